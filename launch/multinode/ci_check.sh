#!/usr/bin/env bash
# CI: two namespaced nodes on this machine (launch/multinode/nodes.sh), removed on exit.
#  1. A two-node Slurm cluster (launch/multinode/slurm.sh) runs the tiny job across both nodes
#     through the project's batch script (2 processes per node: tp2 inside a node, dp2 across),
#     then the time-limit signal -> save -> requeue -> resume path, with every frame on the nodes'
#     link counted (only their two addresses may appear).
#  2. The slow multi-node tests (tests/test_multinode.py): torchrun across the nodes against one
#     process, a two-node checkpoint resumed on one node, a node lost mid-run.
# Root; Debian/Ubuntu packages slurmctld slurmd slurm-client munge. 16.7 minutes measured on 2
# cores shared with other work (load ~25): 5.5 for Slurm, 11.2 for the tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "$PWD/" in
    /tmp/*) echo "launch/multinode/ci_check.sh: the repository is under /tmp, which each node replaces" \
                 "with its own: clone it elsewhere" >&2; exit 2 ;;
esac

if ! command -v slurmctld >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
# Names of their own, so that nodes of another session on this machine are left alone.
export THANN_NODES=ci$$ THANN_NODES_NET=10.213.8
export THANN_NODES_DIR=/run/$THANN_NODES-nodes
NODES=launch/multinode/nodes.sh
on_node1() { bash launch/multinode/slurm.sh exec "$@"; }  # SLURM_CONF and munge of node 1

PACKETS=$(mktemp /var/tmp/thann-ci-packets-XXXXXX.json)
trap 'bash "$NODES" down; rm -f "$PACKETS"' EXIT  # ends every process of the nodes (Slurm, the counter)
bash "$NODES" up
bash launch/multinode/slurm.sh start

# Every frame either node sends or receives crosses node 1's eth0; the counter stops when its
# stdin (fd 3 here) closes.
COUNTER_IN=$THANN_NODES_DIR/count.fifo
mkfifo "$COUNTER_IN"
bash "$NODES" exec 1 python3 launch/multinode/count_packets.py eth0 "$PACKETS" < "$COUNTER_IN" &
COUNTER=$!
exec 3>"$COUNTER_IN"

# The layout tests' model shape: the job is about the launch, not the model.
SMALL=(model.num_layers=4 model.hidden_size=64 model.num_attention_heads=4 model.moe_ffn_hidden_size=64
       train.warmup_steps=1 train.micro_batch_size=2 train.global_batch_size=4 train.seq_length=64
       train.eval_iters=1 logging.wandb.enabled=false parallel.tp=2 parallel.sp=true)

RUN=checkpoints/mn-ci
rm -rf "$RUN" checkpoints/mn-ci-[0-9]*.out
echo "submitting launch/slurm/train.sbatch to 2 nodes (2 processes each)"
GPUS_PER_NODE=2 OMP_NUM_THREADS=1 on_node1 sbatch --wait --nodes 2 --job-name=mn-ci --cpus-per-task=2 --mem=4G \
    launch/slurm/train.sbatch "${SMALL[@]}" train.steps=6 train.eval_interval=3 train.sample.new_tokens=4
JOB=$(grep -o '^job [0-9]*' checkpoints/mn-ci-[0-9]*.out | head -n 1 | cut -d' ' -f2)
on_node1 scontrol show job "$JOB" | grep -q "NodeList=$THANN_NODES-node\[1-2\]"
echo "--- job log"
grep -v -i "warn" checkpoints/mn-ci-[0-9]*.out | grep -E "^job |^THANN|saved|done"

.venv/bin/python - "$RUN" <<'PY'
import json, os, sys
run = sys.argv[1]
records = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
train = [r for r in records if r["split"] == "train"]
valid = [r for r in records if r["split"] == "valid"]
assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6], train
assert [r["step"] for r in valid] == [0, 3, 6], valid
latest = f"{run}/{open(f'{run}/latest').read()}"
meta = json.load(open(f"{latest}/thann.json"))
assert meta["world_size"] == 4 and meta["layout"]["tp"] == 2 and meta["layout"]["dp"] == 2 and meta["step"] == 6, meta
assert sorted(os.listdir(f"{latest}/rng")) == [f"rank_{r:05d}.json" for r in range(4)]
print(f"2-node slurm job checked: 4 processes (tp2 in a node, dp2 across), {len(train)} train steps, validation "
      f"{valid[0]['lm_loss']:.3f} -> {valid[-1]['lm_loss']:.3f}, checkpoint {meta['step']} saved by every rank")
PY
.venv/bin/python -m thann.checkpoint verify "$RUN"

# Preemption across two nodes: the time-limit warning (SIGUSR1 to the batch script on node 1)
# makes the run save, the job requeue itself and resume from that checkpoint on both nodes.
RUN=checkpoints/mn-ci-preempt
rm -rf "$RUN" checkpoints/mn-ci-preempt-*.out
GPUS_PER_NODE=2 OMP_NUM_THREADS=1 on_node1 sbatch --nodes 2 --job-name=mn-ci-preempt --cpus-per-task=2 --mem=4G \
    launch/slurm/train.sbatch "${SMALL[@]}" train.steps=30 train.eval_interval=100 train.sample.new_tokens=2
for _ in $(seq 300); do
    [ -f "$RUN/metrics.jsonl" ] && [ "$(wc -l < "$RUN/metrics.jsonl")" -ge 4 ] && break
    sleep 1
done
JOB=$(on_node1 squeue -h -o %i -n mn-ci-preempt)
echo "sending the time-limit signal to job $JOB"
on_node1 scancel --signal=USR1 --batch "$JOB"
for _ in $(seq 300); do
    on_node1 scontrol show job "$JOB" | grep -q "JobState=COMPLETED" && break
    sleep 2
done
echo "--- job log"
grep -v -i "warn" checkpoints/mn-ci-preempt-*.out | grep -E "^job |saved|stopped|resumed|time limit"
grep -q "(restart 1): 2 node(s)" checkpoints/mn-ci-preempt-*.out
grep -q "resumed from" checkpoints/mn-ci-preempt-*.out
[ "$(cat "$RUN/latest")" = iter_0000030 ]
echo "2-node slurm preemption checked: saved, requeued, resumed on both nodes, finished at step 30"

exec 3>&-  # the counter writes its counts and ends
wait "$COUNTER"
.venv/bin/python - "$PACKETS" "$THANN_NODES_NET" <<'PY'
import json, sys
counted, net = json.load(open(sys.argv[1])), sys.argv[2]
frames = sum(n for n, _ in counted["frames"].values())
assert set(counted["addresses"]) == {f"{net}.1", f"{net}.2"}, counted
print(f"nothing left the nodes: {frames} frames on their link during the Slurm jobs, all between {net}.1 and {net}.2")
PY
bash "$NODES" down  # the tests make nodes of their own
.venv/bin/python -m pytest -m slow -q -p no:cacheprovider tests/test_multinode.py
