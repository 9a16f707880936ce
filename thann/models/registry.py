"""Every model THANN trains or serves, by ``model.arch``, built one way for training, inference,
tools and benchmarks.

    thann           the MoE transformer with learnt tokenization (thann.models.thann)
    gpt             THANN's layers with a dense SwiGLU MLP and no learnt tokenization: the baseline
    thann_encoder   THANN's decoder with a pooled-embedding head (contrastive training, embeddings)
    thann_value     THANN's decoder with a scalar per position (a PPO critic, a reward model)
    thann_vlm       THANN reading projected image patch states before its text (captioning, LLaVA-style)
    vit             an image encoder: megatron-core's ViT with THANN's layers, pooled (thann.models.vit)
    nnn             the cascade of matmul-free nodes (thann.models.nnn)
    chaosnet        chaotic spiking neurons with neuron death, a classifier (thann.models.chaosnet)
    mlp_baseline    ChaosNet's front-ends and heads around a parameter-matched ReLU layer
    nhsnet          Hebbian, sparse, gated, growing and pruned conv net, an image classifier (thann.models.nhsnet)
    resnet          a plain ResNet matched to NHS-Net's parameter count
    vit_classifier  the image encoder with a linear head per dataset: image-text's from-scratch baseline

A ModelSpec checks a model config alone and against a layout, makes megatron-core's
TransformerConfig (the model's own instance), builds one pipeline stage, counts its parameters
and FLOPs from the shape (thann.models.common.size), and names the fields that are its shape: a
checkpoint resumes or initialises a model only when those match exactly. A new model is one
``register(ModelSpec(...))`` call (in this file, or in a plugin's own module).

``build`` is the one way to make a model: the layout's stage, on the run's device, wrapped in
megatron-core's Float16Module under bf16 (the one precision rule, in training and inference).
"""

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core.transformer.module import Float16Module
from omegaconf import DictConfig, ListConfig, OmegaConf

from thann.config import require
from thann.models.common.size import Size


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    check: Callable  # (args, parallel_cfg, recompute) -> None, raising ConfigError naming the field
    transformer_config: Callable  # (args, parallel_cfg, *, bf16, recompute) -> TransformerConfig
    build: Callable  # (config, args, vocab_size, max_sequence_length, pre_process, post_process) -> module
    size: Callable  # (args, vocab_size) -> Size
    shape_fields: tuple[str, ...]  # dotted keys of args
    shape_defaults: tuple[tuple[str, object], ...] = ()  # what an absent shape field means (older configs)
    reads_tokens: bool = True  # token ids in (a tokenizer; the vocabulary padded for tensor parallelism)
    initialised_by: tuple[str, ...] = ()  # other archs whose weights this one starts from (init_from)
    classifies: bool = False  # a classifier: its heads follow the datasets it classifies (args.heads)
    embeds_images: bool = False  # an image encoder: images [B, 3, H, W] in, one embedding per image out


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    REGISTRY[spec.arch] = spec
    return spec


def spec_of(args: DictConfig) -> ModelSpec:
    """The spec of ``args.arch`` (``thann`` for configs written before arch existed)."""
    arch = args.get("arch", "thann")
    require(arch in REGISTRY, "model.arch", arch, f"must be one of {sorted(REGISTRY)}")
    return REGISTRY[arch]


def shape(args: DictConfig) -> dict:
    """The values of the model's shape fields (with its arch)."""
    spec = spec_of(args)
    values, defaults = {"arch": spec.arch}, dict(spec.shape_defaults)
    for field in spec.shape_fields:
        value = OmegaConf.select(args, field, default=defaults.get(field))
        values[field] = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) \
            else value
    return values


def use_bf16(precision: str) -> bool:
    """``auto``: bf16 where there is a GPU."""
    return torch.cuda.is_available() if precision == "auto" else precision == "bf16"


def padded_vocab(spec: ModelSpec, vocab_size: int | None, tp: int) -> int | None:
    from thann.data.tokenizer import padded_vocab_size

    return padded_vocab_size(vocab_size, tp) if spec.reads_tokens else None


def build(args: DictConfig, parallel_cfg, *, vocab_size: int | None, max_sequence_length: int | None, bf16: bool,
          recompute: str = "none", perform_initialization: bool = True):
    """(this rank's pipeline stage of the model, its TransformerConfig): on the run's device,
    Float16Module-wrapped under bf16. Process groups must exist (thann.parallel.state)."""
    from megatron.core import parallel_state

    from thann.parallel import state

    spec = spec_of(args)
    config = spec.transformer_config(args, parallel_cfg, bf16=bf16, recompute=recompute)
    config.perform_initialization = perform_initialization
    module = spec.build(config, args, padded_vocab(spec, vocab_size, parallel_cfg.tp), max_sequence_length,
                        parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage())
    if perform_initialization:
        module = module.to(state.device())
    if bf16:
        module = Float16Module(config, module)
    return module, config


