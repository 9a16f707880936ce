import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = os.path.join(ROOT, "configs", "model", "thann_tiny.yaml")


def slow_case(*values, **kwargs):
    """A parametrized case left to the slow run (pytest -m slow): the default suite keeps a case or
    two of each kind, the others repeat the same comparison on more inputs or layouts."""
    return pytest.param(*values, marks=pytest.mark.slow, **kwargs)


def data_cfg(**fields):
    """The default data config (configs/data/sharegpt_text.yaml) with ``fields`` replaced."""
    return OmegaConf.merge(OmegaConf.load(os.path.join(ROOT, "configs", "data", "sharegpt_text.yaml")), fields)


@pytest.fixture(scope="session")
def single_rank():
    """megatron-core process groups for a world of one, in this process."""
    from thann.parallel import state

    layout = OmegaConf.create({"tp": 1, "pp": 1, "ep": 1, "etp": 1, "sp": False})
    state.initialize(layout, dp=1, seed=1234)
    yield layout
    state.destroy()


@pytest.fixture
def tiny_model_cfg():
    return OmegaConf.load(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """The first 600 ShareGPT conversations as an indexed dataset; returns the path prefix."""
    from thann.data.corpora import sharegpt_text
    from thann.data.preprocess import preprocess

    prefix = str(tmp_path_factory.mktemp("corpus") / "sharegpt_small")
    preprocess(sharegpt_text(), prefix, workers=1, limit=600)
    return prefix


def run_pretrain(overrides: list[str], nproc: int = 1, timeout: int = 240, wandb: bool = False):
    if nproc == 1:
        cmd = [sys.executable, os.path.join(ROOT, "pretrain_thann.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--standalone", os.path.join(ROOT, "pretrain_thann.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run(cmd + [f"logging.wandb.enabled={str(wandb).lower()}", "logging.progress=false", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def run_patched(patch: str, overrides: list[str], script_dir, nproc: int = 1, timeout: int = 300):
    """pretrain_thann.py with ``patch`` (Python source that replaces something to inject a fault)
    executed first, in every rank's process."""
    script = os.path.join(str(script_dir), "patched_pretrain.py")
    with open(script, "w") as f:
        f.write(patch + "\nimport sys\nfrom thann.cli import pretrain\nsys.argv[0] = 'pretrain_thann.py'\npretrain()\n")
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc-per-node={nproc}", "--standalone"]
    return subprocess.run(launcher + [script, "logging.wandb.enabled=false", "logging.progress=false", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def start_pretrain(overrides: list[str]) -> subprocess.Popen:
    """pretrain_thann.py in the background (output merged into stdout), to signal or race."""
    return subprocess.Popen([sys.executable, "pretrain_thann.py", "logging.wandb.enabled=false",
                             "logging.progress=false", *overrides], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_step(run_dir, step: int, proc, timeout: float = 120) -> None:
    """Until ``run_dir/metrics.jsonl`` has a record of ``step`` or later (step 0: the first
    validation), while ``proc`` keeps running."""
    import time

    path = os.path.join(str(run_dir), "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it reached step %d" % step
        if os.path.exists(path):
            with open(path) as f:
                if any(json.loads(line).get("step", -1) >= step for line in f if line.strip()):
                    return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def tiny_run_overrides(corpus: str, run_dir, steps: int = 4) -> list[str]:
    return [f"data.paths=[{corpus}]", f"checkpoint.dir={run_dir}", f"train.steps={steps}", "train.warmup_steps=1",
            "train.eval_interval=2", "train.eval_iters=1", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.seq_length=64", "train.sample.new_tokens=2"]


@pytest.fixture(scope="session")
def tiny_chat_corpus(tmp_path_factory) -> str:
    """The first 300 ShareGPT conversations as chat with the assistant loss mask."""
    from thann.data.corpora import sharegpt_chat
    from thann.data.preprocess import preprocess

    prefix = str(tmp_path_factory.mktemp("chat_corpus") / "sharegpt_chat_small")
    preprocess(sharegpt_chat(), prefix, workers=1, limit=300, loss_mask=True)
    return prefix


@pytest.fixture(scope="session")
def pairs_with_negatives(tmp_path_factory):
    """200 ShareGPT pairs written as pair records, each with another pair's reply as its hard
    negative, preprocessed as pairs; returns the dataset prefix."""
    from thann.data.corpora import sharegpt_pairs
    from thann.data.preprocess import preprocess
    from thann.data.readers import read_inputs

    base = tmp_path_factory.mktemp("pairs")
    pairs = []
    for document in sharegpt_pairs():
        pairs.append(document.pair)
        if len(pairs) == 200:
            break
    with open(base / "pairs.jsonl", "w") as f:
        for i, (query, positive) in enumerate(pairs):
            f.write(json.dumps({"query": query, "positive": positive, "negatives": [pairs[i - 1][1]]}) + "\n")
    prefix = str(base / "pairs")
    preprocess(read_inputs([str(base / "pairs.jsonl")], pairs=True), prefix)
    return prefix


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_corpus, tmp_path_factory):
    """A run directory holding a 2-step tiny THANN checkpoint (iter_0000002): shared by the
    tests that read, load or tamper with a checkpoint (copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("tiny_checkpoint") / "run"
    out = run_pretrain(tiny_run_overrides(tiny_corpus, run_dir, steps=2))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.fixture
def cpu_only():
    if torch.cuda.is_available():
        pytest.skip("CPU path test")
