"""Save and load a THANN-sized training state (hidden 2048, 16 experts of FFN 576, the 100k
embedding, fp32 weights + Adam moments) in THANN's zarr format and megatron-core's torch_dist,
synchronously and asynchronously, in the same process, through the checkpointer a run uses
(every file flushed to the disk before publishing), against the disk's own rates measured in
the same run.

    python benchmarks/checkpoint_io.py [--layers 1] [--dir /tmp/thann_ckpt_bench] [--repeats 2]
    python benchmarks/checkpoint_io.py --model thann_tiny --keep     # a smoke run; keeps the checkpoints

Per format and repeat (zarr's repeats first: torch_dist's writer forks the process, and a fork
slows the parent's next writes to its memory, which a zarr run never pays): a synchronous save, a
load, an asynchronous save during which the loop keeps training, and for zarr a synchronous save
with checkpoint.fsync=false (what the flushes cost; its pages are written back, off the clock,
before the next measurement). Each
load starts with the checkpoint's files dropped from the page cache (posix_fadvise), so that it
reads the disk, as the disk's read rate is measured. Printed: the best of the repeats, as GB/s
and as a fraction of the disk's rate; for each save the time the loop was blocked (the save call
and the polls at step boundaries, publishing included; pruning the previous checkpoint runs on
its own thread, off the clock), the training steps that ran while it was written and their mean
time (per save and over every repeat; a synchronous row: a step with no save running).

Fewer layers than thann_800m keep it within a CPU machine's memory; the per-tensor shapes are
the flagship's. One process (world of one): this measures the format, not parallel I/O.
"""

import argparse
import os
import platform
import shutil
import time

from hydra import compose, initialize_config_dir

from thann.checkpoint.checkpointer import Checkpointer
from thann.cli import CONFIG_DIR
from thann.recipes.pretrain import Pretrain
from thann.training.trainer import Trainer