def size(args: DictConfig, vocab_size: int | None) -> Size:
    spec = spec_of(args)
    return spec.size(args, padded_vocab(spec, vocab_size, 1))


# -- the models ------------------------------------------------------------------------------------

_THANN_SHAPE = ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "num_experts",
                "moe_router_topk", "moe_ffn_hidden_size", "ffn_hidden_size", "normalization", "tie_embeddings",
                "rotary_base", "use_te", "tokenization.enabled", "tokenization.conv_widths")


def _thann(arch: str, head: str | None = None) -> ModelSpec:
    """THANN (``head`` None), or its decoder with the ``encoder`` or ``value`` head."""
    def check(args, parallel_cfg, recompute: str) -> None:
        from thann.models.thann import checks

        checks.check_model(args, dense=arch == "gpt")
        checks.check_layout(args, parallel_cfg)
        checks.check_recompute(recompute)
        if head == "encoder":
            from thann.models.common.heads import POOLINGS

            require(args.pooling in POOLINGS, "contrastive.pooling", args.pooling, f"must be one of {list(POOLINGS)}")
            require(args.pooling != "first_last" or parallel_cfg.pp == 1, "contrastive.pooling", args.pooling,
                    "reads the token embeddings beside the final states, so the model must be one pipeline stage: "
                    "use parallel.pp=1 (or train with contrastive.pooling=mean)")
            require(args.projection_dim is None or args.projection_dim > 0, "contrastive.projection_dim",
                    args.projection_dim, "must be null or positive")
        if head == "vlm":
            for key in ("image_tokens", "image_hidden_size"):
                require(isinstance(args[key], int) and args[key] > 0, f"model.{key}", args[key],
                        "must be a positive integer (the image encoder's patches and width)")
            require(parallel_cfg.pp == 1, "parallel.pp", parallel_cfg.pp,
                    "the image-conditioned decoder is one pipeline stage (its image prefix enters the first): use 1")
            require(not parallel_cfg.sp, "parallel.sp", parallel_cfg.sp,
                    "the image-conditioned decoder does not split sequences: use false")

    def transformer_config(args, parallel_cfg, *, bf16: bool, recompute: str = "none"):
        from thann.models.thann.model import transformer_config

        return transformer_config(args, parallel_cfg, bf16=bf16, recompute=recompute)

    def build(config, args, vocab_size, max_sequence_length, pre_process, post_process):
        if head == "encoder":
            from thann.models.thann.encoder import ThannEncoder

            return ThannEncoder(config, args, vocab_size, max_sequence_length, args.pooling, args.projection_dim,
                                args.learnt_temperature, pre_process=pre_process, post_process=post_process)
        if head == "vlm":
            from thann.models.thann.vlm import ThannVLM

            return ThannVLM(config, args, vocab_size, max_sequence_length, pre_process=pre_process,
                            post_process=post_process)
        if head == "value":
            from thann.models.thann.encoder import ThannValue

            return ThannValue(config, args, vocab_size, max_sequence_length, pre_process=pre_process,
                              post_process=post_process)
        from thann.models.thann.model import ThannModel

        return ThannModel(config, args, vocab_size, max_sequence_length, pre_process=pre_process,
                          post_process=post_process)

    def count(args, vocab_size: int) -> Size:
        from thann.models.thann.size import encoder_size, model_size, value_size, vlm_size

        return {"encoder": encoder_size, "value": value_size, "vlm": vlm_size}.get(head, model_size)(args, vocab_size)

    shape_fields = _THANN_SHAPE + {"encoder": ("projection_dim", "learnt_temperature"),
                                   "vlm": ("image_tokens", "image_hidden_size")}.get(head, ())
    defaults = (("use_te", False),) + ((("tokenization.enabled", True),) if arch != "gpt" else ())
    return ModelSpec(arch, check, transformer_config, build, count, shape_fields, defaults,
                     initialised_by=("thann",) if head else ())


