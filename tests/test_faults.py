"""Signals, crashes and non-finite losses: the run saves and resumes, restarts, or stops clearly."""

import os
import re
import signal
import subprocess
import sys

import psutil
import pytest

from conftest import ROOT, read_metrics, run_pretrain, start_pretrain, tiny_run_overrides, wait_for_step

EXIT_STOPPED, EXIT_NONFINITE = 75, 3


def _train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["split"] == "train"]


@pytest.mark.slow
def test_sigterm_saves_stops_and_the_next_start_continues_exactly(tiny_corpus, tmp_path):
    straight = run_pretrain(tiny_run_overrides(tiny_corpus, tmp_path / "straight", steps=30))
    assert straight.returncode == 0
    overrides = tiny_run_overrides(tiny_corpus, tmp_path / "run", steps=30) + [
        "logging.wandb.enabled=false", "logging.progress=false"]
    proc = start_pretrain(overrides)
    wait_for_step(tmp_path / "run", 3, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_STOPPED, output[-3000:]
    assert "stopped by SIGTERM" in output
    stopped_at = int((tmp_path / "run" / "latest").read_text().removeprefix("iter_"))
    assert 3 <= stopped_at < 30
    resumed = run_pretrain(overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _train_losses(tmp_path / "run") == _train_losses(tmp_path / "straight")


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_both_ranks_after_the_same_step(tiny_corpus, tmp_path):
    overrides = tiny_run_overrides(tiny_corpus, tmp_path, steps=40) + ["logging.wandb.enabled=false",
                                                                     "logging.progress=false"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                             "pretrain_thann.py", *overrides], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_step(tmp_path, 2, proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "pretrain_thann.py" in " ".join(p.cmdline())]
    rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGUSR1)
    output = proc.communicate(timeout=120)[0]
    # torchrun exits 1 when a worker exits non-zero; the first worker to exit (rank 0) says 75.
    assert re.search(r"exitcode\s*:\s*75 ", output), output[-3000:]
    assert "stopped by a signal on another rank" in output, output[-3000:]
    stops = re.findall(r"\[rank (\d)\] stopped after step (\d+)", output)
    assert sorted(rank for rank, _ in stops) == ["0", "1"] and len({step for _, step in stops}) == 1
    latest = (tmp_path / "latest").read_text()
    assert latest == f"iter_{int(stops[0][1]):07d}"
    resumed = run_pretrain(overrides, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / latest}" in resumed.stdout + resumed.stderr


KILL_RANK_1_ONCE = """
import os, signal, sys
import torch.distributed as dist
from thann.cli import pretrain
from thann.training import trainer as trainer_module

train_step = trainer_module.Trainer.train_step

def train_step_or_die(self, batches):
    if self.position.step == 5 and dist.get_rank() == 1 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return train_step(self, batches)

trainer_module.Trainer.train_step = train_step_or_die
sys.argv[0] = "pretrain_thann.py"
pretrain()
"""


def test_torchrun_restarts_the_group_after_a_sigkill_and_resumes(tiny_corpus, tmp_path):
    script = tmp_path / "kill_once.py"
    script.write_text(KILL_RANK_1_ONCE)
    overrides = tiny_run_overrides(tiny_corpus, tmp_path / "run", steps=8) + [
        "checkpoint.interval=2", "logging.wandb.enabled=false", "logging.progress=false"]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                          "--max-restarts=1", str(script), *overrides], cwd=ROOT, capture_output=True, text=True,
                         timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout + out.stderr and "iter_0000004 at step 4" in out.stdout + out.stderr
    assert (tmp_path / "run" / "latest").read_text() == "iter_0000008"


NAN_AT_STEP_3 = """
import sys
import torch
from thann.cli import pretrain
from thann.recipes.pretrain import recipe as recipe_module
from thann.training import trainer as trainer_module

lm_loss = recipe_module.lm_loss

def nan_at_step_3(loss_mask, token_losses):
    loss_sum, report = lm_loss(loss_mask, token_losses)
    if STEP["n"] == 3:
        loss_sum = loss_sum * float("nan")
        report = {"lm_loss": torch.stack([loss_sum.detach(), report["lm_loss"][1]])}
    return loss_sum, report

STEP = {"n": 0}
train_step = trainer_module.Trainer.train_step

def counting_train_step(self, batches):
    STEP["n"] = self.position.step + 1
    return train_step(self, batches)

recipe_module.lm_loss = nan_at_step_3
trainer_module.Trainer.train_step = counting_train_step
sys.argv[0] = "pretrain_thann.py"
pretrain()
"""


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss(tiny_corpus, tmp_path, policy):
    script = tmp_path / "nan.py"
    script.write_text(NAN_AT_STEP_3)
    overrides = tiny_run_overrides(tiny_corpus, tmp_path / "run", steps=6) + [
        "checkpoint.interval=2", f"train.on_nonfinite_loss={policy}", "logging.wandb.enabled=false",
        "logging.progress=false"]
    out = subprocess.run([sys.executable, str(script), *overrides], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    if policy == "stop":
        assert out.returncode == EXIT_NONFINITE
        assert "non-finite loss (nan) at step 3" in out.stderr
        assert (tmp_path / "run" / "latest").read_text() == "iter_0000002"
    else:
        assert out.returncode == 0, out.stderr[-3000:]
        records = {r["step"]: r for r in read_metrics(tmp_path / "run") if r["split"] == "train"}
        assert records[3].get("skipped") and not records[4].get("skipped")
        assert all(map(lambda s: abs(records[s]["loss"]) < 100, (4, 5, 6)))
        assert (tmp_path / "run" / "latest").read_text() == "iter_0000006"
