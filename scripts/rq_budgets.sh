#!/bin/sh
# The route-quality study of issue 12 at 25 % and 75 % of the FLOPs (50 % is scripts/rq_study.sh),
# re-fitted (--reconstruct) and fine-tuned at every budget, 1000 test images (300 made the 50 %
# study noisy): multi-exit, MultiFashion resnet18, the pretrained O-Net (0.25 / 0.5 / 0.75, face
# task), then the pretrained MobileNetV2. 3 seeds. Resumable: a fresh checkout starts from the
# rows in docs/route_quality_data/ (runs/ is not committed) and copies each file back when its
# recipe is done.
#
#   nohup nice -n 10 env OMP_NUM_THREADS=1 sh scripts/rq_budgets.sh > runs/rq/budgets.log 2>&1 &
set -u
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/rq}
DOCS=docs/route_quality_data
mkdir -p "$OUT" "$DOCS"
V="--seeds 0 1 2 --variants raw-importance group-magnitude magnitude tp-taylor taylor"
C="--n-test 1000 --score-batches 4 --finetune-steps 24 --tp-steps 50 --reconstruct"
B="$C --n-train 1024 --epochs 2 --budgets 0.25 0.75 --finetune-budgets 0.25 0.75"
run() {  # name, then the benchmark's arguments
  name=$1; shift
  [ -s "$OUT/$name.jsonl" ] || [ ! -s "$DOCS/$name.jsonl" ] || cp "$DOCS/$name.jsonl" "$OUT/"
  "$PY" benchmarks/route_quality.py "$@" --out "$OUT/$name.jsonl" && cp "$OUT/$name.jsonl" "$DOCS/"
}
run budgets_r2 --recipe multiexit $B $V
run budgets_r1 --recipe multifashion $B $V
run onet_lsq --recipe onet $C --epochs 6 --tasks face --budgets 0.25 0.5 0.75 \
  --finetune-budgets 0.25 0.5 0.75 $V
run budgets_mbv2 --recipe multifashion-mbv2 $B --finetune-lr 1e-4 $V
