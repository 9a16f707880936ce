"""Parameter counts of a model config: the model is built on the meta device (no memory for
weights) in a world of one through the registry (thann.models.registry), and its count must equal
the registry's count from the shape.

    python -m thann.summary model=thann_800m
    model=thann_800m arch=thann vocab=100352 hidden_size=2048 num_layers=8 ... tie_embeddings=True
    total_params=822413312 active_params=482674688
    training_flops_per_token=2.924e+09 seq_length=128

Active parameters are those a token passes through: all but a THANN's unrouted experts, all of a
dense model. A classifier (ChaosNet, NHS-Net) has no tokens to count them by, and its front-ends
and heads follow the datasets it classifies: it is counted with the default classify.datasets of
configs/classify.yaml. An image encoder's FLOPs are per image (its patches are its tokens).
"""

import os
import sys

import torch
from omegaconf import OmegaConf

from thann.cli import CONFIG_DIR, exit_on_bad_input, load_config

SHOWN = ("hidden_size", "num_layers", "num_nodes", "num_attention_heads", "num_experts", "moe_router_topk",
         "moe_ffn_hidden_size", "ffn_hidden_size", "tie_embeddings", "neurons", "ticks", "input_width")


def _model_options() -> list[str]:
    return sorted(n.removesuffix(".yaml") for n in os.listdir(os.path.join(CONFIG_DIR, "model")) if n.endswith(".yaml"))


def usage() -> str:
    return "\n".join([
        "usage: python -m thann.summary [model=<config>] [model.<field>=<value> ...]",
        "",
        "Prints a model config's parameter counts (total, and active per token where a model has tokens),",
        "from the model built on the meta device and checked against the registry's count.",
        "",
        f"model configs (configs/model/): {', '.join(_model_options())}",
        "",
        "example:",
        "  .venv/bin/python -m thann.summary model=thann_800m model.tie_embeddings=false",
    ])


def summary(cfg) -> list[str]:
    from thann.data.tokenizer import build_tokenizer
    from thann.models import registry
    from thann.parallel import state

    args, lines = cfg.model, []
    spec = registry.spec_of(args)
    if spec.classifies:
        from thann.data.classification import heads

        datasets = load_config("classify", []).classify.datasets
        args = OmegaConf.create({**OmegaConf.to_container(cfg.model, resolve=True), "heads": heads(datasets)})
        lines.append(f"heads for classify.datasets={list(datasets)}, the default of configs/classify.yaml")
    single = OmegaConf.create({"tp": 1, "pp": 1, "ep": 1, "etp": 1, "sp": False})
    spec.check(args, single, "none")
    vocab = build_tokenizer(cfg.data.tokenizer.type, cfg.data.tokenizer.model).vocab_size if spec.reads_tokens \
        else None
    state.initialize(single, dp=1, seed=0)
    try:
        with torch.device("meta"):
            model, _ = registry.build(args, single, vocab_size=vocab, max_sequence_length=cfg.train.seq_length,
                                      bf16=False, perform_initialization=False)
    finally:
        state.destroy()
    size = registry.size(args, vocab)
    built = sum(p.numel() for p in model.parameters())
    if built != size.total:
        raise RuntimeError(f"the built model has {built} parameters; the registry counts {size.total}")
    shown = " ".join(f"{field}={args[field]}" for field in SHOWN if field in args)
    padded = f" vocab={registry.padded_vocab(spec, vocab, 1)}" if spec.reads_tokens else ""
    lines.insert(0, f"model={args.name} arch={spec.arch}{padded} {shown}")
    if spec.reads_tokens:
        lines.append(f"total_params={size.total} active_params={size.active}")
        lines.append(f"training_flops_per_token={size.flops_per_token(cfg.train.seq_length):.4g} "
                     f"seq_length={cfg.train.seq_length}")
    else:
        lines.append(f"total_params={size.total}")
        if not spec.classifies:  # an image encoder: its tokens are an image's patches
            patches = (args.image_size // args.patch_size) ** 2
            lines.append(f"training_flops_per_image={size.flops_per_token(patches) * patches:.4g} patches={patches}")
    return lines


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(usage())
        sys.exit(0)
    print("\n".join(exit_on_bad_input(lambda: summary(load_config("config", argv)))))


if __name__ == "__main__":
    main(sys.argv[1:])
