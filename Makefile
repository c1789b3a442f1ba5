# Two commands: `make demo` (install, widen the bundled example, verify it) and `make test`.
# PY is the Python that installs and runs everything: a virtualenv's (README, "Install"); .ci/run points it at a
# fresh one. Every step runs `$(PY) -m mupscale_cli`, so the venv need not be activated.
PY ?= python3
OUT ?= out
MUPSCALE = $(PY) -m mupscale_cli

.PHONY: install demo test bench

install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,hf]'
	# mup last, without its declared dependencies (torchvision, pandas, seaborn: plots only, and a CUDA torch);
	# pip's resolver then has nothing to complain about
	$(PY) -m pip install -q --no-deps mup==1.0.0 2>&1 | grep -v "dependency conflicts\|^mup 1.0.0 requires\|resolver does not" || true

demo: install
	mkdir -p $(OUT)
	$(MUPSCALE) inspect examples/nanogpt-tiny.pt --k 4 --sigma 0.75 > /dev/null
	$(MUPSCALE) widen examples/nanogpt-tiny.pt --k 4 --sigma 0.75 --seed 0 -o $(OUT)/wide.safetensors --force
	$(MUPSCALE) widen examples/nanogpt-tiny.pt --k 4 -o $(OUT)/wide-exact.pt --force
	$(MUPSCALE) verify examples/nanogpt-tiny.pt $(OUT)/wide-exact.pt --steps 50 -q
	@echo "demo: widened examples/nanogpt-tiny.pt x4 into $(OUT)/ and verified it trains in lockstep with the base"

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) scripts/bench_verify.py
