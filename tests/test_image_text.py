"""Image-text training: GradCache over both towers, 2 data-parallel ranks and 2 micro-batches gives
the gradients of one pass over the whole batch (several captions per image, dropout replayed);
tp2·sp computes the same loss and gradients; the emoji and Fashion-MNIST readers give the
packages' pixels, captions and a split by emoji (by class); a bad caption file or image is one
line with exit code 2; thann-embed gives each tower's embeddings; a captioner trains on the
image encoder and thann-generate reads an image."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

HARNESS = os.path.join(ROOT, "tests", "support", "image_text_harness.py")
SIZE = 16  # 16 patches of 4x4: divisible by tp2
MODEL = ["image_model.image_size=16", "image_model.patch_size=4", "image_model.hidden_size=32",
         "image_model.ffn_hidden_size=64", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.moe_ffn_hidden_size=64", "model.moe_aux_loss_coeff=0.0", "contrastive.projection_dim=16",
         "data.heldout=0.25", "train.precision=fp32", "train.seq_length=8", "train.steps=4", "train.warmup_steps=1",
         "train.micro_batch_size=2", "train.global_batch_size=8", "logging.wandb.enabled=false",
         "logging.progress=false"]


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> str:
    """12 random 16x16 RGBA images; the even ones with two captions."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("captions")
    rng = np.random.default_rng(0)
    lines = []
    for k in range(12):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8), "RGBA").save(folder / f"{k}.png")
        names = [f"a picture of thing {k}", f"thing {k}"] if k % 2 == 0 else f"the object number {k}"
        lines.append(json.dumps({"image": f"{k}.png", "caption": names}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "captions.jsonl")


def _overrides(captions, run_dir, extra=()):
    return MODEL + [f"data.source={captions}", f"checkpoint.dir={run_dir}", *extra]


def _harness(init_dir, out, overrides, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone", HARNESS,
           str(init_dir), str(out), *overrides]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def towers(single_rank, captions, tmp_path_factory):
    """The recipe and both towers in this process; their initial weights in files for every layout."""
    from hydra import compose, initialize_config_dir

    from support.full_state import gather_full, model_sharded_tensors
    from thann.cli import CONFIG_DIR
    from thann.models import registry
    from thann.parallel.state import Layout
    from thann.recipes.image_text.recipe import ImageText, image_args, text_args

    base = tmp_path_factory.mktemp("image_text")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="image_text", overrides=_overrides(captions, base / "unused"))
    recipe = ImageText(cfg, Layout(1, 1, 1, 1, False, 2))
    image, _ = registry.build(image_args(cfg), single_rank, vocab_size=None, max_sequence_length=None, bf16=False)
    text, _ = registry.build(text_args(cfg), single_rank, vocab_size=recipe.tokenizer.vocab_size,
                             max_sequence_length=cfg.train.seq_length, bf16=False)
    models = {"image": image, "text": text}
    tensors = {name: model_sharded_tensors([m]) for name, m in models.items()}
    for name, model in models.items():
        full = gather_full(tensors[name])
        assert sum(t.numel() for t in full.values()) == sum(p.numel() for p in model.parameters()), name
        torch.save(full, base / f"{name}.pt")
    return base, cfg, recipe, models, tensors


def _reference_loss(images, texts, groups, scale):
    """Symmetric InfoNCE with every same-group pair a positive, row by row: the negative log of
    the softmax probability on a row's positives, averaged over rows, then over both directions."""
    scores = images @ texts.T * scale
    rows = [-torch.log(torch.softmax(scores[i], 0)[groups == groups[i]].sum()) for i in range(len(groups))]
    columns = [-torch.log(torch.softmax(scores[:, j], 0)[groups == groups[j]].sum()) for j in range(len(groups))]
    return (torch.stack(rows).mean() + torch.stack(columns).mean()) / 2


def _one_pass(towers, orders, rng=None):
    """The whole batch's loss and both towers' gradients, from the micro-batches each order holds
    (rank after rank), each rank's towers run from its RNG state (images, then texts, as the step)."""
    from megatron.core.utils import unwrap_model

    from support.full_state import gather_full
    from thann.inference.embedding import encode, encode_images

    _, cfg, recipe, models, tensors = towers
    images, texts, groups = [], [], []
    for rank, order in enumerate(orders):
        recipe.order = order
        batches = recipe.train_batches(0)
        held = [next(batches) for _ in range(order.num_microbatches)]
        if rng is not None:
            torch.set_rng_state(rng[rank])
        images += [encode_images(b, models["image"]) for b in held]
        texts += [encode(b, models["text"]) for b in held]
        groups += [b["groups"] for b in held]
    groups = torch.cat(groups)
    scale = unwrap_model(models["image"]).pooled_embedding.log_scale.exp()
    loss = _reference_loss(torch.cat(images), torch.cat(texts), groups, scale)
    for group in tensors.values():
        for t in group:
            t.data.grad = None
    loss.backward()
    return loss.item(), groups, {name: gather_full(tensors[name], value=lambda t: t.data.grad) for name in tensors}


