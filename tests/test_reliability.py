"""Runs that never lose work: the ordinary mistakes and faults of issue 13, each with the new
behaviour and a check that nothing on disk was lost or corrupted."""

import json
import os
import shutil
import signal

import pytest
from omegaconf import OmegaConf

from conftest import (ROOT, read_metrics, run_patched, run_pretrain, slow_case, start_pretrain, tiny_run_overrides,
                      wait_for_step)

EXIT_FAILED, EXIT_CONFIG, EXIT_NONFINITE, EXIT_STOPPED, EXIT_ABORTED = 1, 2, 3, 75, 130


def _checkpoints(run_dir) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("iter_"))


def _steps(run_dir, split="train") -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if r["split"] == split]


@pytest.fixture(scope="module")
def saved_at_2_and_4(tiny_corpus, tmp_path_factory):
    """A run of 4 steps that saved at steps 2 and 4 (the source of each damaged copy below)."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    out = run_pretrain(tiny_run_overrides(tiny_corpus, run_dir, steps=4) + ["checkpoint.interval=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert _checkpoints(run_dir) == ["iter_0000002", "iter_0000004"]
    return run_dir


def _copy(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


# -- 1. latest missing: resume from what is on disk; starting over needs resume=false ---------------

def test_missing_latest_resumes_from_the_newest_checkpoint_and_a_fresh_start_keeps_the_old_ones(
        tiny_corpus, saved_at_2_and_4, tmp_path):
    run_dir = _copy(saved_at_2_and_4, tmp_path)
    (run_dir / "latest").unlink()
    out = run_pretrain(tiny_run_overrides(tiny_corpus, run_dir, steps=6) + ["checkpoint.interval=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming from {run_dir / 'iter_0000004'}" in out.stdout and "there is no 'latest' file" in out.stdout
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert _checkpoints(run_dir) == ["iter_0000004", "iter_0000006"]  # keep=2 of this run

    old = {name: (run_dir / name / "manifest.json").read_text() for name in _checkpoints(run_dir)}
    fresh = run_pretrain(tiny_run_overrides(tiny_corpus, run_dir, steps=2) + [
        "checkpoint.resume=false", "checkpoint.interval=1", "checkpoint.keep=1"])
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "checkpoint.resume=false: starting from scratch; the earlier run's 2 checkpoint(s) and logs are kept in" \
        in fresh.stdout
    assert _checkpoints(run_dir) == ["iter_0000002"]
    archive = next((run_dir / "archive").iterdir())
    assert all((archive / name / "manifest.json").read_text() == text for name, text in old.items())
    assert (run_dir / "latest").read_text() == "iter_0000002"
    assert _steps(run_dir) == [1, 2]
    assert [r["step"] for r in read_metrics(archive) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_fresh_start_leaves_every_file_of_the_earlier_run_byte_identical(tiny_corpus, tmp_path):
    """checkpoint.resume=false where the new run saves the same step names (2, 4) as the old one
    (2, 4, 6): nothing of the old run is replaced or pruned; it is set aside, byte for byte."""
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_corpus, run_dir, steps=6) + ["checkpoint.interval=2", "checkpoint.keep=3"]
    assert run_pretrain(overrides).returncode == 0
    assert _checkpoints(run_dir) == ["iter_0000002", "iter_0000004", "iter_0000006"]
    before = {name: data for name, data in _files(run_dir).items() if name != ".lock"}
    fresh = run_pretrain(tiny_run_overrides(tiny_corpus, run_dir, steps=4) + [
        "checkpoint.interval=2", "checkpoint.keep=1", "checkpoint.resume=false", "train.seed=7"])
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    archive = next((run_dir / "archive").iterdir())
    assert _files(archive) == before
    assert _checkpoints(run_dir) == ["iter_0000004"] and _steps(run_dir) == [1, 2, 3, 4]  # the new run trained
    # The run's output ends with what it did and where its files are.
    train = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    done, where = fresh.stdout.rstrip("\n").split("\n")[-2:]
    assert done.startswith("done: steps 0 -> 4 in ") and f"train loss {train[0]['loss']:.4g} -> {train[-1]['loss']:.4g}" in done
    assert where == (f"checkpoints {run_dir} (latest iter_0000004); metrics {run_dir / 'metrics.jsonl'}; "
                     f"log {run_dir / 'run.log'}")


def test_a_save_never_removes_a_checkpoint_it_did_not_write(tiny_corpus, saved_at_2_and_4, tmp_path):
    """Resuming step 2 while a step-4 checkpoint of another timeline exists: the new step 4 is
    published, the old one is kept in the archive."""
    run_dir = _copy(saved_at_2_and_4, tmp_path)
    old = _files(run_dir / "iter_0000004")
    (run_dir / "latest").write_text("iter_0000002")
    out = run_pretrain(tiny_run_overrides(tiny_corpus, run_dir, steps=4) + ["checkpoint.interval=2", "train.lr=1e-3"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "iter_0000004 of an earlier timeline is kept in" in out.stdout
    archived = [p for p in (run_dir / "archive").rglob("iter_0000004")]
    assert len(archived) == 1 and _files(archived[0]) == old
    assert (run_dir / "iter_0000004" / "thann.json").exists() and _files(run_dir / "iter_0000004") != old


# -- 2. one run per directory --------------------------------------------------------------------

def test_a_second_run_on_the_same_directory_is_refused_and_a_stale_lock_is_taken_over(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_corpus, run_dir, steps=300) + ["logging.wandb.enabled=false",
                                                                      "logging.progress=false"]
    first = start_pretrain(overrides)
    wait_for_step(run_dir, 0, first)
    second = run_pretrain(overrides)
    assert second.returncode == EXIT_CONFIG
    assert f"is in use by another run (pid {first.pid} on " in second.stderr
    assert second.stderr.strip().endswith("or choose another checkpoint.dir") and second.stderr.count("\n") == 1
    assert first.poll() is None, "the first run should still be training"
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == EXIT_STOPPED
    stopped_at = int((run_dir / "latest").read_text().removeprefix("iter_"))
    assert _steps(run_dir) == list(range(1, stopped_at + 1))  # one valid JSON object per line, each step once

    (run_dir / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "then"}))
    again = run_pretrain(overrides + [f"train.stop_after_step={stopped_at + 1}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the previous run (pid 999999 on gone) ended without releasing it" in again.stdout


# -- 3. resume with a changed config: continue training, follow the new schedule -----------------

@pytest.mark.slow
def test_raising_train_steps_continues_on_the_new_schedule(tiny_corpus, tmp_path):
    def lrs(run_dir):
        return {r["step"]: r["lr"] for r in read_metrics(run_dir) if r["split"] == "train"}

    straight = run_pretrain(tiny_run_overrides(tiny_corpus, tmp_path / "straight", steps=10) + [
        "train.eval_interval=10"])
    assert straight.returncode == 0
    short = tiny_run_overrides(tiny_corpus, tmp_path / "run", steps=6) + ["train.eval_interval=10"]
    assert run_pretrain(short).returncode == 0
    longer = run_pretrain(tiny_run_overrides(tiny_corpus, tmp_path / "run", steps=10) + [
        "train.eval_interval=10", "train.global_batch_size=8"])
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "train.steps: 6 -> 10 (the schedule follows the new config)" in longer.stdout
    assert "train.global_batch_size: 4 -> 8 (training continues at the same number of consumed samples)" in longer.stdout
    resumed, expected = lrs(tmp_path / "run"), lrs(tmp_path / "straight")
    assert resumed[6] == pytest.approx(3.0e-4)  # the 6-step run ended at min_lr
    for step in range(7, 11):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), step
    assert resumed[7] > 2 * 3.0e-4  # not stuck at min_lr


# -- 4. interrupts save; the default run saves on its way ---------------------------------------

def test_ctrl_c_saves_and_exits_75_and_the_run_resumes(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_corpus, run_dir, steps=30) + ["logging.wandb.enabled=false",
                                                                     "logging.progress=false"]
    proc = start_pretrain(overrides)
    wait_for_step(run_dir, 2, proc)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_STOPPED, output[-3000:]
    assert "KeyboardInterrupt" not in output and "stopped by SIGINT" in output
    stopped_at = int((run_dir / "latest").read_text().removeprefix("iter_"))
    resumed = run_pretrain(overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in resumed.stdout
    assert _steps(run_dir) == list(range(1, 31))


SIGTERM_WHILE_BUILDING = """
import os, signal
from thann.models import registry

