"""Contrastive training memory against the global batch: GradCache keeps it flat.

    python benchmarks/contrastive_memory.py [--global-batches 32 128 512] [--micro-batch 8] [--steps 2]

For each global batch, a fresh process runs contrastive training steps of thann_tiny (sequence
128, in-batch negatives over the whole global batch) with a fixed micro-batch, and, for
comparison, with the whole global batch as one micro-batch (what memory would be without
GradCache). Prints peak resident memory (CPU) or peak allocated GPU memory, and median step
time. Needs data/sharegpt_pairs (python -m thann.data.preprocess --corpus sharegpt_pairs ...).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def one_run(global_batch: int, micro_batch: int, steps: int, data: str) -> dict:
    from hydra import compose, initialize_config_dir

    from thann.cli import CONFIG_DIR
    from thann.recipes.contrastive import Contrastive
    from thann.training.trainer import Trainer

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="contrastive", overrides=[
            f"train.global_batch_size={global_batch}", f"train.micro_batch_size={micro_batch}", f"data.paths=[{data}]",
            f"checkpoint.dir=/tmp/thann_contrastive_memory_{os.getpid()}", "checkpoint.save=false",
            "checkpoint.resume=false", "logging.wandb.enabled=false", "logging.progress=false"])
    trainer = Trainer(cfg, Contrastive)
    batches = trainer.recipe.train_batches(0)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step(batches)
        seconds.append(time.perf_counter() - start)
    trainer.close()
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_mib": peak, "step_s": statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--global-batches", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--data", default="data/sharegpt_pairs", help="a pairs dataset prefix")
    parser.add_argument("--one", type=int, nargs=2, help=argparse.SUPPRESS)  # child: global and micro batch
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(*args.one, args.steps, args.data)))
        return

    def child(global_batch: int, micro_batch: int) -> dict:
        out = subprocess.run([sys.executable, __file__, "--one", str(global_batch), str(micro_batch),
                              "--steps", str(args.steps), "--data", args.data], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (peak resident memory)"
    print(f"thann_tiny, sequence 128, micro-batch {args.micro_batch}, median of {args.steps} steps, {device}")
    print(f"{'global batch':>12} {'GradCache peak MiB':>19} {'step s':>8} {'one micro-batch peak MiB':>25} {'step s':>8}")
    for global_batch in args.global_batches:
        cached, whole = child(global_batch, args.micro_batch), child(global_batch, global_batch)
        print(f"{global_batch:>12} {cached['peak_mib']:>19.0f} {cached['step_s']:>8.2f} "
              f"{whole['peak_mib']:>25.0f} {whole['step_s']:>8.2f}")


if __name__ == "__main__":
    main()
