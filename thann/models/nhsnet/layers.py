"""NHS-Net's layers: masked convolutions and linears, the Hebbian and the structured sparse
convolution, the Hodgkin-Huxley gate and squeeze-excitation. The equations are in README.md.

Shapes: B batch, C/I/O channels (in, out), H×W pixels, K = I·k·k a kernel's fan-in, k the kernel
size, R the gate's and squeeze-excitation's hidden width.

Every weight that pruning may remove lives in a MaskedConv2d or MaskedLinear: the forward uses
``weight ⊙ mask`` with a uint8 ``keep`` buffer (0: pruned), so a pruned weight takes no part in
the output and receives a zero gradient, and nothing's shape ever changes. Biases and
normalisation parameters are never masked.

Statistics a local rule reads (the Hebbian correlations, the gate's activity) are summed during
training forwards into plain attributes, not buffers: they live for one step, are summed over
data-parallel ranks and consumed by the model's ``after_step`` (model.py), and are empty whenever
a checkpoint is written.
"""

import math

import torch
import torch.nn.functional as F


def kaiming_std(fan_in: int) -> float:
    """He-normal for a layer followed by a ReLU."""
    return math.sqrt(2.0 / fan_in)


class MaskedConv2d(torch.nn.Module):
    """A k×k convolution without bias ("same" padding), its weight multiplied by a mask."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, **factory):
        super().__init__()
        self.stride, self.padding = stride, kernel_size // 2
        self.weight = torch.nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size, **factory))
        torch.nn.init.normal_(self.weight, std=kaiming_std(in_channels * kernel_size * kernel_size))
        self.register_buffer("keep", torch.ones_like(self.weight, dtype=torch.uint8))

    def available(self) -> torch.Tensor:
        """Where a weight may exist at all (structure): pruning ranks only these."""
        return torch.ones_like(self.keep)

    def mask(self, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> torch.Tensor:
        """keep ⊙ available, restricted to alive output channels (rows) and input channels (columns)."""
        mask = self.keep * self.available()
        if rows is not None:
            mask = mask * rows.view(-1, 1, 1, 1)
        if columns is not None:
            mask = mask * columns.view(1, -1, 1, 1)
        return mask

    def forward(self, x_BIHW: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = self.mask() if mask is None else mask
        return F.conv2d(x_BIHW, self.weight * mask.to(self.weight.dtype), stride=self.stride, padding=self.padding)


class MaskedLinear(torch.nn.Linear):
    """A linear layer whose weight (not its bias) is multiplied by a uint8 mask."""

    def __init__(self, in_features: int, out_features: int, **factory):
        super().__init__(in_features, out_features, **factory)
        self.register_buffer("keep", torch.ones_like(self.weight, dtype=torch.uint8))

    def available(self) -> torch.Tensor:
        return torch.ones_like(self.keep)

    def mask(self) -> torch.Tensor:
        return self.keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.keep.to(self.weight.dtype), self.bias)


class HebbianConv2d(MaskedConv2d):
    """A masked convolution trained by backprop and, after each optimizer step, by Oja's rule on
    its own input and output (README.md):

        y = (W ⊙ M) * x                        (the convolution, per position)
        W ← W + η·(⟨y·xᵀ⟩ − ⟨y²⟩·(W ⊙ M)) ⊙ M   ⟨·⟩: mean over the global batch's positions

    In training, each forward adds Σ y·xᵀ (a weight-gradient convolution of x with y), Σ y² and
    the number of positions to ``pending``; ``oja_update`` applies the rule from those sums,
    already summed over ranks."""

    def __init__(self, *args, lr: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr = lr
        self.pending: list[torch.Tensor] | None = None  # [Σ y·xᵀ (O, I, k, k), Σ y² (O), positions (1)]

    def forward(self, x_BIHW: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y_BOHW = super().forward(x_BIHW, mask)
        if self.training:
            with torch.no_grad():
                x, y = x_BIHW.detach().float(), y_BOHW.detach().float()
                sums = [torch.nn.grad.conv2d_weight(x, tuple(self.weight.shape), y, stride=self.stride,
                                                    padding=self.padding),
                        y.square().sum(dim=(0, 2, 3)),
                        torch.tensor([y.shape[0] * y.shape[2] * y.shape[3]], dtype=torch.float32, device=y.device)]
                self.pending = sums if self.pending is None else [a + b for a, b in zip(self.pending, sums)]
        return y_BOHW

    @torch.no_grad()
    def oja_update(self, correlation_OIkk: torch.Tensor, power_O: torch.Tensor, positions: torch.Tensor,
                   mask: torch.Tensor) -> None:
        """The rule from sums over the global batch (already summed over ranks)."""
        m = mask.float()
        w = self.weight.float() * m
        delta = self.lr * (correlation_OIkk / positions - (power_O / positions).view(-1, 1, 1, 1) * w) * m
        self.weight.add_(delta.to(self.weight.dtype))


def band_structure(out_channels: int, in_channels: int, sparsity: float) -> torch.Tensor:
    """uint8 [O, I]: which input channels each output channel reads (whole k×k kernels).
    Exactly round((1 − sparsity)·O·I) kernels are kept, spread as evenly as integers allow: output
    o reads n_o consecutive input channels (cyclically) starting at ⌊o·I/O⌋, n_o differing by at
    most one between outputs. Every kernel of an output channel reads the same taps."""
    kept = round((1 - sparsity) * out_channels * in_channels)
    counts = [(kept * (o + 1)) // out_channels - (kept * o) // out_channels for o in range(out_channels)]
    structure = torch.zeros(out_channels, in_channels, dtype=torch.uint8)
    for o, n in enumerate(counts):
        start = (o * in_channels) // out_channels
        structure[o, [(start + j) % in_channels for j in range(n)]] = 1
    return structure


class SparseConv2d(MaskedConv2d):
    """A convolution with a fixed structured connectivity: its ``structure`` buffer (uint8
    [O, I], band_structure) keeps whole k×k kernels; the fraction of zero weights is
    ``sparsity`` (up to one kernel's rounding). Pruning acts on the kept kernels only."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, *,
                 sparsity: float, **factory):
        super().__init__(in_channels, out_channels, kernel_size, stride, **factory)
        self.register_buffer("structure", band_structure(out_channels, in_channels, sparsity).to(self.weight.device))
        # He-normal over the kernels an output channel really reads
        fan_in = self.structure.sum(dim=1).clamp(min=1).float() * kernel_size * kernel_size
        with torch.no_grad():
            self.weight.normal_().mul_((2.0 / fan_in).sqrt().view(-1, 1, 1, 1).to(self.weight.dtype))

    def available(self) -> torch.Tensor:
        return self.structure[:, :, None, None].expand_as(self.keep)


