"""Saving and resuming training from named stateful parts (thann.checkpoint.parts), the RNG
streams of every rank (``iter_*/rng/rank_00000.json``) and a description of the run, in a run
directory laid out as thann.checkpoint.directory says; what a run resumes is decided by
thann.checkpoint.resume.

A checkpoint is written under ``iter_*.tmp`` and renamed, and ``latest`` replaced, only after
every rank has finished: a crash mid-save leaves the previous checkpoint as ``latest`` (and a
``.tmp`` directory that the next start removes, saying so). Resuming does not trust ``latest``
alone: when it is missing or names a missing or damaged checkpoint, the newest complete
checkpoint that verifies is used, and the run says which and why.

Nothing a run did not create is ever removed: a fresh start (``checkpoint.resume=false``, or
nothing to resume) moves an earlier run's checkpoints, ``latest`` and logs into ``archive/``,
and a save whose directory name is taken by a checkpoint of an abandoned timeline moves that one
there too. Pruning (``checkpoint.keep``) removes only checkpoints of this run.
"""

import json
import os
import random
import shutil
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

from thann.checkpoint import plain, zarr_store
from thann.checkpoint.directory import (
    LATEST,
    METADATA,
    Candidate,
    find_checkpoints,
    interrupted_saves,
    iteration_dir,
    latest_checkpoint,
    read_metadata,
    set_aside,
)
from thann.checkpoint.lock import DirectoryInUse, DirectoryLock
from thann.checkpoint.parts import Part
from thann.checkpoint.resume import restores_rng

