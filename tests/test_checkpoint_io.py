"""Checkpoint I/O (issue 29): THANN's own chunk files read back by independent zarr readers and
into any sharding; every file flushed before a checkpoint is published and before ``latest``
moves; asynchronous saves that survive a SIGKILL mid-write, resume bit for bit, report a failed
background write and wait for it when stopped."""

import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts
import torch
import xxhash
import zarr

from conftest import ROOT, read_metrics, run_patched, tiny_run_overrides

EXIT_FAILED, EXIT_STOPPED = 1, 75


# -- the format, in one process ------------------------------------------------------------------

def _rows(key, full, parts, axis=0, prepend=0):
    """``full`` as ``parts`` ShardedTensors split along ``axis`` (all held by this one rank)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    pieces = full.chunk(parts, dim=axis - prepend) if axis >= prepend else list(full)
    return [ShardedTensor.from_rank_offsets(key, piece.clone(), (axis, i, parts), replica_id=0,
                                            prepend_axis_num=prepend) for i, piece in enumerate(pieces)]


def test_chunks_are_plain_zarr_read_into_any_sharding_and_verified(single_rank, tmp_path, monkeypatch):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from thann.checkpoint import durable, plain, zarr_store

    monkeypatch.setattr(zarr_store, "MAX_CHUNK_BYTES", 64)  # several chunks per shard
    weight = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    experts = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    counts = torch.arange(5)
    state = {"weight": _rows("weight", weight, 2), "experts": _rows("experts", experts, 2, prepend=1),
             "counts": _rows("counts", counts, 1), "note": ShardedObject("note", {"betas": (0.9, 0.95)}, (1,), (0,)),
             "position": {"step": 3}}
    root = tmp_path / "checkpoint"
    zarr_store.save(state, str(root), {"step": 3})

    # The chunk grid: each [4, 6] fp32 shard (96 bytes) split along rows into [2, 6] chunks.
    manifest = zarr_store.read_manifest(str(root))
    assert sorted(p for p in manifest if p.startswith("weight/c/")) == [f"weight/c/{i}/0" for i in range(4)]
    assert np.array_equal(np.fromfile(root / "weight" / "c" / "1" / "0", dtype="<f4").reshape(2, 6), weight[2:4])
    # Independent readers see the global arrays.
    for key, full in (("weight", weight), ("experts", experts), ("counts", counts)):
        read = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / key)}}).result()
        value = read.read().result()
        value = torch.from_numpy(value.view(np.int16)).view(torch.bfloat16) if full.dtype == torch.bfloat16 else \
            torch.from_numpy(value)
        assert torch.equal(value, full), key
    assert np.array_equal(zarr.open(str(root), mode="r")["weight"][:], weight.numpy())
    assert zarr.open(str(root), mode="r").attrs["step"] == 3
    # Every file but the manifest is listed, with the xxh3-128 digest of its bytes on the disk.
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest) == files
    assert all("xxh3_128:" + xxhash.xxh3_128((root / p).read_bytes()).hexdigest() == d for p, d in manifest.items())

    # Loaded into other shardings: whole, by column halves (every chunk cut in two), by four rows.
    layouts = {"whole": _rows("weight", torch.zeros(8, 6), 1), "columns": _rows("weight", torch.zeros(8, 6), 2, axis=1),
               "quarters": _rows("weight", torch.zeros(8, 6), 4)}
    for name, leaves in layouts.items():
        experts_into = _rows("experts", torch.zeros_like(experts), 2, prepend=1)
        loaded = zarr_store.load({"weight": leaves, "experts": experts_into,
                                  "note": ShardedObject("note", None, (1,), (0,))}, str(root))
        axis = 1 if name == "columns" else 0
        assert torch.equal(torch.cat(loaded["weight"], dim=axis), weight), name
        assert torch.equal(torch.stack(loaded["experts"]), experts)
        assert loaded["note"] == {"betas": (0.9, 0.95)} and loaded["position"] == {"step": 3}

    # A changed byte is found by the load that reads it, naming the array and chunk.
    chunk = root / "weight" / "c" / "3" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(zarr_store.CorruptCheckpoint, match=r"checksum mismatch in array 'weight', chunk 3\.0"):
        zarr_store.load({"weight": _rows("weight", torch.zeros(8, 6), 2, axis=1)}, str(root))

    # A checkpoint whose arrays tensorstore wrote (sharded chunks, before chunks were plain), with the
    # sha256 digests of its time, still loads; a changed byte in it is still found.
    old = tmp_path / "old"
    ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(old / "weight")}, "metadata": {
        "shape": [8, 6], "data_type": "float32",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4, 6]}},
        "codecs": [{"name": "sharding_indexed", "configuration": {"chunk_shape": [1, 6], "codecs": [
            {"name": "bytes", "configuration": {"endian": "little"}}]}}]}}, create=True).result()[...].write(
        weight.numpy()).result()
    plain.dump({}, str(old / "common.json"), "common")
    listed = ["common.json", "weight/c/0/0", "weight/c/1/0"]
    (old / "manifest.json").write_text(json.dumps({"files": {
        p: hashlib.sha256((old / p).read_bytes()).hexdigest() for p in listed}}))
    loaded = zarr_store.load({"weight": _rows("weight", torch.zeros(8, 6), 2, axis=1)}, str(old))
    assert torch.equal(torch.cat(loaded["weight"], dim=1), weight)
    zarr_store.verify(str(old))
    (old / "common.json").write_text((old / "common.json").read_text() + " ")
    with pytest.raises(zarr_store.CorruptCheckpoint, match="common.json"):
        zarr_store.verify(str(old))

    # checkpoint.fsync=false: not one flush.
    def refuse(*args):
        raise AssertionError("flushed")

    monkeypatch.setattr(os, "fsync", refuse)
    monkeypatch.setattr(os, "fdatasync", refuse)
    zarr_store.save({"weight": _rows("weight", weight, 2)}, str(tmp_path / "unflushed"), {"step": 3}, sync=False)
    durable.replace(str(tmp_path / "unflushed"), str(tmp_path / "renamed"), sync=False)


# -- runs -----------------------------------------------------------------------------------------

RECORD_FLUSHES = """
import atexit, json, os, threading
events, lock = [], threading.Lock()

