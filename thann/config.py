"""Checks on the resolved Hydra config, run on every rank before anything is built.

Each failure names the offending field, so a bad override is reported in one line instead of
as an assertion deep inside megatron-core (or a hang in a collective on some ranks).
"""

import os
import warnings
from collections.abc import Sequence

from omegaconf import DictConfig


class ConfigError(ValueError):
    def __init__(self, field: str, value, reason: str):
        super().__init__(f"invalid config: {field}={value!r}: {reason}")
        self.field = field


def _require(ok: bool, field: str, value, reason: str) -> None:
    if not ok:
        raise ConfigError(field, value, reason)


def check_model(model: DictConfig) -> None:
    for field in ("hidden_size", "num_layers", "num_attention_heads", "num_experts", "moe_ffn_hidden_size"):
        _require(int(model[field]) > 0, f"model.{field}", model[field], "must be a positive integer")
    _require(
        model.hidden_size % model.num_attention_heads == 0,
        "model.num_attention_heads", model.num_attention_heads,
        f"must divide model.hidden_size={model.hidden_size}",
    )
    _require(
        model.num_attention_heads % model.num_query_groups == 0,
        "model.num_query_groups", model.num_query_groups,
        f"must divide model.num_attention_heads={model.num_attention_heads}",
    )
    _require(
        1 <= model.moe_router_topk <= model.num_experts,
        "model.moe_router_topk", model.moe_router_topk,
        f"must be between 1 and model.num_experts={model.num_experts}",
    )
    _require(model.normalization in ("RMSNorm", "LayerNorm"), "model.normalization", model.normalization,
             "must be RMSNorm or LayerNorm")
    widths = list(model.tokenization.conv_widths)
    _require(bool(widths) and all(int(k) > 0 for k in widths), "model.tokenization.conv_widths", widths,
             "must be a non-empty list of positive widths")
    _require(0.0 <= model.tokenization.dropout < 1.0, "model.tokenization.dropout", model.tokenization.dropout,
             "must be in [0, 1)")


