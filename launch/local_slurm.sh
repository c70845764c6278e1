#!/bin/bash
# A real SLURM on this one machine, for the tests of the SLURM scripts (and for trying them out):
#   sudo launch/local_slurm.sh start     # install Debian's slurmctld, slurmd, munge if missing; start
#   sudo launch/local_slurm.sh stop      # stop it and remove its state
#   launch/local_slurm.sh status         # exit 0 when it answers
# Two simulated nodes, n1 and n2: two slurmd on 127.0.0.1 that each declare 64 CPUs and 8 GPUs
# (config_overrides: the declared, not the real, hardware), so the scripts' own #SBATCH requests
# are granted as on a GPU node; the processes then share this machine's cores and run on the CPU.
# One partition `debug`, no accounting. A requeued job may start again after ~10 s (cred_expire=10,
# backfill every second). All three commands are idempotent.
# It writes /etc/slurm/slurm.conf, and refuses to replace one it did not write: on a machine with
# a SLURM of its own, use that.
set -euo pipefail
STATE=${IQA_DIST_SLURM_DIR:-/tmp/iqa-dist-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by iqa-dist launch/local_slurm.sh"

answers() { timeout 5 sinfo -h >/dev/null 2>&1; }

stop() {
    for pid in "$STATE"/*.pid; do
        [ -e "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
    done
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    sleep 1
    rm -rf "$STATE"
}

start() {
    if answers; then echo "local SLURM: already running"; return; fi
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null
    fi
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        echo "local SLURM: $CONF exists and is not ours; this machine has a SLURM of its own" >&2
        exit 1
    fi
    stop
    mkdir -p "$STATE/ctld" "$STATE/d-n1" "$STATE/d-n2" /run/munge /etc/slurm
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
    chown munge:munge /etc/munge/munge.key /run/munge && chmod 400 /etc/munge/munge.key
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
    # stand-ins for 8 GPU device files (the null device's numbers): GRES must name files to count them
    for i in 0 1 2 3 4 5 6 7; do mknod "$STATE/gpu$i" c 1 3; done
    cat > /etc/slurm/gres.conf <<EOF
$MARK
NodeName=n[1-2] Name=gpu File=$STATE/gpu[0-7]
EOF
    cat > "$CONF" <<EOF
$MARK
ClusterName=iqa-local
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
ReturnToService=2
SlurmdParameters=config_overrides
GresTypes=gpu
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
NodeName=n[1-2] NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=17001-17002 CPUs=64 Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP
EOF
    slurmctld -c
    slurmd -N n1
    slurmd -N n2
    for _ in $(seq 1 60); do
        if [ "$(sinfo -h -o %t 2>/dev/null | sort -u)" = "idle" ]; then echo "local SLURM: n1, n2 idle"; return; fi
        sleep 0.5
    done
    echo "local SLURM: the nodes did not come up; see $STATE/*.log" >&2
    exit 1
}

case "${1:-}" in
    start) start ;;
    stop) stop; echo "local SLURM: stopped" ;;
    status) answers ;;
    *) echo "usage: launch/local_slurm.sh start|stop|status" >&2; exit 2 ;;
esac
