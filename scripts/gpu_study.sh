#!/bin/sh
# The method study at a larger budget on one GPU, from one command (docs/results.md):
# recipe 1, MultiFashion (60k train / 10k val / 10k test canvases), timm resnet18 at 36 px,
# 30 epochs, batch 512, every method, 3 seeds, data resident on the GPU, the Trainer's
# precision="bf16" where the method allows it (a refusal is recorded and the run is float32).
# Sized from an estimate, not a measurement: no GPU was available when it was written; run
#   .venv/bin/python recipes/study.py --gpu-preset --estimate
# first on the GPU to see the per-run times.
#
#   sh scripts/gpu_study.sh [OUT]          # default OUT: runs/gpu-study
#   WORKERS=4 sh scripts/gpu_study.sh      # parallel workers sharing the GPU (default 8)
#
# The workers share OUT/runs.jsonl (each run claimed by a lock file); none starts a run that the
# runs so far say would end after DEADLINE_MIN (default 7.5) minutes, so the command ends within
# 8 minutes; running it again continues where it stopped. Tables:
#   .venv/bin/python recipes/tables.py study OUT/runs.jsonl --png OUT/curves.png
set -eu
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/gpu-study}
WORKERS=${WORKERS:-8}
DEADLINE_MIN=${DEADLINE_MIN:-7.5}
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script needs one GPU')"
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name())" | tee "$OUT/gpu.txt"
i=0
while [ "$i" -lt "$WORKERS" ]; do
  OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore "$PY" recipes/study.py --gpu-preset --out "$OUT" \
    --deadline-min "$DEADLINE_MIN" ${STUDY_ARGS:-} > "$OUT/worker$i.log" 2>&1 &
  i=$((i + 1))
  sleep 2
done
wait
"$PY" recipes/tables.py study "$OUT/runs.jsonl" --png "$OUT/curves.png" > "$OUT/tables.md"
cat "$OUT/tables.md"
