"""Config checks of NHS-Net and its matched ResNet: ConfigError naming the field (one line, exit 2)."""

from omegaconf import ListConfig

from thann.config import require

ARCHS = ("nhsnet", "resnet")
POOLS = ("flatten", "mean")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_ints(values) -> bool:
    return isinstance(values, (list, ListConfig)) and len(values) > 0 and all(_positive_int(v) for v in values)


def _flag(model_cfg, section: str) -> None:
    require(isinstance(model_cfg[section].enabled, bool), f"model.{section}.enabled", model_cfg[section].enabled,
            "must be true or false")


def check_model_config(model_cfg) -> None:
    require(model_cfg.arch in ARCHS, "model.arch", model_cfg.arch, f"must be one of {list(ARCHS)}")
    for field in ("group_size", "stem_width", "reduction"):
        require(_positive_int(model_cfg[field]), f"model.{field}", model_cfg[field], "must be a positive integer")
    g = model_cfg.group_size
    require(model_cfg.stem_width % g == 0, "model.stem_width", model_cfg.stem_width,
            f"must be a multiple of model.group_size={g} (GroupNorm groups)")
    widths, blocks = model_cfg.widths, model_cfg.blocks
    require(_positive_ints(widths) and all(w % g == 0 for w in widths), "model.widths", widths,
            f"must be a list of positive multiples of model.group_size={g}")
    require(_positive_ints(blocks) and len(blocks) == len(widths), "model.blocks", blocks,
            f"must be a list of {len(widths)} positive block counts, one per stage of model.widths")
    image = model_cfg.image
    require(_positive_int(image.channels), "model.image.channels", image.channels, "must be a positive integer")
    require(_positive_int(image.size) and image.size >= 2 ** (len(widths) - 1), "model.image.size", image.size,
            f"must be an integer >= {2 ** (len(widths) - 1)}: each stage after the first halves it")
    require(model_cfg.pool in POOLS, "model.pool", model_cfg.pool, f"must be one of {list(POOLS)}")
    require(_number(model_cfg.residual_scale) and model_cfg.residual_scale > 0, "model.residual_scale",
            model_cfg.residual_scale, "must be a positive number")
    for section in ("hebbian", "sparse", "gate", "se", "growth", "pruning"):
        _flag(model_cfg, section)
    require(_number(model_cfg.hebbian.lr) and model_cfg.hebbian.lr >= 0, "model.hebbian.lr", model_cfg.hebbian.lr,
            "must be a number >= 0")
    sparsity = model_cfg.sparse.sparsity
    require(_number(sparsity) and 0 <= sparsity < 1, "model.sparse.sparsity", sparsity,
            "must be in [0, 1): the fraction of the sparse convolution's kernels left out")
    require(_number(model_cfg.gate.rate) and 0 < model_cfg.gate.rate <= 1, "model.gate.rate", model_cfg.gate.rate,
            "must be in (0, 1]")
    require(_number(model_cfg.gate.leak) and model_cfg.gate.leak > 0, "model.gate.leak", model_cfg.gate.leak,
            "must be a positive number")
    growth = model_cfg.growth
    limits = growth.max_widths
    require(_positive_ints(limits) and len(limits) == len(widths), "model.growth.max_widths", limits,
            f"must be a list of {len(widths)} channel counts, one per stage of model.widths")
    for stage, (limit, width) in enumerate(zip(limits, widths)):
        require(limit >= width, "model.growth.max_widths", list(limits),
                f"stage {stage} starts at model.widths[{stage}]={width} channels: its growth limit must be >= that")
        require(limit % g == 0, "model.growth.max_widths", list(limits),
                f"must be multiples of model.group_size={g} (growth adds whole GroupNorm groups)")
    require(_positive_int(growth.channels) and growth.channels % g == 0, "model.growth.channels", growth.channels,
            f"must be a positive multiple of model.group_size={g} (growth adds whole GroupNorm groups)")
    pruning = model_cfg.pruning
    require(_number(pruning.amount) and 0 <= pruning.amount < 1, "model.pruning.amount", pruning.amount,
            "must be in [0, 1): the fraction of each layer's weights pruned in the end")
    for section, field in (("growth", "start"), ("growth", "interval"), ("pruning", "start"),
                           ("pruning", "interval"), ("pruning", "ramp")):
        value = model_cfg[section][field]
        require(_positive_int(value), f"model.{section}.{field}", value, "must be a positive integer (steps)")
    require(_number(growth.threshold) and 0 <= growth.threshold <= 1, "model.growth.threshold", growth.threshold,
            "must be in [0, 1] (a firing rate)")
    inner = model_cfg.get("inner_widths")
    if model_cfg.arch == "resnet":
        matched = inner is None or (_positive_ints(inner) and len(inner) == len(widths)
                                    and all(w % g == 0 for w in inner))
        require(matched,
                "model.inner_widths", inner, f"must be null (matched to NHS-Net's parameter count) or a list of "
                f"{len(widths)} positive multiples of model.group_size={g}")
    require(len(model_cfg.heads) > 0, "model.heads", model_cfg.heads, "must name at least one head")
    for name, head in model_cfg.heads.items():
        require(head.modality == "image", f"model.heads.{name}.modality", head.modality,
                f"{model_cfg.arch} classifies images: choose image datasets (mnist, fashion_mnist)")


def check_layout(parallel_cfg) -> None:
    """Data-parallel only: the model is too small to split over tensor, pipeline or expert ranks."""
    for field in ("tp", "pp", "ep", "etp"):
        require(parallel_cfg[field] == 1, f"parallel.{field}", parallel_cfg[field],
                "NHS-Net and its ResNet run data-parallel only: use 1")
