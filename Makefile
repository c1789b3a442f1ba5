# Two commands: `make demo` (install, then widen and check the bundled example) and `make test`.
# PY is the Python that installs and runs everything (.ci/run points it at a fresh virtualenv).
PY ?= python3
OUT ?= out

.PHONY: install demo test bench

install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps mup==1.0.0   # mup's declared deps would pull a CUDA torch
	$(PY) -m pip install -q -e '.[test,hf]'

demo: install
	mkdir -p $(OUT)
	mupscale inspect examples/nanogpt-tiny.pt --k 4 --sigma 0.75
	mupscale widen examples/nanogpt-tiny.pt --k 4 --sigma 0.75 --seed 0 -o $(OUT)/wide.safetensors --force
	mupscale widen examples/nanogpt-tiny.pt --k 4 -o $(OUT)/wide-exact.pt --force
	mupscale inspect $(OUT)/wide.safetensors --k 1 > /dev/null

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) scripts/bench_verify.py