def _assert_gradients_equal(got, expected, tolerance):
    for name in expected:
        keys = sorted(expected[name])
        full_got = torch.cat([got["gradients"][name][k].flatten() for k in keys])
        full_expected = torch.cat([expected[name][k].flatten() for k in keys])
        assert ((full_got - full_expected).norm() / full_expected.norm()).item() < tolerance, name
        assert all(expected[name][k].abs().sum() > 0 for k in keys if "experts" not in k), f"{name}: a part got none"


def test_grad_cache_over_2_ranks_2_micro_batches_and_both_towers_equals_one_pass(towers, captions):
    from thann.data.order import SampleOrder

    base, cfg, recipe, models, tensors = towers
    got = _harness(base, base / "dp2.pt", _overrides(captions, base / "dp2"), nproc=2)  # tokenization dropout on
    for model in models.values():
        model.train()
    loss, groups, expected = _one_pass(towers, [SampleOrder(8, 2, 2, rank) for rank in range(2)], got["rng"])
    assert len(set(groups.tolist())) < len(groups), "no image had a second positive in the batch"
    assert got["loss"] == pytest.approx(loss, rel=1e-5)
    _assert_gradients_equal(got, expected, 1e-5)
    (temperature,) = [k for k in expected["image"] if k.endswith("log_scale")]
    torch.testing.assert_close(got["gradients"]["image"][temperature], expected["image"][temperature],
                               rtol=1e-5, atol=0)


def test_tp2_sp_computes_the_single_pass_loss_and_gradients(towers, captions):
    from thann.data.order import SampleOrder

    base, cfg, recipe, models, tensors = towers
    got = _harness(base, base / "tp2.pt", _overrides(captions, base / "tp2", [
        "parallel.tp=2", "parallel.sp=true", "model.tokenization.dropout=0.0"]), nproc=2)
    for model in models.values():
        model.eval()  # no dropout, as the run's
    loss, _, expected = _one_pass(towers, [SampleOrder(8, 2, 1, 0)])
    assert got["loss"] == pytest.approx(loss, rel=1e-5)
    _assert_gradients_equal(got, expected, 1e-4)


@pytest.fixture(scope="module")
def image_text_run(captions, tmp_path_factory):
    """A two-step run of the test's tiny towers: its checkpoint holds both slots."""
    run_dir = tmp_path_factory.mktemp("image_text_run") / "run"
    run = subprocess.run([sys.executable, "pretrain_image_text.py", *_overrides(captions, run_dir, [
        "train.steps=2", "train.eval_interval=2", "zero_shot.train=20", "zero_shot.test=20"])],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run_dir


def _embed(*args):
    return subprocess.run([sys.executable, "-m", "thann.inference.embed", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_thann_embed_gives_each_tower_of_an_image_text_checkpoint(image_text_run, single_rank, tmp_path):
    """A directory of images goes through the image slot, texts through the text slot (the
    primary is the image encoder), each equal to that tower's forward in the test, one input at
    a time; an image of another size is refused in one line, with nothing written."""
    from PIL import Image

    from thann.checkpoint.weights import saved_slots, slot_prefix
    from thann.data.tokenizer import build_tokenizer
    from thann.inference.load import build_from_checkpoint, saved

    rng = np.random.default_rng(1)
    pixels = {name: rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for name in ("b.png", "a.png", "c.png")}
    (tmp_path / "images").mkdir()
    for name, image in pixels.items():
        Image.fromarray(image, "RGB").save(tmp_path / "images" / name)
    texts = ["thing 4", "the object number 3"]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n"
                                                  for i, t in enumerate(texts)))
    for name, source in (("images", tmp_path / "images"), ("texts", tmp_path / "texts.jsonl")):
        run = _embed(f"load={image_text_run}", f"input={source}", f"output={tmp_path / name}", "batch_size=2")
        assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "images.ids.json").read_text()) == ["a.png", "b.png", "c.png"]
    assert json.loads((tmp_path / "texts.ids.json").read_text()) == ["q0", "q1"]

    path, metadata = saved(str(image_text_run), "load")
    slots = saved_slots(metadata)
    image, text = (build_from_checkpoint(path, slots[name], single_rank, "fp32", slot_prefix(metadata, name))[0]
                   for name in ("image", "text"))
    tokenizer = build_tokenizer("tiktoken", "cl100k_base")
    got = np.load(tmp_path / "images.npy")
    with torch.no_grad():
        for row, name in enumerate(sorted(pixels)):
            x = torch.from_numpy(pixels[name]).permute(2, 0, 1)[None].float() / 127.5 - 1
            np.testing.assert_allclose(got[row], image(x)[0].numpy(), rtol=1e-5, atol=1e-6)
        got = np.load(tmp_path / "texts.npy")
        for row, t in enumerate(texts):
            ids = torch.tensor([tokenizer.encode(t) + [tokenizer.eod]])
            expected = text(ids, torch.arange(ids.size(1))[None], torch.tensor([ids.size(1)]))[0]
            np.testing.assert_allclose(got[row], expected.numpy(), rtol=1e-5, atol=1e-6)

    (tmp_path / "odd").mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), "RGB").save(tmp_path / "odd" / "big.png")
    run = _embed(f"load={image_text_run}", f"input={tmp_path / 'odd'}", f"output={tmp_path / 'odd_out'}")
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr[-2000:]
    assert "big.png: 20x20 pixels, the image encoder reads 16x16 (resize=true resizes)" in run.stderr
    assert not list(tmp_path.glob("odd_out*"))


