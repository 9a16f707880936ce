"""PPO fine-tuning (finetune_ppo.py, thann/recipes/ppo/): the rollout's and the update's
log-probabilities are one policy's; every layout computes a single rank's first iteration; a
stopped run resumes exactly; bad input is one line with exit code 2."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import zarr

from conftest import ROOT, read_metrics, slow_case

HARNESS = os.path.join(ROOT, "tests", "support", "ppo_harness.py")
# Four prompts of one iteration, one mini-batch: what the first update sees is the rollout itself.
SMALL = ["ppo.max_prompt_tokens=24", "ppo.max_new_tokens=6", "ppo.heldout_prompts=2", "ppo.epochs=1",
         "ppo.mini_batches=1", "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=0",
         "train.eval_interval=100", "logging.wandb.enabled=false", "logging.progress=false"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _finetune(overrides: list[str], nproc: int = 1, timeout: int = 300):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc-per-node={nproc}", "--standalone"]
    return subprocess.run(launcher + [os.path.join(ROOT, "finetune_ppo.py"), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=_env())


def _harness(out, overrides: list[str], nproc: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone", HARNESS,
           str(out), *overrides]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(out)


def _relative(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


TP2_SP = ["parallel.tp=2", "parallel.sp=true"]


@pytest.mark.parametrize("temperature, nproc, layout", [
    slow_case(1.0, 1, [], id="1rank-1.0"),
    slow_case(0.7, 1, [], id="1rank-0.7"),
    slow_case(1.0, 2, TP2_SP, id="tp2_sp-1.0"),
    pytest.param(0.7, 2, TP2_SP, id="tp2_sp-0.7"),
])
def test_the_update_sees_the_rollouts_own_log_probabilities(tiny_checkpoint, tmp_path, temperature, nproc, layout):
    """The first mini-batch of the first epoch: the update's full forward gives the log-probability
    the KV-cached rollout recorded for every response token (learnt tokenization on), so the ratio
    is 1 and nothing is clipped."""
    record = _harness(tmp_path / "out.pt", SMALL + layout + [f"init_from={tiny_checkpoint}",
                                                            f"ppo.temperature={temperature}",
                                                            f"checkpoint.dir={tmp_path / 'run'}"], nproc)["record"]
    assert record["logprob_diff_max"] < 1e-5
    assert record["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and record["clip_fraction"] == 0.0
    assert record["response_length"] > 0


@pytest.fixture(scope="module")
def single(tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("ppo_single")
    return _harness(base / "out.pt", SMALL + [f"init_from={tiny_checkpoint}", f"checkpoint.dir={base / 'run'}",
                                              "ppo.mini_batches=2", "train.micro_batch_size=1"], 1)


@pytest.mark.parametrize("nproc, layout", [pytest.param(2, [], id="dp2"), slow_case(2, TP2_SP, id="tp2_sp")])
def test_every_layout_computes_a_single_ranks_first_iteration(single, tiny_checkpoint, tmp_path, nproc, layout):
    got = _harness(tmp_path / "out.pt", SMALL + layout + [f"init_from={tiny_checkpoint}",
                                                         f"checkpoint.dir={tmp_path / 'run'}", "ppo.mini_batches=2",
                                                         "train.micro_batch_size=1"], nproc)
    assert torch.equal(got["tokens"], single["tokens"])  # the same responses, sampled row by row
    torch.testing.assert_close(got["score"], single["score"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["advantages"], single["advantages"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["returns"], single["returns"], rtol=1e-4, atol=1e-5)
    for slot in ("actor", "critic"):
        keys = sorted(single["gradients"][slot])
        reference = torch.cat([single["gradients"][slot][k].flatten() for k in keys])
        mine = torch.cat([got["gradients"][slot][k].flatten() for k in keys])
        assert reference.norm() > 0 and _relative(mine, reference) < 1e-4, slot


@pytest.mark.parametrize("nproc, layout", [
    pytest.param(2, ["parallel.pp=2"], id="pp2"),
    slow_case(2, ["parallel.ep=2"], id="ep2"),
])
def test_pipeline_and_expert_layouts_complete_an_iteration(tiny_checkpoint, tmp_path, nproc, layout):
    record = _harness(tmp_path / "out.pt", SMALL + layout + [f"init_from={tiny_checkpoint}",
                                                            f"checkpoint.dir={tmp_path / 'run'}"], nproc)["record"]
    assert record["logprob_diff_max"] < 1e-5 and record["value_loss"] >= 0


def test_a_stopped_run_resumes_exactly(tiny_checkpoint, tmp_path):
    """Iterations 3-4 after a stop at 2: the uninterrupted run's metrics, weights and both
    optimizers' states (every array of the final checkpoint)."""
    common = SMALL + [f"init_from={tiny_checkpoint}", "train.steps=4", "checkpoint.interval=2",
                      "ppo.mini_batches=2", "train.micro_batch_size=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for run in (_finetune(common + [f"checkpoint.dir={straight}"]),
                _finetune(common + [f"checkpoint.dir={split}", "train.stop_after_step=2"]),
                _finetune(common + [f"checkpoint.dir={split}"])):
        assert run.returncode == 0, run.stderr[-3000:]

    def metrics(run_dir):
        timing = ("step_time_s", "tokens_per_s", "rollout_tokens_per_s", "train_tokens_per_s")
        return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run_dir)]

    assert metrics(split) == metrics(straight)
    a, b = zarr.open(str(straight / "iter_0000004"), mode="r"), zarr.open(str(split / "iter_0000004"), mode="r")
    names = sorted(k for k, _ in a.arrays())
    assert names == sorted(k for k, _ in b.arrays())
    assert any(n.startswith("critic.") for n in names) and any("exp_avg" in n and "critic" in n for n in names)
    for name in names:
        assert (a[name][...] == b[name][...]).all(), name


