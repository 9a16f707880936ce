"""Saving and resuming training: model, optimizer (in model space, so any layout can load it),
LR schedule, data position, per-rank RNG streams and a description of the run.

    <checkpoint.dir>/iter_0000100/   one directory per saved step (zarr or torch_dist inside)
                     thann.json      step, layout, config, tokenizer, versions
                     rng/rank_00000.pt
    <checkpoint.dir>/latest          name of the newest complete checkpoint

A checkpoint is written under ``iter_*.tmp`` and renamed, and ``latest`` replaced, only after
every rank has finished: a crash mid-save leaves the previous checkpoint as ``latest``.
"""

import json
import os
import random
import shutil
import time
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.utils import unwrap_model
from omegaconf import OmegaConf

from thann.checkpoint import zarr_store
from thann.config import ConfigError
from thann.training.optimizer import unshare_adam_steps

FORMATS = ("zarr", "torch_dist")
LATEST = "latest"


def iteration_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def latest_checkpoint(root: str) -> str | None:
    path = os.path.join(root, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    return os.path.join(root, name)


def read_metadata(path: str) -> dict:
    with open(os.path.join(path, "thann.json")) as f:
        return json.load(f)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:  # e.g. THANN run from a source tree on PYTHONPATH
        return "not installed"


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


class NonFiniteWeights(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, cfg, trainer):
        if cfg.format not in FORMATS:
            raise ValueError(f"checkpoint.format must be one of {FORMATS}, got {cfg.format!r}")
        self.cfg = cfg
        self.trainer = trainer

    # -- what goes in ---------------------------------------------------------------------------

    def _sharded_state_dict(self, is_loading: bool) -> dict:
        t = self.trainer
        if len(t.model) != 1:
            raise NotImplementedError("checkpointing supports one model chunk per rank")
        model = unwrap_model(t.model[0]).sharded_state_dict()
        optimizer = t.optimizer.sharded_state_dict(
            model, is_loading=is_loading,
            # Optimizer state as tensors shaped like the parameters: reshardable to any layout.
            metadata={"distrib_optim_sharding_type": "fully_reshardable"},
        )
        return {
            "model": model,
            "optimizer": optimizer,
            "scheduler": t.scheduler.state_dict(),
            "train": {"step": t.step, "consumed_samples": t.consumed_samples},
        }

    def _metadata(self) -> dict:
        t = self.trainer
        return {
            "step": t.step,
            "consumed_samples": t.consumed_samples,
            "format": self.cfg.format,
            "layout": vars(t.layout),
            "world_size": dist.get_world_size(),
            "tokenizer": t.task.tokenizer and t.task.tokenizer.identity,
            "config": OmegaConf.to_container(t.cfg, resolve=True),
            "versions": {name: _version(name) for name in ("thann", "megatron-core", "torch")},
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    # -- save -----------------------------------------------------------------------------------

    def _weights_finite(self) -> bool:
        finite = torch.tensor([1.0 if all(torch.isfinite(p).all() for p in self.trainer.model[0].parameters())
                               else 0.0], device=next(self.trainer.model[0].parameters()).device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def save(self) -> str:
        step = self.trainer.step
        if not self._weights_finite():
            raise NonFiniteWeights(f"refusing to save step {step}: the model has NaN/inf weights")
        final = iteration_dir(self.cfg.dir, step)
        tmp = final + ".tmp"
        rank = dist.get_rank()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        state = self._sharded_state_dict(is_loading=False)
        metadata = self._metadata()
        if self.cfg.format == "zarr":
            zarr_store.save(state, tmp, metadata)
        else:
            dist_checkpointing.save(state, tmp)
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
        dist.barrier()  # every rank's part is on disk
        if rank == 0:
            with open(os.path.join(tmp, "thann.json"), "w") as f:
                json.dump(metadata, f, indent=1)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            with open(os.path.join(self.cfg.dir, LATEST + ".tmp"), "w") as f:
                f.write(os.path.basename(final))
            os.replace(os.path.join(self.cfg.dir, LATEST + ".tmp"), os.path.join(self.cfg.dir, LATEST))
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        """Keeps the newest ``keep`` checkpoints and removes leftovers of interrupted saves."""
        names = sorted(n for n in os.listdir(self.cfg.dir) if n.startswith("iter_"))
        complete = [n for n in names if not n.endswith(".tmp")]
        for name in [n for n in names if n.endswith(".tmp")] + complete[: -self.cfg.keep]:
            shutil.rmtree(os.path.join(self.cfg.dir, name), ignore_errors=True)

    # -- load -----------------------------------------------------------------------------------

    def load(self, path: str) -> None:
        t = self.trainer
        metadata = read_metadata(path)
        saved, ours = metadata["tokenizer"], t.task.tokenizer and t.task.tokenizer.identity
        if (saved and saved["fingerprint"]) != (ours and ours["fingerprint"]):
            raise ConfigError("data.tokenizer", ours and f"{ours['type']}:{ours['model']}",
                              f"the checkpoint {path} was trained with tokenizer {saved}, whose token ids mean "
                              "other strings; use its tokenizer or another checkpoint.dir")
        state = self._sharded_state_dict(is_loading=True)
        if metadata["format"] == "zarr":
            loaded = zarr_store.load(state, path)
        else:
            loaded = dist_checkpointing.load(state, path)
        unwrap_model(t.model[0]).load_state_dict(loaded["model"])
        t.optimizer.load_state_dict(loaded["optimizer"])
        unshare_adam_steps(t.optimizer)
        t.scheduler.load_state_dict(loaded["scheduler"])
        t.step = loaded["train"]["step"]
        t.consumed_samples = loaded["train"]["consumed_samples"]
        # RNG streams belong to ranks: restored only when the layout is the one that saved them.
        if metadata["layout"] == vars(t.layout) and metadata["world_size"] == dist.get_world_size():
            _set_rng_state(torch.load(os.path.join(path, "rng", f"rank_{dist.get_rank():05d}.pt"),
                                      weights_only=False))

    def resume(self) -> str | None:
        """Loads the newest complete checkpoint under checkpoint.dir, if any and if allowed."""
        if not self.cfg.resume:
            return None
        path = latest_checkpoint(self.cfg.dir)
        if path is None:
            return None
        self.load(path)
        return path
