"""Classification (ChaosNet and its MLP baseline) on the one trainer: seeded, layout-independent
neuron death; dp2 equals one rank; resume equals an uninterrupted run; sequential stages keep
the heads they do not train fixed; bad input is one line with exit code 2; the claims benchmark
runs end to end at tiny size. (The neuron core's own checks, recurrent gradients in the
stateful mode and the parallel-tick closed form, are in tests/test_chaosnet_model.py.)"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

HARNESS = os.path.join(ROOT, "tests", "support", "classify_harness.py")
ENTRY = os.path.join(ROOT, "train_classifier.py")
# A small ChaosNet, fp32, 8 samples per step; 16 evaluation samples per task.
TINY = ["model.neurons=32", "model.input_width=16", "model.ticks=3", "model.image.conv_channels=[4]",
        "model.text.max_tokens=32", "train.precision=fp32", "train.global_batch_size=8", "train.micro_batch_size=4",
        "train.warmup_steps=1", "train.eval_iters=1", "classify.eval_samples=16", "logging.wandb.enabled=false",
        "logging.progress=false"]
TIMING = ("step_time_s", "samples_per_s")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(overrides, timeout=240):
    return subprocess.run([sys.executable, ENTRY, *TINY, *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _relative(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- randomness ------------------------------------------------------------------------------------

def test_masks_come_from_seeded_streams():
    from thann.models.chaosnet import ChaosNeurons
    from thann.recipes.classify.recipe import TRAIN_MASKS, generator

    core = ChaosNeurons(4, 64, ticks=5)

    def masks(seed, g):
        return core.draw_randomness(16, generator(seed, TRAIN_MASKS, g), 0.5)

    (alive_a, noise_a), (alive_b, noise_b) = masks(7, 3), masks(7, 3)
    assert torch.equal(alive_a, alive_b) and torch.equal(noise_a, noise_b)
    for other in (masks(8, 3), masks(7, 4)):  # another seed, another global batch
        assert not torch.equal(alive_a, other[0]) and not torch.equal(noise_a, other[1])
    torch.manual_seed(0)  # the global RNG plays no part
    assert torch.equal(masks(7, 3)[0], alive_a)


def test_same_seed_same_metrics_even_through_a_resume_at_a_stage_change(tmp_path):
    """Two sequential runs (MNIST, then Fashion-MNIST) of train_classifier.py with seed 7: one
    straight through, one stopped at the end of the first stage and resumed from its checkpoint
    (the resumed run must reset the optimizer state as the straight one did). They log identical
    numbers (timings aside)."""
    common = ["classify.datasets=[mnist,fashion_mnist]", "classify.sequential=true", "train.steps=4",
              "train.eval_interval=2", "checkpoint.interval=2", "train.schedule=constant",
              "classify.eval_death_rates=[0,0.9]", "train.seed=7"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run in (_train(common + [f"checkpoint.dir={straight}"]),
                _train(common + [f"checkpoint.dir={resumed}", "train.stop_after_step=2"]),
                _train(common + [f"checkpoint.dir={resumed}"])):
        assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from" in run.stdout and "stage 2/2 trains fashion_mnist (optimizer state reset)" in run.stdout
    first = _metrics(straight)
    assert [(r["step"], r["split"], r["dataset"]) for r in first] == [
        (0, "valid", "mnist"), (1, "train", "mnist"), (2, "train", "mnist"), (2, "valid", "mnist"),
        (3, "train", "fashion_mnist"), (4, "train", "fashion_mnist"), (4, "valid", "fashion_mnist")]
    assert "accuracy_mnist" in first[3] and "accuracy_fashion_mnist" not in first[3]
    final = first[-1]
    assert {"loss", "accuracy", "accuracy_mnist", "accuracy_fashion_mnist", "accuracy_mnist_death_0",
            "accuracy_fashion_mnist_death_0.9"} <= final.keys()
    with open(straight / "metrics.jsonl") as f:
        train_record = json.loads(f.readlines()[1])
    assert "samples_per_s" in train_record and "tokens_per_s" not in train_record  # no tokens in images
    assert _metrics(resumed) == first


# -- data parallel ---------------------------------------------------------------------------------

def _harness(args, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone", HARNESS, *args]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert run.returncode == 0, run.stderr[-4000:]


def test_dp2_equals_one_rank(tmp_path):
    """Text first (the embedding's gradient), death rate 0.5: the first step's loss and full
    gradient, and the step-0 evaluation of both tasks, on 2 data-parallel ranks and on one."""
    overrides = TINY + ["classify.datasets=[newsgroups20,mnist]", "train.steps=2", "train.eval_interval=1"]
    init, results = tmp_path / "init.pt", {}
    for name, nproc in (("single", 1), ("dp2", 2)):
        out = tmp_path / f"{name}.pt"
        _harness(["first_step", str(init), str(out), *overrides, f"checkpoint.dir={tmp_path / name}"], nproc)
        results[name] = torch.load(out)
    single, dp2 = results["single"], results["dp2"]
    assert dp2["loss"] == pytest.approx(single["loss"], rel=1e-5)
    keys = sorted(single["gradients"])
    assert keys == sorted(dp2["gradients"]) and any("frontends.text" in k for k in keys)
    full_single = torch.cat([single["gradients"][k].flatten() for k in keys])
    full_dp2 = torch.cat([dp2["gradients"][k].flatten() for k in keys])
    assert full_single.norm() > 0 and _relative(full_dp2, full_single) < 1e-4
    for key in ("loss", "accuracy", "accuracy_newsgroups20", "accuracy_mnist"):
        assert dp2["evaluation"][key] == pytest.approx(single["evaluation"][key], rel=1e-6), key


# -- sequential stages -----------------------------------------------------------------------------

def test_sequential_stages_keep_the_parameters_they_do_not_train(tmp_path):
    """20 Newsgroups for 3 steps, then MNIST for 3: during the MNIST stage the text head and the
    text front-end stay bitwise fixed (and the MNIST head before its stage), while the core and
    the MNIST head learn. Without the reset of the optimizer state at the stage change, Adam's
    momentum would have moved the text head on."""
    out = tmp_path / "stages.pt"
    overrides = TINY + ["classify.datasets=[newsgroups20,mnist]", "classify.sequential=true", "train.steps=6",
                        "train.eval_interval=3", "train.schedule=constant", f"checkpoint.dir={tmp_path / 'run'}"]
    _harness(["stages", str(out), *overrides], 1)
    runs = torch.load(out)
    weights, moments = runs["reset"]["weights"], runs["reset"]["moments"]

    def group(prefix):
        return [name for name in weights[0] if name.startswith(prefix)]

    text, mnist_head, core = group("frontends.text") + group("heads.newsgroups20"), group("heads.mnist"), group("core")
    assert text and mnist_head and core
    for name in text:
        assert not torch.equal(weights[0][name], weights[3][name]), f"{name} did not learn in its stage"
        for step in (4, 5, 6):
            assert torch.equal(weights[step][name], weights[3][name]), f"{name} moved at step {step}"
    for name in mnist_head + group("frontends.image"):
        for step in (1, 2, 3):
            assert torch.equal(weights[step][name], weights[0][name]), f"{name} moved before its stage"
        assert not torch.equal(weights[6][name], weights[3][name])
    for name in core:
        assert not torch.equal(weights[6][name], weights[3][name])
    # What the reset prevents: the text head ended its stage with momentum, which keeps moving it.
    assert moments[3]["heads.newsgroups20.weight"] > 0
    drifting = runs["no_reset"]["weights"]
    assert torch.equal(drifting[3]["heads.newsgroups20.weight"], weights[3]["heads.newsgroups20.weight"])
    assert not torch.equal(drifting[6]["heads.newsgroups20.weight"], drifting[3]["heads.newsgroups20.weight"])


def test_sequential_config_and_layout_checks_name_their_field():
    from thann.cli import load_config
    from thann.config import ConfigError
    from thann.recipes.classify import Classify

    cases = {
        "parallel.tp": ["parallel.tp=2"],
        "parallel.ep": ["parallel.ep=2"],
        "train.steps": ["classify.datasets=[mnist,fashion_mnist]", "classify.sequential=true", "train.steps=601"],
        "train.eval_interval": ["classify.datasets=[mnist,fashion_mnist]", "classify.sequential=true",
                                "train.eval_interval=7"],
        "train.weight_decay": ["classify.datasets=[mnist,fashion_mnist]", "classify.sequential=true",
                               "train.weight_decay=0.1"],
        "classify.datasets": ["classify.datasets=[mnist,cifar10]"],
        "classify.eval_samples": ["classify.eval_samples=0"],
    }
    for field, overrides in cases.items():
        with pytest.raises(ConfigError) as error:
            Classify.check(load_config("classify", overrides), 1)
        assert error.value.field == field, (field, str(error.value))
        assert "\n" not in str(error.value)
    Classify.check(load_config("classify", []), 1)


# -- bad input -------------------------------------------------------------------------------------

def test_bad_input_is_one_line_naming_the_field_with_exit_2(tmp_path):
    cases = {
        "model.train_death_rate": ["model.train_death_rate=1.0"],
        "classify.eval_death_rates": ["classify.eval_death_rates=[0.5,1.0]"],
        "model.ticks": ["model.ticks=0"],
        "classify.data_dir": [f"classify.data_dir={tmp_path / 'no_such_dir'}"],
    }
    procs = {field: subprocess.Popen([sys.executable, ENTRY, *TINY, *overrides, f"checkpoint.dir={tmp_path / 'run'}"],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for field, overrides in cases.items()}
    for field, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (field, stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith(f"invalid config: {field}="), (field, stderr[-2000:])


# -- the claims benchmark --------------------------------------------------------------------------

@pytest.mark.slow
def test_claims_benchmark_writes_its_tables_and_plot(tmp_path):
    out = subprocess.run(
        [sys.executable, "benchmarks/chaosnet_claims.py", "--steps", "2", "--stage-steps", "1", "--seeds", "2",
         "--datasets", "mnist", "--models", "stateful,mlp", "--train-rates", "0.5", "--eval-rates", "0,0.9,0.999",
         "--retention-datasets", "mnist,fashion_mnist", "--retention-models", "stateful", "--eval-samples", "16",
         "--batch", "8", "--jobs", "1", "--out", str(tmp_path), "--plot", str(tmp_path / "death_rates.png"),
         "--override", "model.neurons=32", "--override", "model.input_width=16", "--override",
         "model.image.conv_channels=[4]"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    rows = re.findall(r"^\| (0|0\.9|0\.999) \| (90\.08|86|13) \| ([\d.]+ ± [\d.]+) \| ([\d.]+ ± [\d.]+) \|$", text,
                      re.MULTILINE)
    assert [r[0] for r in rows] == ["0", "0.9", "0.999"], text
    assert "ChaosNet stateful, trained at 0.5" in text and "MLP + dropout (matched), trained at 0.5" in text
    assert re.search(r"^\| MNIST \| MLP matched \| H=\d+ \|", text, re.MULTILINE)
    assert re.search(r"^\| 2: Fashion-MNIST \| ChaosNet stateful \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \|$", text,
                     re.MULTILINE), text
    assert re.search(r"6 runs in [\d.]+ minutes", text)
    with open(tmp_path / "death_rates.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "chaosnet_claims.json").read_text())
    assert len(results["runs"]) == 6 and (tmp_path / "chaosnet_claims.md").read_text().startswith("### MNIST")
    assert (tmp_path / "runs" / "stateful_sequential_seed1" / "metrics.jsonl").is_file()
