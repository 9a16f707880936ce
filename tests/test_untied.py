"""A THANN with its LM head untied from the embedding (model.tie_embeddings=false): it trains,
resumes exactly, reshards from tp1 to tp2, generates, and every layout draws the same head."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import zarr

from conftest import ROOT, read_metrics, run_pretrain, slow_case, tiny_run_overrides

# Dropout off: the tp2 continuation is compared with the tp1 one, and sequence parallelism draws
# its masks from another stream.
UNTIED = ["model.tie_embeddings=false", "model.tokenization.dropout=0.0"]
HEAD, EMBEDDING = "output_layer.weight", "embedding.word_embeddings.weight"


def _torchrun(nproc: int, script: str, args: list[str]):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
           os.path.join(ROOT, "tests", "support", script), *args, "logging.wandb.enabled=false", "logging.progress=false"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-4000:]


def _train_losses(run_dir) -> list[tuple]:
    return [(r["step"], r["split"], r["loss"]) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    """4 steps straight; the same stopped at step 2 and resumed; and the step-2 checkpoint
    copied and continued under tp2·sp by tests/support/checkpoint_harness.py (weights dumped on load)."""
    base = tmp_path_factory.mktemp("untied")

    def overrides(name):
        return tiny_run_overrides(tiny_corpus, base / name, steps=4) + UNTIED

    straight = run_pretrain(overrides("straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_pretrain(overrides("split") + ["train.stop_after_step=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(base / "split", base / "tp2")
    second = run_pretrain(overrides("split"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    _torchrun(2, "checkpoint_harness.py", [str(base / "tp2"), *overrides("tp2"), "parallel.tp=2", "parallel.sp=true"])
    return base


@pytest.mark.slow
def test_untied_training_resumes_exactly(runs):
    straight = _train_losses(runs / "straight")
    assert [step for step, split, _ in straight if split == "train"] == [1, 2, 3, 4]
    assert _train_losses(runs / "split") == straight
    checkpoint = zarr.open(str(runs / "straight" / "iter_0000004"), mode="r")
    assert checkpoint[HEAD].shape == checkpoint[EMBEDDING].shape == (100352, 128)
    assert not (checkpoint[HEAD][:] == checkpoint[EMBEDDING][:]).all()


@pytest.mark.slow
def test_a_tp1_checkpoint_loads_under_tp2_and_continues(runs):
    saved = zarr.open(str(runs / "split" / "iter_0000002"), mode="r")
    loaded = torch.load(runs / "tp2.start.pt")
    assert HEAD in loaded
    for key, tensor in loaded.items():
        assert torch.equal(tensor, torch.from_numpy(saved[key][:])), key
    continued = [r["loss"] for r in read_metrics(runs / "tp2") if r["split"] == "train"][-2:]
    straight = [r["loss"] for r in read_metrics(runs / "straight") if r["split"] == "train"][-2:]
    assert continued == pytest.approx(straight, rel=1e-4)


@pytest.mark.slow
def test_generation_from_the_tp2_trained_untied_checkpoint(runs):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "generate_thann.py"), f"load={runs / 'tp2'}",
                          "prompt=What is the capital of France?", "max_new_tokens=3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[length: 3 tokens]" in out.stdout


def _seeded_start(corpus, base, name: str, nproc: int, layout: list[str]) -> dict:
    """Initial weights the seed alone gives this layout (gathered whole) and its first loss."""
    out = base / f"{name}.pt"
    _torchrun(nproc, "layout_harness.py", [
        "seeded", str(out), f"data.paths=[{corpus}]", f"checkpoint.dir={base / name}", "train.steps=6",
        "train.warmup_steps=1", "train.micro_batch_size=2", "train.global_batch_size=4", "train.seq_length=32",
        "train.eval_interval=100", "train.precision=fp32", "model.hidden_size=64", "model.moe_ffn_hidden_size=64",
        *UNTIED, *layout])
    return torch.load(out)


@pytest.fixture(scope="module")
def single_rank_start(tiny_corpus, tmp_path_factory):
    return _seeded_start(tiny_corpus, tmp_path_factory.mktemp("untied_seeded"), "single", 1, [])


@pytest.mark.parametrize("layout", [slow_case(["parallel.pp=2"], id="pp2"),
                                    pytest.param(["parallel.tp=2", "parallel.sp=true"], id="tp2_sp")])
def test_every_layout_starts_from_the_single_rank_head(tiny_corpus, tmp_path, single_rank_start, layout):
    """pp2's last stage holds no embedding and tp2 holds half the head: both start from the
    single rank's untied head, drawn from the seed alone."""
    single = single_rank_start
    got = _seeded_start(tiny_corpus, tmp_path, "layout", 2, layout)
    assert got["initial"].keys() == single["initial"].keys() and HEAD in single["initial"]
    for key in single["initial"]:
        assert torch.equal(got["initial"][key], single["initial"][key]), key
    assert got["first_loss"] == pytest.approx(single["first_loss"], rel=1e-5)
