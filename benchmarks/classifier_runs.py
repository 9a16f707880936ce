"""Runs of the classification recipe for the benchmarks that compare classifiers
(chaosnet_claims.py, nhsnet_ablation.py): each one thann.training.trainer.Trainer running
thann.recipes.classify.Classify with configs/classify.yaml and command-line style overrides,
exactly what train_classifier.py runs, in worker processes of their own thread count."""

import logging
import math
import multiprocessing
import shutil
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np


def quiet() -> None:
    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


def init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    quiet()


def train(overrides: list[str], measure=None) -> dict:
    """One run: its validation records, its time and median step time; ``measure(trainer, cfg)``
    (a module-level function, called before the trainer closes) adds what it returns."""
    from thann.cli import load_config
    from thann.recipes.classify import Classify
    from thann.training.trainer import Trainer

    quiet()
    cfg = load_config("classify", overrides)
    shutil.rmtree(cfg.checkpoint.dir, ignore_errors=True)
    start = time.perf_counter()
    trainer = Trainer(cfg, Classify)
    try:
        history = trainer.fit()
        seconds = time.perf_counter() - start
        extra = measure(trainer, cfg) if measure is not None else {}
    finally:
        trainer.close()
    steps = [r["step_time_s"] for r in history if r["split"] == "train"]
    return {"valid": [r for r in history if r["split"] == "valid"], "seconds": seconds,
            "step_ms": 1000 * float(np.median(steps)) if steps else math.nan, **extra}


def execute(runs: list[dict], jobs: int, threads: int, measure=None) -> None:
    """Trains every run (in the order given), ``jobs`` at a time, and stores its result in it."""
    done = 0

    def report(run, result):
        nonlocal done
        run.update(result)
        done += 1
        print(f"[{done}/{len(runs)}] {run['name']}: {result['seconds']:.0f} s, {result['step_ms']:.0f} ms/step",
              file=sys.stderr, flush=True)

    if jobs == 1:
        init_worker(threads)
        for run in runs:
            report(run, train(run["overrides"], measure))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=init_worker, initargs=(threads,)) as pool:
        futures = [(run, pool.submit(train, run["overrides"], measure)) for run in runs]
        for run, future in futures:
            report(run, future.result())
