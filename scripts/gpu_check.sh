#!/bin/sh
# GPU check of issue 13, one command, under 5 minutes on one GPU:
#   1. the tests marked `cuda` (every path on the GPU: instrument, every method in float32, bf16
#      and fp16, checkpoint/resume, export, saving, the report's latency naming the device,
#      torch.compile), which skip on a machine without one;
#   2. benchmarks/gpu_step_bench.py: a summed-loss step, drmgf-step, pcgrad and a drmgf epoch on
#      a timm resnet50 with three heads at 224 px, batch 64, T = 3, ratios measured in one run,
#      in float32 and under bf16 autocast;
#   3. benchmarks/compile_bench.py on the GPU (compiled vs eager step of equal and drmgf-step).
# Output: OUT/ (default runs/gpu-check): cuda_tests.log, step_fp32.txt, step_bf16.txt,
# compile.txt. Written without a GPU to run it on (none was available this session).
#
#   sh scripts/gpu_check.sh [OUT]
#   sh scripts/gpu_check.sh --cpu-tiny [OUT]   # the same commands in a seconds-long CPU form
set -eu
PY=${PY:-.venv/bin/python}
if [ "${1:-}" = "--cpu-tiny" ]; then
  OUT=${2:-runs/gpu-check-tiny}
  mkdir -p "$OUT"
  "$PY" -m pytest -q -n 0 -m cuda tests/test_cuda.py > "$OUT/cuda_tests.log" 2>&1 || {
    tail -20 "$OUT/cuda_tests.log"; exit 1; }
  "$PY" benchmarks/gpu_step_bench.py --device cpu --tiny | tee "$OUT/step_fp32.txt"
  exit 0
fi
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script needs one GPU (or pass --cpu-tiny)')"
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)" | tee "$OUT/gpu.txt"
START=$(date +%s)
# time caps (seconds) keep the whole command under 5 minutes: 110 + 70 + 50 + 60
PYTHONWARNINGS=ignore timeout 110 "$PY" -m pytest -q -n 0 -m cuda tests/test_cuda.py -rs \
  > "$OUT/cuda_tests.log" 2>&1 && echo "cuda tests: passed" || { echo "cuda tests: FAILED"; tail -30 "$OUT/cuda_tests.log"; }
PYTHONWARNINGS=ignore timeout 70 "$PY" benchmarks/gpu_step_bench.py --device cuda | tee "$OUT/step_fp32.txt"
PYTHONWARNINGS=ignore timeout 50 "$PY" benchmarks/gpu_step_bench.py --device cuda --precision bf16 \
  --rounds 5 --epoch-batches 5 | tee "$OUT/step_bf16.txt"
PYTHONWARNINGS=ignore timeout 60 "$PY" benchmarks/compile_bench.py --device cuda --batch 64 \
  --size 112 --rounds 5 --methods drmgf-step | tee "$OUT/compile.txt" \
  || echo "compile bench: did not finish in 60 s"
echo "gpu_check: $(( $(date +%s) - START )) s"
