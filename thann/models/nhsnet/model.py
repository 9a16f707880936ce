"""NHS-Net: a residual conv net with Hebbian convolutions, structured sparsity, Hodgkin-Huxley
gating, squeeze-excitation, neurogenesis and magnitude pruning, each switchable (README.md).

    pixels [B, K, H, W] -> stem (3×3 conv, GroupNorm, ReLU) -> blocks -> pool -> head

pool: ``mean`` over H×W (the seed's), or ``flatten`` (the default at the reduced shape: on a
budget of a few hundred steps a mean-pooled head learns far slower, README.md).

Block (the seed's residual block), inner channels in a fixed-capacity tensor with an alive mask:

    h = alive ⊙ ReLU(GN(Hebbian conv 3×3, stride s (x)))             [B, capacity, H', W']
    o = SE(gate(GN(sparse conv 3×3 (h))))                              [B, width, H', W']
    y = ReLU(residual_scale·o + shortcut(x))        shortcut: identity, or 1×1 conv + GN

Stage i has blocks[i] blocks of width widths[i], stride 2 at its first block from stage 1 on.
GroupNorm everywhere (groups of ``group_size`` channels): it has no running statistics, so
nothing of the forward differs between data-parallel ranks, and growth adds whole groups, so a
dormant group never touches an alive one's statistics.

Local rules, after each optimizer step (``after_step``, through the slot's after-step hook):
the Hebbian update of every block's first convolution, the gate's running state, pruning and
growth. Their statistics are summed over the data-parallel ranks first (one all-reduce), so the
same decisions and writes happen on every rank and equal a single rank's on the global batch.
"""

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from thann.models.nhsnet.layers import (
    HebbianConv2d,
    HodgkinHuxleyGate,
    MaskedConv2d,
    MaskedLinear,
    SparseConv2d,
    SqueezeExcitation,
    kaiming_std,
)


def nhsnet_transformer_config(model_cfg, *, bf16: bool) -> TransformerConfig:
    """The smallest valid TransformerConfig: megatron-core's DDP, optimizer and Float16Module read
    its dtypes; the transformer fields are placeholders (no transformer is built)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(num_layers=1, hidden_size=model_cfg.widths[-1], num_attention_heads=1,
                             params_dtype=dtype, pipeline_dtype=dtype, bf16=bf16,
                             use_cpu_initialization=True)  # built on the host; the trainer moves it


def parameter_factory(config: TransformerConfig) -> dict:
    # None follows torch.device(...) contexts, such as meta for counting parameters.
    device = None if config.use_cpu_initialization else torch.cuda.current_device()
    return dict(dtype=config.params_dtype, device=device)


def stage_layout(model_cfg) -> list[tuple[int, int, int]]:
    """(stage, in_channels, stride) of every block, in order."""
    layout, channels = [], model_cfg.stem_width
    for stage, (width, count) in enumerate(zip(model_cfg.widths, model_cfg.blocks)):
        for b in range(count):
            layout.append((stage, channels, 2 if stage > 0 and b == 0 else 1))
            channels = width
    return layout


def head_inputs(model_cfg) -> int:
    """The features a head reads: the last width, times the last feature map's pixels when flattened."""
    size = model_cfg.image.size
    for _ in model_cfg.widths[1:]:
        size = (size + 1) // 2  # a 3×3 convolution with stride 2 and padding 1
    return model_cfg.widths[-1] * (size * size if model_cfg.pool == "flatten" else 1)


def capacities(model_cfg) -> list[int]:
    """Inner channels allocated per stage: the growth limit when growth is on, else the width."""
    return list(model_cfg.growth.max_widths if model_cfg.growth.enabled else model_cfg.widths)