build = registry.build

def build_then_sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the run is still starting
    return build(*args, **kwargs)

registry.build = build_then_sigterm
"""


def test_sigterm_during_start_up_exits_75_without_a_checkpoint(tiny_corpus, tmp_path):
    out = run_patched(SIGTERM_WHILE_BUILDING, tiny_run_overrides(tiny_corpus, tmp_path / "run"), tmp_path)
    assert out.returncode == EXIT_STOPPED, out.stderr[-3000:]
    assert "stopped by SIGTERM while starting" in out.stdout
    assert _checkpoints(tmp_path / "run") == [] and not (tmp_path / "run" / "latest").exists()


def test_the_default_run_saves_at_an_interval():
    cfg = OmegaConf.load(os.path.join(ROOT, "configs", "checkpoint", "default.yaml"))
    train = OmegaConf.load(os.path.join(ROOT, "configs", "train", "cpu_tiny.yaml"))
    assert 0 < cfg.interval < train.steps


# -- 5. damaged checkpoints: fall back to the previous intact one -------------------------------

def _truncate_a_chunk(checkpoint):
    chunk = next((checkpoint / "embedding.word_embeddings.weight" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.write_bytes(chunk.read_bytes()[:100])


@pytest.mark.parametrize("damage, reason", [
    (_truncate_a_chunk, "checksum mismatch in array 'embedding.word_embeddings.weight'"),
    slow_case(lambda c: (c / "manifest.json").unlink(), "no manifest.json (incomplete checkpoint)"),
    slow_case(lambda c: (c.parent / "latest").write_text("iter_0000099"),
              "'latest' names iter_0000099, which is missing"),
], ids=["truncated_chunk", "missing_manifest", "latest_names_a_missing_directory"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_corpus, saved_at_2_and_4, tmp_path,
                                                                    damage, reason):
    run_dir = _copy(saved_at_2_and_4, tmp_path)
    damage(run_dir / "iter_0000004")
    out = run_pretrain(tiny_run_overrides(tiny_corpus, run_dir, steps=6) + ["checkpoint.interval=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    resumed_from = "iter_0000002" if "latest" not in reason else "iter_0000004"
    assert f"resuming from {run_dir / resumed_from}, the newest complete checkpoint that verifies" in out.stdout
    assert reason in out.stdout
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "latest").read_text() == "iter_0000006"


def test_no_intact_checkpoint_is_one_line_with_the_way_forward(tiny_corpus, saved_at_2_and_4, tmp_path):
    run_dir = _copy(saved_at_2_and_4, tmp_path)
    for name in ("iter_0000002", "iter_0000004"):
        _truncate_a_chunk(run_dir / name)
    out = run_pretrain(tiny_run_overrides(tiny_corpus, run_dir, steps=6))
    assert out.returncode == EXIT_FAILED
    last = out.stderr.strip().splitlines()[-1]
    assert "holds checkpoints but none can be resumed" in last and "checkpoint.resume=false" in last
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("override, field", [
    ("model.hidden_size=64", "model.hidden_size"),        # shape change on resume
    ("train.steps=3", "train.steps"),                     # fewer steps than the checkpoint has
])
def test_resume_refuses_what_it_cannot_continue(tiny_corpus, saved_at_2_and_4, tmp_path, override, field):
    run_dir = _copy(saved_at_2_and_4, tmp_path)
    out = run_pretrain(tiny_run_overrides(tiny_corpus, run_dir, steps=6) + [override])
    assert out.returncode == EXIT_CONFIG
    assert out.stderr.strip().startswith(f"invalid config: {field}=") and out.stderr.count("\n") == 1


@pytest.mark.parametrize("override, message", [
    ("checkpoint.format=foo", "invalid config: checkpoint.format='foo'"),
    slow_case("checkpoint.dir=/proc/thann_run", "invalid config: checkpoint.dir='/proc/thann_run': cannot be"),
    slow_case("train.warmup_steps=4", "invalid config: train.warmup_steps=4: must be in [0, train.steps=4)"),
    ("train.stepz=3", "invalid config: train.stepz: no such field (did you mean train.steps?)"),
    slow_case("+train.stepz=3", "invalid config: train.stepz: no such field (did you mean train.steps?)"),
    slow_case("model=thann_huge", "invalid config: model=thann_huge: no such option (available:"),
    slow_case("~train.steps", "invalid config: ~train.steps: keys cannot be deleted"),
    slow_case("train.steps", "invalid config: train.steps: expected key=value"),
])
def test_usage_errors_are_one_line_with_exit_2(tiny_corpus, tmp_path, override, message):
    out = run_pretrain(tiny_run_overrides(tiny_corpus, tmp_path / "run") + [override], timeout=120)
    assert out.returncode == EXIT_CONFIG
    assert out.stderr.strip().startswith(message) and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_checkpoint_dir_that_is_a_file_is_a_usage_error(tiny_corpus, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    out = run_pretrain(tiny_run_overrides(tiny_corpus, tmp_path / "file"), timeout=120)
    assert out.returncode == EXIT_CONFIG and "exists and is not a directory" in out.stderr
    assert (tmp_path / "file").read_text() == "not a directory"


LOW_ON_SPACE_AT_THE_SECOND_SAVE = """
import shutil
disk_usage = shutil.disk_usage
calls = {"n": 0}

