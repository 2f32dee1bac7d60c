#!/bin/sh
# One CPU worker of the method study (recipes/study.py), tier by tier; start several (nohup, nice,
# one thread each) to share OUT: each run is claimed by a lock file, done runs are skipped, so
# this resumes and extends the study across sessions.
#
#   nohup nice -n 10 env OMP_NUM_THREADS=1 sh scripts/cpu_study.sh > runs/study/w1.log 2>&1 &
#   STUDY=r1-fashionmnist-lenet sh scripts/cpu_study.sh        # the other recipes
#   PHASE=matched sh scripts/cpu_study.sh                       # then: baselines given drmgf's passes
#
# Tier 1 (what the headline comparisons need): single-task nets, equal weighting and its
# learning-rate sweep (tuned-equal), drmgf, drmgf-step; tier 2 every other registered baseline;
# tier 3 drmgf-step's fusion options; seeds 0-2 first, then 3-4. Copy OUT/runs.jsonl over
# docs/study/runs.jsonl and commit as runs finish (runs/ is lost with the checkout).
set -u
PY=${PY:-.venv/bin/python}
STUDY=${STUDY:-r1-fashion-lenet}
OUT=${OUT:-runs/study}
PHASE=${PHASE:-epoch}
S="--study $STUDY --out $OUT --phase $PHASE"
# runs/ is not committed: a fresh checkout resumes from the committed rows
mkdir -p "$OUT"
if [ ! -s "$OUT/runs.jsonl" ] && [ -s docs/study/runs.jsonl ]; then
  cp docs/study/runs.jsonl "$OUT/runs.jsonl"
fi
if [ "$STUDY" = r2-fashion-lenet ]; then
  SINGLES="single:exit0 single:exit1 single:exit2 single:coarse"
else
  SINGLES="single:left single:right"
fi
T1="$SINGLES equal equal:lr=0.0003 equal:lr=0.003 drmgf drmgf-step"
T2=$("$PY" -c "import routesurgeon as rs; print(' '.join(m for m in rs.available_methods() if m not in ('equal', 'drmgf', 'drmgf-step')))")
T3="drmgf-step:uniform_mix=0.5 drmgf-step:warmup_steps=235 drmgf-step:ema=0.99 drmgf-step:importance=gated"
"$PY" recipes/study.py $S --methods $T1 --seeds 0 1 2
for m in $T2; do  # method by method: a stopped session leaves whole methods (3 seeds)
  "$PY" recipes/study.py $S --methods "$m" --seeds 0 1 2
done
"$PY" recipes/study.py $S --methods $T3 --seeds 0 1 2
"$PY" recipes/study.py $S --methods $T1 $T2 $T3 --seeds 3 4
