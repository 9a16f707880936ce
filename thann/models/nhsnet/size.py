"""Parameter counts of NHS-Net and of its matched ResNet from the config alone (every tensor as
allocated: dormant capacity and pruned weights included; ``alive_parameters`` on a built NHS-Net
counts what takes part in the output)."""

from thann.models.common.size import Size
from thann.models.nhsnet.model import capacities, head_inputs, stage_layout


def _norm(channels: int) -> int:
    return 2 * channels


def _common(model_cfg) -> int:
    """Stem and heads."""
    stem = model_cfg.image.channels * model_cfg.stem_width * 9 + _norm(model_cfg.stem_width)
    heads = sum((head_inputs(model_cfg) + 1) * head.num_classes for head in model_cfg.heads.values())
    return stem + heads


def _shortcut(in_channels: int, width: int, stride: int) -> int:
    return in_channels * width + _norm(width) if stride != 1 or in_channels != width else 0


def _block(in_channels: int, inner: int, width: int, stride: int) -> int:
    """Two 3×3 convolutions with their norms, and the shortcut."""
    return in_channels * inner * 9 + _norm(inner) + inner * width * 9 + _norm(width) + \
        _shortcut(in_channels, width, stride)


def nhsnet_parameters(model_cfg) -> int:
    total, capacity = _common(model_cfg), capacities(model_cfg)
    for stage, channels, stride in stage_layout(model_cfg):
        width = model_cfg.widths[stage]
        hidden = max(1, width // model_cfg.reduction)
        total += _block(channels, capacity[stage], width, stride)
        if model_cfg.gate.enabled:
            total += width * hidden + hidden + hidden * 3 * width + 3 * width
        if model_cfg.se.enabled:
            total += width * hidden + hidden + hidden * width + width
    return total


def resnet_parameters(model_cfg, inner_widths) -> int:
    total = _common(model_cfg)
    for stage, channels, stride in stage_layout(model_cfg):
        total += _block(channels, inner_widths[stage], model_cfg.widths[stage], stride)
    return total


def matched_inner_widths(model_cfg) -> list[int]:
    """The ResNet's inner width per stage whose parameter count is closest to the NHS-Net's of the
    same config: f × the stage widths rounded to whole GroupNorm groups, one stage then moved by
    a group either way, for f on a grid of 0.01 from 0.25 to 8 (within 0.2% on the configs here)."""
    target, g, widths = nhsnet_parameters(model_cfg), model_cfg.group_size, list(model_cfg.widths)
    # The count is linear in each stage's inner width: fixed + Σ per_channel[i] · inner[i].
    fixed = resnet_parameters(model_cfg, [0] * len(widths))
    per_channel = [resnet_parameters(model_cfg, [int(i == s) for i in range(len(widths))]) - fixed
                   for s in range(len(widths))]
    best = None
    for f in (k / 100 for k in range(25, 801)):
        base = [max(g, g * round(f * w / g)) for w in widths]
        for stage in range(len(base)):
            for move in (-g, 0, g):
                inner = [max(g, w + move) if i == stage else w for i, w in enumerate(base)]
                error = abs(fixed + sum(a * w for a, w in zip(per_channel, inner)) - target)
                if best is None or error < best[0]:
                    best = (error, inner)
    return best[1]


def resnet_inner_widths(model_cfg) -> list[int]:
    """``inner_widths`` as set, or matched (null)."""
    return list(model_cfg.inner_widths) if model_cfg.get("inner_widths") else matched_inner_widths(model_cfg)


def classifier_size(model_cfg) -> Size:
    """A classifier is not measured in tokens: no matmul parameters per token."""
    total = resnet_parameters(model_cfg, resnet_inner_widths(model_cfg)) if model_cfg.arch == "resnet" \
        else nhsnet_parameters(model_cfg)
    return Size(total=total, active=total, matmul=0)
