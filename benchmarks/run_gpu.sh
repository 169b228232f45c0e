#!/usr/bin/env bash
# Everything measured on a CUDA machine, in one command: the CUDA tests, bench_gpu.py
# and a variant sweep (default benchmarks/results/variants/gpu_sweep.config.json,
# PARALLEL=5 at once).
# Usage, from the repository root:
#   OUT=runs/gpu CACHE=~/.cache/scribble2label bash benchmarks/run_gpu.sh
#   VARIANTS=benchmarks/results/variants/affinity_sweep.config.json PARALLEL=7 THREADS=2 bash benchmarks/run_gpu.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/gpu}
CACHE=${CACHE:-$HOME/.cache/scribble2label}
mkdir -p "$OUT/ckpt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_losses.py 2>&1 | tail -4
timeout 120 "$PYTHON" benchmarks/bench_gpu.py --cache-dir "$CACHE" --output "$OUT/gpu.json"
VARIANTS=${VARIANTS:-benchmarks/results/variants/gpu_sweep.config.json}
timeout "${SWEEP_S:-330}" "$PYTHON" benchmarks/bench_variants.py "$VARIANTS" \
  --device cuda --parallel "${PARALLEL:-5}" --threads "${THREADS:-3}" --cache-dir "$CACHE" \
  --checkpoints "$OUT/ckpt" --output "$OUT/variants.json"
echo "sweep exit $?"
