"""Metrics on rank 0: one JSON object per logged step in ``<checkpoint.dir>/metrics.jsonl``,
the same numbers on a progress bar, and optionally to wandb (offline unless asked otherwise)
and TensorBoard (``<checkpoint.dir>/tensorboard``). Every message of the run also goes to
``<checkpoint.dir>/run.log``, with the full detail of a failure that the terminal shows in one line.

metrics.jsonl is strict JSON (RFC 8259 has no NaN): a value that is not finite is written as
``null`` and the record lists its key under ``nonfinite``.
"""

import json
import math
import os
import time

from omegaconf import OmegaConf
from tqdm import tqdm


LOG_FILE = "run.log"
SAMPLES_FILE = "samples.jsonl"  # what a recipe generates at its evaluations, one JSON object per sample


def run_files(logging_cfg) -> list[str]:
    """The files a run writes beside its checkpoints (set aside with them by a fresh start)."""
    return [logging_cfg.metrics_file, SAMPLES_FILE, "config.yaml", LOG_FILE, "tensorboard"]


def strict_json(record: dict) -> str:
    """One JSON line; non-finite numbers become null and are listed under ``nonfinite``."""
    nonfinite = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if nonfinite:
        record = {**{k: (None if k in nonfinite else v) for k, v in record.items()}, "nonfinite": nonfinite}
    return json.dumps(record, allow_nan=False)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _first_last(history: list[dict], split: str, key: str) -> str | None:
    values = [r[key] for r in history if r.get("split") == split and isinstance(r.get(key), float)]
    return f"{split} {key} {values[0]:.4g} -> {values[-1]:.4g}" if values else None


def run_summary(history: list[dict], seconds: float, run_dir: str, metrics_file: str, latest: str | None) -> str:
    """What a run did, for the end of its output: steps and time, first and last losses, speed,
    and where its files are."""
    train = [r for r in history if r.get("split") == "train"]
    steps = f"steps {train[0]['step'] - 1} -> {train[-1]['step']}" if train else "no training step"
    speed = ""
    for key, unit in (("tokens_per_s", "tokens/s"), ("samples_per_s", "samples/s")):
        values = [r[key] for r in train if isinstance(r.get(key), float)]
        if values:
            speed = f" ({sum(values) / len(values):,.0f} {unit})"
            break
    losses = [x for x in (_first_last(history, "train", "loss"), _first_last(history, "valid", "loss")) if x]
    where = (f"checkpoints {run_dir} (latest {os.path.basename(latest)})" if latest else f"no checkpoint in {run_dir}")
    return (f"done: {steps} in {_duration(seconds)}{speed}" + (f"; {', '.join(losses)}" if losses else "")
            + f"\n{where}; metrics {os.path.join(run_dir, metrics_file)}; log {os.path.join(run_dir, LOG_FILE)}")


def keep_records_up_to(path: str, step: int) -> int:
    """Rewrites a metrics file to the records of steps <= ``step`` (those of the run a resumed
    run continues; later ones were logged after its checkpoint and are logged again), dropping
    lines that are not one JSON object. Returns how many lines were dropped."""
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return dropped


class MetricsLogger:
    def __init__(self, cfg, layout_description: str, is_logging_rank: bool, resumed_step: int | None = None):
        self.enabled = is_logging_rank
        self._bar = None
        self._wandb = None
        self._tensorboard = None
        if not self.enabled:
            return
        os.makedirs(cfg.checkpoint.dir, exist_ok=True)
        OmegaConf.save(cfg, os.path.join(cfg.checkpoint.dir, "config.yaml"), resolve=True)
        # A fresh start found the directory without an earlier run's files (Checkpointer.start_fresh).
        self.path = os.path.join(cfg.checkpoint.dir, cfg.logging.metrics_file)
        for records in (self.path, os.path.join(cfg.checkpoint.dir, SAMPLES_FILE)):
            if resumed_step is not None and os.path.exists(records):
                keep_records_up_to(records, resumed_step)
        self._file = open(self.path, "a")
        self.log_path = os.path.join(cfg.checkpoint.dir, LOG_FILE)
        self._log = open(self.log_path, "a")
        started = "started" if resumed_step is None else f"resumed at step {resumed_step}"
        self._log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {started} (layout {layout_description})\n")
        if cfg.logging.progress:
            self._bar = tqdm(total=cfg.train.steps, initial=resumed_step or 0, desc="train", unit="step",
                             dynamic_ncols=True)
        if cfg.logging.wandb.enabled:
            try:
                import wandb
            except ImportError:
                raise ImportError("logging.wandb.enabled=true but wandb is not installed: "
                                  "pip install 'thann[wandb]' or set logging.wandb.enabled=false") from None

            self._wandb = wandb.init(
                project=cfg.logging.wandb.project,
                name=cfg.logging.run_name,
                mode=cfg.logging.wandb.mode,
                dir=cfg.checkpoint.dir,
                config={**OmegaConf.to_container(cfg, resolve=True), "layout": layout_description},
            )
        if cfg.logging.tensorboard.enabled:
            self._open_tensorboard(cfg, layout_description)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(strict_json(record) + "\n")
        self._file.flush()
        split = record.get("split", "train")
        scalars = {f"{split}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, record["step"])
        if self._bar is not None:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in record.items()
                     if k in ("loss", "lm_loss", "aux_loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "mfu")}
            if record.get("split") == "valid":
                extra = "".join(f", {k} {v:.4g}" for k, v in record.items()
                                if isinstance(v, float) and k != "loss" and v != record["loss"])
                self._bar.write(f"step {record['step']}: validation loss {record['loss']:.4f}{extra}")
            else:
                self._bar.set_postfix(shown, refresh=False)
                self._bar.update(record["step"] - self._bar.n)

    def _open_tensorboard(self, cfg, layout_description: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("logging.tensorboard.enabled=true but tensorboard is not installed: "
                              "pip install 'thann[tensorboard]'") from None
        self._tensorboard = SummaryWriter(os.path.join(cfg.checkpoint.dir, "tensorboard"))
        self._tensorboard.add_text("config", f"layout {layout_description}\n\n" + OmegaConf.to_yaml(cfg))

    def message(self, text: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(text)
            self._log.write(text + "\n")
            self._log.flush()

    def close(self, summary: str | None = None, failure: str | None = None, detail: str | None = None) -> None:
        """Closes the progress bar and wandb, then prints ``summary``: the end of the run's output
        (a ``failure`` is printed after this by the caller; the run's log records it with its
        ``detail``)."""
        if not self.enabled:
            return
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failure else 0)
        if summary:
            print(summary, flush=True)
            self._log.write(summary + "\n")
        if failure:
            self._log.write(f"failed: {failure}\n" + (f"{detail}\n" if detail else ""))
        self._file.close()
        self._log.close()