def almost_full(path):
    calls["n"] += 1
    usage = disk_usage(path)
    return usage._replace(free=1024) if calls["n"] >= 2 else usage

shutil.disk_usage = almost_full
"""

DISK_FULL_WHILE_WRITING = """
import errno, os
from thann.checkpoint import zarr_store
from thann.checkpoint import plain

dump = plain.dump
calls = {"n": 0}

def dump_until_full(value, path, where):
    if where == "common":
        calls["n"] += 1
    if calls["n"] >= 2:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    dump(value, path, where)

plain.dump = dump_until_full
"""


@pytest.mark.parametrize("patch, cause", [
    slow_case(LOW_ON_SPACE_AT_THE_SECOND_SAVE, "not enough free space in"),
    (DISK_FULL_WHILE_WRITING, "No space left on device"),
], ids=["checked_before_saving", "full_while_writing"])
def test_a_full_disk_stops_with_one_line_and_keeps_the_previous_checkpoint(tiny_corpus, tmp_path, patch, cause):
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_corpus, run_dir, steps=4) + ["checkpoint.interval=2"]
    out = run_patched(patch, overrides + ["logging.progress=true"], tmp_path)
    assert out.returncode == EXIT_FAILED, out.stderr[-3000:]
    # A line of its own (not appended to the progress bar's, which tqdm redraws after "\r"), the
    # last one, short; the full detail is in the run's log.
    last = out.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith(("not enough free space", "could not save step 4")), last
    assert cause in last and "the run resumes from iter_0000002" in last and len(last) < 200, last
    assert "Traceback" not in out.stderr
    assert f"failed: {last}" in (run_dir / "run.log").read_text()
    assert _checkpoints(run_dir) == ["iter_0000002"] and (run_dir / "latest").read_text() == "iter_0000002"
    resumed = run_pretrain(overrides)
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout


NAN_WEIGHTS_AFTER_STEP_1 = """
import torch
from thann.training.context import StepContext