def group_norm(channels: int, group_size: int, **factory) -> torch.nn.GroupNorm:
    return torch.nn.GroupNorm(channels // group_size, channels, **factory)


class Shortcut(torch.nn.Module):
    """1×1 convolution (stride s) and GroupNorm, where a block changes the shape."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, group_size: int, **factory):
        super().__init__()
        self.conv = MaskedConv2d(in_channels, out_channels, 1, stride, **factory)
        self.norm = group_norm(out_channels, group_size, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class NHSBlock(torch.nn.Module):
    def __init__(self, model_cfg, in_channels: int, width: int, capacity: int, stride: int, **factory):
        super().__init__()
        g, hidden = model_cfg.group_size, max(1, width // model_cfg.reduction)
        self.residual_scale = model_cfg.residual_scale
        if model_cfg.hebbian.enabled:
            self.conv1 = HebbianConv2d(in_channels, capacity, 3, stride, lr=model_cfg.hebbian.lr, **factory)
        else:
            self.conv1 = MaskedConv2d(in_channels, capacity, 3, stride, **factory)
        self.norm1 = group_norm(capacity, g, **factory)
        if model_cfg.sparse.enabled:
            self.conv2 = SparseConv2d(capacity, width, 3, sparsity=model_cfg.sparse.sparsity, **factory)
        else:
            self.conv2 = MaskedConv2d(capacity, width, 3, **factory)
        self.norm2 = group_norm(width, g, **factory)
        self.gate = HodgkinHuxleyGate(width, hidden, rate=model_cfg.gate.rate, leak=model_cfg.gate.leak,
                                      **factory) if model_cfg.gate.enabled else None
        self.se = SqueezeExcitation(width, hidden, **factory) if model_cfg.se.enabled else None
        self.shortcut = Shortcut(in_channels, width, stride, g, **factory) \
            if stride != 1 or in_channels != width else None
        alive = torch.zeros(capacity, dtype=torch.uint8, device=factory.get("device"))
        alive[:width] = 1
        self.register_buffer("alive", alive)
        self.firing: list[torch.Tensor] | None = None  # growth's statistics: [Σ (h > 0) per channel, positions]
        self.counts_firing = model_cfg.growth.enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alive = self.alive.to(x.dtype).view(1, -1, 1, 1)
        h = torch.relu(self.norm1(self.conv1(x, self.conv1.mask(rows=self.alive)))) * alive
        if self.training and self.counts_firing:
            sums = [(h.detach() > 0).float().sum(dim=(0, 2, 3)),
                    torch.tensor([h.shape[0] * h.shape[2] * h.shape[3]], dtype=torch.float32, device=h.device)]
            self.firing = sums if self.firing is None else [a + b for a, b in zip(self.firing, sums)]
        o = self.norm2(self.conv2(h, self.conv2.mask(columns=self.alive)))
        if self.gate is not None:
            o = self.gate(o)
        if self.se is not None:
            o = self.se(o)
        return torch.relu(self.residual_scale * o + (x if self.shortcut is None else self.shortcut(x)))

    def masked_layers(self):
        """(layer, the mask of its weights that exist: structure and alive channels, not pruning)."""
        yield self.conv1, self.conv1.available() * self.alive.view(-1, 1, 1, 1)
        yield self.conv2, self.conv2.available() * self.alive.view(1, -1, 1, 1)
        for module in (self.gate, self.se, self.shortcut):
            if module is not None:
                for layer in module.modules():
                    if isinstance(layer, (MaskedConv2d, MaskedLinear)):
                        yield layer, layer.available()

    @torch.no_grad()
    def grow(self, channels: int, generator: torch.Generator) -> list[torch.nn.Parameter]:
        """Wakes the next ``channels`` dormant inner channels: their incoming weights drawn
        He-normal from ``generator``, their norm at gain 1 and bias 0, their outgoing weights 0,
        so the block's output is unchanged; every other weight is left as it is. Returns the
        parameters written."""
        start = int(self.alive.sum())
        new = slice(start, start + channels)
        w1 = self.conv1.weight
        fan_in = w1.shape[1] * w1.shape[2] * w1.shape[3]
        draw = torch.randn((channels, *w1.shape[1:]), generator=generator) * kaiming_std(fan_in)
        w1[new] = draw.to(w1)
        self.norm1.weight[new] = 1
        self.norm1.bias[new] = 0
        self.conv2.weight[:, new] = 0
        self.alive[new] = 1
        return [w1, self.norm1.weight, self.norm1.bias, self.conv2.weight]


class ImageClassifier(MegatronModule):
    """What NHS-Net and its ResNet share: pixels / 255 -> stem (conv, norm, ReLU) -> blocks ->
    pool -> the dataset's head. Subclasses build ``stem``, ``stem_norm``, ``blocks`` and
    ``heads`` (reading head_inputs features)."""

    def __init__(self, config: TransformerConfig, model_cfg):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron-core's schedules
        self.pool = model_cfg.pool

    def set_input_tensor(self, input_tensor) -> None:
        """megatron-core's schedules call this on every model; a one-stage model receives nothing."""

    def forward(self, pixels_BKHW: torch.Tensor, head: str, labels=None) -> torch.Tensor:
        """Logits [B, C]; with labels, the per-sample cross-entropy [B] instead."""
        if head not in self.heads:
            raise ValueError(f"unknown head {head!r}; this model has heads for {sorted(self.heads)}")
        x = torch.relu(self.stem_norm(self.stem(pixels_BKHW.to(self.stem.weight.dtype) / 255)))
        for block in self.blocks:
            x = block(x)
        logits = self.heads[head](x.flatten(1) if self.pool == "flatten" else x.mean(dim=(2, 3)))
        return logits if labels is None else F.cross_entropy(logits.float(), labels, reduction="none")


class NHSNetClassifier(ImageClassifier):
    """NHS-Net with one linear head per dataset (image datasets; ``heads`` from the recipe)."""

    def __init__(self, config: TransformerConfig, model_cfg):
        super().__init__(config, model_cfg)
        factory = parameter_factory(config)
        self.cfg = model_cfg
        g = model_cfg.group_size
        self.stem = MaskedConv2d(model_cfg.image.channels, model_cfg.stem_width, 3, **factory)
        self.stem_norm = group_norm(model_cfg.stem_width, g, **factory)
        capacity = capacities(model_cfg)
        self.blocks = torch.nn.ModuleList(
            NHSBlock(model_cfg, channels, model_cfg.widths[stage], capacity[stage], stride, **factory)
            for stage, channels, stride in stage_layout(model_cfg))
        self.heads = torch.nn.ModuleDict({name: MaskedLinear(head_inputs(model_cfg), head.num_classes, **factory)
                                          for name, head in model_cfg.heads.items()})
        # Growth draws its new weights from generators seeded by this (one number per model,
        # drawn at init like the weights, the same on every rank, kept in checkpoints).
        self.register_buffer("growth_seed", torch.randint(2 ** 62, (1,), device=factory["device"]))

    # -- local rules ------------------------------------------------------------------------------

    def _hebbian(self) -> list[HebbianConv2d]:
        return [b.conv1 for b in self.blocks if isinstance(b.conv1, HebbianConv2d)]

    def _gates(self) -> list[HodgkinHuxleyGate]:
        return [b.gate for b in self.blocks if b.gate is not None]

    def _pending(self) -> list[tuple[object, str]]:
        """(owner, attribute) of every statistic gathered since the last step."""
        owners = [(m, "pending") for m in self._hebbian() + self._gates()]
        owners += [(b, "firing") for b in self.blocks if b.counts_firing]
        return [(owner, name) for owner, name in owners if getattr(owner, name) is not None]

    def discard_statistics(self) -> None:
        """Drops what training forwards gathered (a step whose update was skipped)."""
        for owner, name in self._pending():
            setattr(owner, name, None)

    @torch.no_grad()
    def after_step(self, step: int, all_reduce_sum) -> list[torch.nn.Parameter]:
        """The local rules after optimizer step ``step`` (1-based), from the statistics of that
        step's training forwards, summed over data-parallel ranks with ``all_reduce_sum`` (in
        place on one flat tensor, returned). In order: Hebbian updates, the gates' running state,
        pruning, growth (after pruning, so that a new channel's zero outgoing weights are not
        pruned at once). Returns the parameters written."""
        pending = self._pending()
        sums = [t for owner, name in pending for t in getattr(owner, name)]
        if sums:
            flat = all_reduce_sum(torch.cat([t.flatten() for t in sums]))
            for t, total in zip(sums, flat.split([t.numel() for t in sums])):
                t.copy_(total.view_as(t))
        changed = []
        for block in self.blocks:
            if isinstance(block.conv1, HebbianConv2d) and block.conv1.pending is not None:
                block.conv1.oja_update(*block.conv1.pending, block.conv1.mask(rows=block.alive))
                changed.append(block.conv1.weight)
            if block.gate is not None and block.gate.pending is not None:
                block.gate.relax(*block.gate.pending)
        pruning, growth = self.cfg.pruning, self.cfg.growth
        if pruning.enabled and step >= pruning.start and (step - pruning.start) % pruning.interval == 0:
            events = (step - pruning.start) // pruning.interval + 1
            self.prune(pruning.amount * min(events, pruning.ramp) / pruning.ramp)
        if growth.enabled and step >= growth.start and (step - growth.start) % growth.interval == 0:
            changed += self.grow(growth.threshold, growth.channels)
        self.discard_statistics()
        return list({id(p): p for p in changed}.values())

    def masked_layers(self):
        """(layer, the mask of its weights that exist) for every conv and linear layer."""
        yield self.stem, self.stem.available()
        for block in self.blocks:
            yield from block.masked_layers()
        for head in self.heads.values():
            yield head, head.available()

    @torch.no_grad()
    def prune(self, fraction: float) -> None:
        """In every conv and linear layer, removes the smallest-magnitude weights until
        ``fraction`` of those that exist (structure, alive channels) are pruned; a weight once
        pruned stays pruned. Norms and biases are never pruned. The weights are the same on every
        rank, and so is the (stable) order of removal."""
        for layer, exists in self.masked_layers():
            kept = (layer.keep * exists).bool()
            remove = int(fraction * int(exists.sum())) - (int(exists.sum()) - int(kept.sum()))
            if remove > 0:
                magnitude = torch.where(kept, layer.weight.detach().float().abs(), torch.inf)
                order = torch.argsort(magnitude.flatten(), stable=True)
                layer.keep.view(-1)[order[:remove]] = 0

    def grow(self, threshold: float, channels: int) -> list[torch.nn.Parameter]:
        """Every block with dormant capacity and an alive inner channel that fired on fewer than
        ``threshold`` of this step's positions (the seed's under-activation trigger) wakes
        ``channels`` more. Block i's e-th growth draws from a generator seeded by
        (growth_seed, i, e)."""
        changed = []
        for i, block in enumerate(self.blocks):
            alive = int(block.alive.sum())
            if block.firing is None or alive + channels > len(block.alive):
                continue
            counts, positions = block.firing
            if (counts[:alive] / positions).min() < threshold:
                event = (alive - self.cfg.widths[self._stage_of(i)]) // channels
                generator = growth_generator(int(self.growth_seed), i, event)
                changed += block.grow(channels, generator)
        return changed

    def _stage_of(self, block: int) -> int:
        return stage_layout(self.cfg)[block][0]

    def alive_parameters(self) -> int:
        """Parameters that take part in the output: all, less pruned and structurally absent
        weights and those of dormant channels (their weights and norm parameters)."""
        total = sum(p.numel() for p in self.parameters())
        absent = sum(layer.weight.numel() - int((layer.keep * exists).sum()) for layer, exists in self.masked_layers())
        dormant_norms = sum(2 * int((b.alive == 0).sum()) for b in self.blocks)
        return total - absent - dormant_norms


def growth_generator(growth_seed: int, block: int, event: int) -> torch.Generator:
    """The generator of block ``block``'s ``event``-th growth (both 0-based). SeedSequence mixes
    the numbers, so neighbouring blocks or events draw unrelated weights."""
    words = np.random.SeedSequence([growth_seed, block, event]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))
