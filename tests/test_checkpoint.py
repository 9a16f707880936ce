"""Checkpoints: exact resume, resharding across layouts, plain-zarr readability, corruption and
crashes during save."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import zarr

from conftest import ROOT, read_metrics, run_patched, run_pretrain, slow_case, tiny_run_overrides

HARNESS = os.path.join(ROOT, "tests", "support", "checkpoint_harness.py")


def _train_losses(run_dir):
    return [(r["step"], r["split"], r["loss"]) for r in read_metrics(run_dir)]


@pytest.mark.parametrize("fmt", ["zarr", slow_case("torch_dist")])
def test_resume_continues_bitwise_exactly(tiny_corpus, tmp_path, fmt):
    """20 steps straight == 10 steps, stop, resume, 10 more: every loss identical (dropout on)."""
    common = tiny_run_overrides(tiny_corpus, tmp_path / "straight", steps=20) + [
        "train.eval_interval=5", f"checkpoint.format={fmt}"]
    assert run_pretrain(common).returncode == 0
    split = tiny_run_overrides(tiny_corpus, tmp_path / "split", steps=20) + [
        "train.eval_interval=5", f"checkpoint.format={fmt}"]
    first = run_pretrain(split + ["train.stop_after_step=10"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "split" / "latest").read_text() == "iter_0000010"
    second = run_pretrain(split)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    assert _train_losses(tmp_path / "split") == _train_losses(tmp_path / "straight")


def test_resume_with_the_distributed_optimizer_on_two_ranks(tiny_corpus, tmp_path):
    """ZeRO-1 optimizer state is saved in model space and reloaded: the resumed run matches."""
    def overrides(name):
        return tiny_run_overrides(tiny_corpus, tmp_path / name, steps=6) + [
            "parallel.distributed_optimizer=true", "train.eval_interval=3"]
    assert run_pretrain(overrides("straight"), nproc=2).returncode == 0
    first = run_pretrain(overrides("split") + ["train.stop_after_step=3"], nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_pretrain(overrides("split"), nproc=2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _train_losses(tmp_path / "split") == _train_losses(tmp_path / "straight")


def _harness(tmp_path, corpus, nproc, run_dir, prefix, extra=()):
    overrides = tiny_run_overrides(corpus, run_dir, steps=4) + [
        "model.tokenization.dropout=0.0", "train.eval_interval=100", "logging.wandb.enabled=false",
        "logging.progress=false", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
           HARNESS, str(prefix), *overrides]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.fixture(scope="module")
def saved_at_tp2_ep2(tiny_corpus, tmp_path_factory):
    """A 4-rank tp2·sp·ep2 run saved at step 2 (of 4), and its own continuation to step 4."""
    base = tmp_path_factory.mktemp("reshard")
    layout = ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"]
    _harness(base, tiny_corpus, 4, base / "origin", base / "origin", layout + ["train.stop_after_step=2"])
    shutil.copytree(base / "origin", base / "continued")
    _harness(base, tiny_corpus, 4, base / "continued", base / "continued", layout)
    return base


@pytest.mark.parametrize("nproc, layout", [pytest.param(1, [], id="tp1"), slow_case(2, ["parallel.pp=2"], id="pp2")])
def test_checkpoint_from_tp2_ep2_loads_into_other_layouts(tiny_corpus, saved_at_tp2_ep2, nproc, layout):
    base = saved_at_tp2_ep2
    name = f"loaded_{nproc}"
    shutil.copytree(base / "origin", base / name)
    _harness(base, tiny_corpus, nproc, base / name, base / name, layout)
    originals = torch.load(base / "origin.end.pt")
    loaded = torch.load(base / f"{name}.start.pt")
    assert loaded.keys() == originals.keys()
    for key in originals:
        assert torch.equal(loaded[key], originals[key]), key
    continued = [r["loss"] for r in read_metrics(base / "continued") if r["split"] == "train"][-2:]
    resumed = [r["loss"] for r in read_metrics(base / name) if r["split"] == "train"][-2:]
    assert resumed == pytest.approx(continued, rel=1e-4)


def test_plain_zarr_reads_the_embedding(saved_at_tp2_ep2):
    base = saved_at_tp2_ep2
    path = base / "origin" / (base / "origin" / "latest").read_text()
    embedding = zarr.open(str(path), mode="r")["embedding.word_embeddings.weight"]
    originals = torch.load(base / "origin.end.pt")["embedding.word_embeddings.weight"]
    assert tuple(embedding.shape) == tuple(originals.shape) == (100352, 128)
    assert torch.equal(torch.from_numpy(embedding[:]), originals)


def _checkpoint_tool(*args):
    return subprocess.run([sys.executable, "-m", "thann.checkpoint", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_tools_and_a_flipped_byte(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert run_pretrain(tiny_run_overrides(tiny_corpus, run_dir, steps=2)).returncode == 0
    inspect = _checkpoint_tool("inspect", run_dir)
    assert inspect.returncode == 0 and "step 2" in inspect.stdout and "files OK" in inspect.stdout
    export = _checkpoint_tool("export", run_dir, tmp_path / "model.safetensors")
    assert export.returncode == 0, export.stderr
    from safetensors.torch import load_file
    assert load_file(tmp_path / "model.safetensors")["embedding.word_embeddings.weight"].shape == (100352, 128)
    exported = (tmp_path / "model.safetensors").read_bytes()
    again = _checkpoint_tool("export", run_dir, tmp_path / "model.safetensors")
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    assert (tmp_path / "model.safetensors").read_bytes() == exported  # untouched
    assert _checkpoint_tool("export", run_dir, tmp_path / "model.safetensors", "--force").returncode == 0
    latest = (run_dir / "latest").read_text()
    into_run = _checkpoint_tool("export", run_dir, run_dir / "latest", "--force")
    assert into_run.returncode == 2 and "inside the run directory" in into_run.stderr
    assert (run_dir / "latest").read_text() == latest

    checkpoint = run_dir / "iter_0000002"
    chunk = checkpoint / "learnt_tokenization.mix.weight" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    verify = _checkpoint_tool("verify", run_dir)
    assert verify.returncode == 1
    assert "array 'learnt_tokenization.mix.weight', chunk 0.0" in verify.stderr
    damaged = _checkpoint_tool("inspect", run_dir)
    assert damaged.returncode == 1 and "checksums: FAILED" in damaged.stdout
    resume = run_pretrain(tiny_run_overrides(tiny_corpus, run_dir, steps=4))
    assert resume.returncode != 0
    assert "array 'learnt_tokenization.mix.weight', chunk 0.0" in resume.stderr


KILLED_WHILE_WRITING = """
import os, signal
import torch.distributed as dist
from thann.checkpoint import zarr_store

