#!/bin/bash
# The GPU figures of BENCHMARKS.md, in one bounded script: run it first whenever a GPU is lent.
#   launch/gpu_bench.sh [OUT_DIR]                 # default runs/gpu-bench; at most DEADLINE (8 min)
#   SMOKE=1 launch/gpu_bench.sh /tmp/smoke       # tiny settings on the CPU: checks the script itself
#   STEPS="kernels real-eager" DEADLINE=300 launch/gpu_bench.sh OUT   # some steps, a total budget
# Every step runs under `timeout`, and no step starts with less than 30 s of DEADLINE (seconds,
# default 480) left, so one slow step cannot eat the others' time. Steps, most important first:
#   graph          `bench graph`: train.cuda_graph (the step captured once, replayed) vs eager at batch
#                  12..192, host and wall ms per step, capture time, peak memory; 50 graphed steps'
#                  losses and weights against the same steps eager
#   kernels        the kernel budget (device kernels and syncs per step: real step, model only,
#                  timm anchor, the graphed body) and 20 real steps at batch 96 under
#                  set_sync_debug_mode("error")
#   real-eager     `iqa-dist train`, koniq-swin-t, batch 96, 300 steps: patches/s from metrics.jsonl
#   real-graphed   the same with train.cuda_graph
#   gpu-tests      the tests that skip without CUDA (tests/test_graph.py: capture, replay, equality)
#   profile        `bench profile --compile`: torch.profiler over 5 steady steps at batch 96, eager,
#                  compiled and graphed: host and device ms per part, device idle per step; dynamo's
#                  counters, and TORCH_LOGS=recompiles,graph_breaks,cudagraphs in its log
#   real-compiled  the real loop with train.compile (one cold compile; the second window is steady state)
#   batches        `bench train` at batch 12..192: end to end, model only, anchor, MFU, peak memory
#   scaling        `bench scaling`: the step per per-process batch and the projection to 1-64 GPUs
#   eval           `bench eval`: evaluation images/s at 20 patches per image
#   predict        `bench predict`: predict's images/s before and after decoding in workers (and JPEGs
#                  on the GPU under the grid protocol), the model alone, decoding alone
# Writes one JSON and one log per step into OUT_DIR, then gpu-bench.json and gpu-bench.md (the
# markdown table BENCHMARKS.md takes as it is) from `iqa-dist bench summary`.
set -u
OUT=${1:-runs/gpu-bench}
PY=${PYTHON:-python3}
STEPS=${STEPS:-graph kernels real-eager real-graphed gpu-tests profile real-compiled batches scaling eval predict}
DEADLINE=${DEADLINE:-480}
mkdir -p "$OUT"
export COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
TINY=()
if [ "${SMOKE:-0}" = 1 ]; then
    BACKBONE=tiny; PREC=fp32; BATCHES=8,16; STEPS_N=2; IMAGES=9; LOOP=6; BATCH=16; SYNC_BATCH=8; PREDICT_WORKERS=2
    DEMO_SWIN=$($PY -c 'import json; from iqa_dist.config import load_config; print(json.dumps(load_config("demo").model.backbone_kwargs))')
    TINY=("--model.backbone_kwargs=$DEMO_SWIN"
          --model.img_size=112 --train.batch_size=16 --train.mixed_precision=no --train.compile_backend=aot_eager)
else
    BACKBONE=swin-t; PREC=bf16; BATCHES=12,24,48,96,192; STEPS_N=20; IMAGES=96; LOOP=300; BATCH=96; SYNC_BATCH=96; PREDICT_WORKERS=8
fi
step() {  # step NAME LIMIT_S COMMAND...: run bounded (by LIMIT_S and what is left of DEADLINE), keep the log
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return ;; esac
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 30 ]; then echo "== $name: skipped, ${left} s of the deadline left" | tee "$OUT/$name.log"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (at most ${limit} s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s" >> "$OUT/$name.log"
    tail -n 25 "$OUT/$name.log"
}
{ nvidia-smi || true; $PY -c "import torch; print(torch.__version__, torch.cuda.is_available())"; } > "$OUT/machine.log" 2>&1
WORK=(--images $IMAGES --work-dir "$OUT/work")
LOOP_ARGS=(--preset koniq-swin-t --data.root "$OUT/work/koniq" --data.split random --data.cache_dir "$OUT/work/cache"
           --model.pretrained none --train.max_steps $LOOP --train.eval_every $((LOOP / 2)) --train.log_every 50)

step graph 200 env CUBLAS_WORKSPACE_CONFIG=:4096:8 $PY -m iqa_dist bench graph --backbones $BACKBONE --precisions $PREC --batch $BATCHES --steps $STEPS_N \
    --check-steps 50 "${WORK[@]}" --output "$OUT/graph.json"
step kernels 150 $PY -m iqa_dist bench kernels --backbones swin-t --batch $SYNC_BATCH --steps 20 "${WORK[@]}" \
    --output "$OUT/kernels.json"
step real-eager 150 $PY -m iqa_dist train "${LOOP_ARGS[@]}" --run.root "$OUT/runs-eager" "${TINY[@]}"
step real-graphed 150 $PY -m iqa_dist train "${LOOP_ARGS[@]}" --train.cuda_graph true --run.root "$OUT/runs-graphed" \
    "${TINY[@]}"
step gpu-tests 120 env CUBLAS_WORKSPACE_CONFIG=:4096:8 $PY -m pytest -q -rs -p no:cacheprovider tests/test_graph.py -k gpu_
step profile 240 env TORCH_LOGS=recompiles,graph_breaks,cudagraphs $PY -m iqa_dist bench profile --backbones $BACKBONE \
    --precisions $PREC --batch $BATCH --steps 5 --compile "${WORK[@]}" --output "$OUT/profile.json"
step real-compiled 330 $PY -m iqa_dist train "${LOOP_ARGS[@]}" --train.compile true --run.root "$OUT/runs-compiled" \
    "${TINY[@]}"
step batches 180 $PY -m iqa_dist bench train --backbones $BACKBONE --precisions $PREC --batch $BATCHES \
    --steps $STEPS_N "${WORK[@]}" --output "$OUT/batches.json"
step scaling 120 $PY -m iqa_dist bench scaling --backbones $BACKBONE --precisions $PREC --batch ${BATCHES%,192} \
    --steps $STEPS_N "${WORK[@]}" --output "$OUT/scaling.json"
step eval 90 $PY -m iqa_dist bench eval --batch $BATCH --steps 8 "${WORK[@]}" --output "$OUT/eval.json"
step predict 120 $PY -m iqa_dist bench predict --workers $PREDICT_WORKERS --steps 4 "${WORK[@]}" \
    --output "$OUT/predict.json"
$PY -m iqa_dist bench summary --work-dir "$OUT" --output "$OUT/gpu-bench.json" > "$OUT/gpu-bench.md" 2> "$OUT/summary.log"
cat "$OUT/gpu-bench.md"
echo "figures in $OUT (total $SECONDS s)"
