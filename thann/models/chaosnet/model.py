"""ChaosNet classifier: a front-end per modality, one shared neuron core, and a linear head per dataset.

    text   token ids [B, L] -> mean of their embeddings (padding excluded) -> x [B, I]
    image  uint8 pixels [B, K, H, W] -> (3x3 conv, ReLU, 2x2 max-pool) per entry
           of image.conv_channels -> flatten -> linear -> x [B, I]
    core   x -> firing rates [B, N] over T ticks (neurons.py)
    head   rates -> logits [B, C], one head per dataset

Datasets trained in sequence (20 Newsgroups, then MNIST, then Fashion-MNIST) share the core, and
each keeps its own head. Datasets of one modality also share that modality's front-end.

Shapes: B batch, L tokens, K image channels, H×W pixels, I input width, T ticks, N neurons,
C classes of a dataset.

The model config (an OmegaConf node or anything that reads the same way) holds arch, neurons,
ticks, sigma, theta, rho, leak, mode, train_death_rate, eval_death_rate, input_width,
text {vocab_size, max_tokens}, image {channels, size, conv_channels}, and
heads {dataset: {modality, num_classes}}. README.md has a complete example.
"""

import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from thann.config import require
from thann.models.common.size import Size
from thann.models.chaosnet.neurons import MODES, ChaosNeurons

ARCHS = ("chaosnet", "mlp_baseline")
MODALITIES = ("text", "image")


def chaosnet_transformer_config(model_cfg, *, bf16: bool) -> TransformerConfig:
    """The smallest valid TransformerConfig. megatron-core's DDP, optimizer and Float16Module read
    it (dtypes, bf16). The transformer fields are placeholders because no transformer is built."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=1, hidden_size=model_cfg.neurons, num_attention_heads=1,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=bf16,
        # Built on the host, the trainer moves the model to its device.
        use_cpu_initialization=True,
    )


class TextFrontEnd(torch.nn.Module):
    """Mean of a document's token embeddings. Id ``vocab_size`` is padding and is left out of the mean."""

    def __init__(self, vocab_size: int, width: int, **factory):
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(vocab_size + 1, width, mode="mean", padding_idx=vocab_size, **factory)

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        return self.bag(tokens_BL)