@pytest.mark.slow
def test_the_grid_benchmark_recomputes_the_runs_held_out_recall(image_text_run, tmp_path):
    from conftest import read_metrics

    run = subprocess.run([sys.executable, "benchmarks/image_text_grid.py", str(image_text_run), "--images", "2",
                          "--out", str(tmp_path / "grid.png")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    last = [r for r in read_metrics(image_text_run) if r["split"] == "valid"][-1]
    row = run.stdout.splitlines()[2].split("|")
    assert [float(v) for v in row[2:5]] == pytest.approx([last[f"i2t_recall@{k}"] for k in (1, 5, 10)], abs=1e-3)
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_a_captioner_trains_on_the_image_encoder_and_thann_generate_reads_an_image(image_text_run, captions,
                                                                                   tmp_path):
    """finetune_captioning.py from the image-text run's frozen encoder (a decoder from scratch):
    its evaluation captions the held-out images beside the nearest-neighbour baseline;
    thann-generate reads an image before the prompt, refuses a prompt without one, and a
    language model refuses one."""
    from conftest import read_metrics

    decoder = [o for o in MODEL if o.startswith(("model.", "train."))]
    run_dir = tmp_path / "captioner"
    run = subprocess.run([sys.executable, "finetune_captioning.py", *decoder, f"data.source={captions}",
                          f"image_from={image_text_run}", "init_from=null", "train.steps=2", "train.eval_interval=2",
                          "captioning.max_new_tokens=3", f"checkpoint.dir={run_dir}", "logging.wandb.enabled=false",
                          "logging.progress=false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    valid = [r for r in read_metrics(run_dir) if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [0, 2]
    for name in ("caption_exact", "caption_f1", "nearest_exact", "nearest_f1"):
        assert 0.0 <= valid[-1][name] <= 1.0
    image = os.path.join(os.path.dirname(captions), "0.png")
    cases = {"image": ([f"image={image}"], 0, None),
             "missing": ([], 2, "reads an image before its prompt: give image=path"),
             "unreadable": ([f"image={captions}"], 2, "not a readable image")}
    for name, (extra, code, message) in cases.items():
        run = subprocess.run([sys.executable, "generate_thann.py", f"load={run_dir}", "prompt=Emoji:",
                              "max_new_tokens=3", *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == code, (name, run.stderr[-2000:])
        if message:
            assert message in run.stderr and run.stderr.count("\n") == 1, (name, run.stderr[-2000:])
        else:
            assert run.stdout.startswith("Emoji:") and "tokens]" in run.stdout


def test_emoji_reader_gives_the_package_pixels_captions_and_a_split_by_emoji():
    from PIL import Image

    from thann.data import sources
    from thann.data.images import EMOJI, emoji

    root = sources.npm_package(*EMOJI)
    records = json.load(open(os.path.join(root, "emoji.json"), encoding="utf-8"))
    data = emoji()
    expected_images = sum(1 + len(r.get("skin_variations") or {}) for r in records if r["has_img_google"])
    names = [r["name"].lower() for r in records]
    assert data.pixels.shape == (expected_images, 64, 64, 3)
    santa = data.captions.index(["father christmas", "santa"])
    record = records[names.index("father christmas")]
    assert data.categories[santa] == "People & Body"
    images = np.flatnonzero(data.groups == santa)
    assert len(images) == 1 + len(record["skin_variations"])
    # Emoji sharing a caption are one group: two are named "MAN IN TUXEDO"; "cat" is the cat and the cat face.
    groups = [sorted(c) for c in data.captions]
    assert ["man in tuxedo", "person in tuxedo"] in groups and ["cat", "cat face", "cat2"] in groups
    every = [c for captions in data.captions for c in captions]
    assert len(every) == len(set(every))
    # The first of its images is the record's own, transparency over white.
    rgba = np.asarray(Image.open(os.path.join(root, "img", "google", "64", record["image"])).convert("RGBA"),
                      dtype=np.float64)
    over_white = rgba[..., :3] * rgba[..., 3:] / 255 + 255 * (1 - rgba[..., 3:] / 255)
    assert np.abs(data.pixels[images[0]] - over_white).max() <= 1  # rounding
    train, heldout = data.split(0.1, seed=1234)
    assert len(train.pixels) + len(heldout.pixels) == len(data.pixels)
    train_names = {c for captions in train.captions for c in captions}
    assert not train_names & {c for captions in heldout.captions for c in captions}
    assert len(heldout.captions) == round(0.1 * len(data.captions))


def test_fashion_mnist_reader_gives_the_package_pixels_class_captions_and_holds_out_whole_classes():
    """At the images' own size (28) the resize is the identity: the pixels are the IDX file's,
    read here with gzip and numpy, repeated over red, green and blue."""
    import gzip

    from thann.data.classification import _FASHION_FILES, _fashion_dir
    from thann.data.images import fashion_mnist

    images, labels = (os.path.join(_fashion_dir(), name) for name in _FASHION_FILES["train"])
    with gzip.open(images) as f:
        expected = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(-1, 28, 28)
    with gzip.open(labels) as f:
        expected_labels = np.frombuffer(f.read()[8:], dtype=np.uint8)
    data = fashion_mnist(28, ["a photo of a {}", "a {}"])
    assert data.pixels.shape == (60000, 28, 28, 3)
    for i in (0, 1, 59999):
        assert (data.pixels[i] == expected[i][..., None]).all()
    assert (data.groups == expected_labels).all()
    assert data.captions[0] == ["a photo of a t-shirt or top", "a t-shirt or top"]
    assert data.captions[9] == ["a photo of a ankle boot", "a ankle boot"]
    train, heldout = data.split(0.1, seed=1234)
    assert len(heldout.captions) == 1 and len(heldout.pixels) == 6000 and len(train.captions) == 9


def test_bad_caption_files_and_images_are_one_line_with_exit_2(captions, tmp_path):
    from hydra import compose, initialize_config_dir

    from thann.cli import CONFIG_DIR
    from thann.config import ConfigError
    from thann.recipes.image_text import ImageText

    folder = os.path.dirname(captions)
    (tmp_path / "not_an_image.png").write_text("hello")
    cases = {
        "no_image": ([json.dumps({"caption": "a cat"})], 'captions.jsonl:2: a line needs "image"'),
        "unreadable": ([json.dumps({"image": str(tmp_path / "not_an_image.png"), "caption": "x"})],
                       "captions.jsonl:2: " + str(tmp_path / "not_an_image.png") + ": not a readable image"),
        "size": ([json.dumps({"image": os.path.join(folder, "0.png"), "caption": "x"})], None),
    }
    for name, (line, message) in cases.items():
        path = tmp_path / name / "captions.jsonl"
        path.parent.mkdir()
        path.write_text(json.dumps({"image": os.path.join(folder, "1.png"), "caption": "fine"}) + "\n" + line[0] + "\n")
        overrides = _overrides(str(path), tmp_path / name / "run")
        if name == "size":
            overrides.append("image_model.image_size=32")
            message = f"captions.jsonl:1: {os.path.join(folder, '1.png')}: 16x16 pixels, the image encoder reads 32x32"
        if name == "no_image":  # the entry point: one line, exit 2, nothing written
            run = subprocess.run([sys.executable, "pretrain_image_text.py", *overrides], cwd=ROOT,
                                 capture_output=True, text=True, timeout=120)
            assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr[-2000:]
            assert message in run.stderr
            run_dir = tmp_path / name / "run"
            assert not run_dir.exists() or not any(run_dir.iterdir())
            continue
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="image_text", overrides=overrides)
        with pytest.raises(ConfigError) as refused:
            ImageText.check(cfg, dp=1)
        assert message in str(refused.value) and "\n" not in str(refused.value)
