#!/usr/bin/env bash
# Two "nodes" on one Linux machine, for trying multi-node runs without a cluster. Each node is a
# network namespace with its own hostname, /etc/hosts, /tmp and process table (a PID namespace);
# the two are joined by one veth pair, each end the node's eth0 with one address. There is no
# default route and no link to the host: a node can reach the other node and itself, nothing
# else. Everything else (the repository, checkpoints/) is the shared filesystem both nodes see.
# Root only (iproute2; unshare and nsenter from util-linux; python3 as each node's init).
#
#   sudo bash launch/multinode/nodes.sh run -- COMMAND...  # nodes up, COMMAND here, nodes removed on exit
#   sudo bash launch/multinode/nodes.sh up                 # or by hand: up ... down
#   sudo bash launch/multinode/nodes.sh exec 1 COMMAND...  # COMMAND on node 1 (working directory and environment kept)
#   sudo bash launch/multinode/nodes.sh kill 2             # SIGKILL every process of node 2: a node lost
#   sudo bash launch/multinode/nodes.sh status | down
#
# Environment: THANN_NODES (name prefix, default thann: hostnames and namespaces thann-node1 and
# thann-node2), THANN_NODES_NET (first three octets of a free /24, default 10.213.0: the nodes are
# .1 and .2), THANN_NODES_DIR (state: hosts file, each node's /tmp; default /run/<prefix>-nodes).
set -euo pipefail
PREFIX=${THANN_NODES:-thann}
NET=${THANN_NODES_NET:-10.213.0}
STATE=${THANN_NODES_DIR:-/run/${PREFIX}-nodes}
export THANN_NODES=$PREFIX THANN_NODES_NET=$NET THANN_NODES_DIR=$STATE

node() { echo "$PREFIX-node$1"; }
# A node's init: the host PID of process 1 of its PID namespace (killing it kills the node).
init_pid() { cat "$STATE/node$1/init.pid" 2>/dev/null; }
alive() { local pid; pid=$(init_pid "$1") && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

# Process 1 of a node: reaps the daemons that get orphaned (slurmd, torchrun's workers), as init does.
REAPER='import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.5)'

start_node() {
    local i=$1 dir=$STATE/node$1
    mkdir -p "$dir/tmp" "$dir/cgroup"
    chmod 1777 "$dir/tmp"
    # A private mount namespace (this node's /etc/hosts, /tmp and /sys), its hostname, and a PID
    # namespace with its own /proc. /sys is mounted again so that it shows this node's network
    # (/sys/class/net: lo, eth0); the machine's cgroup mounts are kept in it (slurmd needs them).
    setsid nsenter --net="/run/netns/$(node "$i")" \
        unshare --mount --propagation private --uts --pid --fork --mount-proc sh -c '
            hostname "$1" && mount -n --bind "$2" /etc/hosts && mount -n --bind "$3" /tmp &&
            mount -n --rbind /sys/fs/cgroup "$4" && mount -n -t sysfs sysfs /sys &&
            mount -n --move "$4" /sys/fs/cgroup && exec /usr/bin/python3 -c "$5"' \
        sh "$(node "$i")" "$STATE/hosts" "$dir/tmp" "$dir/cgroup" "$REAPER" </dev/null >"$dir/init.log" 2>&1 &
    local unshare_pid=$! child
    for _ in $(seq 50); do
        # ready once process 1 is the reaper (the mounts and the hostname are done by then)
        child=$(pgrep -P "$unshare_pid" || true)
        if [ -n "$child" ] && grep -q python3 "/proc/$child/cmdline" 2>/dev/null; then
            echo "$child" > "$dir/init.pid"
            return 0
        fi
        sleep 0.1
    done
    echo "node $i did not start: $(cat "$dir/init.log")" >&2
    return 1
}

up() {
    local existing
    existing=$( (ip netns list; ip -br link) | awk '{print $1}' | grep -xE "$PREFIX-(node[12]|v[12])" || true)
    if [ -n "$existing" ]; then
        echo "$(echo "$existing" | tr '\n' ' ')exist already (another run's; set THANN_NODES to another prefix)" >&2
        return 1
    fi
    OURS=1  # from here on, what exists is ours to remove
    mkdir -p "$STATE"
    printf '127.0.0.1 localhost\n%s.1 %s\n%s.2 %s\n' "$NET" "$(node 1)" "$NET" "$(node 2)" > "$STATE/hosts"
    ip netns add "$(node 1)"
    ip netns add "$(node 2)"
    ip link add "$PREFIX-v1" type veth peer name "$PREFIX-v2"
    for i in 1 2; do
        local ns
        ns=$(node "$i")
        ip link set "$PREFIX-v$i" netns "$ns"
        # IPv6 off, so that the link carries the two IPv4 addresses and nothing else (no link-local
        # addresses, no neighbour discovery).
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
        ip -n "$ns" link set "$PREFIX-v$i" name eth0
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.eth0.disable_ipv6=1
        ip -n "$ns" addr add "$NET.$i/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        start_node "$i"
    done
    echo "nodes up: $(node 1) ($NET.1), $(node 2) ($NET.2); no route beyond $NET.0/24"
}

kill_node() {
    local pid ns pids
    ns=$(node "$1")
    pid=$(init_pid "$1") || true
    # Killing process 1 of the node's PID namespace makes the kernel kill every process in it at
    # once; then whatever else runs in its network namespace (nsenter's and unshare's waiting
    # parents, anything started with ip netns exec).
    [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -z "$pids" ] && return 0
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        sleep 0.1
    done
    echo "processes remain in $ns: $(ip netns pids "$ns" | tr '\n' ' ')" >&2
    return 1
}

down() {
    for i in 1 2; do
        [ -f "$STATE/node$i/init.pid" ] && kill_node "$i"
        ip netns del "$(node "$i")" 2>/dev/null || true  # removes its end of the veth pair, and so both
    done
    ip link del "$PREFIX-v1" 2>/dev/null || true  # a half-done `up`
    rm -rf "$STATE"
}

exec_on() {
    local i=$1
    shift
    alive "$i" || { echo "$(node "$i") is not running (nodes.sh up)" >&2; return 1; }
    exec nsenter --target "$(init_pid "$i")" --net --uts --mount --pid --wd="$PWD" -- "$@"
}

status() {
    for i in 1 2; do
        if alive "$i"; then
            echo "$(node "$i"): up, init $(init_pid "$i"), $(ip netns pids "$(node "$i")" | wc -l) processes"
            ip -n "$(node "$i")" -br addr
            ip -n "$(node "$i")" route
        else
            echo "$(node "$i"): down"
        fi
    done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    exec) shift; [ $# -ge 2 ] || { echo "usage: $0 exec 1|2 COMMAND..." >&2; exit 2; }; exec_on "$@" ;;
    kill) [ -n "${2:-}" ] || { echo "usage: $0 kill 1|2" >&2; exit 2; }; kill_node "$2" ;;
    run)
        shift
        [ "${1:-}" = -- ] && shift
        [ $# -ge 1 ] || { echo "usage: $0 run -- COMMAND..." >&2; exit 2; }
        # Whatever happens to COMMAND (failure, Ctrl-C, SIGTERM), the nodes are removed.
        OURS=0
        trap '[ "$OURS" = 1 ] && down' EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM
        up
        rc=0
        "$@" || rc=$?  # THANN_NODES* are exported: COMMAND's own `nodes.sh exec` finds these nodes
        exit "$rc"
        ;;
    *) echo "usage: $0 run -- COMMAND... | up | down | status | exec 1|2 COMMAND... | kill 1|2" >&2; exit 2 ;;
esac
