#!/usr/bin/env bash
# The generalization benchmark's training jobs on a CUDA machine, in one command, with a
# prepared dataset carried along (DATASET). Jobs that finish before BUDGET_S seconds are
# kept; a later run resumes the others. ONLY names the variants to run (default: every
# variant of VARIANTS), PRESETS the prediction settings scored. Usage, from the
# repository root:
#   OUT=runs/gpu DATASET=~/.cache/scribble2label/bbbc038 bash benchmarks/run_generalization_gpu.sh
# On a machine the working tree travels to, carry the fluorescence part of the dataset
# (about 50 MiB; made here by `python benchmarks/carry_dataset.py runs/carry/bbbc038`):
#   ONLY="s2l pce" OUT=runs/gpu DATASET=runs/carry/bbbc038 bash benchmarks/run_generalization_gpu.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/gpu}
WORK=${WORK:-$OUT/work}
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
timeout "${BUDGET_S:-450}" "$PYTHON" benchmarks/bench_generalization.py run \
  "${VARIANTS:-benchmarks/results/generalization/generalization.config.json}" --device ${DEVICE:-cuda} \
  --parallel "${PARALLEL:-14}" --threads "${THREADS:-1}" --dataset "$DATASET" --work "$WORK" \
  --presets ${PRESETS:-plain default auto_tta_t0.5} ${ONLY:+--only $ONLY} --no-shifts
echo "run exit $?"
tar czf "$OUT/jobs.tgz" -C "$WORK" jobs
# The weights come back in files of at most 16 MiB: in-distribution networks per seed,
# then the held-out folds' networks of the two Scribble2Label variants (seed 0).
for seed in 0 1; do
  (cd "$WORK" && ls ckpt/s2l*in-distribution__s$seed.pt 2>/dev/null | tar cf "$OUT/ckpt_s$seed.tar" -T -)
done
for v in s2l s2l-robust; do
  (cd "$WORK" && ls ckpt/${v}__fluorescence__*__s0.pt 2>/dev/null | grep -v in-distribution |
    tar cf "$OUT/ckpt_folds_$v.tar" -T -)
done
ls -la "$OUT"
