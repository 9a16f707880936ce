"""Contrastive pretraining: GradCache over data-parallel ranks and micro-batches gives the
gradient of the whole batch in one pass; every layout computes the single rank's loss; the
transfer metrics are scikit-learn's on the model's embeddings; thann-embed of a language model is
the mean of its final hidden states; bad input is one line with exit code 2."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, slow_case

HARNESS = os.path.join(ROOT, "tests", "support", "contrastive_harness.py")
# Question/reply pairs (the default) without dropout in the decoder, pinned (SimCSE runs set it); the
# tokenization's dropout stays on where a test says so. Mean pooling, pinned: every layout has it
# (first_last, the default, needs one pipeline stage; one layout case checks it).
MODEL = ["data=sharegpt_pairs", "model.hidden_dropout=0.0", "model.attention_dropout=0.0", "contrastive.pooling=mean",
         "model.num_layers=2",
         "model.hidden_size=64", "model.num_attention_heads=4", "model.moe_ffn_hidden_size=64",
         "model.moe_aux_loss_coeff=0.0", "train.precision=fp32", "contrastive.hard_negatives=1",
         "contrastive.learnable_temperature=true",
         "train.seq_length=32", "train.steps=4", "train.warmup_steps=1", "contrastive.eval_pool=10",
         "contrastive.transfer.train=60", "contrastive.transfer.test=30", "contrastive.transfer.k=5",
         "logging.wandb.enabled=false", "logging.progress=false"]


def _overrides(prefix, run_dir, extra=()):
    return MODEL + [f"data.paths=[{prefix}]", f"checkpoint.dir={run_dir}", *extra]


def _harness(init, out, overrides, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone", HARNESS,
           str(init), str(out), *overrides]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(out)


def _relative(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def encoder(single_rank, pairs_with_negatives, tmp_path_factory):
    """The recipe and encoder in this process, and their initial weights in a file for every layout."""
    from hydra import compose, initialize_config_dir

    from support.full_state import gather_full, model_sharded_tensors
    from thann.cli import CONFIG_DIR
    from thann.models import registry
    from thann.parallel.state import Layout
    from thann.recipes.contrastive.recipe import Contrastive, encoder_args

    base = tmp_path_factory.mktemp("contrastive")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="contrastive", overrides=_overrides(pairs_with_negatives, base / "unused") + [
            "train.micro_batch_size=2", "train.global_batch_size=8"])
    recipe = Contrastive(cfg, Layout(1, 1, 1, 1, False, 2))
    model, _ = registry.build(encoder_args(cfg), single_rank, vocab_size=recipe.tokenizer.vocab_size,
                              max_sequence_length=cfg.train.seq_length, bf16=False)
    tensors = model_sharded_tensors([model])
    torch.save(gather_full(tensors), base / "init.pt")
    return base, cfg, recipe, model, tensors


def test_grad_cache_over_2_ranks_and_2_micro_batches_equals_one_pass(encoder, pairs_with_negatives):
    from megatron.core.utils import unwrap_model

    from support.full_state import gather_full
    from thann.data.order import SampleOrder
    from thann.data.pairs import pair_batches
    from thann.inference.embedding import encode

    base, cfg, recipe, model, tensors = encoder
    got = _harness(base / "init.pt", base / "dp2.pt", _overrides(pairs_with_negatives, base / "dp2", [
        "train.micro_batch_size=2", "train.global_batch_size=8"]), nproc=2)  # dropout 0.1 on

    model.train()
    queries, positives, negatives = [], [], []
    for rank in range(2):
        batches = pair_batches(recipe.train_set, SampleOrder(8, 2, 2, rank), 0, cfg.train.seed, 32,
                               recipe.tokenizer.eod)
        torch.set_rng_state(got["rng"][rank])  # the dropout stream that rank started the step with
        for _ in range(2):
            embedded = encode(next(batches), model)
            queries.append(embedded[:2])
            positives.append(embedded[2:4])
            negatives.append(embedded[4:])
    candidates = torch.cat(positives + negatives)
    log_scale = unwrap_model(model).pooled_embedding.log_scale  # learnt: 1/temperature = its exp
    assert log_scale.item() == pytest.approx(-math.log(cfg.contrastive.temperature))
    scores = torch.cat(queries) @ candidates.T * log_scale.exp()
    assert scores.shape == (8, 16)  # every query against 8 positives and 8 hard negatives
    loss = F.cross_entropy(scores, torch.arange(8))
    for tensor in tensors:
        tensor.data.grad = None
    loss.backward()
    expected = gather_full(tensors, value=lambda t: t.data.grad)

    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    full_got = torch.cat([got["gradients"][k].flatten() for k in sorted(expected)])
    full_expected = torch.cat([expected[k].flatten() for k in sorted(expected)])
    assert _relative(full_got, full_expected) < 1e-5
    assert all(expected[k].abs().sum() > 0 for k in expected if "experts" not in k), "a part got no gradient"
    (temperature,) = [k for k in expected if k.endswith("log_scale")]
    torch.testing.assert_close(got["gradients"][temperature], expected[temperature], rtol=1e-5, atol=0)


@pytest.mark.parametrize("nproc, layout", [
    slow_case(2, ["parallel.tp=2", "parallel.sp=true"]),  # slow: the default pooling's case below covers tp2·sp
    (2, ["parallel.tp=2", "parallel.sp=true", "contrastive.pooling=first_last"]),
    # without the tokenization the embedding itself splits the sequence (first_last gathers it)
    slow_case(2, ["parallel.tp=2", "parallel.sp=true", "contrastive.pooling=first_last",
                  "model.tokenization.enabled=false"]),
    (2, ["parallel.pp=2"]),
    slow_case(2, ["parallel.ep=2"]),
], ids=["tp2_sp", "tp2_sp_first_last", "tp2_sp_first_last_no_tokenization", "pp2", "ep2"])
def test_every_layout_computes_the_single_rank_loss(encoder, pairs_with_negatives, nproc, layout):
    base, *_ = encoder
    no_dropout = ["model.tokenization.dropout=0.0", "train.micro_batch_size=2", "train.global_batch_size=4"]
    name = "_".join(layout).replace("parallel.", "").replace("contrastive.", "").replace("=", "")
    model = [o for o in layout if not o.startswith("parallel.")]  # the reference is the same model
    single = base / ("single" + "_".join(o.split("=")[1] for o in model) + ".pt")
    reference = (torch.load(single) if single.exists() else
                 _harness(base / "init.pt", single, _overrides(pairs_with_negatives, base / single.stem,
                                                               no_dropout + model), 1))
    extra = no_dropout if layout != ["parallel.ep=2"] else no_dropout[:1] + ["train.micro_batch_size=1",
                                                                               "train.global_batch_size=4"]
    got = _harness(base / "init.pt", base / f"{name}.pt",
                   _overrides(pairs_with_negatives, base / name, layout + extra), nproc)
    assert got["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    keys = sorted(reference["gradients"])
    full_got = torch.cat([got["gradients"][k].flatten() for k in keys])
    full_ref = torch.cat([reference["gradients"][k].flatten() for k in keys])
    assert _relative(full_got, full_ref) < 1e-4


def test_transfer_metrics_are_scikit_learns_on_the_model_embeddings(encoder):
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    from thann.inference.embedding import embed_texts

    _, cfg, recipe, model, _ = encoder
    model.eval()
    got = recipe._embedding_metrics([model], project=True)
    lexical = recipe._lexical_metrics()
    t, k = recipe.transfer, cfg.contrastive.transfer.k
    assert (len(t.train_texts), len(t.test_texts), len(set(t.test_labels))) == (60, 30, len(set(t.test_labels)))
    x = embed_texts([model], t.train_texts + t.test_texts, recipe.texts_per_micro_batch, cfg.train.seq_length,
                    recipe.tokenizer.eod, cfg.model.hidden_size).numpy()
    train_x, test_x = x[:60], x[60:]
    assert got["knn_accuracy"] == (KNeighborsClassifier(n_neighbors=k, metric="cosine")
                                   .fit(train_x, t.train_labels).score(test_x, t.test_labels))
    scaler = StandardScaler().fit(train_x)
    assert got["probe_accuracy"] == (LogisticRegression(max_iter=1000).fit(scaler.transform(train_x), t.train_labels)
                                     .score(scaler.transform(test_x), t.test_labels))
    cosines = x @ x.T
    assert got["mean_cosine"] == pytest.approx((cosines.sum() - np.trace(cosines)) / (90 * 89), rel=1e-5)
    texts = [recipe.tokenizer.decode(ids[:-1]) for ids in t.train_texts + t.test_texts]
    vectorizer = TfidfVectorizer(sublinear_tf=True).fit(texts[:60])
    assert lexical["tfidf_knn_accuracy"] == (KNeighborsClassifier(n_neighbors=k, metric="cosine")
                                             .fit(vectorizer.transform(texts[:60]), t.train_labels)
                                             .score(vectorizer.transform(texts[60:]), t.test_labels))


def test_bad_pair_records_are_one_line_with_exit_2(tmp_path):
    for record, message in (({"query": "where?"}, "no 'positive' key"), ({"query": " ", "positive": "x"},
                                                                          "'query' is empty")):
        (tmp_path / "pairs.jsonl").write_text(json.dumps({"query": "fine", "positive": "ok"}) + "\n"
                                              + json.dumps(record) + "\n")
        run = subprocess.run([sys.executable, "-m", "thann.data.preprocess", "--input", str(tmp_path / "pairs.jsonl"),
                              "--pairs", "--output-prefix", str(tmp_path / "out"), "--workers", "1"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
        assert "pairs.jsonl:2:" in run.stderr and message in run.stderr
        assert not list(tmp_path.glob("out*"))


def test_init_from_a_checkpoint_of_another_tokenizer_is_refused(tiny_checkpoint, pairs_with_negatives, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    metadata_path = other / "iter_0000002" / "thann.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["tokenizer"] = {**metadata["tokenizer"], "model": "my_bpe", "fingerprint": "huggingface:0123"}
    metadata_path.write_text(json.dumps(metadata))
    run = subprocess.run([sys.executable, "pretrain_contrastive.py", f"init_from={other}",
                          *_overrides(pairs_with_negatives, tmp_path / "run")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().startswith(f"invalid config: init_from='{other}': was trained with tokenizer my_bpe")
    assert run.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def contrastive_checkpoint(pairs_with_negatives, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("contrastive_run") / "run"
    run = subprocess.run([sys.executable, "pretrain_contrastive.py", *_overrides(pairs_with_negatives, run_dir, [
        "train.steps=2", "train.eval_interval=2", "train.micro_batch_size=2", "train.global_batch_size=4",
        "contrastive.projection_dim=16"])], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_thann_embed_writes_the_same_embeddings_in_another_layout(contrastive_checkpoint, tmp_path):
    import numpy as np

    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "text": text}) + "\n" for i, text in
                                                  enumerate(["How do I bake bread?", "The capital of France",
                                                             "Explain quantum computing", "Hi"])))
    outputs = {}
    for name, nproc, layout in (("single", 1, []), ("tp2_sp", 2, ["parallel.tp=2", "parallel.sp=true"]),
                                ("pp2", 2, ["parallel.pp=2"]), ("dp2", 2, [])):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                              "--standalone", "-m", "thann.inference.embed", f"load={contrastive_checkpoint}",
                              f"input={tmp_path / 'texts.jsonl'}", f"output={tmp_path / name}", "batch_size=3",
                              *layout],
                             cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-3000:]
        outputs[name] = np.load(tmp_path / f"{name}.npy")
        assert json.loads((tmp_path / f"{name}.ids.json").read_text()) == ["t0", "t1", "t2", "t3"]
    assert outputs["single"].shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(outputs["single"], axis=1), 1.0, rtol=1e-5)
    for name in ("tp2_sp", "pp2", "dp2"):
        np.testing.assert_allclose(outputs[name], outputs["single"], rtol=1e-5, atol=1e-6)
    missing = subprocess.run([sys.executable, "-m", "thann.inference.embed", f"load={contrastive_checkpoint}",
                              f"input={tmp_path / 'none.txt'}", f"output={tmp_path / 'x'}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("invalid config: input=")


def test_contrastive_run_logs_transfer_beside_start_and_lexical_baselines(contrastive_checkpoint):
    from conftest import read_metrics

    valid = [r for r in read_metrics(contrastive_checkpoint) if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [0, 2]
    for name in ("knn_accuracy", "probe_accuracy", "recall@10"):
        for record in valid:
            assert 0.0 <= record[name] <= 1.0 and record[f"start_{name}"] == valid[0][f"start_{name}"]
    assert all(0 <= valid[-1][f"tfidf_{name}"] <= 1 for name in ("knn_accuracy", "probe_accuracy"))
    for name in ("mean_cosine", "top_pc_share", "uniformity", "alignment"):
        assert name in valid[-1] and f"start_{name}" in valid[-1]


@pytest.mark.slow
def test_thann_embed_of_a_language_model_is_the_mean_of_its_final_hidden_states(tiny_checkpoint, single_rank,
                                                                                 tmp_path):
    """A pretraining checkpoint embeds a text as the L2-normalised mean of the language model's
    final (normed) hidden states over the text's tokens and its end-of-document token; whitening
    then gives the similarities of the test's own whitening of those embeddings."""
    import numpy as np

    from thann.data.tokenizer import build_tokenizer
    from thann.inference.load import build_from_checkpoint, saved, slot_record

    texts = [f"Text number {i} is about {'bread' if i % 2 else 'rockets'}" + " and more" * (i % 7)
             for i in range(140)]  # more texts than the 128 dimensions, for whitening
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    outputs = {}
    for name, extra in (("raw", []), ("white", ["postprocess=whiten"])):
        run = subprocess.run([sys.executable, "-m", "thann.inference.embed", f"load={tiny_checkpoint}",
                              f"input={tmp_path / 'texts.txt'}", f"output={tmp_path / name}", *extra],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        outputs[name] = np.load(tmp_path / f"{name}.npy")
    assert "is a language model: its embeddings are the mean of its final hidden states" in run.stderr

    path, metadata = saved(str(tiny_checkpoint), "load")
    record = slot_record(metadata)
    assert record["args"]["arch"] == "thann"
    (model,) = build_from_checkpoint(path, record, single_rank, "fp32")
    captured = []
    hook = model.decoder.final_layernorm.register_forward_hook(lambda module, args, output: captured.append(output))
    tokenizer = build_tokenizer("tiktoken", "cl100k_base")
    with torch.no_grad():
        for i in (0, 3, 6, 139):  # different lengths; one text at a time, so no padding anywhere
            ids = torch.tensor([tokenizer.encode(texts[i]) + [tokenizer.eod]])
            model(ids, torch.arange(ids.size(1))[None], None)
            mean = captured.pop()[:, 0].double().mean(dim=0)  # [S, 1, H] -> [H]
            np.testing.assert_allclose(outputs["raw"][i], (mean / mean.norm()).numpy(), rtol=1e-5, atol=1e-6)
    hook.remove()

    raw = outputs["raw"].astype(np.float64)
    variances, vectors = np.linalg.eigh(np.cov(raw.T))
    white = (raw - raw.mean(axis=0)) @ vectors / np.sqrt(variances)
    white /= np.linalg.norm(white, axis=1, keepdims=True)
    np.testing.assert_allclose(outputs["white"] @ outputs["white"].T, white @ white.T, atol=1e-4)
    with np.load(tmp_path / "white.stats.npz") as stats:
        assert stats["mean"].shape == (128,) and stats["transform"].shape == (128, 128)
    both = subprocess.run([sys.executable, "-m", "thann.inference.embed", f"load={tiny_checkpoint}",
                           f"input={tmp_path / 'texts.txt'}", f"output={tmp_path / 'x'}", "postprocess=center",
                           f"statistics={tmp_path / 'white.stats.npz'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert both.returncode == 2 and both.stderr.strip().startswith("invalid config: statistics=")
    assert both.stderr.count("\n") == 1


def test_first_last_pooling_adds_the_mean_token_embedding_to_the_mean_final_state(single_rank):
    """``first_last``: the normalised mean of the token embeddings (looked up here in the
    embedding's weight) plus the normalised mean final state (a mean-pooling encoder with the same
    weights), normalised, padding ignored; and every parameter's gradient is that of this
    expression computed here (so the embeddings get the pooled head's gradient, not only the
    decoder's)."""
    from omegaconf import OmegaConf

    from thann.models import registry

    args = OmegaConf.merge(OmegaConf.load(f"{ROOT}/configs/model/thann_tiny.yaml"),
                           {"arch": "thann_encoder", "projection_dim": None, "learnt_temperature": None})
    V, S = 512, 16
    first_last, _ = registry.build(OmegaConf.merge(args, {"pooling": "first_last"}), single_rank, vocab_size=V,
                                   max_sequence_length=S, bf16=False)
    mean, _ = registry.build(OmegaConf.merge(args, {"pooling": "mean"}), single_rank, vocab_size=V,
                             max_sequence_length=S, bf16=False)
    mean.load_state_dict(first_last.state_dict())
    first_last.eval(), mean.eval()
    tokens = torch.randint(0, V, (3, S), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(S).expand(3, S)
    lengths = torch.tensor([S, 5, 9])
    pooled = first_last(tokens, positions, lengths)
    final = mean(tokens, positions, lengths)  # normalised mean final states, with gradients
    table = mean.embedding.word_embeddings.weight
    expected = torch.stack([F.normalize(F.normalize(table[tokens[b, : lengths[b]]].mean(dim=0), dim=0) + final[b],
                                        dim=0) for b in range(3)])
    torch.testing.assert_close(pooled.detach(), expected.detach(), atol=1e-5, rtol=1e-5)

    weights = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(1))
    (pooled * weights).sum().backward()
    (expected * weights).sum().backward()
    for (name, got), (_, want) in zip(first_last.named_parameters(), mean.named_parameters()):
        assert (got.grad is None) == (want.grad is None), name
        if got.grad is not None:
            torch.testing.assert_close(got.grad, want.grad, atol=1e-6, rtol=1e-4, msg=name)
    read = torch.zeros(V, dtype=torch.bool)  # the tokens of real positions: padding gets no gradient
    for b in range(3):
        read[tokens[b, : lengths[b]]] = True
    grad = first_last.embedding.word_embeddings.weight.grad
    assert (grad[read].abs().sum(dim=1) > 0).all() and grad[~read].abs().sum() == 0

    from thann.config import ConfigError

    with pytest.raises(ConfigError, match="contrastive.pooling='first_last': .*one pipeline stage"):
        registry.spec_of(args).check(OmegaConf.merge(args, {"pooling": "first_last"}),
                                     OmegaConf.merge(single_rank, {"pp": 2}), "none")
