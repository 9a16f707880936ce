"""Saving and resuming training from named stateful parts (thann.checkpoint.parts), the RNG
streams of every rank (``iter_*/rng/rank_00000.json``) and a description of the run, in a run
directory laid out as thann.checkpoint.directory says; what a run resumes is decided by
thann.checkpoint.resume.

A checkpoint is written under ``iter_*.tmp`` and renamed, and ``latest`` replaced, only after
every rank has finished: a crash mid-save leaves the previous checkpoint as ``latest`` (and a
``.tmp`` directory that the next start removes, saying so). Resuming does not trust ``latest``
alone: when it is missing or names a missing or damaged checkpoint, the newest complete
checkpoint that verifies is used, and the run says which and why.

Every file and directory of a checkpoint is flushed to the disk before it is renamed into place,
and ``latest`` moves only after that rename is on the disk (thann.checkpoint.durable;
``checkpoint.fsync=false`` turns the flushes off).

With ``checkpoint.async_save`` a save copies the state to host memory and returns; the files are
written, flushed and hashed on a background thread (zarr) or a forked process (torch_dist,
megatron-core's AsyncCallsQueue), and the checkpoint is published by ``poll`` at a later step
boundary, once every rank has written its part, or by ``finish`` (the next save, the end of the
run, a stop). Every collective runs on the main thread, in ``save``, ``poll`` and ``finish``. A
failure of the background write is raised by the ``poll`` that finds it; ``latest`` never moves
to a checkpoint that is not complete, and pruning happens only after the new one is published.

Nothing a run did not create is ever removed: a fresh start (``checkpoint.resume=false``, or
nothing to resume) moves an earlier run's checkpoints, ``latest`` and logs into ``archive/``,
and a save whose directory name is taken by a checkpoint of an abandoned timeline moves that one
there too. Pruning (``checkpoint.keep``) removes only checkpoints of this run.
"""

import json
import os
import random
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from torch.distributed.checkpoint import CheckpointException

from thann.checkpoint import durable, plain, zarr_store
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
from thann.config import ConfigError
from thann.parallel import state

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


