#!/bin/sh
# The route-quality study of issue 12 with reconstruction (benchmarks/route_quality.py
# --reconstruct; torch-pruning's copies are re-fitted too): pretrained MobileNetV2 on
# MultiFashion, then the multi-exit and MultiFashion resnet18 recipes; 3 seeds, 50 % of the
# FLOPs. Resumable (done routes are skipped); results are copied into docs/route_quality_data/
# after each recipe (runs/ is not committed).
#
#   nohup nice -n 5 env OMP_NUM_THREADS=1 sh scripts/rq_study.sh > runs/rq/rq.log 2>&1 &
set -u
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/rq}
DOCS=docs/route_quality_data
mkdir -p "$OUT" "$DOCS"
V="raw-importance magnitude group-magnitude learned tp-taylor"
# the sizes of docs/results.md's route-quality study (the `small` budget)
B="--n-train 1024 --n-test 300 --epochs 2 --score-batches 4 --finetune-steps 24 --tp-steps 50"
# a worker already on a recipe (a resumed session): wait for it, then resume its file
while pgrep -f "benchmarks/route_quality.py" > /dev/null; do sleep 30; done
"$PY" benchmarks/route_quality.py --recipe multifashion-mbv2 $B --reconstruct --budgets 0.5 \
  --seeds 0 1 2 --variants $V --out "$OUT/lsq_mbv2.jsonl"
cp "$OUT/lsq_mbv2.jsonl" "$DOCS/"
"$PY" benchmarks/route_quality.py --recipe multiexit $B --reconstruct --budgets 0.5 \
  --seeds 0 1 2 --variants $V --out "$OUT/lsq_r2.jsonl"
cp "$OUT/lsq_r2.jsonl" "$DOCS/"
"$PY" benchmarks/route_quality.py --recipe multifashion $B --reconstruct --budgets 0.5 \
  --seeds 0 1 2 --variants $V --out "$OUT/lsq_r1.jsonl"
cp "$OUT/lsq_r1.jsonl" "$DOCS/"
# fine-tuning after the re-fit at a small learning rate, with two more criteria
"$PY" benchmarks/route_quality.py --recipe multifashion-mbv2 $B --reconstruct --budgets 0.5 \
  --seeds 0 1 2 --variants $V taylor --finetune-lr 1e-4 --out "$OUT/lsq_mbv2_lr1e-4.jsonl"
cp "$OUT/lsq_mbv2_lr1e-4.jsonl" "$DOCS/"
