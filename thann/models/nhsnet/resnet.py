"""The matched baseline: a plain ResNet with NHS-Net's stem, stages, strides, norms and heads, and
none of its mechanisms. Each block is

    y = ReLU(GN(conv 3×3 (ReLU(GN(conv 3×3, stride s (x))))) + shortcut(x))

with inner widths (the first convolution's output) solved so that the parameter count is NHS-Net's
(``inner_widths: null``, size.matched_inner_widths) or set in the config.
"""

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from thann.models.nhsnet.model import ImageClassifier, group_norm, head_inputs, parameter_factory, stage_layout
from thann.models.nhsnet.size import resnet_inner_widths


def conv3x3(in_channels: int, out_channels: int, stride: int, **factory) -> torch.nn.Conv2d:
    return torch.nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False, **factory)


class ResNetBlock(torch.nn.Module):
    def __init__(self, in_channels: int, inner: int, width: int, stride: int, group_size: int, **factory):
        super().__init__()
        self.conv1 = conv3x3(in_channels, inner, stride, **factory)
        self.norm1 = group_norm(inner, group_size, **factory)
        self.conv2 = conv3x3(inner, width, 1, **factory)
        self.norm2 = group_norm(width, group_size, **factory)
        self.shortcut = None
        if stride != 1 or in_channels != width:
            self.shortcut = torch.nn.Sequential(
                torch.nn.Conv2d(in_channels, width, 1, stride, bias=False, **factory),
                group_norm(width, group_size, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        o = self.norm2(self.conv2(h))
        return torch.relu(o + (x if self.shortcut is None else self.shortcut(x)))


class ResNetClassifier(ImageClassifier):
    def __init__(self, config: TransformerConfig, model_cfg):
        super().__init__(config, model_cfg)
        factory = parameter_factory(config)
        g = model_cfg.group_size
        self.inner_widths = resnet_inner_widths(model_cfg)
        self.stem = conv3x3(model_cfg.image.channels, model_cfg.stem_width, 1, **factory)
        self.stem_norm = group_norm(model_cfg.stem_width, g, **factory)
        self.blocks = torch.nn.ModuleList(
            ResNetBlock(channels, self.inner_widths[stage], model_cfg.widths[stage], stride, g, **factory)
            for stage, channels, stride in stage_layout(model_cfg))
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(head_inputs(model_cfg), head.num_classes, **factory)
                                          for name, head in model_cfg.heads.items()})
