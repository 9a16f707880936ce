"""Every parallel layout computes what a single rank computes (CPU, gloo, real processes).

The single-rank run writes the initial weights; each layout loads them, then its first-step
loss, full gradient (gathered back into the single-rank layout) and losses over 5 optimizer
steps are compared with the single rank's.
"""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

HARNESS = os.path.join(ROOT, "tests", "layout_harness.py")
# fp32, no dropout, dropless routing; 4 layers / 4 heads / 16 experts so tp, pp and ep up to 4 fit.
MODEL = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.moe_ffn_hidden_size=64",
         "model.tokenization.dropout=0.0", "train.precision=fp32"]
TRAIN = ["train.steps=6", "train.warmup_steps=1", "train.micro_batch_size=2", "train.global_batch_size=8",
         "train.seq_length=32", "train.eval_interval=100", "train.lr=1e-3"]


def _run(tmp_path, corpus, nproc: int, layout: list[str], name: str) -> dict:
    out = tmp_path / f"{name}.pt"
    overrides = MODEL + TRAIN + layout + [f"data.paths=[{corpus}]", f"checkpoint.dir={tmp_path / name}",
                                          "logging.wandb.enabled=false", "logging.progress=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
           HARNESS, str(tmp_path.parent / "init.pt"), str(out), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    run_dir = base / "single"
    run_dir.mkdir()
    return base, tiny_corpus, _run(run_dir, tiny_corpus, 1, [], "single")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


LAYOUTS = {
    # name: (processes, overrides)
    "dp2": (2, []),
    "dp2_distopt": (2, ["parallel.distributed_optimizer=true"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "pp2": (2, ["parallel.pp=2"]),
    "ep2": (2, ["parallel.ep=2"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.sp=true", "parallel.pp=2"]),
    "tp2_ep2": (4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"]),
    "pp2_ep2": (4, ["parallel.pp=2", "parallel.ep=2"]),
    "dp2_ep2": (4, ["parallel.ep=2"]),
    "dp4_distopt": (4, ["parallel.distributed_optimizer=true"]),
    "tp4_sp": (4, ["parallel.tp=4", "parallel.sp=true"]),
    "pp4": (4, ["parallel.pp=4"]),
    "ep4": (4, ["parallel.ep=4"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_rank(reference, name):
    base, corpus, ref = reference
    nproc, overrides = LAYOUTS[name]
    run_dir = base / name
    run_dir.mkdir()
    got = _run(run_dir, corpus, nproc, overrides, name)
    assert got["first_loss"] == pytest.approx(ref["first_loss"], rel=1e-5)
    if got["gradients"] is not None:
        assert got["gradients"].keys() == ref["gradients"].keys()
        full_got = torch.cat([got["gradients"][k].flatten() for k in sorted(ref["gradients"])])
        full_ref = torch.cat([ref["gradients"][k].flatten() for k in sorted(ref["gradients"])])
        assert _relative(full_got, full_ref) < 1e-4
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-4)
