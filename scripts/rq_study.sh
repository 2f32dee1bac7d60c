#!/bin/sh
# The route-quality study of issue 12 with reconstruction (benchmarks/route_quality.py
# --reconstruct): pretrained MobileNetV2 on MultiFashion, then the multi-exit LeNet and the
# MultiFashion LeNet; 3 seeds, 50 % of the FLOPs. Resumable (done routes are skipped); results
# are copied into docs/route_quality_data/ after each recipe (runs/ is not committed).
#
#   nohup nice -n 5 env OMP_NUM_THREADS=1 sh scripts/rq_study.sh > runs/rq/rq.log 2>&1 &
set -u
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/rq}
DOCS=docs/route_quality_data
mkdir -p "$OUT" "$DOCS"
V="raw-importance magnitude group-magnitude learned tp-taylor"
"$PY" benchmarks/route_quality.py --recipe multifashion-mbv2 --n-train 1024 --n-test 300 \
  --epochs 2 --score-batches 4 --finetune-steps 24 --tp-steps 50 --reconstruct --budgets 0.5 \
  --seeds 0 1 2 --variants $V --out "$OUT/lsq_mbv2.jsonl"
cp "$OUT/lsq_mbv2.jsonl" "$DOCS/"
"$PY" benchmarks/route_quality.py --recipe multiexit --reconstruct --budgets 0.5 \
  --seeds 0 1 2 --variants $V --out "$OUT/lsq_r2.jsonl"
cp "$OUT/lsq_r2.jsonl" "$DOCS/"
"$PY" benchmarks/route_quality.py --recipe multifashion --reconstruct --budgets 0.5 \
  --seeds 0 1 2 --variants $V --out "$OUT/lsq_r1.jsonl"
cp "$OUT/lsq_r1.jsonl" "$DOCS/"
