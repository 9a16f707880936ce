#!/usr/bin/env bash
# A one-node Slurm cluster on 127.0.0.1 for trying the batch scripts on a laptop or in CI
# (Debian/Ubuntu packages slurmctld slurmd slurm-client munge; run as root; no systemd needed).
#
#   sudo bash launch/slurm/local_cluster.sh start    # prints the SLURM_CONF to export
#   sudo bash launch/slurm/local_cluster.sh stop
set -euo pipefail
STATE=${THANN_SLURM_DIR:-/tmp/thann-slurm}
CONF=$STATE/slurm.conf

start() {
    mkdir -p "$STATE"/{spool,state,log} /run/munge /var/log/munge /var/lib/munge /etc/munge
    chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge 2>/dev/null || true
    [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none;
                                     chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    runuser -u munge -- /usr/sbin/munged --force
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # MB, below the real total
    cat > "$CONF" <<CONF
ClusterName=thann-local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldParameters=enable_configless
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF=$CONF
    /usr/sbin/slurmctld -f "$CONF"
    /usr/sbin/slurmd -f "$CONF"
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            echo "local Slurm up: export SLURM_CONF=$CONF"; sinfo; return 0
        fi
        sleep 1
    done
    echo "Slurm did not come up; logs in $STATE/log" >&2
    cat "$STATE"/log/*.log >&2 || true
    return 1
}

stop() {
    for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    # This cluster's munged only (its default pid file): other munged daemons on the machine, such
    # as those of launch/multinode/slurm.sh's nodes, are not this script's to stop.
    [ -f /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