optimizer_step = StepContext.optimizer_step

def poisoned_optimizer_step(self, slot, loss):
    grad_norm = optimizer_step(self, slot, loss)
    if self.position.step + 1 == 2:  # after the last update, before the save
        with torch.no_grad():
            next(self.slots[slot].chunks[0].parameters()).view(-1)[0] = float("nan")
    return grad_norm

StepContext.optimizer_step = poisoned_optimizer_step
"""


def test_non_finite_weights_stop_with_exit_3_and_no_checkpoint(tiny_corpus, tmp_path):
    out = run_patched(NAN_WEIGHTS_AFTER_STEP_1, tiny_run_overrides(tiny_corpus, tmp_path / "run", steps=2), tmp_path)
    assert out.returncode == EXIT_NONFINITE, out.stderr[-3000:]
    assert "refusing to save step 2: the model has NaN/inf weights" in out.stderr
    assert _checkpoints(tmp_path / "run") == []


NAN_WEIGHTS_FROM_STEP_2 = """
import torch
from thann.training.context import StepContext

optimizer_step = StepContext.optimizer_step

def poisoned_optimizer_step(self, slot, loss):
    grad_norm = optimizer_step(self, slot, loss)
    if self.position.step + 1 == 1:  # every later step has a NaN loss and gradient
        with torch.no_grad():
            next(self.slots[slot].chunks[0].parameters()).view(-1)[0] = float("nan")
    return grad_norm

