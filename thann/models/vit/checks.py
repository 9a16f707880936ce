"""Checks of an image-encoder config, alone and against a parallel layout; each names the field."""

from omegaconf import DictConfig

from thann.config import require


def check_model(model: DictConfig, field: str = "model") -> None:
    for key in ("image_size", "patch_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size"):
        require(isinstance(model[key], int) and model[key] > 0, f"{field}.{key}", model[key],
                "must be a positive integer")
    require(model.image_size % model.patch_size == 0, f"{field}.patch_size", model.patch_size,
            f"must divide {field}.image_size={model.image_size}")
    require(model.hidden_size % model.num_attention_heads == 0, f"{field}.num_attention_heads",
            model.num_attention_heads, f"must divide {field}.hidden_size={model.hidden_size}")
    require(isinstance(model.num_query_groups, int) and model.num_query_groups > 0
            and model.num_attention_heads % model.num_query_groups == 0, f"{field}.num_query_groups",
            model.num_query_groups, f"must divide {field}.num_attention_heads={model.num_attention_heads}")
    require(model.normalization in ("RMSNorm", "LayerNorm"), f"{field}.normalization", model.normalization,
            "must be RMSNorm or LayerNorm")
    require(model.projection_dim is None or (isinstance(model.projection_dim, int) and model.projection_dim > 0),
            f"{field}.projection_dim", model.projection_dim, "must be null or a positive integer")


def check_layout(model: DictConfig, parallel: DictConfig, field: str = "model") -> None:
    require(parallel.pp == 1, "parallel.pp", parallel.pp,
            "the image encoder is one pipeline stage (megatron-core's ViT always embeds patches): use 1")
    require(parallel.ep == 1 and parallel.etp == 1, "parallel.ep", parallel.ep, "the image encoder has no experts")
    require(model.num_query_groups % parallel.tp == 0, "parallel.tp", parallel.tp,
            f"must divide {field}.num_query_groups={model.num_query_groups}")
    patches = (model.image_size // model.patch_size) ** 2
    require(not parallel.sp or patches % parallel.tp == 0, "parallel.tp", parallel.tp,
            f"must divide the {patches} patches of an image under sequence parallelism")
