#!/usr/bin/env bash
# Every GPU path of segray in one command, on a one-GPU machine, in under ~8 minutes:
#   1. model-only, no Ray (gpu_steps.py): AMP training steps and forward passes of U-Net,
#      an smp U-Net/ResNet-18 and Mask R-CNN, fp32 vs mixed precision;
#   2. U-Net image pipeline vs model-only vs plain loop (infer_throughput.py, one actor per GPU);
#   3. Mask R-CNN pipeline vs model-only (maskrcnn_throughput.py);
#   4. one 8,000² scene through segment-scenes on the GPU (scene_memory.py; blend: core, row bands).
# Steps 2-4 need Ray; where `import ray` fails they are skipped with a line saying so, and
# step 1 still runs. Each step has its own time limit; a step that fails or times out is
# reported and the next one runs. Figures are printed, never asserted; copy them into
# benchmarks/README.md.
#
#   benchmarks/gpu_check.sh                 # PYTHON=.venv/bin/python by default
#   DEVICE=cpu SMOKE=1 benchmarks/gpu_check.sh   # a tiny run of the same steps on a CPU machine
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/segray-gpu-check}
mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then
  STEPS=(--size 64 --steps 2 --batch-size 4); INFER=(--num-images 40 --model-only-images 16 --size 64)
  MRCNN=(--num-images 4 --size 128); SCENE=(--size 1024); L1=300; L2=300; L3=300; L4=300
else
  STEPS=(--size 512 --steps 20 --batch-size 16); INFER=(--num-images 2000 --batch-size 64)
  MRCNN=(--num-images 96 --batch-size 8); SCENE=(--size 8000); L1=90; L2=150; L3=100; L4=130  # 7.8 min at most
fi
GPUS=0; [ "$DEVICE" = cuda ] && GPUS=1

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT, say how it ended
  local name=$1 limit=$2; shift 2
  echo "== $name"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -E ' INFO |UserWarning|warnings\.warn|^\s*$' "$OUT/$name.log" | tail -n 25  # figures, not Ray's progress
  if [ $rc -eq 0 ]; then echo "-- $name: done in $((SECONDS - t0)) s (log: $OUT/$name.log)"
  elif [ $rc -eq 124 ]; then echo "-- $name: TIMED OUT after ${limit} s (log: $OUT/$name.log)"
  else echo "-- $name: FAILED, exit $rc (log: $OUT/$name.log)"; fi
}

"$PY" -c "import torch; print('torch', torch.__version__, '| cuda available:', torch.cuda.is_available(), \
  '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
step model-only "$L1" "$PY" benchmarks/gpu_steps.py --device "$DEVICE" "${STEPS[@]}"
if "$PY" -c "import ray" 2>/dev/null; then
  step unet-pipeline "$L2" "$PY" benchmarks/infer_throughput.py --device "$DEVICE" "${INFER[@]}" \
    --workdir "$OUT/infer"
  step maskrcnn-pipeline "$L3" "$PY" benchmarks/maskrcnn_throughput.py --device "$DEVICE" "${MRCNN[@]}" \
    --workdir "$OUT/maskrcnn"
  step scene "$L4" "$PY" benchmarks/scene_memory.py "${SCENE[@]}" --num-gpus-per-actor "$GPUS" \
    --num-actors 1 --blend core --workdir "$OUT/scene"
else
  echo "== Ray is not importable here: the pipeline steps (U-Net, Mask R-CNN, scene) are skipped"
fi
echo "== gpu_check: finished in $SECONDS s; logs in $OUT"