# Room kept free beyond a checkpoint's own size when checking the disk before a save.
_FREE_SPACE_MARGIN = 1.05


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or resumed; the message says why and what to do, ``detail``
    (for the run's log) what the layers below reported."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail


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


def _rng_file(rank: int) -> str:
    return os.path.join("rng", f"rank_{rank:05d}.json")


class Checkpointer:
    def __init__(self, cfg, message: Callable[[str], None] = print):
        self.cfg = cfg
        self.message = message
        self.parts: dict[str, Part] = {}
        self.run_id = uuid.uuid4().hex[:12]
        self._lock = DirectoryLock(cfg.dir)

    def attach(self, parts: dict[str, Part]) -> None:
        self.parts = parts

    # -- the directory belongs to one run ----------------------------------------------------------

    def acquire(self) -> None:
        """Collective: rank 0 takes the directory's lock; every rank learns whether it could."""
        outcome = [None]
        if dist.get_rank() == 0:
            try:
                self._lock.acquire()
                holder = self._lock.stale_holder
                outcome = [{"stale": holder}]
            except DirectoryInUse as e:
                outcome = [{"error": str(e)}]
        dist.broadcast_object_list(outcome, src=0)
        if "error" in outcome[0]:
            raise DirectoryInUse(outcome[0]["error"])
        holder = outcome[0]["stale"]
        if holder:
            self.message(f"{self.cfg.dir}: the previous run (pid {holder.get('pid')} on {holder.get('host')}) ended "
                         "without releasing it; taking it over")

    def release(self) -> None:
        self._lock.release()

    def tidy(self) -> None:
        """Collective, at start-up: removes the ``.tmp`` directories of saves that never completed
        (a run killed or aborted mid-save), saying so."""
        if dist.get_rank() == 0:
            for name in interrupted_saves(self.cfg.dir):
                shutil.rmtree(os.path.join(self.cfg.dir, name), ignore_errors=True)
                self.message(f"removed {name}: a save that never completed (the run that wrote it was stopped)")
        dist.barrier()

    def start_fresh(self, run_files: list[str], reason: str) -> None:
        """Collective: moves an earlier run's checkpoints, ``latest`` and ``run_files`` (its
        metrics, logs) into ``archive/`` so that a run starting from scratch cannot overwrite or
        prune them; says where."""
        if dist.get_rank() == 0:
            names = sorted(n for n in os.listdir(self.cfg.dir) if n.startswith("iter_") and not n.endswith(".tmp"))
            checkpoints = len(names)
            names += [n for n in (LATEST, *run_files) if os.path.exists(os.path.join(self.cfg.dir, n))]
            if names:
                kept = set_aside(self.cfg.dir, names)
                what = f"{checkpoints} checkpoint(s) and logs" if checkpoints else "logs"
                self.message(f"{reason}: starting from scratch; the earlier run's {what} are kept in {kept}")
        dist.barrier()

    # -- save -----------------------------------------------------------------------------------

    def _check_free_space(self, states: dict, step: int, resume_hint: str) -> None:
        sharded = [t for t in nested_values(states) if isinstance(t, ShardedTensor)]
        mine = sum(t.data.numel() * t.data.element_size() for t in sharded if is_main_replica(t.replica_id))
        total = torch.tensor([float(mine)], dtype=torch.float64,
                             device=sharded[0].data.device if sharded else torch.device("cpu"))
        dist.all_reduce(total)
        needed = total.item() * _FREE_SPACE_MARGIN
        free = shutil.disk_usage(self.cfg.dir).free
        if free < needed:
            raise CheckpointError(
                f"not enough free space in checkpoint.dir to save step {step} (needs {needed / 2**30:.2f} GiB, "
                f"{free / 2**30:.2f} GiB free); free some or lower checkpoint.keep, and start again{resume_hint}",
                detail=f"{self.cfg.dir}: {free} bytes free, {needed:.0f} needed")

    def save(self, step: int, metadata: dict) -> str:
        """Collective. Writes every part at ``step``; returns the checkpoint's directory."""
        final = iteration_dir(self.cfg.dir, step)
        tmp = final + ".tmp"
        rank = dist.get_rank()
        latest = latest_checkpoint(self.cfg.dir)
        resume_hint = f": the run resumes from {os.path.basename(latest)}" if latest else ""
        states = {name: part.state(is_loading=False) for name, part in self.parts.items()}
        self._check_free_space(states, step, resume_hint)
        metadata = {**metadata, "run_id": self.run_id, "format": self.cfg.format,
                    "versions": {name: _version(name) for name in ("thann", "megatron-core", "torch")},
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "saved_at_unix": time.time()}
        try:
            error = ""
            if rank == 0:
                try:
                    shutil.rmtree(tmp, ignore_errors=True)
                    os.makedirs(tmp)
                except OSError as e:
                    error = f"cannot create {tmp}: {e.strerror}"
            zarr_store.agree(error)
            if self.cfg.format == "zarr":
                zarr_store.save(states, tmp, metadata, rank_files={_rng_file(rank): _rng_state()})
            else:
                dist_checkpointing.save(states, tmp)
                os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
                plain.dump(_rng_state(), os.path.join(tmp, _rng_file(rank)), "rng")
                dist.barrier()
            error = ""
            if rank == 0:
                try:
                    self._publish(tmp, final, metadata)
                except OSError as e:
                    error = f"cannot finish {final}: {e.strerror}"
            zarr_store.agree(error)
        except zarr_store.CheckpointWriteError as e:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not save step {step}: {e.cause}; free space or fix checkpoint.dir and "
                                  f"start again{resume_hint}", detail=str(e)) from None
        if rank == 0:
            self._prune(step)
        dist.barrier()
        return final

    def _publish(self, tmp: str, final: str, metadata: dict) -> None:
        with open(os.path.join(tmp, METADATA), "w") as f:
            json.dump(metadata, f, indent=1)
        if os.path.exists(final):  # a checkpoint of a timeline abandoned by resuming an earlier one
            kept = set_aside(self.cfg.dir, [os.path.basename(final)])
            self.message(f"{os.path.basename(final)} of an earlier timeline is kept in {kept}")
        os.replace(tmp, final)
        with open(os.path.join(self.cfg.dir, LATEST + ".tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(self.cfg.dir, LATEST + ".tmp"), os.path.join(self.cfg.dir, LATEST))

    def _prune(self, step: int) -> None:
        """Keeps this run's newest ``keep`` checkpoints up to ``step``. Checkpoints of other runs,
        and of this run beyond ``step`` (left by a timeline that was abandoned when an earlier
        checkpoint was resumed), are never touched."""
        ours = [c for c in find_checkpoints(self.cfg.dir) if c.metadata.get("run_id") == self.run_id and c.step <= step]
        ours.sort(key=lambda c: c.step)
        for candidate in ours[: -self.cfg.keep]:
            shutil.rmtree(candidate.path, ignore_errors=True)

    # -- load -----------------------------------------------------------------------------------

    def load(self, path: str, layout: dict) -> dict:
        """Collective. Loads every part from ``path``; returns its metadata."""
        metadata = read_metadata(path)
        states = {name: part.state(is_loading=True) for name, part in self.parts.items()}
        if metadata["format"] == "zarr":
            loaded = zarr_store.load(states, path)
        else:
            loaded = dist_checkpointing.load(states, path)
        for name, part in self.parts.items():
            part.load(loaded[name])
        if restores_rng(metadata, layout, dist.get_world_size()):
            rng = _rng_file(dist.get_rank())
            if metadata["format"] == "zarr":
                _set_rng_state(zarr_store.read_plain(path, rng))
            else:
                _set_rng_state(plain.load(os.path.join(path, rng)))
        return metadata

    def resume(self, candidates: list[Candidate], layout: dict) -> Candidate | None:
        """Loads the first candidate that verifies; says which one and why when it is not the one
        ``latest`` names. None when there is nothing to resume."""
        if not candidates:
            return None
        skipped = []
        for candidate in candidates:
            try:
                self.load(candidate.path, layout)
            except zarr_store.CorruptCheckpoint as e:  # verified collectively: every rank is here
                skipped.append(f"{os.path.basename(candidate.path)}: {e}")
                continue
            notes = candidates[0].notes + skipped
            if notes:
                self.message(f"resuming from {candidate.path}, the newest complete checkpoint that verifies ("
                             + "; ".join(notes) + ")")
            self.run_id = candidate.metadata.get("run_id", self.run_id)
            return candidate
        raise CheckpointError(
            f"{self.cfg.dir} holds checkpoints but none can be resumed (" + "; ".join(skipped) + "); check them with "
            f"`python -m thann.checkpoint verify {self.cfg.dir}`, or set checkpoint.resume=false to start from "
            "scratch (they are kept)")
