"""What a user types: --help on every entry point, command-line values as typed (non-ASCII,
spaces), Hydra syntax THANN refuses."""

import json
import os
import subprocess
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import ROOT
from thann.cli import _verbatim

TRAINING = ["pretrain_thann.py", "pretrain_contrastive.py", "train_classifier.py", "finetune_captioning.py"]


@pytest.mark.parametrize("script", TRAINING)
def test_training_entry_points_have_real_help(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    # every config group with its options, keys with defaults, exit codes, an example
    for group in ("model", "parallel", "train", "checkpoint", "logging"):
        options = sorted(n.removesuffix(".yaml") for n in os.listdir(os.path.join(ROOT, "configs", group)))
        assert any(line.split()[:1] == [group] and ", ".join(options) in line for line in text.splitlines()), group
    assert "  train.steps=" in text and "  checkpoint.dir=" in text
    assert "75  stopped by SIGTERM" in text and "130 aborted by a second Ctrl-C" in text
    assert f"python {script}" in text


@pytest.mark.parametrize("value", ["Hello, world", "Привет, мир", "你好", "🙂 emoji", "  leading and trailing  ", "it's",
                                   "back\\slash\\", "quote\\'d", "a=b"])
def test_values_are_passed_as_typed(value):
    """Hydra's own parser reads the rewritten override back as the value the user typed."""
    override = OverridesParser.create().parse_override(_verbatim(f"prompt={value}"))
    assert override.value() == value


@pytest.mark.parametrize("typed", ["prompt=plain ascii", "prompt='quoted'", 'prompt="quoted"', "stop=[a,b]", "train.steps=3"])
def test_values_hydra_reads_already_are_left_alone(typed):
    assert _verbatim(typed) == typed


def test_non_ascii_and_space_prompts_generate_unquoted(tiny_checkpoint, tmp_path):
    """Each prompt as a shell passes it on (no quotes for Hydra): Cyrillic, CJK and an emoji, and a
    prompt of spaces."""
    for i, prompt in enumerate(("Привет 你好世界 🙂", "   ")):
        output = tmp_path / f"out{i}.jsonl"
        out = subprocess.run([sys.executable, "generate_thann.py", f"load={tiny_checkpoint}", f"prompt={prompt}",
                              "max_new_tokens=2", f"output={output}"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        record = json.loads(output.read_text())
        assert record["prompt"] == prompt and len(record["tokens"]) == 2


@pytest.mark.parametrize("command, keys", [
    (["generate_thann.py"], ("load=", "prompt=", "output=", "force=false", "max_new_tokens=")),
    (["-m", "thann.inference.embed"], ("load=", "input=", "output=", "force=false")),
])
def test_inference_entry_points_have_real_help(command, keys):
    out = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert all(f"  {key}" in out.stdout for key in keys)
    assert "parallel    default" in out.stdout and "2   invalid config or usage" in out.stdout
    assert "examples:" in out.stdout


def test_plot_draws_a_runs_curves_and_keeps_an_existing_picture(tmp_path):
    from thann.plot import panels, series

    records = [{"step": 0, "split": "valid", "loss": -0.1, "reward_mean_heldout": 0.1},
               {"step": 1, "split": "train", "reward_mean": 0.2, "kl": 0.5},
               {"step": 2, "split": "train", "reward_mean": None, "kl": 0.7, "nonfinite": ["reward_mean"]},
               {"step": 3, "split": "train", "reward_mean": 0.4, "kl": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert series(records, "train", "reward_mean") == ([1, 3], [0.2, 0.4])  # the null is left out
    assert [title for title, _ in panels(records)] == ["reward", "KL to the reference (nats per response)"]
    run = subprocess.run([sys.executable, "-m", "thann.plot", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    picture = (tmp_path / "curves.png").read_bytes()
    assert picture.startswith(b"\x89PNG")
    again = subprocess.run([sys.executable, "-m", "thann.plot", str(tmp_path)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and "pass --force to overwrite it" in again.stderr
    assert (tmp_path / "curves.png").read_bytes() == picture