_PIECE = 64 * 2**20


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def drop_from_cache(path: str) -> None:
    """Evicts the (flushed) files under ``path`` from the page cache, so the next read hits the disk."""
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, files in os.walk(path) for f in files]
    for name in paths:
        fd = os.open(name, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def disk_rates(directory: str, size: int) -> tuple[float, float]:
    """Bytes/s writing ``size`` bytes to a file and flushing it (fdatasync), then reading it back
    from the disk."""
    path = os.path.join(directory, "disk_rate")
    data = memoryview(os.urandom(_PIECE))
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(size // _PIECE):
        piece = data
        while piece:
            piece = piece[os.write(fd, piece):]
    os.fdatasync(fd)
    os.close(fd)
    write = size / (time.perf_counter() - start)
    drop_from_cache(path)
    buffer = bytearray(_PIECE)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    read = size / (time.perf_counter() - start)
    os.remove(path)
    return write, read


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="thann_800m")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--dir", default="/tmp/thann_ckpt_bench")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--disk-gib", type=float, default=2.0, help="size of the file that measures the disk")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints written (DIR/<format>/iter_*)")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    overrides = [f"model={args.model}", f"model.num_layers={args.layers}", "train.steps=1000000",
                 "train.warmup_steps=0", "train.micro_batch_size=1", "train.global_batch_size=1",
                 "train.seq_length=64", "train.eval_iters=1", "checkpoint.save=false", f"checkpoint.dir={args.dir}/run",
                 "logging.wandb.enabled=false", "logging.progress=false"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    trainer = Trainer(cfg, Pretrain)
    batches = trainer.recipe.train_batches(0)

    def step() -> float:
        start = time.perf_counter()
        trainer.train_step(batches)
        return time.perf_counter() - start

    step()  # creates the Adam moments
    alone = min(step() for _ in range(2))
    params = sum(p.numel() for p in trainer.slots["model"].module.parameters())
    disk_write, disk_read = disk_rates(args.dir, int(args.disk_gib * 2**30) // _PIECE * _PIECE)

    # torch_dist's writer flushes its data files whatever checkpoint.fsync says: unflushed is zarr's alone.
    modes = {"zarr": ("sync", "async", "unflushed"), "torch_dist": ("sync", "async")}
    checkpointers = {}
    for fmt, fmt_modes in modes.items():
        for mode in fmt_modes:
            ckpt_cfg = cfg.checkpoint.copy()
            ckpt_cfg.format, ckpt_cfg.keep = fmt, 1
            ckpt_cfg.dir = os.path.join(args.dir, fmt + ("_unflushed" if mode == "unflushed" else ""))
            ckpt_cfg.async_save, ckpt_cfg.fsync = mode == "async", mode != "unflushed"
            os.makedirs(ckpt_cfg.dir, exist_ok=True)
            checkpointers[fmt, mode] = Checkpointer(ckpt_cfg, message=lambda text: None)
            checkpointers[fmt, mode].attach(trainer.checkpointer.parts)
    number = [0]

    def save(checkpointer) -> tuple[str, float, float, float, list[float]]:
        """A save, the loop training on while it is written in the background: its path, the
        seconds until it is published, the seconds the loop was blocked and of those the polls'
        (publishing), the steps' times."""
        number[0] += 1
        start = time.perf_counter()
        path = checkpointer.save(number[0], {**trainer.checkpoint_metadata(), "step": number[0]})
        called, polls, steps = time.perf_counter() - start, 0.0, []
        while checkpointer.saving:
            steps.append(step())
            polled = time.perf_counter()
            checkpointer.poll()
            polls += time.perf_counter() - polled
        seconds = time.perf_counter() - start if steps else called  # synchronous: published when save returned
        checkpointer.finish()  # the previous checkpoint's pruning, off the clock
        return path, seconds, called + polls, polls, steps

    saves = {key: [] for key in checkpointers}  # (seconds to published, blocked, polls, step times meanwhile)
    loads = {fmt: [] for fmt in modes}
    sizes, paths = {}, {}
    # megatron-core's torch_dist writer forks this process (its write workers, synchronous or not),
    # and after a fork every page the parent writes faults once more (copy-on-write bookkeeping,
    # even with the children gone): a zarr host copy after one took 0.44-0.51 s instead of
    # 0.12-0.23. THANN's zarr path never forks, so zarr is measured first, then torch_dist.
    for fmt, fmt_modes in modes.items():
        for _ in range(args.repeats):
            for mode in fmt_modes:
                path, seconds, blocked, polls, steps = save(checkpointers[fmt, mode])
                saves[fmt, mode].append((seconds, blocked, polls, steps))
                if mode == "unflushed":
                    os.sync()  # its pages reach the disk before the next measurement, off the clock
                if mode == "sync":
                    sizes[fmt] = directory_bytes(path)
                    drop_from_cache(path)
                    start = time.perf_counter()
                    checkpointers[fmt, mode].load(path, vars(trainer.layout))
                    loads[fmt].append(time.perf_counter() - start)
                if mode == "async":
                    paths[fmt] = path

    print(f"\nmachine: {machine()}; date {time.strftime('%Y-%m-%d')}; directory {args.dir}")
    print(f"state: {params / 1e6:.0f}M parameters ({args.model}, {args.layers} layer(s)), fp32 + Adam; "
          f"best of {args.repeats}; every save flushed to the disk (checkpoint.fsync=true) but the unflushed one")
    print(f"disk: write {disk_write / 1e9:.3f} GB/s ({args.disk_gib:g} GiB, fdatasync), "
          f"read {disk_read / 1e9:.3f} GB/s (dropped from the page cache)")
    print("\n| format | save | size (GB) | save (s) | save GB/s | of disk write | blocked (s) | blocked / sync save "
          "| of which polls (s) | steps meanwhile | step (s) |\n|---|---|---|---|---|---|---|---|---|---|---|")
    best = {key: (min(r[0] for r in rows), min(r[1:3] for r in rows)) for key, rows in saves.items()}
    for (fmt, mode), (seconds, (blocked, polls)) in best.items():
        rate = sizes[fmt] / seconds
        steps = [t for row in saves[fmt, mode] for t in row[3]]  # over every repeat
        step = sum(steps) / len(steps) if steps else alone
        print(f"| {fmt} | {mode} | {sizes[fmt] / 1e9:.4f} | {seconds:.3f} | {rate / 1e9:.3f} | {rate / disk_write:.2f} "
              f"| {blocked:.3f} | {blocked / best[fmt, 'sync'][0]:.3f} | {polls:.3f} | {len(steps) / args.repeats:g} "
              f"| {step:.3f} |")
    print("\n| format | size (GB) | load (s) | load GB/s | of disk read |\n|---|---|---|---|---|")
    for fmt in modes:
        rate = sizes[fmt] / min(loads[fmt])
        print(f"| {fmt} | {sizes[fmt] / 1e9:.4f} | {min(loads[fmt]):.3f} | {rate / 1e9:.3f} | {rate / disk_read:.2f} |")
    print("first asynchronous save (zarr allocates its host copy then): blocked " + ", ".join(
        f"{saves[fmt, 'async'][0][1]:.3f} s ({fmt})" for fmt in modes))
    print(f"\nzarr / torch_dist: save {best['torch_dist', 'sync'][0] / best['zarr', 'sync'][0]:.2f}x, "
          f"load {min(loads['torch_dist']) / min(loads['zarr']):.2f}x as fast")
    trainer.close()
    if args.keep:
        print("kept: " + ", ".join(paths.values()))
    else:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
