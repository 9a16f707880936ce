"""Recipes over named model slots (thann.training): a recipe and a model from outside THANN (the
two-slot distillation of tests/support/distill: a frozen THANN teacher, a trained MLP student)
run on the one trainer in every layout, resume exactly and leave the frozen slot untouched; a
weight changed after the optimizer step reaches the optimizer's master weights on every rank."""

import json
import os
import subprocess
import sys

import pytest
import torch
import zarr

from conftest import ROOT, read_metrics

RUN = os.path.join(ROOT, "tests", "support", "distill", "run.py")
TRAIN = ["train.steps=4", "train.warmup_steps=1", "train.micro_batch_size=2", "train.global_batch_size=4",
         "train.seq_length=64", "train.eval_interval=2", "train.eval_iters=1", "checkpoint.interval=2",
         "logging.wandb.enabled=false", "logging.progress=false"]


def _overrides(corpus, teacher, run_dir) -> list[str]:
    return TRAIN + [f"data.paths=[{corpus}]", f"distill.teacher={teacher}", f"checkpoint.dir={run_dir}"]


def _torchrun(nproc: int, args: list[str]):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone", RUN, *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def probes(tiny_corpus, tiny_checkpoint, tmp_path_factory):
    """The first step of the single rank (which writes the student's initial weights), dp2 and pp2."""
    base = tmp_path_factory.mktemp("distill")
    results = {}
    for name, nproc, layout in (("single", 1, []), ("dp2", 2, []), ("pp2", 2, ["parallel.pp=2"])):
        _torchrun(nproc, ["--probe", str(base / f"{name}.pt"), str(base / "init.pt"),
                          *_overrides(tiny_corpus, tiny_checkpoint, base / name), *layout])
        results[name] = torch.load(base / f"{name}.pt")
    return results


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_the_students_first_step_is_the_single_ranks_in_every_layout(probes, layout):
    reference, got = probes["single"], probes[layout]
    assert got["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    keys = sorted(reference["gradients"])
    assert keys == sorted(got["gradients"]) and any(k.startswith("blocks.1.") for k in keys)
    full_ref = torch.cat([reference["gradients"][k].flatten() for k in keys])
    full_got = torch.cat([got["gradients"][k].flatten() for k in keys])
    assert full_ref.norm() > 0
    assert ((full_got - full_ref).norm() / full_ref.norm()).item() < 1e-4


def test_the_frozen_teacher_is_bitwise_its_checkpoint_after_training(probes, tiny_checkpoint):
    saved = zarr.open(str(next(tiny_checkpoint.glob("iter_*"))), mode="r")
    for layout, probe in probes.items():
        for key, tensor in probe["teacher"].items():
            assert torch.equal(tensor, torch.from_numpy(saved[key][...])), (layout, key)


def test_stop_and_resume_continue_exactly_and_the_checkpoint_names_both_slots(tiny_corpus, tiny_checkpoint,
                                                                              tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _torchrun(1, _overrides(tiny_corpus, tiny_checkpoint, straight))
    _torchrun(1, _overrides(tiny_corpus, tiny_checkpoint, split) + ["train.stop_after_step=2"])
    resumed = _torchrun(1, _overrides(tiny_corpus, tiny_checkpoint, split))
    assert "resumed from" in resumed.stdout and "teacher: loaded (frozen) from" in resumed.stdout

    def losses(run_dir):
        return [(r["step"], r["split"], r["loss"], r.get("grad_norm")) for r in read_metrics(run_dir)]

    assert losses(split) == losses(straight) and len(losses(straight)) == 7

    checkpoint = straight / "iter_0000004"
    metadata = json.loads((checkpoint / "thann.json").read_text())
    assert metadata["primary"] == "student" and sorted(metadata["slots"]) == ["student", "teacher"]
    assert metadata["slots"]["teacher"]["trainable"] is False and metadata["slots"]["teacher"]["init"]
    assert metadata["slots"]["student"]["args"]["arch"] == "mlp_lm"
    arrays = {p.name for p in checkpoint.iterdir() if (p / "zarr.json").exists()}
    assert "blocks.1.up.weight" in arrays  # the primary slot's arrays carry no prefix
    assert not any("word_embeddings" in a for a in arrays)  # the frozen teacher is not saved


def test_a_new_recipe_and_model_touch_nothing_of_thann():
    """The distillation recipe and its model live under tests/support/distill (a folder, a config
    file, one register() call): THANN's own code does not know them."""
    for folder, _, files in os.walk(os.path.join(ROOT, "thann")):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                words = ("mlp_lm", "MLPLanguageModel", "tests/support", "recipe:Distill")
                assert not any(word in text for word in words), os.path.join(folder, name)


def test_a_weight_written_after_the_optimizer_step_reaches_the_master_weights_on_every_rank(tiny_corpus, tmp_path):
    """dp2, distributed optimizer, bf16 weights with fp32 master copies. Each rank's hook adds
    rank + 1 to the final norm's weight after step 1; StepContext.weights_changed averages the
    ranks (+1.5 on both) and carries the write into the master copies, so step 2 (no hook)
    continues from it instead of restoring the old weight."""
    out = tmp_path / "hook.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
           os.path.join(ROOT, "tests", "support", "hook_harness.py"), str(out), f"data.paths=[{tiny_corpus}]",
           f"checkpoint.dir={tmp_path / 'run'}", "checkpoint.save=false", "train.precision=bf16",
           "parallel.distributed_optimizer=true", "train.steps=4", "train.warmup_steps=1", "train.micro_batch_size=2",
           "train.global_batch_size=4", "train.seq_length=64", "train.sample.new_tokens=0",
           "logging.wandb.enabled=false", "logging.progress=false"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    r = torch.load(out)
    before = r["before_hook"][0]
    assert torch.equal(before, r["before_hook"][1])
    expected = (before + (1 + 2) / 2).to(torch.bfloat16).float()  # the mean of what the two ranks wrote
    for rank in (0, 1):
        assert torch.equal(r["after_step_1"][rank], expected)
        # one more update moves it by about lr (3e-3); had the master copy missed the write, the
        # update would have started from `before` again
        assert (r["after_step_2"][rank] - expected).abs().max() < 0.05
    assert torch.equal(r["every_weight"][0], r["every_weight"][1])  # the replicas are identical
    assert r["main_changed"].sum() == before.numel()  # only the written weight's master elements
