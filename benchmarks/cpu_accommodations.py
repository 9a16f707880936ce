"""What the CPU accommodations' TorchFunctionMode costs per training step (CPU machines only).

    python benchmarks/cpu_accommodations.py [--steps 5] [key=value overrides]

The mode (thann.parallel.megatron_patches, item 1) sees every torch function call, so its
cost is (calls per step) x (overhead per call). A step cannot run without it (megatron-core's
schedules allocate on "cuda"), so the two factors are measured separately: the calls of real
training steps of the default run, counted by a mode that only counts; the overhead of one call
through the mode, timed on a cheap operation with and without the mode. Prints a table.
"""

import argparse
import contextlib
import statistics
import sys
import time

import torch
from hydra import compose, initialize_config_dir

from thann.cli import CONFIG_DIR
from thann.parallel import megatron_patches
from thann.recipes.pretrain import Pretrain
from thann.training.trainer import Trainer


class CountingRedirect(megatron_patches.CudaAllocationsToCpu):
    calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        CountingRedirect.calls += 1
        return super().__torch_function__(func, types, args, kwargs)


def overhead_per_call(repeats: int = 200_000) -> float:
    x = torch.ones(1)

    def loop() -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            torch.add(x, x)
        return (time.perf_counter() - start) / repeats

    # The accommodations' own mode is active here: exit it to time the bare call.
    stack = torch.overrides._get_current_function_mode_stack()
    with torch.overrides._pop_mode_temporarily() if stack else contextlib.nullcontext():
        bare = statistics.median(loop() for _ in range(3))
        with megatron_patches.CudaAllocationsToCpu():
            through = statistics.median(loop() for _ in range(3))
    return through - bare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    args, overrides = parser.parse_known_args()
    if torch.cuda.is_available():
        sys.exit("the accommodations are installed only without CUDA")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["checkpoint.dir=/tmp/thann_cpu_accommodations",
                                                       "checkpoint.resume=false", "checkpoint.save=false",
                                                       "logging.wandb.enabled=false", "logging.progress=false",
                                                       *overrides])
    trainer = Trainer(cfg, Pretrain)
    batches = trainer.recipe.train_batches(0)
    trainer.train_step(batches)  # warm-up
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.train_step(batches)
        seconds.append(time.perf_counter() - start)
    step = statistics.median(seconds)
    with CountingRedirect():  # inside the installed mode: counts what reaches it
        trainer.train_step(batches)
    calls = CountingRedirect.calls
    per_call = overhead_per_call()
    trainer.close()
    print(f"{'step (median of ' + str(args.steps) + ')':32s} {step * 1e3:10.1f} ms")
    print(f"{'torch calls through the mode':32s} {calls:10.0f} per step")
    print(f"{'overhead of one call':32s} {per_call * 1e6:10.2f} us")
    print(f"{'cost of the mode':32s} {calls * per_call * 1e3:10.1f} ms per step "
          f"({100 * calls * per_call / step:.1f}% of the step)")


if __name__ == "__main__":
    main()
