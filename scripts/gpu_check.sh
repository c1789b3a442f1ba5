#!/usr/bin/env bash
# GPU checks, run on a CUDA machine from the repository root (mupscale needs: torch, mup, typer, rich,
# safetensors, PyYAML, xxhash). Writes logs to $OUT (default ./gpu-out):
#   gpu-tests.log   the `-m gpu` tests
#   drift-cuda.log  verify drift of exact widenings on CUDA, every zoo model x optimizer x dtype
#   bench-cuda.log  verify cost vs training base and wide alone, on CUDA
#   verify-*.json   `mupscale verify --device cuda` of the bundled example
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log"
for dt in float64 float32 bfloat16; do
  python3 -m mupscale_cli verify examples/nanogpt-tiny.pt ${VERIFY_ARGS:-} --device cuda --dtype $dt --steps 200 \
    --json "$OUT/verify-$dt.json" 2>&1 | tail -3
done
python3 scripts/bench_verify.py --part drift --device cuda --drift-steps 200 2>&1 | tee "$OUT/drift-cuda.log"
python3 scripts/bench_verify.py --part bench --device cuda --steps 50 --n-layer 8 --n-embd 512 --block-size 256 \
  --batch-size 32 2>&1 | tee "$OUT/bench-cuda.log"
# verify under torchrun on one GPU: NCCL process group, both models sharded with FSDP2 (one rank)
torchrun --nproc-per-node 1 -m mupscale_cli verify examples/nanogpt-tiny.pt ${VERIFY_ARGS:-} --device cuda \
  --steps 50 --json "$OUT/verify-torchrun.json" 2>&1 | tail -3
