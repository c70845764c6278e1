#!/bin/bash
# The GPU figures of BENCHMARKS.md, in one bounded script (every step under `timeout`, so one
# slow step cannot eat the others' time). Run it from the checkout on a machine with one GPU:
#   launch/gpu_bench.sh [OUT_DIR]                 # default runs/gpu-bench
#   SMOKE=1 launch/gpu_bench.sh /tmp/smoke       # tiny settings on the CPU: checks the script itself
# Writes one JSON and one log per step into OUT_DIR; `iqa-dist bench` prints the tables.
set -u
OUT=${1:-runs/gpu-bench}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOOP_EXTRA=()
if [ "${SMOKE:-0}" = 1 ]; then
    BACKBONE=tiny; PREC=fp32; BATCHES=8,16; STEPS=2; IMAGES=9; LOOP_STEPS=6; COMPILE=""; SCALE_BATCHES=8,16
    LOOP_EXTRA=("--model.backbone_kwargs={embed_dim: 32, depths: [1, 1, 2, 1], num_heads: [1, 2, 4, 8], window_size: 7}"
                --model.img_size=112 --train.batch_size=16 --train.mixed_precision=no)
else
    BACKBONE=swin-t; PREC=bf16; BATCHES=12,24,48,96,192; STEPS=20; IMAGES=96; LOOP_STEPS=400; COMPILE=--compile
    SCALE_BATCHES=12,24,48,96
fi
step() {  # step NAME LIMIT_S COMMAND...: run bounded, keep the log, show its tail
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s" >> "$OUT/$name.log"
    tail -n 25 "$OUT/$name.log"
}
{ nvidia-smi || true; $PY -c "import torch; print(torch.__version__, torch.cuda.is_available())"; } > "$OUT/machine.log" 2>&1

# 1. the real step, model-only step and timm anchor per per-GPU batch (the per-GPU batch table),
#    with the projected time of a KonIQ epoch on 1-8 GPUs
step train-batches 300 $PY -m iqa_dist bench train --backbones $BACKBONE --precisions $PREC --batch $BATCHES \
    --steps $STEPS --images $IMAGES --work-dir "$OUT/work" --output "$OUT/train-batches.json"
# 2. the same at batch 96 with torch.compile (the first step's time is the compilation)
[ -n "$COMPILE" ] && step train-compile 420 $PY -m iqa_dist bench train --backbones $BACKBONE --precisions $PREC \
    --batch 96 --steps $STEPS --images $IMAGES --compile --work-dir "$OUT/work" --output "$OUT/train-compile.json"
# 3. evaluation images/s at 20 patches per image
step eval 240 $PY -m iqa_dist bench eval --batch 96 --steps 8 --images $IMAGES $COMPILE --work-dir "$OUT/work" \
    --output "$OUT/eval.json"
# 4. the real `iqa-dist train` loop on the KonIQ-size images bench made (patches/s from metrics.jsonl)
step real-loop 300 $PY -m iqa_dist train --preset koniq-swin-t --data.root "$OUT/work/koniq" --data.split random \
    --data.cache_dir "$OUT/work/cache" --model.pretrained none --train.max_steps $LOOP_STEPS \
    --train.eval_every $LOOP_STEPS --train.log_every 50 --run.root "$OUT/runs" "${LOOP_EXTRA[@]}"
# 5. scaling: the step per per-process batch and the projection for 1-64 GPUs
step scaling 240 $PY -m iqa_dist bench scaling --backbones $BACKBONE --precisions $PREC --batch $SCALE_BATCHES \
    --steps $STEPS --images $IMAGES --work-dir "$OUT/work" --output "$OUT/scaling.json"
echo "figures in $OUT"
