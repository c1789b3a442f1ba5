"""Tied readouts. A μP readout (mup's MuSharedReadout, Granite's logits_scaling) divides by the width, so a
tied embedding/readout pair is widened once and stays tied. A standard-parametrization readout sums: its
weight must become E/k while the input embedding stays E, which no tied pair can hold. Then `--untie`
writes a separate readout = E/k (Table 1, readout 'sum') and records the pair as untied; without it,
widening stops (never k × the logits, silently)."""
from __future__ import annotations

from dataclasses import replace

from mupscale_cli.core.source import LazyTensors
from mupscale_cli.core.spec import Spec
from mupscale_cli.errors import MupscaleError


def resolve_ties(spec: Spec, model_args: dict | None, untie: bool) -> tuple[Spec, dict[str, str], list[str]]:
    """(spec with the ties that apply to this checkpoint, {readout: embedding} to write untied, notes)."""
    ties = spec.ties(model_args)
    if spec.readout != "sum" or not ties:
        notes = [f"--untie: nothing to untie (spec {spec.name} keeps its readout exact as it is)"] if untie else []
        return replace(spec, tied=ties), {}, notes
    alias, canon = next(iter(ties.items()))
    if not untie:
        raise MupscaleError(f"{alias} is tied to {canon} and spec {spec.name} is standard parametrization: "
                            f"duplicating a tied summing readout multiplies the logits by k, and no tied pair can "
                            f"be exact; pass --untie to write an untied {alias} = {canon} / k (README: 'Tied "
                            f"embeddings')")
    notes = [f"--untie: {a} written untied as {c} / k" + (f"; {spec.tied_if}: false" if spec.tied_if else "")
             for a, c in ties.items()]
    return replace(spec, tied={}), ties, notes


def add_untied(tensors, original: dict[str, str], pairs: dict[str, str]) -> None:
    """Make each readout of `pairs` readable from its embedding's values, when the file does not hold it."""
    for alias, canon in pairs.items():
        if alias in tensors:
            continue
        if isinstance(tensors, LazyTensors):
            tensors.keys_in_file[alias] = tensors.keys_in_file[canon]
        else:
            tensors[alias] = tensors[canon]
        original[alias] = alias


def untied_args(spec: Spec, model_args: dict | None, pairs: dict[str, str]) -> dict | None:
    if model_args is None or not pairs or spec.tied_if is None:
        return model_args
    return {**model_args, spec.tied_if: False}
