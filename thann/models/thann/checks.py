"""Checks of a THANN model config, alone and against a parallel layout; each failure names the field."""

from omegaconf import DictConfig

from thann.config import require
from thann.models.thann.model import tokenization_enabled


def check_model(model: DictConfig, dense: bool = False) -> None:
    """``dense``: the GPT baseline (a SwiGLU MLP of ffn_hidden_size, no experts)."""
    mlp = ("ffn_hidden_size",) if dense else ("num_experts", "moe_ffn_hidden_size")
    for field in ("hidden_size", "num_layers", "num_attention_heads", *mlp):
        require(isinstance(model[field], int) and model[field] > 0, f"model.{field}", model[field],
                "must be a positive integer")
    require(model.hidden_size % model.num_attention_heads == 0, "model.num_attention_heads",
            model.num_attention_heads, f"must divide model.hidden_size={model.hidden_size}")
    require(isinstance(model.num_query_groups, int) and model.num_query_groups > 0
            and model.num_attention_heads % model.num_query_groups == 0, "model.num_query_groups",
            model.num_query_groups, f"must divide model.num_attention_heads={model.num_attention_heads}")
    if not dense:
        require(1 <= model.moe_router_topk <= model.num_experts, "model.moe_router_topk", model.moe_router_topk,
                f"must be between 1 and model.num_experts={model.num_experts}")
    require(model.normalization in ("RMSNorm", "LayerNorm"), "model.normalization", model.normalization,
            "must be RMSNorm or LayerNorm")
    if not tokenization_enabled(model):
        return
    widths = list(model.tokenization.conv_widths)
    require(bool(widths) and all(isinstance(k, int) and k > 0 for k in widths), "model.tokenization.conv_widths",
            widths, "must be a non-empty list of positive widths")
    require(0.0 <= model.tokenization.dropout < 1.0, "model.tokenization.dropout", model.tokenization.dropout,
            "must be in [0, 1)")


def check_layout(model: DictConfig, parallel: DictConfig) -> None:
    tp, pp, ep, etp = parallel.tp, parallel.pp, parallel.ep, parallel.etp
    require(model.num_attention_heads % tp == 0, "parallel.tp", tp,
            f"must divide model.num_attention_heads={model.num_attention_heads}")
    require(model.num_query_groups % tp == 0, "parallel.tp", tp,
            f"must divide model.num_query_groups={model.num_query_groups}")
    if model.get("num_experts") is None:
        require(ep == 1, "parallel.ep", ep, "a dense model has no experts: use 1")
        require(model.ffn_hidden_size % tp == 0, "parallel.tp", tp,
                f"must divide model.ffn_hidden_size={model.ffn_hidden_size}")
    else:
        require(model.num_experts % ep == 0, "parallel.ep", ep, f"must divide model.num_experts={model.num_experts}")
        require(model.moe_ffn_hidden_size % etp == 0, "parallel.etp", etp,
                f"must divide model.moe_ffn_hidden_size={model.moe_ffn_hidden_size}")
    require(model.num_layers % pp == 0, "parallel.pp", pp,
            f"must divide model.num_layers={model.num_layers} (each stage holds the same number of layers)")
    # megatron-core routes MoE tokens under tensor parallelism only with sequence parallelism.
    require(tp == 1 or parallel.sp or model.get("num_experts") is None, "parallel.sp", parallel.sp,
            "MoE with parallel.tp > 1 needs parallel.sp=true")


def check_recompute(recompute: str) -> None:
    require(recompute in ("none", "selective", "full"), "train.recompute", recompute,
            "must be none, selective or full")
