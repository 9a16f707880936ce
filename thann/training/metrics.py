"""Metrics on rank 0: one JSON object per logged step in ``<checkpoint.dir>/metrics.jsonl``,
the same numbers on a progress bar, and optionally to wandb (offline unless asked otherwise)
and TensorBoard (``<checkpoint.dir>/tensorboard``)."""

import json
import os
import time

from omegaconf import OmegaConf
from tqdm import tqdm


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
        self.path = os.path.join(cfg.checkpoint.dir, cfg.logging.metrics_file)
        if resumed_step is not None and os.path.exists(self.path):
            keep_records_up_to(self.path, resumed_step)
        elif resumed_step is None and os.path.exists(self.path) and os.path.getsize(self.path):
            # A fresh start in a directory with another run's metrics: keep them beside.
            stem, ext = os.path.splitext(self.path)
            aside = f"{stem}.{time.strftime('%Y%m%d-%H%M%S')}{ext}"
            os.replace(self.path, aside)
            print(f"starting a new run: the previous metrics are kept in {aside}")
        self._file = open(self.path, "a")
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
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        split = record.get("split", "train")
        scalars = {f"{split}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
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

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file.close()