def recorded(kind, call, paths):
    def wrapper(*args):
        where = paths(*args)  # before the call: a renamed path no longer exists after it
        result = call(*args)
        with lock:
            events.append([kind, *where])
        return result
    return wrapper

os.fsync = recorded("flush", os.fsync, lambda fd: [os.readlink(f"/proc/self/fd/{fd}")])
os.fdatasync = recorded("flush", os.fdatasync, lambda fd: [os.readlink(f"/proc/self/fd/{fd}")])
os.replace = recorded("rename", os.replace, lambda a, b: [os.path.realpath(a), os.path.realpath(b)])
main = os.getpid()
atexit.register(lambda: os.getpid() == main and json.dump(events, open(%r, "w")))
"""


def _published_in_order(events: list, run_dir, name: str) -> None:
    """Every file and directory of the checkpoint ``name`` was flushed (under its ``.tmp`` name,
    each directory after the files in it) before the rename that published it; the run directory
    was flushed after that rename, ``latest`` was flushed, moved, and the run directory flushed
    again."""
    run_dir = os.path.realpath(run_dir)
    final, latest = os.path.join(run_dir, name), os.path.join(run_dir, "latest")
    tmp = final + ".tmp"
    published = events.index(["rename", tmp, final])
    moved = next(i for i, e in enumerate(events) if i > published and e == ["rename", latest + ".tmp", latest])
    flushes = [(i, e[1]) for i, e in enumerate(events) if e[0] == "flush"]

    def last_flush(path: str, before: int) -> int:
        found = [i for i, p in flushes if p == path and i < before]
        assert found, f"{path} never flushed before event {before}"
        return found[-1]

    for directory, subdirectories, files in os.walk(final):
        relative = os.path.relpath(directory, final)
        inside = os.path.normpath(os.path.join(tmp, relative))
        directory_flushed = last_flush(inside, published)
        for entry in files:
            assert last_flush(os.path.join(inside, entry), published) < directory_flushed, entry
    assert any(published < i < moved and p == run_dir for i, p in flushes), "run directory not flushed after rename"
    last_flush(latest + ".tmp", moved)
    assert any(i > moved and p == run_dir for i, p in flushes), "run directory not flushed after latest moved"


def _chunk_digests(checkpoint) -> dict:
    """The digest of every array chunk (weights and Adam moments): equal digests, equal state."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())["files"]
    return {path: digest for path, digest in manifest.items() if "/c/" in path}


