"""pretrain_thann.py end to end on CPU: determinism, learning, and config errors."""

import pytest

from conftest import read_metrics, run_pretrain, slow_case, tiny_run_overrides


def _losses(records):
    return [(r["step"], r["split"], r["loss"]) for r in records]


@pytest.mark.slow
def test_same_seed_gives_identical_losses(tiny_corpus, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = run_pretrain(tiny_run_overrides(tiny_corpus, tmp_path / name))
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(read_metrics(tmp_path / name))
    assert _losses(runs[0]) == _losses(runs[1])
    assert len([r for r in runs[0] if r["split"] == "train"]) == 4

    out = run_pretrain(tiny_run_overrides(tiny_corpus, tmp_path / "c") + ["train.seed=7"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert _losses(read_metrics(tmp_path / "c")) != _losses(runs[0])


def test_metrics_records_and_sample(tiny_corpus, tmp_path):
    out = run_pretrain(tiny_run_overrides(tiny_corpus, tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    records = read_metrics(tmp_path)
    valid = [r for r in records if r["split"] == "valid"]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in valid] == [0, 2, 4]
    for r in train:
        assert {"step", "loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys()
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["aux_loss"])
        assert r["aux_loss"] > 0 and r["tokens_per_s"] > 0
    assert "sample (greedy)" in out.stdout + out.stderr
    assert (tmp_path / "config.yaml").exists()


def test_validation_loss_drops_by_more_than_one_nat(tiny_corpus, tmp_path):
    overrides = tiny_run_overrides(tiny_corpus, tmp_path, steps=24) + [
        "train.eval_interval=24", "train.eval_iters=2", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.seq_length=128", "train.warmup_steps=3"]
    out = run_pretrain(overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    valid = [r["lm_loss"] for r in read_metrics(tmp_path) if r["split"] == "valid"]
    assert valid[0] - valid[-1] >= 1.0, valid


@pytest.mark.parametrize("override, field", [
    ("model.num_attention_heads=15", "model.num_attention_heads"),
    slow_case("data.paths=[/nonexistent/corpus]", "data.paths[0]"),
    slow_case("data.weights=[0.5,0.5]", "data.weights"),
    ("data.tokenizer.model=no_such_encoding", "data.tokenizer"),
    slow_case("train.global_batch_size=3", "train.global_batch_size"),
    slow_case("model.moe_router_topk=17", "model.moe_router_topk"),
    slow_case("parallel.sp=true", "parallel.sp"),
    ("data.prompt_template='Q: {question}'", "data.prompt_template"),
])
def test_bad_override_fails_before_training_naming_the_field(tiny_corpus, tmp_path, override, field):
    out = run_pretrain(tiny_run_overrides(tiny_corpus, tmp_path) + ["model=thann_800m", override], timeout=120)
    assert out.returncode == 2
    assert f"invalid config: {field}=" in out.stderr
    assert not (tmp_path / "metrics.jsonl").exists()



def test_wandb_offline_and_tensorboard_receive_the_metrics(tiny_corpus, tmp_path):
    out = run_pretrain(tiny_run_overrides(tiny_corpus, tmp_path) + ["logging.tensorboard.enabled=true"], wandb=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("nproc, layout, recipe", [
    pytest.param(1, [], "pretrain", id="1rank-pretrain"),
    slow_case(1, [], "contrastive", id="1rank-contrastive"),
    slow_case(2, ["parallel.tp=2", "parallel.sp=true"], "pretrain", id="tp2_sp-pretrain"),
    pytest.param(2, ["parallel.tp=2", "parallel.sp=true"], "contrastive", id="tp2_sp-contrastive"),
])
def test_the_moe_auxiliary_loss_is_switch_transformers_loss_of_what_the_routers_saw(
        tiny_corpus, pairs_with_negatives, tmp_path, recipe, nproc, layout):
    """The reported aux_loss (coefficient 0.05) equals the load-balancing loss computed in
    tests/support/aux_loss_harness.py from the routers' inputs and weights, with one rank and
    with tensor and sequence parallelism (each rank routes a slice of the sequence)."""
    import os
    import subprocess
    import sys

    import torch

    from conftest import ROOT

    data = [f"data.paths=[{tiny_corpus if recipe == 'pretrain' else pairs_with_negatives}]"]
    extra = ["train.sample.new_tokens=0"] if recipe == "pretrain" else ["contrastive.eval_pool=10", "train.seq_length=32"]
    out = tmp_path / "aux.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
           os.path.join(ROOT, "tests", "support", "aux_loss_harness.py"), recipe, str(out), *data, *layout, *extra,
           f"checkpoint.dir={tmp_path / 'run'}", "checkpoint.save=false", "model.moe_aux_loss_coeff=0.05",
           "model.tokenization.dropout=0.0", "train.steps=4", "train.warmup_steps=1", "train.micro_batch_size=2",
           "train.global_batch_size=4", "logging.wandb.enabled=false", "logging.progress=false"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    result = torch.load(out)
    assert result["layers"] == 2 and result["reported"] > 0.05  # two layers, each near E·k/(k·E) = 1 x 0.05
    assert result["reported"] == pytest.approx(result["reference"], rel=1e-5)
