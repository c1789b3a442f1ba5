"""Reference μP models that `mupscale verify` and the tests train. Each module defines
`build(model_args, base_args=None)`, `batch(model_args, batch_size, generator, dtype)`,
`loss(model, inputs, targets)` and `output(model, inputs)`, plus `DEFAULT_ARGS`."""
