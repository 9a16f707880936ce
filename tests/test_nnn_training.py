"""NNN on the training machinery: data and pipeline parallelism compute what one rank does,
checkpoints reshard between pipeline layouts, the packed export generates what the checkpoint
does, and bad layouts are one line with exit code 2."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, read_metrics, run_pretrain, slow_case, tiny_run_overrides

LAYOUT_HARNESS = os.path.join(ROOT, "tests", "support", "layout_harness.py")
CHECKPOINT_HARNESS = os.path.join(ROOT, "tests", "support", "checkpoint_harness.py")
NNN = ["model=nnn_tiny", "model.hidden_size=64", "model.num_nodes=4", "model.intermediate_size=128",
       "train.precision=fp32"]
TRAIN = ["train.steps=6", "train.warmup_steps=1", "train.micro_batch_size=2", "train.global_batch_size=8",
         "train.seq_length=32", "train.eval_interval=100", "train.lr=1e-3"]


def _torchrun(script, args, nproc):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
                          script, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]


def _layout_run(base, corpus, nproc, layout, name):
    out = base / f"{name}.pt"
    _torchrun(LAYOUT_HARNESS, [base / "init.pt", out, *NNN, *TRAIN, *layout, f"data.paths=[{corpus}]",
                               f"checkpoint.dir={base / name}", "logging.wandb.enabled=false",
                               "logging.progress=false"], nproc)
    return torch.load(out)


@pytest.fixture(scope="module")
def nnn_reference(tiny_corpus, tmp_path_factory):
    base = tmp_path_factory.mktemp("nnn_layouts")
    return base, _layout_run(base, tiny_corpus, 1, [], "single")


@pytest.mark.parametrize("nproc, layout", [(2, []), (2, ["parallel.pp=2"])],
                         ids=["dp2", "pp2"])
def test_nnn_layout_matches_a_single_rank(tiny_corpus, nnn_reference, nproc, layout):
    base, ref = nnn_reference
    name = "_".join(layout).replace("parallel.", "").replace("=", "") or f"dp{nproc}"
    got = _layout_run(base, tiny_corpus, nproc, layout, name)
    assert got["first_loss"] == pytest.approx(ref["first_loss"], rel=1e-5)
    if got["gradients"] is not None:
        keys = sorted(ref["gradients"])
        assert sorted(got["gradients"]) == keys
        full_got = torch.cat([got["gradients"][k].flatten() for k in keys])
        full_ref = torch.cat([ref["gradients"][k].flatten() for k in keys])
        assert ((full_got - full_ref).norm() / full_ref.norm()).item() < 1e-4
    # Later steps agree less tightly than THANN's: an 8-bit activation sitting at a rounding
    # boundary moves a whole level when the reduction order of an update differs.
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-3)


@pytest.mark.slow
def test_nnn_checkpoint_from_pp2_resumes_on_one_rank_with_equal_weights(tiny_corpus, tmp_path):
    common = [*NNN, f"data.paths=[{tiny_corpus}]", "train.steps=4", "train.warmup_steps=1", "train.micro_batch_size=2",
              "train.global_batch_size=4", "train.seq_length=32", "train.eval_interval=100",
              "logging.wandb.enabled=false", "logging.progress=false"]
    _torchrun(CHECKPOINT_HARNESS, [tmp_path / "origin", *common, f"checkpoint.dir={tmp_path / 'origin'}",
                                   "parallel.pp=2", "train.stop_after_step=2"], 2)
    shutil.copytree(tmp_path / "origin", tmp_path / "single")
    _torchrun(CHECKPOINT_HARNESS, [tmp_path / "single", *common, f"checkpoint.dir={tmp_path / 'single'}"], 1)
    saved, loaded = torch.load(tmp_path / "origin.end.pt"), torch.load(tmp_path / "single.start.pt")
    assert saved.keys() == loaded.keys() and any(k.startswith("nodes.3.") for k in saved)
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    assert [r["step"] for r in read_metrics(tmp_path / "single") if r["split"] == "train"] == [1, 2, 3, 4]


@pytest.mark.parametrize("nproc, override, message", [
    (2, ["parallel.pp=2", "model.num_nodes=3"], "invalid config: parallel.pp=2: must divide model.num_nodes=3"),
    slow_case(2, ["parallel.tp=2", "parallel.sp=true"],
              "invalid config: parallel.tp=2: NNN has no tensor-parallel BitLinear"),
])
def test_bad_nnn_layouts_are_one_line_with_exit_2(tiny_corpus, tmp_path, nproc, override, message):
    run = run_pretrain(tiny_run_overrides(tiny_corpus, tmp_path / "run") + ["model=nnn_tiny", *override], nproc=nproc,
                       timeout=120)
    assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]
    assert run.stderr.count("invalid config: ") == 1 and re.search(r"exitcode\s*:\s*2 ", run.stderr)


@pytest.mark.slow
def test_the_packed_export_generates_what_the_checkpoint_generates(tiny_corpus, tmp_path):
    run = run_pretrain(tiny_run_overrides(tiny_corpus, tmp_path / "run", steps=2) + [*NNN])
    assert run.returncode == 0, run.stderr[-3000:]
    packed = tmp_path / "nnn.safetensors"
    export = subprocess.run([sys.executable, "-m", "thann.inference.nnn_pack", str(tmp_path / "run"), str(packed)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert export.returncode == 0, export.stderr[-3000:]
    assert "take 2 bits each" in export.stdout
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hello", "What is 2+2?")))
    results = {}
    for name, load in (("checkpoint", tmp_path / "run"), ("packed", packed)):
        out = tmp_path / f"{name}.jsonl"
        gen = subprocess.run([sys.executable, "generate_thann.py", f"load={load}", f"prompts_file={tmp_path / 'prompts.jsonl'}",
                              f"output={out}", "max_new_tokens=6", "max_sequence_length=32"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert gen.returncode == 0, gen.stderr[-3000:]
        results[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["tokens"] for r in results["packed"]] == [r["tokens"] for r in results["checkpoint"]]
    for p, c in zip(results["packed"], results["checkpoint"]):
        assert p["logprobs"] == pytest.approx(c["logprobs"], rel=1e-5)


def test_the_dense_baseline_has_nnn_tiny_s_parameter_count(single_rank):
    from omegaconf import OmegaConf

    from thann.models import registry

    counts = {}
    for name in ("nnn_tiny", "gpt_tiny"):
        cfg = OmegaConf.load(os.path.join(ROOT, "configs", "model", f"{name}.yaml"))
        model, _ = registry.build(cfg, single_rank, vocab_size=100277, max_sequence_length=64, bf16=False)
        counts[name] = sum(p.numel() for p in model.parameters())
        assert counts[name] == registry.size(cfg, 100277).total, name
    assert counts["nnn_tiny"] == counts["gpt_tiny"]


@pytest.mark.parametrize("model_fields, tp, field", [
    ({"num_query_groups": 3}, 1, "model.num_query_groups"),  # 4 heads cannot share 3 groups
    ({"num_query_groups": 1}, 2, "parallel.tp"),  # one key-value group cannot split over 2 ranks
])
def test_the_dense_baseline_names_a_bad_attention_layout(model_fields, tp, field):
    from omegaconf import OmegaConf

    from thann.config import ConfigError
    from thann.models import registry

    cfg = OmegaConf.merge(OmegaConf.load(os.path.join(ROOT, "configs", "model", "gpt_tiny.yaml")), model_fields)
    layout = OmegaConf.create({"tp": tp, "pp": 1, "ep": 1, "etp": 1, "sp": tp > 1})
    with pytest.raises(ConfigError) as error:
        registry.spec_of(cfg).check(cfg, layout, "none")
    assert str(error.value).startswith(f"invalid config: {field}=")