def _nnn() -> ModelSpec:
    def check(args, parallel_cfg, recompute: str) -> None:
        from thann.models.nnn.model import check_model_config

        check_model_config(args)
        require(parallel_cfg.tp == 1, "parallel.tp", parallel_cfg.tp,
                "NNN has no tensor-parallel BitLinear: use 1 (data and pipeline parallelism are supported)")
        require(args.num_nodes % parallel_cfg.pp == 0, "parallel.pp", parallel_cfg.pp,
                f"must divide model.num_nodes={args.num_nodes} (each stage holds the same number of nodes)")
        require(parallel_cfg.ep == 1 and parallel_cfg.etp == 1, "parallel.ep", parallel_cfg.ep,
                "NNN has no experts: use 1")
        require(recompute == "none", "train.recompute", recompute, "NNN has no activation recompute: use none")

    def transformer_config(args, parallel_cfg, *, bf16: bool, recompute: str = "none"):
        from thann.models.nnn.model import nnn_transformer_config

        return nnn_transformer_config(args, parallel_cfg, bf16=bf16)

    def build(config, args, vocab_size, max_sequence_length, pre_process, post_process):
        from thann.models.nnn.model import NNNModel

        return NNNModel(config, args, vocab_size, pre_process=pre_process, post_process=post_process)

    def count(args, vocab_size: int) -> Size:
        from thann.models.nnn.model import model_size

        return model_size(args, vocab_size)

    return ModelSpec("nnn", check, transformer_config, build, count,
                     ("hidden_size", "num_nodes", "intermediate_size", "cross_node_attention", "cross_attention_heads"))


_VIT_ENCODER_SHAPE = ("image_size", "patch_size", "hidden_size", "num_layers", "num_attention_heads",
                      "num_query_groups", "ffn_hidden_size", "normalization")


def _vit() -> ModelSpec:
    def check(args, parallel_cfg, recompute: str) -> None:
        from thann.models.vit import checks

        checks.check_model(args)
        checks.check_layout(args, parallel_cfg)
        require(recompute == "none", "train.recompute", recompute, "the image encoder has no activation recompute")

    def transformer_config(args, parallel_cfg, *, bf16: bool, recompute: str = "none"):
        from thann.models.thann.model import transformer_config

        return transformer_config(args, parallel_cfg, bf16=bf16)

    def build(config, args, vocab_size, max_sequence_length, pre_process, post_process):
        from thann.models.vit.model import ViTEncoder

        return ViTEncoder(config, args)

    def count(args, vocab_size) -> Size:
        from thann.models.vit.size import vit_size

        return vit_size(args)

    return ModelSpec("vit", check, transformer_config, build, count,
                     _VIT_ENCODER_SHAPE + ("projection_dim", "learnt_temperature"),
                     reads_tokens=False, embeds_images=True)


def _classifier(arch: str, package: str, config_function: str, shape_fields: tuple) -> ModelSpec:
    """A classifier whose ``package`` (imported when first used) offers check_model_config,
    check_layout, ``config_function``, build_classifier and classifier_size."""
    def check(args, parallel_cfg, recompute: str) -> None:
        model = importlib.import_module(package)
        model.check_model_config(args)
        model.check_layout(parallel_cfg)
        require(recompute == "none", "train.recompute", recompute, "a classifier has no activation recompute: use none")

    def transformer_config(args, parallel_cfg, *, bf16: bool, recompute: str = "none"):
        return getattr(importlib.import_module(package), config_function)(args, bf16=bf16)

    def build(config, args, vocab_size, max_sequence_length, pre_process, post_process):
        return importlib.import_module(package).build_classifier(config, args)

    def count(args, vocab_size) -> Size:
        return importlib.import_module(package).classifier_size(args)

    return ModelSpec(arch, check, transformer_config, build, count, shape_fields, reads_tokens=False, classifies=True)


_CHAOSNET_SHAPE = ("neurons", "input_width", "text.vocab_size", "image.channels", "image.size", "image.conv_channels",
                   "heads")
_NHSNET_SHAPE = ("image.channels", "image.size", "stem_width", "widths", "blocks", "group_size", "reduction", "pool",
                 "sparse.enabled", "sparse.sparsity", "gate.enabled", "se.enabled", "growth.enabled",
                 "growth.max_widths", "heads")


for _spec in (_thann("thann"), _thann("gpt"), _thann("thann_encoder", "encoder"), _thann("thann_value", "value"),
              _thann("thann_vlm", "vlm"), _nnn(), _vit(),
              _classifier("chaosnet", "thann.models.chaosnet", "chaosnet_transformer_config", _CHAOSNET_SHAPE),
              _classifier("mlp_baseline", "thann.models.chaosnet", "chaosnet_transformer_config",
                          _CHAOSNET_SHAPE + ("hidden_width",)),
              _classifier("nhsnet", "thann.models.nhsnet", "nhsnet_transformer_config", _NHSNET_SHAPE),
              _classifier("resnet", "thann.models.nhsnet", "nhsnet_transformer_config",
                          _NHSNET_SHAPE + ("inner_widths",)),
              _classifier("vit_classifier", "thann.models.vit.classifier", "vit_classifier_transformer_config",
                          _VIT_ENCODER_SHAPE + ("image.channels", "image.size", "heads"))):
    register(_spec)
