"""Multi-rank failure modes: invalid layouts stop every rank before the model is built with one
message; a rank that raises mid-run takes the whole job down within seconds."""

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_pretrain, slow_case, tiny_run_overrides


@pytest.mark.parametrize("layout, field", [
    (["parallel.tp=4"], "parallel.tp"),                                 # world size 2 not divisible by tp
    slow_case(["parallel.tp=2", "model.num_attention_heads=1"], "parallel.tp"),   # tp does not divide heads
    (["parallel.ep=3"], "parallel.ep"),                                 # ep does not divide 16 experts
    slow_case(["parallel.pp=2", "model.num_layers=1"], "parallel.pp"),  # more stages than layers
    slow_case(["parallel.sp=true"], "parallel.sp"),                     # sequence parallel without tp
    (["parallel.tp=2"], "parallel.sp"),                                 # MoE under tp needs sp
])
def test_invalid_layout_stops_every_rank_with_one_message(tiny_corpus, tmp_path, layout, field):
    start = time.monotonic()
    out = run_pretrain(tiny_run_overrides(tiny_corpus, tmp_path) + layout, nproc=2, timeout=120)
    assert out.returncode != 0
    assert out.stderr.count("invalid config: ") == 1, out.stderr[-2000:]
    assert f"invalid config: {field}=" in out.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "metrics.jsonl").exists()


FAILING_RANK = """
import sys
from thann.cli import pretrain
from thann.recipes.pretrain import Pretrain
import torch.distributed as dist

forward_step = Pretrain.forward_step
calls = {"n": 0}

def failing_forward_step(self, batch, model):
    calls["n"] += 1
    if dist.get_rank() == 1 and calls["n"] == 6:
        raise RuntimeError("injected failure on rank 1")
    return forward_step(self, batch, model)

Pretrain.forward_step = failing_forward_step
sys.argv[0] = "pretrain_thann.py"
pretrain()
"""


def test_a_rank_that_raises_takes_the_job_down_within_seconds(tiny_corpus, tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", str(script),
           *tiny_run_overrides(tiny_corpus, tmp_path, steps=50), "logging.wandb.enabled=false", "logging.progress=false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    failed_at = None
    lines = []
    for line in proc.stdout:  # rank 1 prints the traceback as it dies
        lines.append(line)
        if failed_at is None and "injected failure on rank 1" in line:
            failed_at = time.monotonic()
    proc.wait(timeout=120)
    assert failed_at is not None, "".join(lines[-50:])
    assert proc.returncode != 0
    assert time.monotonic() - failed_at < 15
