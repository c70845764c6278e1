#!/bin/bash
# A real SLURM on this one machine, for the tests of the SLURM scripts (and for trying them out).
# As root (sudo if you are not):
#   launch/local_slurm.sh start     # install Debian's slurmctld, slurmd, munge if missing; start
#   launch/local_slurm.sh stop      # stop the daemons it started and remove its state
#   launch/local_slurm.sh status    # exit 0 when it answers
#   launch/local_slurm.sh conf      # print the SLURM_CONF path its clients use
# Two simulated nodes, n1 and n2: two slurmd on 127.0.0.1 that each declare 64 CPUs and 8 GPUs
# (config_overrides: the declared, not the real, hardware), so the scripts' own #SBATCH requests
# are granted as on a GPU node; the processes then share this machine's cores and run on the CPU.
# One partition `debug`, no accounting. All four commands are idempotent.
#
# Everything it writes is in its state folder ($IQA_DIST_SLURM_DIR, default /tmp/iqa-dist-slurm):
# slurm.conf and gres.conf, its own munged (key, socket, pid), the daemons' state, pid files and
# logs. Nothing under /etc is written (`stop` removes what an earlier version wrote there) and no
# system daemon is used or stopped: every daemon and client of this SLURM finds its config
# through SLURM_CONF=$STATE/slurm.conf, and a client without it (an `sinfo` on a cluster's login
# node) keeps talking to the machine's own SLURM, if any. Its ports (controller $PORT, the nodes'
# $PORT+1 and $PORT+2; IQA_DIST_SLURM_PORT, default 16817) are not SLURM's defaults (6817, 6818),
# so it runs beside a real one too.
set -euo pipefail
STATE=${IQA_DIST_SLURM_DIR:-/tmp/iqa-dist-slurm}
PORT=${IQA_DIST_SLURM_PORT:-16817}
export SLURM_CONF=$STATE/slurm.conf
MARK="# written by iqa-dist launch/local_slurm.sh"
DAEMONS="slurmctld slurmd-n1 slurmd-n2 munged"  # their pid files, $STATE/NAME.pid

answers() { [ -f "$SLURM_CONF" ] && grep -qF "$MARK" "$SLURM_CONF" && timeout 5 sinfo -h >/dev/null 2>&1; }

# The pid in $STATE/NAME.pid when that process is still the daemon it names (a pid file outlives
# its process, and the number may since belong to another program).
live_pid() {
    local file=$STATE/$1.pid pid
    [ -s "$file" ] || return 1
    pid=$(cat "$file")
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${1%-n[12]}" ] && echo "$pid"
}

stop() {
    local pids="" pid name
    for name in $DAEMONS; do
        pid=$(live_pid "$name") && { kill "$pid" 2>/dev/null || true; pids="$pids $pid"; }
    done
    for _ in $(seq 1 100); do  # until they have gone (at most 10 s), then what is left is killed
        pid=""
        for p in $pids; do kill -0 "$p" 2>/dev/null && pid=$p; done
        [ -z "$pid" ] && break
        sleep 0.1
    done
    for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
    rm -rf "$STATE"
    # an earlier version of this script wrote its config to /etc/slurm: its files (marked) go too,
    # or a plain `sinfo` keeps asking a controller that is gone
    for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
        if [ -f "$f" ] && grep -qF "$MARK" "$f"; then rm -f "$f"; fi
    done
}

start() {
    if answers; then echo "local SLURM: already running (SLURM_CONF=$SLURM_CONF)"; return; fi
    if [ "$(id -u)" != 0 ]; then echo "local SLURM: run it as root (sudo if you are not)" >&2; exit 1; fi
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
            || ! command -v sbatch >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null
    fi
    stop  # a half-started one's leftovers
    mkdir -p -m 755 "$STATE" "$STATE/ctld" "$STATE/d-n1" "$STATE/d-n2" "$STATE/munge"
    # its own munged: its own key and socket (the machine's munged and /etc/munge are not used);
    # munged wants the socket's folder open to all and the key readable by its owner only
    dd if=/dev/urandom bs=1 count=1024 of="$STATE/munge.key" 2>/dev/null
    chmod 400 "$STATE/munge.key"
    munged --socket="$STATE/munge/socket" --key-file="$STATE/munge.key" --pid-file="$STATE/munged.pid" \
        --log-file="$STATE/munged.log" --seed-file="$STATE/munged.seed"
    # stand-ins for 8 GPU device files (the null device's numbers): GRES must name files to count them
    for i in 0 1 2 3 4 5 6 7; do mknod "$STATE/gpu$i" c 1 3; done
    # gres.conf is read from slurm.conf's folder
    cat > "$STATE/gres.conf" <<EOF
$MARK
NodeName=n[1-2] Name=gpu File=$STATE/gpu[0-7]
EOF
    # Requeue and restart latency (the tests requeue a job): a requeued job may start again only
    # once its credential expired (cred_expire + 1 s), so cred_expire is short; the backfill and
    # main schedulers look every second; KillWait bounds how long a stopped step may linger.
    cat > "$SLURM_CONF" <<EOF
$MARK
ClusterName=iqa-local
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/socket,cred_expire=5
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
ReturnToService=2
SlurmdParameters=config_overrides
GresTypes=gpu
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
NodeName=n[1-2] NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$((PORT + 1))-$((PORT + 2)) CPUs=64 Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP
EOF
    slurmctld -c -f "$SLURM_CONF"
    slurmd -N n1 -f "$SLURM_CONF"
    slurmd -N n2 -f "$SLURM_CONF"
    for _ in $(seq 1 60); do
        if [ "$(sinfo -h -o %t 2>/dev/null | sort -u)" = "idle" ]; then
            echo "local SLURM: n1, n2 idle; its clients need SLURM_CONF=$SLURM_CONF"
            return
        fi
        sleep 0.5
    done
    echo "local SLURM: the nodes did not come up; see $STATE/*.log" >&2
    exit 1
}

case "${1:-}" in
    start) start ;;
    stop) stop; echo "local SLURM: stopped" ;;
    status) answers ;;
    conf) echo "$SLURM_CONF" ;;
    *) echo "usage: launch/local_slurm.sh start|stop|status|conf" >&2; exit 2 ;;
esac
