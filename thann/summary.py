"""Parameter counts of a model config: the model is built on the meta device (no memory for
weights) in a world of one, and its count must equal the family's own count from the shape.

    python -m thann.summary model=thann_800m
    model=thann_800m arch=thann vocab=100352 hidden_size=2048 num_layers=8 ... tie_embeddings=True
    total_params=822413312 active_params=482674688

Active parameters are those a token passes through: all but a THANN's unrouted experts, all of a
dense model. A ChaosNet classifier has no tokens to count them by, and its front-ends and heads
follow the classification tasks: it is counted with the default classify.tasks of
configs/classify.yaml.
"""

import os
import sys

import torch
from omegaconf import OmegaConf

from thann.cli import CONFIG_DIR, exit_on_bad_input, load_config

CLASSIFIERS = ("chaosnet", "mlp_baseline")
SHAPE_FIELDS = ("hidden_size", "num_layers", "num_nodes", "num_attention_heads", "num_experts", "moe_router_topk",
                "moe_ffn_hidden_size", "ffn_hidden_size", "tie_embeddings", "neurons", "ticks", "input_width")


def _model_options() -> list[str]:
    return sorted(n.removesuffix(".yaml") for n in os.listdir(os.path.join(CONFIG_DIR, "model")) if n.endswith(".yaml"))


def usage() -> str:
    return "\n".join([
        "usage: python -m thann.summary [model=<config>] [model.<field>=<value> ...]",
        "",
        "Prints a model config's parameter counts (total, and active per token where a model has tokens),",
        "from the model built on the meta device and checked against its family's count.",
        "",
        f"model configs (configs/model/): {', '.join(_model_options())}",
        "",
        "example:",
        "  .venv/bin/python -m thann.summary model=thann_800m model.tie_embeddings=false",
    ])


def _checked(built: int, counted: int, what: str) -> int:
    if built != counted:
        raise RuntimeError(f"the built model has {built} {what}; its family counts {counted}")
    return built


def _shape(model_cfg) -> str:
    return " ".join(f"{field}={model_cfg[field]}" for field in SHAPE_FIELDS if field in model_cfg)


def language_model_summary(cfg) -> list[str]:
    from thann.data.tokenizer import build_tokenizer, padded_vocab_size
    from thann.models.language import family
    from thann.models.thann.size import model_size
    from thann.parallel import state

    model_cfg, lm = cfg.model, family(cfg.model)
    single = OmegaConf.create({"tp": 1, "pp": 1, "ep": 1, "etp": 1, "sp": False})
    lm.check(model_cfg, single, "none")
    vocab_size = padded_vocab_size(
        build_tokenizer(cfg.data.tokenizer.type, cfg.data.tokenizer.model).vocab_size, tensor_parallel_size=1)
    state.initialize(single, dp=1, seed=0)
    try:
        with torch.device("meta"):
            model = lm.build(lm.transformer_config(model_cfg, single, bf16=False), model_cfg, vocab_size,
                             cfg.train.seq_length, True, True)
    finally:
        state.destroy()
    total = _checked(sum(p.numel() for p in model.parameters()), lm.num_parameters(model_cfg, vocab_size),
                     "parameters")
    active = total
    if model_cfg.arch == "thann":
        experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
        _checked(experts, model_size(model_cfg, vocab_size).experts, "expert parameters")
        active = model_size(model_cfg, vocab_size).active
    return [f"model={model_cfg.name} arch={model_cfg.arch} vocab={vocab_size} {_shape(model_cfg)}",
            f"total_params={total} active_params={active}"]


def classifier_summary(cfg) -> list[str]:
    from thann.models.chaosnet import (
        build_classifier,
        chaosnet_transformer_config,
        check_model_config,
        mlp_num_parameters,
        num_parameters,
    )
    from thann.tasks.classify import model_config

    tasks = load_config("classify", []).classify.tasks
    model_cfg = model_config(OmegaConf.create({"model": cfg.model, "classify": {"tasks": tasks}}))
    check_model_config(model_cfg)
    with torch.device("meta"):
        model = build_classifier(chaosnet_transformer_config(model_cfg, bf16=False), model_cfg)
    built = sum(p.numel() for p in model.parameters())
    lines = [f"model={model_cfg.name} arch={model_cfg.arch} {_shape(model_cfg)}",
             f"heads and front-ends for classify.tasks={list(tasks)}, the default of configs/classify.yaml"]
    if model_cfg.arch == "mlp_baseline":
        total = _checked(built, mlp_num_parameters(model_cfg, model.hidden_width), "parameters")
        matched = "set by model.hidden_width" if model_cfg.get("hidden_width") else "matched to ChaosNet's count"
        lines.append(f"hidden_width={model.hidden_width} ({matched}: ChaosNet has {num_parameters(model_cfg)})")
    else:
        total = _checked(built, num_parameters(model_cfg), "parameters")
    return lines + [f"total_params={total}"]


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(usage())
        sys.exit(0)

    def summarise() -> list[str]:
        cfg = load_config("config", argv)
        return classifier_summary(cfg) if cfg.model.get("arch") in CLASSIFIERS else language_model_summary(cfg)

    print("\n".join(exit_on_bad_input(summarise)))


if __name__ == "__main__":
    main(sys.argv[1:])
