"""Checks on the resolved config that every recipe shares, run on every rank before anything is
built: the parallel layout against the world size, the training loop, the checkpoint directory.
Each recipe adds the checks of its own models and data (``Recipe.check``).

Each failure names the offending field, so a bad override is reported in one line instead of
as an assertion deep inside megatron-core (or a hang in a collective on some ranks).
"""

import os

from omegaconf import DictConfig


CHECKPOINT_FORMATS = ("zarr", "torch_dist")  # THANN's (thann.checkpoint.zarr_store) and megatron-core's


class ConfigError(ValueError):
    def __init__(self, field: str, value, reason: str):
        super().__init__(f"invalid config: {field}={value!r}: {reason}")
        self.field = field


def require(ok: bool, field: str, value, reason: str) -> None:
    if not ok:
        raise ConfigError(field, value, reason)


def check_parallel(parallel: DictConfig, world_size: int) -> int:
    """Validates the layout against the world size; returns the data-parallel size."""
    for field in ("tp", "pp", "ep", "etp"):
        require(isinstance(parallel[field], int) and parallel[field] >= 1, f"parallel.{field}", parallel[field],
                "must be an integer >= 1")
    tp, pp, ep, etp = parallel.tp, parallel.pp, parallel.ep, parallel.etp
    require(world_size % (tp * pp) == 0, "parallel.tp", tp, f"tp*pp={tp * pp} must divide the world size {world_size}")
    require((world_size // pp) % (etp * ep) == 0, "parallel.ep", ep,
            f"ep*etp={ep * etp} must divide the ranks of one pipeline stage ({world_size // pp})")
    require(not parallel.sp or tp > 1, "parallel.sp", parallel.sp, "sequence parallelism needs parallel.tp > 1")
    timeout = parallel.get("timeout_minutes", 10)
    require(isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0,
            "parallel.timeout_minutes", timeout, "must be a number of minutes > 0")
    return world_size // (tp * pp)


def check_train(train: DictConfig, dp: int) -> None:
    for field in ("steps", "micro_batch_size", "global_batch_size", "eval_iters", "eval_interval"):
        require(isinstance(train[field], int) and train[field] > 0, f"train.{field}", train[field],
                "must be a positive integer")
    require(train.lr > 0, "train.lr", train.lr, "must be positive")
    require(0 <= train.min_lr <= train.lr, "train.min_lr", train.min_lr, "must be in [0, train.lr]")
    # megatron-core's schedule needs at least one decay step after the warmup.
    require(0 <= train.warmup_steps < train.steps, "train.warmup_steps", train.warmup_steps,
            f"must be in [0, train.steps={train.steps})")
    require(train.schedule in ("cosine", "linear", "constant"), "train.schedule", train.schedule,
            "must be cosine, linear or constant")
    require(train.precision in ("auto", "bf16", "fp32"), "train.precision", train.precision,
            "must be auto, bf16 or fp32")
    require(train.on_nonfinite_loss in ("stop", "skip"), "train.on_nonfinite_loss", train.on_nonfinite_loss,
            "must be stop or skip")
    require(train.stop_after_step is None or 0 < train.stop_after_step <= train.steps, "train.stop_after_step",
            train.stop_after_step, "must be null or in [1, train.steps]")
    per_step = train.micro_batch_size * dp
    require(train.global_batch_size % per_step == 0, "train.global_batch_size", train.global_batch_size,
            f"must be a multiple of micro_batch_size * data-parallel size = {per_step}")


def nearest_existing(path: str) -> str:
    """``path`` or its closest ancestor that exists."""
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path or "."


def check_checkpoint(checkpoint: DictConfig) -> None:
    require(checkpoint.format in CHECKPOINT_FORMATS, "checkpoint.format", checkpoint.format,
            f"must be one of {list(CHECKPOINT_FORMATS)}")
    for field in ("interval", "keep"):
        require(isinstance(checkpoint[field], int) and checkpoint[field] >= 0, f"checkpoint.{field}",
                checkpoint[field], "must be an integer >= 0")
    require(checkpoint.keep >= 1, "checkpoint.keep", checkpoint.keep, "must keep at least 1 checkpoint")
    for field in ("async_save", "fsync"):
        require(isinstance(checkpoint[field], bool), f"checkpoint.{field}", checkpoint[field], "must be true or false")
    path = str(checkpoint.dir)
    require(not os.path.exists(path) or os.path.isdir(path), "checkpoint.dir", path,
            "exists and is not a directory")
    existing = nearest_existing(os.path.abspath(path))
    require(os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK), "checkpoint.dir", path,
            f"cannot be written ({existing} is {'read-only' if os.path.isdir(existing) else 'not a directory'})")
    if not os.path.exists(path):
        try:  # some file systems refuse even root (e.g. /proc); os.access cannot tell
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise ConfigError("checkpoint.dir", path, f"cannot be created ({e.strerror})") from None


def check_logging(logging: DictConfig) -> None:
    require(isinstance(logging.log_interval, int) and logging.log_interval > 0, "logging.log_interval",
            logging.log_interval, "must be a positive integer")
    require(isinstance(logging.metrics_file, str) and logging.metrics_file and "/" not in logging.metrics_file,
            "logging.metrics_file", logging.metrics_file, "must be a file name (it is written in checkpoint.dir)")
    require(logging.peak_tflops > 0, "logging.peak_tflops", logging.peak_tflops, "must be positive")


def check(cfg: DictConfig, world_size: int) -> int:
    """The shared checks, cheapest first; returns the data-parallel size."""
    dp = check_parallel(cfg.parallel, world_size)
    check_train(cfg.train, dp)
    check_logging(cfg.logging)
    check_checkpoint(cfg.checkpoint)
    return dp
