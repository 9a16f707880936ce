#!/usr/bin/env bash
# A two-node Slurm cluster on the nodes of launch/multinode/nodes.sh: slurmctld on node 1, a
# slurmd on each node (its own hostname and address), a munged per node with one shared key.
# Daemons keep their spool, state and sockets in their node's own /tmp; logs and slurm.conf are
# in <THANN_NODES_DIR>/slurm, which every node sees. Commands (sbatch, squeue, scontrol) run on a
# node: they need its munged and reach slurmctld over the nodes' link.
#
#   sudo bash launch/multinode/nodes.sh up && sudo bash launch/multinode/slurm.sh start
#   sudo bash launch/multinode/slurm.sh exec sbatch --nodes 2 launch/slurm/train.sbatch train.steps=20   # on node 1
#   sudo bash launch/multinode/slurm.sh stop      # (or nodes.sh down, which ends every process of the nodes)
#
# Debian/Ubuntu packages: slurmctld slurmd slurm-client munge.
set -euo pipefail
NODES=$(dirname "$(readlink -f "$0")")/nodes.sh
PREFIX=${THANN_NODES:-thann}
NET=${THANN_NODES_NET:-10.213.0}
STATE=${THANN_NODES_DIR:-/run/${PREFIX}-nodes}
DIR=$STATE/slurm
export SLURM_CONF=$DIR/slurm.conf
# Node-local (each node's /tmp): munge's socket; the same path names a different file on each node.
MUNGE=/tmp/munge
on() { bash "$NODES" exec "$@"; }

start() {
    [ -f "$STATE/hosts" ] || { echo "the nodes are not up: bash $NODES up" >&2; return 1; }
    mkdir -p "$DIR/log"
    [ -f "$DIR/munge.key" ] || { dd if=/dev/urandom bs=1 count=1024 of="$DIR/munge.key" status=none; chmod 400 "$DIR/munge.key"; }
    # Each node's CPUs are all of the machine's (the nodes share them); memory is split in two.
    local cpus mem
    cpus=$(nproc)
    mem=$(( ($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048) / 2 ))  # MB per node
    cat > "$SLURM_CONF" <<CONF
ClusterName=$PREFIX-nodes
SlurmctldHost=$PREFIX-node1($NET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: how long a requeued job waits before it starts again (default 120 s)
AuthInfo=socket=$MUNGE/munge.socket,cred_expire=30
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
StateSaveLocation=/tmp/slurm/state
SlurmdSpoolDir=/tmp/slurm/spool
SlurmctldPidFile=/tmp/slurm/slurmctld.pid
SlurmdPidFile=/tmp/slurm/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
NodeName=$PREFIX-node1 NodeAddr=$NET.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=$PREFIX-node2 NodeAddr=$NET.2 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=nodes Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    for i in 1 2; do
        on "$i" sh -c "mkdir -p $MUNGE /tmp/slurm/spool && /usr/sbin/munged --force --socket=$MUNGE/munge.socket \
            --key-file=$DIR/munge.key --pid-file=$MUNGE/munged.pid --log-file=$MUNGE/munged.log --seed-file=$MUNGE/seed"
    done
    on 1 /usr/sbin/slurmctld -f "$SLURM_CONF"
    for i in 1 2; do
        on "$i" /usr/sbin/slurmd -f "$SLURM_CONF" -N "$PREFIX-node$i"
    done
    for _ in $(seq 60); do
        if [ "$(on 1 sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" = 2 ]; then
            echo "Slurm up on $PREFIX-node1 and $PREFIX-node2 (controller on $PREFIX-node1): run commands with"
            echo "  bash $(dirname "$NODES")/slurm.sh exec COMMAND..."
            on 1 sinfo -N
            return 0
        fi
        sleep 1
    done
    echo "Slurm did not come up; logs in $DIR/log" >&2
    tail -n 20 "$DIR"/log/*.log >&2 || true
    return 1
}

stop() {
    # Each daemon by its node-local pid file; nodes.sh down would end them too.
    for i in 1 2; do
        on "$i" sh -c 'for f in /tmp/slurm/slurmd.pid /tmp/slurm/slurmctld.pid /tmp/munge/munged.pid; do
                           [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done; true' 2>/dev/null || true
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    exec) shift; exec bash "$NODES" exec 1 "$@" ;;  # SLURM_CONF exported above
    *) echo "usage: $0 start | stop | exec COMMAND..." >&2; exit 2 ;;
esac