class _ZarrWrite:
    """This rank's part of a zarr checkpoint: taken on the main thread (``prepare``, collective),
    written here or on a background thread, completed collectively on the main thread."""

    def __init__(self, states: dict, root: str, metadata: dict, rank_files: dict, host: dict | None, sync: bool):
        self.root, self.sync = root, sync
        background = host is not None
        self.snapshot = zarr_store.prepare(states, root, metadata, rank_files, host=host, sync=sync)
        self.digests, self.error = {}, ""
        self.stop = threading.Event()
        self.thread = None
        if background:
            # A daemon: a process ending on a failure elsewhere is not held up by it.
            self.thread = threading.Thread(target=self._write, name="checkpoint-writer", daemon=True)
            self.thread.start()
        else:
            self._write()

    def _write(self) -> None:
        try:
            self.digests = zarr_store._write_shards(self.snapshot, self.stop)
        except Exception as e:  # noqa: BLE001 - reported on every rank by complete()
            self.error = zarr_store.describe(e)
        self.snapshot = None  # frees the host copy

    def done(self, wait: bool) -> bool:
        """Collective: whether every rank has written its part (after waiting for this one's)."""
        if wait and self.thread is not None:
            self.thread.join()
        flag = torch.tensor([float(self.thread is None or not self.thread.is_alive())], device=state.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def complete(self) -> None:
        zarr_store.complete(self.root, self.digests, self.error, self.sync)

    def abandon(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


class _TorchDistWrite:
    """This rank's part of a torch_dist checkpoint, written by megatron-core (in a forked process,
    which holds a copy-on-write snapshot of the state, when in the background); its writer syncs
    its data files, and rank 0 flushes the rest before publishing."""

    def __init__(self, states: dict, root: str, rank_files: dict, background: bool, sync: bool):
        self.root, self.sync = root, sync
        for path, value in rank_files.items():
            os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
            plain.dump(value, os.path.join(root, path), path)
            durable.flush_file(os.path.join(root, path), sync)
        self.queue, self.error = None, ""
        try:
            if background:
                self.queue = AsyncCallsQueue()
                self.queue.schedule_async_request(dist_checkpointing.save(states, root, async_sharded_save=True))
            else:
                dist_checkpointing.save(states, root)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - agreed by every rank in complete()
            self.error = zarr_store.describe(e)

    def done(self, wait: bool) -> bool:
        """Collective: megatron-core's finalization (its metadata written) once every rank is done.
        A failed write (CheckpointException: a BaseException) is kept for complete() to report."""
        if self.queue is None:
            return True
        try:
            return bool(self.queue.maybe_finalize_async_calls(blocking=wait))
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            self.error = zarr_store.describe(e)
            return True

    def complete(self) -> None:
        zarr_store.agree(self.error)
        dist.barrier()
        if dist.get_rank() == 0:
            durable.flush_tree(self.root, self.sync)

    def abandon(self) -> None:
        """Kills the forked writer (megatron-core's queue closes only persistent ones)."""
        if self.queue is not None:
            for call in self.queue.async_calls:
                call.async_caller.close(abort=True)


@dataclass
class _Save:
    step: int
    tmp: str
    final: str
    metadata: dict
    resume_hint: str
    writer: _ZarrWrite | _TorchDistWrite
    started: float


class Checkpointer:
    def __init__(self, cfg, message: Callable[[str], None] = print):
        self.cfg = cfg
        self.message = message
        self.parts: dict[str, Part] = {}
        self.run_id = uuid.uuid4().hex[:12]
        self._lock = DirectoryLock(cfg.dir)
        self._pending: _Save | None = None  # a save being written in the background
        self._host: dict = {}  # host copies of the state, reused by every asynchronous save
        self._pruning: threading.Thread | None = None

    def attach(self, parts: dict[str, Part]) -> None:
        self.parts = parts

    # -- the directory belongs to one run ----------------------------------------------------------

    def acquire(self) -> None:
        """Collective: rank 0 takes the directory's lock; every rank learns whether it could, and
        whether it sees the directory rank 0 writes (see _check_shared)."""
        outcome = [None]
        if dist.get_rank() == 0:
            try:
                self._lock.acquire()
                holder = self._lock.stale_holder
                probe = os.path.join(self.cfg.dir, f".shared-{self.run_id}")
                with open(probe, "w") as f:
                    os.fsync(f.fileno())  # closed and on the disk: other hosts' NFS clients see it
                outcome = [{"stale": holder, "probe": probe}]
            except DirectoryInUse as e:
                outcome = [{"error": str(e)}]
        dist.broadcast_object_list(outcome, src=0)
        if "error" in outcome[0]:
            raise DirectoryInUse(outcome[0]["error"])
        self._check_shared(outcome[0]["probe"])
        holder = outcome[0]["stale"]
        if holder:
            self.message(f"{self.cfg.dir}: the previous run (pid {holder.get('pid')} on {holder.get('host')}) ended "
                         "without releasing it; taking it over")

    def _check_shared(self, probe: str) -> None:
        """Collective: every rank must see the directory rank 0 writes. A checkpoint.dir on a path
        of each node's own (a local disk, /tmp) would take the shards of other nodes' ranks to their
        disks: a save would be published incomplete, and resume nowhere. Every rank looks for the
        file of a fresh name that rank 0 has just written there."""
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, (os.path.exists(probe), socket.gethostname()))
        if dist.get_rank() == 0:
            os.remove(probe)
        blind = sorted({host for visible, host in seen if not visible})
        if blind:
            self._lock.release()
            raise ConfigError("checkpoint.dir", self.cfg.dir, f"the ranks on {', '.join(blind)} do not see what rank 0 "
                              f"(on {seen[0][1]}) writes there: every node must see the same directory (a shared "
                              "filesystem), or checkpoints would be saved in pieces on each node's disk")

    def release(self) -> None:
        """Frees the directory; a save still being written in the background is stopped and never
        published (its ``.tmp`` directory is removed at the next start)."""
        if self._pending is not None:
            self._pending.writer.abandon()
            self._pending = None
        self._wait_for_pruning()
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
        """Collective. Writes every part at ``step``; returns the checkpoint's directory, published
        when this returns, or with ``checkpoint.async_save`` by a later ``poll`` or ``finish``
        (this returns once the state is copied to host memory)."""
        self.finish()
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
        started = time.perf_counter()
        background, sync = self.cfg.async_save, self.cfg.fsync
        try:
            error = ""
            if rank == 0:
                try:
                    shutil.rmtree(tmp, ignore_errors=True)
                    os.makedirs(tmp)
                except OSError as e:
                    error = f"cannot create {tmp}: {e.strerror}"
            zarr_store.agree(error)
            rank_files = {_rng_file(rank): _rng_state()}
            if self.cfg.format == "zarr":
                writer = _ZarrWrite(states, tmp, metadata, rank_files, self._host if background else None, sync)
            else:
                writer = _TorchDistWrite(states, tmp, rank_files, background, sync)
        except zarr_store.CheckpointWriteError as e:
            raise self._failed(step, tmp, resume_hint, e) from None
        pending = _Save(step, tmp, final, metadata, resume_hint, writer, started)
        if background:
            self._pending = pending
        else:
            self._complete(pending)
        return final

    @property
    def saving(self) -> bool:
        """Whether a save is being written in the background (published by a later poll or finish)."""
        return self._pending is not None

    def poll(self) -> None:
        """Collective, at a step boundary: publishes the save being written in the background
        once every rank has written its part; its failure is raised here (CheckpointError)."""
        if self._pending is not None and self._pending.writer.done(wait=False):
            pending, self._pending = self._pending, None
            self._complete(pending)

    def finish(self) -> None:
        """Collective: waits for the save being written in the background, publishes it, and
        waits for the pruning of older checkpoints."""
        if self._pending is not None:
            self._pending.writer.done(wait=True)  # a second Ctrl-C here leaves it to release() to stop
            pending, self._pending = self._pending, None
            self._complete(pending)
        self._wait_for_pruning()

    def _wait_for_pruning(self) -> None:
        if self._pruning is not None:
            self._pruning.join()
            self._pruning = None

    def _complete(self, pending: _Save) -> None:
        rank = dist.get_rank()
        try:
            pending.writer.complete()
            error = ""
            if rank == 0:
                try:
                    self._publish(pending.tmp, pending.final, pending.metadata)
                except OSError as e:
                    error = f"cannot finish {pending.final}: {e.strerror}"
            zarr_store.agree(error)
        except zarr_store.CheckpointWriteError as e:
            raise self._failed(pending.step, pending.tmp, pending.resume_hint, e) from None
        if rank == 0:  # off the critical path: deleting gigabytes takes seconds on some disks
            self._pruning = threading.Thread(target=self._prune, args=(pending.step,), name="checkpoint-pruner")
            self._pruning.start()
        dist.barrier()
        took = f" (written in the background in {time.perf_counter() - pending.started:.1f} s)" \
            if self.cfg.async_save else ""
        self.message(f"saved {pending.final}{took}")

    def _failed(self, step: int, tmp: str, resume_hint: str, e: zarr_store.CheckpointWriteError) -> CheckpointError:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        return CheckpointError(f"could not save step {step}: {e.cause}; free space or fix checkpoint.dir and "
                               f"start again{resume_hint}", detail=str(e))

    def _publish(self, tmp: str, final: str, metadata: dict) -> None:
        """Rank 0, once every rank's files are flushed: the description, the rename, ``latest``."""
        sync = self.cfg.fsync
        durable.write(os.path.join(tmp, METADATA), memoryview(json.dumps(metadata, indent=1).encode()), sync)
        durable.flush_dirs([tmp], sync)
        if os.path.exists(final):  # a checkpoint of a timeline abandoned by resuming an earlier one
            kept = set_aside(self.cfg.dir, [os.path.basename(final)])
            self.message(f"{os.path.basename(final)} of an earlier timeline is kept in {kept}")
        durable.replace(tmp, final, sync)
        latest = os.path.join(self.cfg.dir, LATEST)
        durable.write(latest + ".tmp", memoryview(os.path.basename(final).encode()), sync)
        durable.replace(latest + ".tmp", latest, sync)

    def _prune(self, step: int) -> None:
        """Keeps this run's newest ``keep`` checkpoints up to ``step``. Checkpoints of other runs,
        and of this run beyond ``step`` (left by a timeline that was abandoned when an earlier
        checkpoint was resumed), are never touched."""
        ours = [c for c in find_checkpoints(self.cfg.dir) if c.metadata.get("run_id") == self.run_id and c.step <= step]
        ours.sort(key=lambda c: c.step)
        for candidate in ours[: -self.cfg.keep]:
            os.remove(os.path.join(candidate.path, METADATA))  # no longer complete, should the removal be cut short
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
                _set_rng_state(zarr_store.everywhere(lambda: zarr_store.read_plain(path, rng)))
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
