"""Held-out images of an image-text run beside the three captions its encoders retrieve for
each (out of every held-out caption), drawn as a PNG grid, with the retrieval recall printed.

    python benchmarks/image_text_grid.py checkpoints/vit_tiny_thann_tiny_image_text [--images 24] [--out grid.png]

The held-out split is the run's own (its config's data source, data.heldout and train.seed), so
no image or name in the grid was trained on. One image per held-out group (its first: for an
emoji, the variant without a skin tone), groups in a fixed random order. A retrieved caption is
marked + when it is one of the image's own captions.
"""

import argparse
import textwrap

import numpy as np
import torch
from omegaconf import OmegaConf


def retrieve(run: str, count: int, seed: int = 0):
    """(images [N, H, W, 3], their true captions, the top-3 captions of each, i2t recall@1/5/10)."""
    from thann.checkpoint.weights import saved_config, saved_slots, slot_prefix
    from thann.data.images import captioned, to_tensor
    from thann.inference.embedding import embed_images, embed_texts
    from thann.inference.load import build_from_checkpoint, saved, saved_tokenizer
    from thann.parallel import state

    path, metadata = saved(run, "run")
    cfg = saved_config(metadata)
    _, heldout = captioned(cfg.data, cfg.image_model.image_size).split(cfg.data.heldout, cfg.train.seed)
    single = OmegaConf.create({"tp": 1, "pp": 1, "ep": 1, "etp": 1, "sp": False})
    state.initialize(single, 1, 0)
    slots = saved_slots(metadata)
    image, text = (build_from_checkpoint(path, slots[s], single, "fp32", slot_prefix(metadata, s))
                   for s in ("image", "text"))
    tokenizer, seq, dim = saved_tokenizer(metadata, None, "run"), cfg.train.seq_length, cfg.contrastive.projection_dim
    flat = [(g, c) for g, captions in enumerate(heldout.captions) for c in captions]
    tokens = [tokenizer.encode(c)[: seq - 1] + [tokenizer.eod] for _, c in flat]
    texts = embed_texts(text, tokens, 32, seq, tokenizer.eod, dim)
    images = embed_images(image, to_tensor(heldout.pixels), 32, dim)
    text_groups = torch.tensor([g for g, _ in flat])
    scores = images @ texts.T
    ranks = scores.argsort(dim=1, descending=True)
    hits = torch.as_tensor(heldout.groups)[:, None] == text_groups[ranks]
    recall = {k: hits[:, :k].any(dim=1).float().mean().item() for k in (1, 5, 10)}
    groups = np.random.default_rng(seed).permutation(len(heldout.captions))[:count]
    chosen = [int(np.flatnonzero(heldout.groups == g)[0]) for g in groups]
    top3 = [[(flat[int(j)][1], flat[int(j)][0] == heldout.groups[i]) for j in ranks[i, :3]] for i in chosen]
    state.destroy()
    return heldout.pixels[chosen], [heldout.captions[g][0] for g in groups], top3, recall


def draw(pixels, truths, top3, out: str, columns: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(pixels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 3.1 * rows))
    for k, axis in enumerate(np.atleast_1d(axes).flat):
        axis.axis("off")
        if k >= len(pixels):
            continue
        axis.imshow(pixels[k])
        lines = [textwrap.shorten(truths[k], 30)] + [("+ " if hit else "  ") + textwrap.shorten(c, 28)
                                                     for c, hit in top3[k]]
        axis.set_title("\n".join(lines), fontsize=7, loc="left", family="monospace")
    figure.tight_layout()
    figure.savefig(out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="an image-text run or iter_* directory")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--out", default="image_text_grid.png")
    a = parser.parse_args()
    pixels, truths, top3, recall = retrieve(a.run, a.images)
    draw(pixels, truths, top3, a.out)
    hits = sum(row[0][1] for row in top3)
    print("| held-out images | i2t recall@1 | @5 | @10 | grid: top-1 correct |")
    print("|---|---|---|---|---|")
    print(f"| {len(pixels)} drawn | {recall[1]:.3f} | {recall[5]:.3f} | {recall[10]:.3f} | {hits} of {len(pixels)} |")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