def test_bad_input_is_one_line_with_exit_2(tiny_checkpoint, tmp_path):
    (tmp_path / "rewards.py").write_text(
        "def raises(prompts, responses):\n    raise ValueError('no reward today')\n"
        "def short(prompts, responses):\n    return [1.0]\n")
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "word " * 200}) + "\n")
    base = SMALL + [f"init_from={tiny_checkpoint}"]
    cases = [
        (["ppo.reward=rewards:missing"], "ppo.reward='rewards:missing': rewards has no callable 'missing'", False),
        (["ppo.reward=nowhere:score"], "ppo.reward='nowhere:score': cannot import 'nowhere'", False),
        (["ppo.reward=rewards:raises"], "ppo.reward='rewards:raises': raised ValueError: no reward today", True),
        # the step-0 evaluation's 2 held-out responses meet it first
        (["ppo.reward=rewards:short"], "ppo.reward='rewards:short': returned 1 values for 2 responses", True),
        ([f"ppo.prompts={tmp_path / 'long.jsonl'}"], "ppo.prompts=", False),
        (["ppo=grpo", "ppo.samples_per_prompt=1"], "ppo.samples_per_prompt=1: ppo.advantage=grpo compares", False),
    ]
    for i, (overrides, message, after_rollout) in enumerate(cases):
        run = subprocess.run([sys.executable, os.path.join(ROOT, "finetune_ppo.py"), *base, *overrides,
                              f"checkpoint.dir={tmp_path / f'run{i}'}"], capture_output=True, text=True, timeout=300,
                             env=_env(), cwd=tmp_path)  # the reward module is in the working directory
        assert run.returncode == 2, (overrides, run.stderr[-2000:])
        last = run.stderr.strip().split("\n")[-1]
        assert last.startswith(f"invalid config: {message}"), (overrides, run.stderr[-2000:])
        assert "Traceback" not in run.stderr
        built = (tmp_path / f"run{i}" / "metrics.jsonl").exists()
        assert built == after_rollout, overrides  # known before anything is built, where it can be


def test_actor_and_critic_of_different_tokenizers_are_refused(tiny_checkpoint, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    checkpoint = next(other.glob("iter_*"))
    metadata = json.loads((checkpoint / "thann.json").read_text())
    metadata["tokenizer"] = {**metadata["tokenizer"], "fingerprint": "huggingface:0123", "model": "my_bpe"}
    (checkpoint / "thann.json").write_text(json.dumps(metadata))
    run = _finetune(SMALL + [f"init_from={tiny_checkpoint}", f"ppo.critic.init_from={other}",
                             f"checkpoint.dir={tmp_path / 'run'}"])
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().startswith(f"invalid config: ppo.critic.init_from='{checkpoint}': was trained with "
                                         "tokenizer my_bpe")
