"""A ViT image classifier trained from scratch: the image encoder of thann.models.vit (no
projection, no temperature) with one linear head per dataset, for the classification recipe. It
is the baseline the image-text recipe's zero-shot accuracy is read against: the same encoder,
the same images (grey bytes resized to the encoder's size, bicubic, grey over red, green and
blue: thann.data.images.grey_to_rgb, as the zero-shot evaluation), trained on the labels.

    config = vit_classifier_transformer_config(model_cfg, bf16=False)
    model = build_classifier(config, model_cfg)
    logits_BC = model(pixels_B1HW, "fashion_mnist")
"""

import torch
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from omegaconf import DictConfig, OmegaConf

from thann.config import require
from thann.data.images import grey_to_rgb, to_tensor
from thann.models.common.init import init_stream
from thann.models.common.size import Size
from thann.models.vit import checks
from thann.models.vit.model import ViTEncoder
from thann.models.vit.size import vit_size

_DATA_PARALLEL = OmegaConf.create({"tp": 1, "pp": 1, "ep": 1, "etp": 1, "sp": False})


def _encoder_args(model_cfg) -> DictConfig:
    return OmegaConf.merge(model_cfg, {"projection_dim": None, "learnt_temperature": None})


def check_model_config(model_cfg) -> None:
    checks.check_model(_encoder_args(model_cfg))
    require(model_cfg.image.channels == 1, "model.image.channels", model_cfg.image.channels,
            "the ViT classifier reads grey images (mnist, fashion_mnist), shown to the encoder as RGB")


def check_layout(parallel_cfg) -> None:
    """Data-parallel only, as the other classifiers: the baseline is small."""
    for field in ("tp", "pp", "ep", "etp"):
        require(parallel_cfg[field] == 1, f"parallel.{field}", parallel_cfg[field],
                "the ViT classifier runs data-parallel only: use 1")


def vit_classifier_transformer_config(model_cfg, *, bf16: bool):
    from thann.models.thann.model import transformer_config

    return transformer_config(_encoder_args(model_cfg), _DATA_PARALLEL, bf16=bf16)


class ViTClassifier(MegatronModule):
    model_type = ModelType.encoder_or_decoder  # what megatron-core's schedules read

    def __init__(self, config, model_cfg):
        super().__init__(config)
        self.image_size = model_cfg.image_size
        self.encoder = ViTEncoder(config, _encoder_args(model_cfg))
        with init_stream("classifier_heads"):
            self.heads = torch.nn.ModuleDict({
                name: torch.nn.Linear(model_cfg.hidden_size, head.num_classes, dtype=config.params_dtype)
                for name, head in model_cfg.heads.items()})

    def set_input_tensor(self, input_tensor) -> None:
        """megatron-core's schedules call this on every model; a one-stage model receives nothing."""

    def forward(self, pixels_B1HW: torch.Tensor, head: str) -> torch.Tensor:
        """Logits [B, C] of grey bytes [B, 1, H, W]: the head reads the encoder's pooled states
        (L2-normalised, before any projection: what the image-text recipe's linear probe reads)."""
        images = to_tensor(grey_to_rgb(pixels_B1HW, self.image_size)).to(pixels_B1HW.device)
        return self.heads[head](self.encoder(images, project=False).to(self.heads[head].weight.dtype))


def build_classifier(config, model_cfg) -> ViTClassifier:
    return ViTClassifier(config, model_cfg)


def classifier_size(model_cfg) -> Size:
    """A classifier is not measured in tokens: no matmul parameters per token."""
    heads = sum((model_cfg.hidden_size + 1) * head.num_classes for head in model_cfg.heads.values())
    total = vit_size(_encoder_args(model_cfg)).total + heads
    return Size(total=total, active=total, matmul=0)
