#!/usr/bin/env bash
# CI: a real one-node Slurm on this machine runs the tiny pretraining job through the project's
# batch script with 2 processes; then the metrics and the checkpoint are checked.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v slurmctld >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
bash launch/slurm/local_cluster.sh start
trap 'bash launch/slurm/local_cluster.sh stop' EXIT
export SLURM_CONF=${THANN_SLURM_DIR:-/tmp/thann-slurm}/slurm.conf

RUN=checkpoints/slurm-ci
rm -rf "$RUN" checkpoints/slurm-ci-*.out
echo "submitting launch/slurm/train.sbatch (2 processes)"
GPUS_PER_NODE=2 OMP_NUM_THREADS=1 sbatch --wait --job-name=slurm-ci --cpus-per-task=2 --mem=8G \
    launch/slurm/train.sbatch train.steps=6 train.warmup_steps=1 \
    train.eval_interval=3 train.eval_iters=1 train.micro_batch_size=2 train.global_batch_size=4 \
    train.seq_length=64 train.sample.new_tokens=4 logging.wandb.enabled=false
echo "--- job log"
grep -v -i "warn" checkpoints/slurm-ci-*.out | tail -n 8

.venv/bin/python - "$RUN" <<'PY'
import json, sys, yaml
run = sys.argv[1]
records = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
train = [r for r in records if r["split"] == "train"]
valid = [r for r in records if r["split"] == "valid"]
assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6], train
assert [r["step"] for r in valid] == [0, 3, 6], valid
meta = json.load(open(f"{run}/{open(f'{run}/latest').read()}/thann.json"))
assert meta["world_size"] == 2 and meta["layout"]["dp"] == 2 and meta["step"] == 6, meta
print(f"slurm job checked: 2 processes (dp2), {len(train)} train steps, validation "
      f"{valid[0]['lm_loss']:.3f} -> {valid[-1]['lm_loss']:.3f}, checkpoint {meta['step']} saved")
PY
.venv/bin/python -m thann.checkpoint verify "$RUN"

# Preemption: the time-limit warning (SIGUSR1 to the batch script) makes the run save and the
# job requeue itself; the requeued job resumes from that checkpoint and finishes.
RUN=checkpoints/slurm-ci-preempt
rm -rf "$RUN" checkpoints/slurm-ci-preempt-*.out
GPUS_PER_NODE=2 OMP_NUM_THREADS=1 sbatch --job-name=slurm-ci-preempt --cpus-per-task=2 --mem=8G \
    launch/slurm/train.sbatch train.steps=40 train.warmup_steps=1 \
    train.eval_interval=100 train.eval_iters=1 train.micro_batch_size=2 train.global_batch_size=4 \
    train.seq_length=64 train.sample.new_tokens=2 logging.wandb.enabled=false
for _ in $(seq 120); do
    [ -f "$RUN/metrics.jsonl" ] && [ "$(wc -l < "$RUN/metrics.jsonl")" -ge 4 ] && break
    sleep 1
done
JOB=$(squeue -h -o %i -n slurm-ci-preempt)
echo "sending the time-limit signal to job $JOB"
scancel --signal=USR1 --batch "$JOB"
for _ in $(seq 200); do
    scontrol show job "$JOB" | grep -q "JobState=COMPLETED" && break
    sleep 2
done
echo "--- job log"
grep -v -i "warn" checkpoints/slurm-ci-preempt-*.out | grep -E "^job |saved|stopped|resumed|time limit"
grep -q "resumed from" checkpoints/slurm-ci-preempt-*.out
[ "$(cat "$RUN/latest")" = iter_0000040 ]
echo "slurm preemption checked: saved, requeued, resumed, finished at step 40"
