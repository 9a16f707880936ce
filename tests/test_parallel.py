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

from conftest import ROOT, slow_case

HARNESS = os.path.join(ROOT, "tests", "support", "layout_harness.py")
# fp32, no dropout, dropless routing; 4 layers / 4 heads / 16 experts so tp, pp and ep up to 4 fit.
MODEL = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.moe_ffn_hidden_size=64",
         "model.tokenization.dropout=0.0", "train.precision=fp32"]
TRAIN = ["train.steps=6", "train.warmup_steps=1", "train.micro_batch_size=2", "train.global_batch_size=8",
         "train.seq_length=32", "train.eval_interval=100", "train.lr=1e-3"]


def _run(tmp_path, corpus, nproc: int, layout: list[str], name: str, init=None) -> dict:
    out = tmp_path / f"{name}.pt"
    overrides = MODEL + TRAIN + layout + [f"data.paths=[{corpus}]", f"checkpoint.dir={tmp_path / name}",
                                          "logging.wandb.enabled=false", "logging.progress=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
           HARNESS, init or str(tmp_path.parent / "init.pt"), str(out), *overrides]
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


# By default each kind of split once, and tp with pp, with ep, ZeRO-1; the other layouts are slow.
DEFAULT = ("dp2_distopt", "tp2_sp", "ep2", "tp2_pp2", "tp2_ep2")


@pytest.mark.parametrize("name", [n if n in DEFAULT else slow_case(n) for n in LAYOUTS])
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


@pytest.mark.parametrize("name", ["tp2_ep2", slow_case("pp2_ep2")])
def test_the_seed_gives_every_layout_the_single_rank_weights(reference, name):
    """No shared weights loaded: the same seed alone gives the same initial weights and loss."""
    base, corpus, ref = reference
    nproc, overrides = LAYOUTS[name]
    run_dir = base / f"seeded_{name}"
    run_dir.mkdir()
    got = _run(run_dir, corpus, nproc, overrides, name, init="seeded")
    single = torch.load(base / "init.pt")
    assert got["initial"].keys() == single.keys()
    for key in single:
        assert torch.equal(got["initial"][key], single[key]), key
    assert got["first_loss"] == pytest.approx(ref["first_loss"], rel=1e-6)


@pytest.fixture(scope="module")
def chat_layout_runs(tiny_chat_corpus, tmp_path_factory):
    """First-step loss and gradient on assistant-masked chat data, 2 micro-batches per rank, with
    no auxiliary loss: on one rank and on two data-parallel ranks."""
    base = tmp_path_factory.mktemp("chat_layouts")
    chat = ["data.loss_mask=assistant", "model.moe_aux_loss_coeff=0.0", "train.global_batch_size=4"]
    runs = {}
    for name, nproc, layout in (("single", 1, ["train.micro_batch_size=2"]), ("dp2", 2, ["train.micro_batch_size=1"])):
        run_dir = base / name
        run_dir.mkdir()
        runs[name] = _run(run_dir, tiny_chat_corpus, nproc, chat + layout, name)
    return base, runs


def test_the_loss_is_the_global_token_mean_with_uneven_masks(single_rank, tiny_chat_corpus, chat_layout_runs):
    from hydra import compose, initialize_config_dir

    from support.full_state import gather_full, load_full, model_sharded_tensors
    from thann.cli import CONFIG_DIR
    from thann.data.datasets import build_datasets
    from thann.data.tokenizer import build_tokenizer, padded_vocab_size
    from thann.models.thann.model import ThannModel, transformer_config
    from thann.parallel import state

    base, runs = chat_layout_runs
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=MODEL + TRAIN + [
            f"data.paths=[{tiny_chat_corpus}]", "data.loss_mask=assistant", "model.moe_aux_loss_coeff=0.0",
            "train.global_batch_size=4"])
    tokenizer = build_tokenizer("tiktoken", "cl100k_base")
    vocab = padded_vocab_size(tokenizer.vocab_size, 1)
    model = ThannModel(transformer_config(cfg.model, cfg.parallel, bf16=False), cfg.model, vocab,
                       cfg.train.seq_length).to(state.device())
    tensors = model_sharded_tensors([model])
    load_full(tensors, torch.load(base / "init.pt"))
    train, _ = build_datasets(cfg.data, tokenizer, cfg.train.seq_length, cfg.train.seed,
                              train_samples=cfg.train.steps * 4, valid_samples=4)
    samples = [train[i] for i in range(4)]  # the first global batch, whatever the layout
    masks = torch.stack([s["loss_mask"] for s in samples])
    assert len({int(m.sum()) for m in masks}) > 1  # uneven: the two means would differ
    batch = {k: torch.stack([s[k] for s in samples]).to(state.device()) for k in ("tokens", "labels", "position_ids")}
    token_losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    loss = (token_losses * masks.to(token_losses.device)).sum() / masks.sum()
    loss.backward()
    direct = gather_full(tensors, value=lambda t: t.data.grad)
    # The objective before: each micro-batch's mean over its own tokens (at least 1), averaged.
    per_microbatch = sum(float((token_losses[i:i + 2] * masks[i:i + 2]).sum() / masks[i:i + 2].sum().clamp(min=1))
                         for i in (0, 2)) / 2
    assert abs(per_microbatch - loss.item()) > 1e-3  # the old objective is measurably different

    for name, got in runs.items():
        assert got["first_loss"] == pytest.approx(loss.item(), rel=1e-5), name
        full_got = torch.cat([got["gradients"][k].flatten() for k in sorted(direct)])
        full_direct = torch.cat([direct[k].flatten() for k in sorted(direct)])
        assert _relative(full_got, full_direct) < 1e-4, name
