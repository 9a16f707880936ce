"""Which states of a THANN checkpoint carry the topics of 20 Newsgroups, a task it never trained
on: kNN and logistic-probe accuracy (thann.recipes.contrastive.transfer, the contrastive recipe's
own fixed subsets) of the mean over each text's tokens of the token embeddings, of each decoder
layer's output and of the final (normed) states, raw, centred and whitened
(thann.inference.embedding, with statistics of all the texts, train and test, as
``thann-embed postprocess=`` computes them on one file), and of the first-last pooling the
contrastive recipe trains.

    python benchmarks/pooling_layers.py [--load checkpoints/thann_tiny] [--train 1000] [--test 500] [--k 10]

Prints a markdown table. One process; a pretraining (language model) checkpoint (any other, or
a missing one: one line, exit 2).
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from thann.checkpoint.weights import primary_slot, saved_slots, slot_prefix
from thann.cli import exit_on_bad_input
from thann.config import require
from thann.inference.embed import encoder_record
from thann.inference.embedding import apply_statistics, embed_texts, output_statistics
from thann.inference.load import build_from_checkpoint, saved, saved_tokenizer
from thann.parallel import state
from thann.recipes.contrastive.transfer import TransferSet, classification


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", default="checkpoints/thann_tiny")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()

    def prepare():
        path, metadata = saved(args.load, "load")
        slot = primary_slot(metadata)
        require(saved_slots(metadata)[slot]["args"].get("arch", "thann") == "thann", "load", args.load,
                "not a THANN language model (pretraining) checkpoint")
        return path, metadata, slot

    path, metadata, slot = exit_on_bad_input(prepare)
    record, _ = encoder_record(saved_slots(metadata)[slot], args.load)  # mean-pooled final states
    layout = OmegaConf.create({"tp": 1, "pp": 1, "ep": 1, "etp": 1, "sp": False})
    state.initialize(layout, 1, 0)
    (model,) = build_from_checkpoint(path, record, layout, "fp32", slot_prefix(metadata, slot))
    tokenizer = saved_tokenizer(metadata, None, "load")
    seq = record["seq_length"]
    data = TransferSet.newsgroups20(args.train, args.test, seq, tokenizer)
    texts = data.train_texts + data.test_texts

    captured: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        def hook(module, inputs, output):
            captured.setdefault(name, []).append((output[0] if isinstance(output, tuple) else output).transpose(0, 1))
        return hook

    model.embedding.register_forward_hook(keep("token embeddings"))
    for i, layer in enumerate(model.decoder.layers):
        layer.register_forward_hook(keep(f"decoder layer {i + 1}"))
    final = embed_texts([model], texts, 8, seq, tokenizer.eod, record["args"]["hidden_size"], project=False)
    lengths = torch.tensor([len(t) for t in texts])

    def mean(states: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(states)[: len(texts)].float()  # the last batch is padded with copies
        real = (torch.arange(x.size(1))[None] < lengths[:, None]).float()[..., None]
        return (x * real).sum(1) / real.sum(1)

    pooled = {name: mean(states) for name, states in captured.items()}
    pooled["final states (mean pooling)"] = final
    pooled["first-last"] = F.normalize(pooled["token embeddings"], dim=1) + F.normalize(final, dim=1)
    print(f"{args.load}: 20 Newsgroups, {args.train} train / {args.test} test texts, kNN k={args.k} (cosine)\n")
    print("| pooled states | kNN raw | kNN centred | kNN whitened | probe raw | probe centred | probe whitened |\n"
          "|---|---|---|---|---|---|---|")
    for name, x in pooled.items():
        matrix = x.numpy().astype(np.float32)
        scores = []
        for post in ("none", "center", "whiten"):
            y = matrix if post == "none" else apply_statistics(matrix, output_statistics(matrix, post))
            scores.append(classification(y[: args.train], data.train_labels, y[args.train:], data.test_labels, args.k))
        print(f"| {name} | " + " | ".join(f"{s['knn_accuracy']:.3f}" for s in scores) + " | "
              + " | ".join(f"{s['probe_accuracy']:.3f}" for s in scores) + " |")
    state.destroy()


if __name__ == "__main__":
    main()