def _losses(run_dir) -> list:
    return [(r["step"], r["split"], r["loss"]) for r in read_metrics(run_dir)]


KILLED_WHILE_WRITING_IN_THE_BACKGROUND = """
import os, signal, threading
from thann.checkpoint import zarr_store
from thann.training.trainer import Trainer

write_shards, train_step = zarr_store._write_shards, Trainer.train_step
trained_on = threading.Event()
saves = {"n": 0}

def train_step_then_tell(self, batches):
    record = train_step(self, batches)
    if self.position.step == 5:
        trained_on.set()
    return record

def write_then_die(snapshot, stop=None):
    saves["n"] += 1
    if saves["n"] < 2:
        return write_shards(snapshot, stop)
    assert trained_on.wait(300)  # the loop trains step 5 while step 4 is being written
    write_shards(snapshot, stop)  # its files are on disk; the manifest and the rename are not
    os.kill(os.getpid(), signal.SIGKILL)

Trainer.train_step = train_step_then_tell
zarr_store._write_shards = write_then_die
"""


def test_async_saves_are_flushed_before_latest_moves_survive_a_kill_and_resume_bitwise(tiny_corpus, tmp_path):
    def overrides(name):
        return tiny_run_overrides(tiny_corpus, tmp_path / name, steps=6) + [
            "checkpoint.interval=2", "checkpoint.async_save=true", "train.eval_interval=3"]

    straight = run_patched(RECORD_FLUSHES % str(tmp_path / "flushes.json"), overrides("straight"), tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "saved " in straight.stdout and "(written in the background in" in straight.stdout
    events = json.loads((tmp_path / "flushes.json").read_text())
    assert sorted(p.name for p in (tmp_path / "straight").glob("iter_*")) == ["iter_0000004", "iter_0000006"]
    for name in ("iter_0000004", "iter_0000006"):
        _published_in_order(events, tmp_path / "straight", name)

    run_dir = tmp_path / "split"
    killed = run_patched(KILLED_WHILE_WRITING_IN_THE_BACKGROUND, overrides("split"), tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (run_dir / "latest").read_text() == "iter_0000002"
    assert not (run_dir / "iter_0000004").exists() and not (run_dir / "iter_0000004.tmp" / "manifest.json").exists()
    assert any((run_dir / "iter_0000004.tmp" / "embedding.word_embeddings.weight" / "c").rglob("*"))
    assert max(r["step"] for r in read_metrics(run_dir)) >= 5  # training went on while step 4 was written

    resumed = run_patched("", overrides("split"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "removed iter_0000004.tmp: a save that never completed" in resumed.stdout
    assert f"resumed from {run_dir / 'iter_0000002'} at step 2" in resumed.stdout
    assert _losses(run_dir) == _losses(tmp_path / "straight")
    assert _chunk_digests(run_dir / "iter_0000006") == _chunk_digests(tmp_path / "straight" / "iter_0000006")


FULL_WHILE_WRITING_STEP_4 = """
import errno, os
from thann.checkpoint import durable

write = durable.write

def write_until_full(path, data, sync):
    if "iter_0000004.tmp" in path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return write(path, data, sync)

durable.write = write_until_full
"""


def test_a_failed_background_write_is_one_line_and_latest_stays(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    out = run_patched(FULL_WHILE_WRITING_STEP_4, tiny_run_overrides(tiny_corpus, run_dir, steps=6) + [
        "checkpoint.interval=2", "checkpoint.async_save=true"], tmp_path)
    assert out.returncode == EXIT_FAILED, out.stderr[-3000:]
    last = out.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("could not save step 4: No space left on device") and "Traceback" not in out.stderr
    assert last.endswith("the run resumes from iter_0000002"), last
    assert (run_dir / "latest").read_text() == "iter_0000002"
    assert sorted(p.name for p in run_dir.glob("iter_*")) == ["iter_0000002"]


SIGTERM_WHILE_STEP_2_IS_WRITTEN = """
import os, signal, time
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from thann.checkpoint.checkpointer import Checkpointer
from thann.training.trainer import Trainer

save, train_step = Checkpointer.save, Trainer.train_step
write = FileSystemWriterAsync.write_preloaded_data_multiproc

def slow_write(*args):  # in the forked writer: step 2 is still being written when step 3 ends
    time.sleep(5)
    return write(*args)

def save_then_sigterm(self, step, metadata):
    path = save(self, step, metadata)
    if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return path

def train_step_recorded(self, batches):
    record = train_step(self, batches)
    events.append(["step", self.position.step])
    return record

FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(slow_write)
Checkpointer.save = save_then_sigterm
Trainer.train_step = train_step_recorded
"""


def _run_guarded(patch: str, overrides: list[str], tmp_path):
    """run_patched, with the patch and the run under ``if __name__ == "__main__"``: megatron-core's
    torch_dist writer starts a multiprocessing Manager by spawning, which imports the script again."""
    (tmp_path / "fault.py").write_text(patch)
    script = tmp_path / "guarded_pretrain.py"
    script.write_text("if __name__ == '__main__':\n    import sys\n    import fault  # noqa: F401\n"
                      "    from thann.cli import pretrain\n    sys.argv[0] = 'pretrain_thann.py'\n    pretrain()\n")
    return subprocess.run([sys.executable, str(script), "logging.wandb.enabled=false", "logging.progress=false",
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_torch_dist_async_saves_wait_for_a_stop_are_flushed_and_resume(tiny_corpus, tmp_path):
    """megatron-core's forked writer; SIGTERM while it writes: the run trains step 3, waits for
    step 2's checkpoint, saves step 3 and stops (75); both were flushed before publishing."""
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_corpus, run_dir, steps=4) + [
        "checkpoint.format=torch_dist", "checkpoint.async_save=true", "checkpoint.interval=2"]
    stopped = _run_guarded(RECORD_FLUSHES % str(tmp_path / "flushes.json") + SIGTERM_WHILE_STEP_2_IS_WRITTEN,
                           overrides, tmp_path)
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert sorted(p.name for p in run_dir.glob("iter_*")) == ["iter_0000002", "iter_0000003"]
    assert (run_dir / "latest").read_text() == "iter_0000003"
    events = json.loads((tmp_path / "flushes.json").read_text())
    for name in ("iter_0000002", "iter_0000003"):
        _published_in_order(events, run_dir, name)
        assert (run_dir / name / ".metadata").exists()
    step_2 = os.path.realpath(run_dir / "iter_0000002")
    assert events.index(["step", 3]) < events.index(["rename", step_2 + ".tmp", step_2])  # written while step 3 ran

    resumed = _run_guarded("", overrides, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'iter_0000003'} at step 3" in resumed.stdout
    assert (run_dir / "latest").read_text() == "iter_0000004"
