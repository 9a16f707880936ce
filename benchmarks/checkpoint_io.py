"""Save and load a THANN-sized training state (hidden 2048, 16 experts of FFN 576, the 100k
embedding, fp32 weights + Adam moments) in THANN's zarr format and megatron-core's torch_dist,
in the same process, through the checkpointer a run uses, and print GB/s for each.

    python benchmarks/checkpoint_io.py [--layers 1] [--dir /tmp/thann_ckpt_bench] [--repeats 2]
    python benchmarks/checkpoint_io.py --model thann_tiny --keep     # a smoke run; keeps the checkpoints

Fewer layers than thann_800m keep it within a CPU machine's memory; the per-tensor shapes are
the flagship's. One process (world of one): this measures the format, not parallel I/O.
"""

import argparse
import os
import shutil
import time

from hydra import compose, initialize_config_dir

from thann.checkpoint.checkpointer import Checkpointer
from thann.cli import CONFIG_DIR
from thann.recipes.pretrain import Pretrain
from thann.training.trainer import Trainer


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="thann_800m")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--dir", default="/tmp/thann_ckpt_bench")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints written (DIR/<format>/iter_*)")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    overrides = [f"model={args.model}", f"model.num_layers={args.layers}", "train.steps=1", "train.warmup_steps=0",
                 "train.micro_batch_size=1", "train.global_batch_size=1", "train.seq_length=64",
                 "train.eval_iters=1", "checkpoint.save=false", f"checkpoint.dir={args.dir}/run",
                 "logging.wandb.enabled=false", "logging.progress=false"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    trainer = Trainer(cfg, Pretrain)
    trainer.train_step(trainer.recipe.train_batches(0))  # creates the Adam moments
    params = sum(p.numel() for p in trainer.slots["model"].module.parameters())

    rows = []
    for fmt in ("zarr", "torch_dist"):
        ckpt_cfg = cfg.checkpoint.copy()
        ckpt_cfg.format, ckpt_cfg.dir, ckpt_cfg.keep = fmt, os.path.join(args.dir, fmt), 1
        os.makedirs(ckpt_cfg.dir)
        checkpointer = Checkpointer(ckpt_cfg, message=lambda text: None)
        checkpointer.attach(trainer.checkpointer.parts)
        saves, loads = [], []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            path = checkpointer.save(repeat + 1, {**trainer.checkpoint_metadata(), "step": repeat + 1})
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            checkpointer.load(path, vars(trainer.layout))
            loads.append(time.perf_counter() - start)
        rows.append((fmt, directory_bytes(path), min(saves), min(loads), path))

    print(f"\nstate: {params / 1e6:.0f}M parameters ({args.model}, {args.layers} layer(s)), fp32 + Adam; "
          f"best of {args.repeats}; directory {args.dir}")
    print("| format | size (GB) | save (s) | save GB/s | load (s) | load GB/s |\n|---|---|---|---|---|---|")
    for fmt, size, save, load, path in rows:
        print(f"| {fmt} | {size / 1e9:.4f} | {save:.3f} | {size / 1e9 / save:.3f} | {load:.3f} | "
              f"{size / 1e9 / load:.3f} |")
    trainer.close()
    if args.keep:
        print("kept: " + ", ".join(path for *_, path in rows))
    else:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