def check_parallel(parallel: DictConfig, model: DictConfig, world_size: int) -> int:
    """Validates the layout against the world size and the model; returns the data-parallel size."""
    for field in ("tp", "pp", "ep", "etp"):
        _require(int(parallel[field]) >= 1, f"parallel.{field}", parallel[field], "must be >= 1")
    tp, pp, ep, etp = parallel.tp, parallel.pp, parallel.ep, parallel.etp
    _require(model.num_attention_heads % tp == 0, "parallel.tp", tp,
             f"must divide model.num_attention_heads={model.num_attention_heads}")
    _require(model.num_query_groups % tp == 0, "parallel.tp", tp,
             f"must divide model.num_query_groups={model.num_query_groups}")
    _require(model.num_experts % ep == 0, "parallel.ep", ep, f"must divide model.num_experts={model.num_experts}")
    _require(model.moe_ffn_hidden_size % etp == 0, "parallel.etp", etp,
             f"must divide model.moe_ffn_hidden_size={model.moe_ffn_hidden_size}")
    _require(model.num_layers % pp == 0, "parallel.pp", pp,
             f"must divide model.num_layers={model.num_layers} (each stage holds the same number of layers)")
    _require(world_size % (tp * pp) == 0, "parallel.tp", tp,
             f"tp*pp={tp * pp} must divide the world size {world_size}")
    dp = world_size // (tp * pp)
    _require((world_size // pp) % (etp * ep) == 0, "parallel.ep", ep,
             f"ep*etp={ep * etp} must divide the ranks of one pipeline stage ({world_size // pp})")
    _require(not parallel.sp or tp > 1, "parallel.sp", parallel.sp, "sequence parallelism needs parallel.tp > 1")
    # megatron-core routes MoE tokens under tensor parallelism only with sequence parallelism.
    _require(tp == 1 or parallel.sp, "parallel.sp", parallel.sp, "MoE with parallel.tp > 1 needs parallel.sp=true")
    return dp


def check_train(train: DictConfig, dp: int) -> None:
    for field in ("steps", "micro_batch_size", "global_batch_size", "seq_length", "eval_iters"):
        _require(int(train[field]) > 0, f"train.{field}", train[field], "must be a positive integer")
    _require(train.lr > 0, "train.lr", train.lr, "must be positive")
    _require(0 <= train.min_lr <= train.lr, "train.min_lr", train.min_lr, "must be in [0, train.lr]")
    _require(0 <= train.warmup_steps <= train.steps, "train.warmup_steps", train.warmup_steps,
             "must be in [0, train.steps]")
    _require(train.schedule in ("cosine", "linear", "constant"), "train.schedule", train.schedule,
             "must be cosine, linear or constant")
    _require(train.precision in ("auto", "bf16", "fp32"), "train.precision", train.precision,
             "must be auto, bf16 or fp32")
    _require(train.recompute in ("none", "selective", "full"), "train.recompute", train.recompute,
             "must be none, selective or full")
    _require(train.on_nonfinite_loss in ("stop", "skip"), "train.on_nonfinite_loss", train.on_nonfinite_loss,
             "must be stop or skip")
    _require(train.stop_after_step is None or 0 < train.stop_after_step <= train.steps, "train.stop_after_step",
             train.stop_after_step, "must be null or in [1, train.steps]")
    per_step = train.micro_batch_size * dp
    _require(train.global_batch_size % per_step == 0, "train.global_batch_size", train.global_batch_size,
             f"must be a multiple of micro_batch_size * data-parallel size = {per_step}")


def _formats_prompt(template: str) -> bool:
    try:
        return template.format(prompt="a") != template.format(prompt="b")
    except (KeyError, IndexError, ValueError):
        return False


def check_data(data: DictConfig) -> None:
    from thann.data.datasets import LOSS_MASKS, dataset_tokenizer
    from thann.data.preprocess import loss_mask_prefix
    from thann.data.tokenizer import build_tokenizer

    paths = data.paths
    _require(isinstance(paths, Sequence) and not isinstance(paths, str) and len(paths) > 0, "data.paths", paths,
             "must be a non-empty list of indexed dataset prefixes")
    if data.weights is not None:
        _require(isinstance(data.weights, Sequence) and len(data.weights) == len(paths), "data.weights",
                 data.weights, f"must be null or one weight per path ({len(paths)})")
        _require(all(float(w) > 0 for w in data.weights), "data.weights", data.weights, "must all be positive")
    parts = str(data.split).split(",")
    _require(len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts)
             and float(parts[0]) > 0 and float(parts[1]) > 0, "data.split", data.split,
             "must be 'train,valid,test' weights with positive train and valid, e.g. '98,2,0'")
    _require(data.loss_mask in LOSS_MASKS, "data.loss_mask", data.loss_mask, f"must be one of {list(LOSS_MASKS)}")
    _require(data.prompt_template == "chat" or _formats_prompt(data.prompt_template), "data.prompt_template",
             data.prompt_template, "must be chat or a format string whose one field is {prompt}")
    try:
        tokenizer = build_tokenizer(data.tokenizer.type, data.tokenizer.model)
    except ValueError as e:
        raise ConfigError("data.tokenizer", dict(data.tokenizer), str(e)) from None
    for i, prefix in enumerate(paths):
        field = f"data.paths[{i}]"
        needed = [f"{prefix}.bin", f"{prefix}.idx"]
        if data.loss_mask == "assistant":
            needed += [f"{loss_mask_prefix(prefix)}.bin", f"{loss_mask_prefix(prefix)}.idx"]
        missing = [p for p in needed if not os.path.isfile(p)]
        _require(not missing, field, prefix, f"no indexed dataset there (missing {', '.join(missing)}); create it "
                 "with `python -m thann.data.preprocess`" + (" --loss-mask" if data.loss_mask == "assistant" else ""))
        recorded = dataset_tokenizer(prefix)
        if recorded is None:
            warnings.warn(f"{field}={prefix!r} has no {prefix}.json recording its tokenizer; "
                          f"assuming it was made with {tokenizer.identity['model']}")
            continue
        _require(recorded.get("fingerprint") == tokenizer.fingerprint, field, prefix,
                 f"was tokenized with {recorded.get('type')}:{recorded.get('model')} ({recorded.get('fingerprint')}), "
                 f"but the run uses data.tokenizer={data.tokenizer.type}:{data.tokenizer.model} "
                 f"({tokenizer.fingerprint}); set data.tokenizer to match or preprocess the data again")


def check(cfg: DictConfig, world_size: int) -> int:
    """All checks, cheapest first; returns the data-parallel size."""
    check_model(cfg.model)
    dp = check_parallel(cfg.parallel, cfg.model, world_size)
    check_train(cfg.train, dp)
    check_data(cfg.data)
    return dp
