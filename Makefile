# Two commands: `make demo` (install, widen the bundled example, verify the widening) and `make test`.
# PY is the Python that installs and runs everything: the active virtualenv's python3 by default
# (.ci/run points it at a fresh virtualenv). Every command runs as `$(PY) -m mupscale_cli`, so nothing
# depends on PATH: `make demo PY=venv/bin/python` works without activating the virtualenv.
PY ?= python3
OUT ?= out
MUPSCALE = $(PY) -m mupscale_cli

.PHONY: install demo test bench

# torch==2.13.0 is whatever build the package index serves: on Linux x86-64 the CUDA one (~2.7 GB). For the
# CPU build install it first: `$(PY) -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu`
# (the line below then finds it installed). mup comes last and with --no-deps: its declared dependencies
# (torchvision, pandas, seaborn) serve only its plots and would pull a second torch; with --no-deps pip skips
# its dependency check, which would otherwise print "ERROR: ... mup 1.0.0 requires pandas, which is not
# installed" although the installation succeeded.
install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,hf]'
	$(PY) -m pip install -q --no-deps mup==1.0.0

# Widen the bundled nanoGPT checkpoint (μP GPT-2, n_embd 32, trained with AdamW) 4× with its optimizer state,
# then train base and wide side by side for 30 steps: verify exits 1 (and make stops) unless they agree.
demo: install
	mkdir -p $(OUT)
	$(MUPSCALE) widen examples/nanogpt-tiny.pt --k 4 -o $(OUT)/wide.safetensors --force --json > $(OUT)/widen.json
	$(MUPSCALE) verify examples/nanogpt-tiny.pt $(OUT)/wide.safetensors --steps 30 --json $(OUT)/verify.json
	@$(PY) scripts/demo_summary.py $(OUT)/widen.json $(OUT)/verify.json

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) scripts/bench_verify.py