class HodgkinHuxleyGate(torch.nn.Module):
    """A per-channel gain from Hodgkin-Huxley-style gating variables (README.md):

        v = mean_HW(x)                                   a channel's "potential", [B, C]
        (n∞, m∞, h∞) = σ(W₂·ReLU(W₁·v + b₁) + b₂)         steady states, [3, B, C]
        (n, m, h) = s + β·((n∞, m∞, h∞) − s)             one relaxation step from the running state s
        y = x · m³h / (m³h + n⁴ + g_L)                    the membrane's steady state, E_Na = x, E_K = E_L = 0

    ``state`` (buffer [3, C], starting at ½) relaxes toward the global batch's mean steady state
    once per optimizer step, ``s ← s + β·(⟨(n∞, m∞, h∞)⟩ − s)`` (``relax``); never in evaluation."""

    def __init__(self, channels: int, hidden: int, *, rate: float, leak: float, **factory):
        super().__init__()
        self.rate, self.leak = rate, leak
        self.hidden = MaskedLinear(channels, hidden, **factory)
        self.gates = MaskedLinear(hidden, 3 * channels, **factory)
        self.register_buffer("state", torch.full((3, channels), 0.5, dtype=factory.get("dtype"),
                                                 device=factory.get("device")))
        self.pending: list[torch.Tensor] | None = None  # [Σ steady states (3, C), samples (1)]

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        v_BC = x_BCHW.mean(dim=(2, 3))
        steady_3BC = torch.sigmoid(self.gates(torch.relu(self.hidden(v_BC)))).unflatten(1, (3, -1)).transpose(0, 1)
        if self.training:
            sums = [steady_3BC.detach().float().sum(dim=1),
                    torch.tensor([x_BCHW.shape[0]], dtype=torch.float32, device=x_BCHW.device)]
            self.pending = sums if self.pending is None else [a + b for a, b in zip(self.pending, sums)]
        state = self.state.unsqueeze(1)
        n, m, h = state + self.rate * (steady_3BC - state)
        sodium = m.pow(3) * h
        gain_BC = sodium / (sodium + n.pow(4) + self.leak)
        return x_BCHW * gain_BC[:, :, None, None]

    @torch.no_grad()
    def relax(self, steady_sum_3C: torch.Tensor, samples: torch.Tensor) -> None:
        mean = steady_sum_3C / samples
        self.state.add_((self.rate * (mean - self.state.float())).to(self.state.dtype))


class SqueezeExcitation(torch.nn.Module):
    """x · σ(W₂·ReLU(W₁·mean_HW(x) + b₁) + b₂), per channel (Hu et al. 2018)."""

    def __init__(self, channels: int, hidden: int, **factory):
        super().__init__()
        self.squeeze = MaskedLinear(channels, hidden, **factory)
        self.excite = MaskedLinear(hidden, channels, **factory)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        scale_BC = torch.sigmoid(self.excite(torch.relu(self.squeeze(x_BCHW.mean(dim=(2, 3))))))
        return x_BCHW * scale_BC[:, :, None, None]