write_shards = zarr_store._write_shards
calls = {"n": 0}

def write_then_die(*args, **kwargs):
    digests = write_shards(*args, **kwargs)
    calls["n"] += 1
    if calls["n"] == 2 and dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # its chunks are on disk; the manifest is not
    return digests

zarr_store._write_shards = write_then_die
"""


@pytest.mark.slow
def test_rank_killed_while_writing_leaves_the_previous_checkpoint(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_corpus, run_dir, steps=6) + [
        "checkpoint.interval=2", "logging.wandb.enabled=false", "logging.progress=false"]
    killed = run_patched(KILLED_WHILE_WRITING, overrides, tmp_path, nproc=2)
    assert killed.returncode != 0
    assert (run_dir / "latest").read_text() == "iter_0000002"
    partial = run_dir / "iter_0000004.tmp"
    assert partial.exists() and not (run_dir / "iter_0000004").exists()
    assert any((partial / "embedding.word_embeddings.weight" / "c").rglob("*"))  # it was writing
    assert not (partial / "manifest.json").exists()

    resumed = run_pretrain(overrides, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert (run_dir / "latest").read_text() == "iter_0000006"
    assert not (run_dir / "iter_0000004.tmp").exists()
    steps = [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step once: those logged after iter_0000002 were logged again


def test_an_all_zero_tensor_is_written_verified_and_read_back(single_rank, tmp_path):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from thann.checkpoint import zarr_store

    def state(a, b):
        return {"zeros": ShardedTensor.from_rank_offsets("zeros", a, replica_id=0),
                "ones": ShardedTensor.from_rank_offsets("ones", b, replica_id=0)}

    root = str(tmp_path / "checkpoint")
    zarr_store.save(state(torch.zeros(4, 8), torch.ones(4, 8)), root, {"step": 0})
    zarr_store.verify(root)  # every chunk the manifest lists exists, the all-zero one included
    assert "zeros/c/0/0" in zarr_store.read_manifest(root)
    loaded = zarr_store.load(state(torch.full((4, 8), 7.0), torch.full((4, 8), 7.0)), root)
    assert torch.equal(loaded["zeros"], torch.zeros(4, 8)) and torch.equal(loaded["ones"], torch.ones(4, 8))