class ImageFrontEnd(torch.nn.Module):
    def __init__(self, channels: int, size: int, conv_channels, width: int, **factory):
        super().__init__()
        layers = []
        for out in conv_channels:
            layers += [torch.nn.Conv2d(channels, out, 3, padding=1, **factory), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
            channels, size = out, size // 2
        self.convs = torch.nn.Sequential(*layers)
        self.project = torch.nn.Linear(channels * size * size, width, **factory)

    def forward(self, pixels_BKHW: torch.Tensor) -> torch.Tensor:
        x_BKHW = pixels_BKHW.to(self.project.weight.dtype) / 255
        return self.project(self.convs(x_BKHW).flatten(1))


def parameter_factory(config: TransformerConfig) -> dict:
    # None follows torch.device(...) contexts, such as meta for counting parameters.
    device = None if config.use_cpu_initialization else torch.cuda.current_device()
    return dict(dtype=config.params_dtype, device=device)


def _modalities(model_cfg) -> list[str]:
    return [m for m in MODALITIES if any(head.modality == m for head in model_cfg.heads.values())]


def build_frontends(model_cfg, **factory) -> torch.nn.ModuleDict:
    """A front-end for each modality that some head reads."""
    width = model_cfg.input_width
    build = {
        "text": lambda: TextFrontEnd(model_cfg.text.vocab_size, width, **factory),
        "image": lambda: ImageFrontEnd(model_cfg.image.channels, model_cfg.image.size,
                                       list(model_cfg.image.conv_channels), width, **factory),
    }
    return torch.nn.ModuleDict({m: build[m]() for m in _modalities(model_cfg)})


def build_heads(model_cfg, width: int, **factory) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict(
        {name: torch.nn.Linear(width, head.num_classes, **factory) for name, head in model_cfg.heads.items()}
    )


def frontend_parameters(model_cfg) -> int:
    width, total = model_cfg.input_width, 0
    for modality in _modalities(model_cfg):
        if modality == "text":
            total += (model_cfg.text.vocab_size + 1) * width
        else:
            channels, size = model_cfg.image.channels, model_cfg.image.size
            for out in model_cfg.image.conv_channels:
                total += out * (channels * 9 + 1)
                channels, size = out, size // 2
            total += (channels * size * size + 1) * width
    return total


def head_parameters(model_cfg, width: int) -> int:
    return sum((width + 1) * head.num_classes for head in model_cfg.heads.values())


def num_parameters(model_cfg) -> int:
    """ChaosNet's parameter count from the config alone: front-ends + W_in, b + W_raw + heads."""
    n, i = model_cfg.neurons, model_cfg.input_width
    return frontend_parameters(model_cfg) + n * (i + 1) + n * n + head_parameters(model_cfg, n)


def classifier_size(model_cfg) -> Size:
    """Parameters of ChaosNet or its MLP baseline; a classifier is not measured in tokens."""
    if model_cfg.arch == "mlp_baseline":
        from thann.models.chaosnet.mlp_baseline import matched_hidden_width, mlp_num_parameters

        total = mlp_num_parameters(model_cfg, model_cfg.get("hidden_width") or matched_hidden_width(model_cfg))
    else:
        total = num_parameters(model_cfg)
    return Size(total=total, active=total, matmul=0)


def classify(head: torch.nn.Linear, features_BN: torch.Tensor, labels_B=None) -> torch.Tensor:
    """Logits [B, C]. With labels, the per-sample cross-entropy [B] instead."""
    logits_BC = head(features_BN)
    if labels_B is None:
        return logits_BC
    return F.cross_entropy(logits_BC.float(), labels_B, reduction="none")


class Classifier(MegatronModule):
    """What ChaosNet and its MLP baseline share: the front-ends and the routing of a head to its
    modality. Each subclass adds its heads, sized to its own feature width."""

    def __init__(self, config: TransformerConfig, model_cfg):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron-core's schedules
        self.modality = {name: head.modality for name, head in model_cfg.heads.items()}
        self.frontends = build_frontends(model_cfg, **parameter_factory(config))
        self.death_rates = {True: model_cfg.train_death_rate, False: model_cfg.eval_death_rate}

    def death_rate(self, rate: float | None) -> float:
        """``rate``, or (None) the configured death rate of the current mode, training or evaluation."""
        return self.death_rates[self.training] if rate is None else rate

    def set_input_tensor(self, input_tensor) -> None:
        """megatron-core's schedules call this on every model. A one-stage model receives nothing."""

    def features(self, inputs: torch.Tensor, head: str) -> torch.Tensor:
        if head not in self.modality:
            raise ValueError(f"unknown head {head!r}; this model has heads for {sorted(self.modality)}")
        return self.frontends[self.modality[head]](inputs)


class ChaosNetClassifier(Classifier):
    def __init__(self, config: TransformerConfig, model_cfg):
        super().__init__(config, model_cfg)
        factory = parameter_factory(config)
        self.core = ChaosNeurons(
            model_cfg.input_width, model_cfg.neurons, ticks=model_cfg.ticks, sigma=model_cfg.sigma,
            theta=model_cfg.theta, rho=model_cfg.rho, leak=model_cfg.leak, mode=model_cfg.mode, **factory,
        )
        self.heads = build_heads(model_cfg, model_cfg.neurons, **factory)

    def draw_randomness(self, batch: int, generator: torch.Generator, death_rate: float | None = None):
        return self.core.draw_randomness(batch, generator, self.death_rate(death_rate))

    def forward(self, inputs: torch.Tensor, head: str, alive_BTN: torch.Tensor, noise_BTN: torch.Tensor,
                labels=None) -> torch.Tensor:
        rates_BN = self.core(self.features(inputs, head), alive_BTN, noise_BTN)
        return classify(self.heads[head], rates_BN, labels)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_model_config(model_cfg) -> None:
    """Checks a ChaosNet (or MLP baseline) model config. Raises ConfigError naming the field."""
    require(model_cfg.arch in ARCHS, "model.arch", model_cfg.arch, f"must be one of {list(ARCHS)}")
    for field in ("neurons", "ticks", "input_width"):
        require(_positive_int(model_cfg[field]), f"model.{field}", model_cfg[field], "must be a positive integer")
    require(model_cfg.mode in MODES, "model.mode", model_cfg.mode, f"must be one of {list(MODES)}")
    for field in ("train_death_rate", "eval_death_rate"):
        require(0 <= model_cfg[field] < 1, f"model.{field}", model_cfg[field], "must be in [0, 1)")
    require(model_cfg.sigma >= 0, "model.sigma", model_cfg.sigma, "must be >= 0")
    width = model_cfg.get("hidden_width")
    require(width is None or _positive_int(width), "model.hidden_width", width,
             "must be null (matched to ChaosNet's parameter count) or a positive integer")
    for field in ("rho", "leak"):
        require(0 <= model_cfg[field] <= 1, f"model.{field}", model_cfg[field], "must be in [0, 1]")
    require(len(model_cfg.heads) > 0, "model.heads", model_cfg.heads, "must name at least one head")
    for name, head in model_cfg.heads.items():
        # Head names are module names in the heads' ModuleDict.
        require("." not in name and name != "", f"model.heads.{name}", name,
                 "a head name must be non-empty, without '.'")
        require(head.modality in MODALITIES, f"model.heads.{name}.modality", head.modality,
                 f"must be one of {list(MODALITIES)}")
        require(_positive_int(head.num_classes) and head.num_classes >= 2, f"model.heads.{name}.num_classes",
                 head.num_classes, "must be an integer >= 2")
    modalities = _modalities(model_cfg)
    if "text" in modalities:
        for field in ("vocab_size", "max_tokens"):
            require(_positive_int(model_cfg.text[field]), f"model.text.{field}", model_cfg.text[field],
                     "must be a positive integer")
    if "image" in modalities:
        image = model_cfg.image
        require(_positive_int(image.channels), "model.image.channels", image.channels, "must be a positive integer")
        convs = list(image.conv_channels)
        require(all(_positive_int(c) for c in convs), "model.image.conv_channels", convs,
                 "must be a list of positive channel counts")
        require(_positive_int(image.size) and image.size >= 2 ** len(convs), "model.image.size", image.size,
                 f"must be an integer >= {2 ** len(convs)}: each of the {len(convs)} convolutions halves it")


def check_layout(parallel_cfg) -> None:
    """ChaosNet runs data-parallel only: its core is too small to split over tensor, pipeline or
    expert ranks (and it has no experts)."""
    for field in ("tp", "pp", "ep", "etp"):
        require(parallel_cfg[field] == 1, f"parallel.{field}", parallel_cfg[field],
                 "ChaosNet runs data-parallel only: use 1")
