#!/bin/bash
# Train on this machine's GPUs (all of them by default) without a scheduler:
#   launch/local.sh koniq-swin-t --data.root=/data/koniq
#   GPUS=1 launch/local.sh koniq-swin-t ...        # one GPU
#   CPU_PROCESSES=2 launch/local.sh demo             # two CPU processes (gloo), no GPU needed
# Interrupted runs continue with:  launch/local.sh PRESET ... --resume auto
set -euo pipefail
PRESET=${1:?usage: launch/local.sh PRESET [--section.field=value ...]}
shift
ACCELERATE=${ACCELERATE:-accelerate}
PORT=${PORT:-29500}
if [ -n "${CPU_PROCESSES:-}" ]; then
    MODE="--multi_gpu --num_processes $CPU_PROCESSES"            # gloo on CPU
else
    GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
    if [ "${GPUS:-0}" -gt 1 ]; then MODE="--multi_gpu --num_processes $GPUS"; else MODE="--num_processes 1"; fi
fi
exec $ACCELERATE launch $MODE --num_machines 1 --main_process_port "$PORT" --mixed_precision no \
    -m iqa_dist train --preset "$PRESET" "$@"