StepContext.optimizer_step = poisoned_optimizer_step
"""


def test_a_diverging_run_writes_strict_json_metrics(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    out = run_patched(NAN_WEIGHTS_FROM_STEP_2, tiny_run_overrides(tiny_corpus, run_dir, steps=3) + [
        "train.on_nonfinite_loss=skip", "checkpoint.save=false"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    diverged = [r for r in records if r["split"] == "train" and r["step"] >= 2]
    assert diverged and all(r["loss"] is None and "loss" in r["nonfinite"] and r["skipped"] for r in diverged)
    assert all("nonfinite" not in r for r in records if r["split"] == "train" and r["step"] == 1)


def test_an_interrupted_save_is_removed_at_the_next_start_which_says_so(tiny_corpus, saved_at_2_and_4, tmp_path):
    run_dir = _copy(saved_at_2_and_4, tmp_path)
    leftover = run_dir / "iter_0000006.tmp"
    shutil.copytree(run_dir / "iter_0000004", leftover)
    (leftover / "thann.json").unlink()  # as a save killed before publishing leaves it
    out = run_pretrain(tiny_run_overrides(tiny_corpus, run_dir, steps=6) + ["checkpoint.interval=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "removed iter_0000006.tmp: a save that never completed" in out.stdout
    assert not leftover.exists() and _checkpoints(run_dir) == ["iter_0000004", "iter_0000006"]


def test_a_second_ctrl_c_aborts_with_one_line(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_pretrain(tiny_run_overrides(tiny_corpus, run_dir, steps=300) + ["checkpoint.interval=0"])
    wait_for_step(run_dir, 2, proc)
    proc.send_signal(signal.SIGINT)
    # The second once the first is handled: two signals that arrive while the main thread is inside
    # one C call reach Python's handler as one.
    before = []
    while not (line := proc.stdout.readline()).startswith("stopping after this step") and line:
        before.append(line)
    proc.send_signal(signal.SIGINT)
    output = "".join(before) + line + proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_ABORTED, output[-3000:]
    assert output.rstrip("\n").split("\n")[-1].startswith("aborted by a second Ctrl-C, without saving")
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
