"""BitLinear (matmulfreellm, arXiv 2406.02528): y = Q_a(RMSNorm(x)) · Q_w(W)ᵀ, no bias.

Q_a quantises each token's activations to 8 bits (absmax, scale 127/max|x|); Q_w quantises the
whole weight to ternary values {-1, 0, 1} times one scale (absmean, s = 1/mean|W|). Training
keeps W in full precision and passes gradients through both roundings unchanged
(straight-through estimators). The forward still multiplies dense dequantised matrices, as
matmulfreellm's training kernels do; the ternary weights are what make an addition-only
inference kernel possible (not built here).

Shape legend: O output features, F input features.
"""

import contextlib
import contextvars

import torch
import torch.nn.functional as F

EPS = 1e-5  # floor of max|x| and mean|W|: an all-zero token or weight quantises to zero, not NaN
NORM_EPS = 1e-8  # matmulfreellm's BitLinear RMSNorm


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    # bf16's 8 significant bits cannot hold x·scale up to 127 for rounding, nor a long
    # recurrence; float64 stays float64 (tests compare code paths there, see the README).
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # Value exactly q (x - x.detach() is exactly 0), gradient exactly that of x. The textbook
    # x + (q - x).detach() rounds once more, so a model rebuilt from the ternary export would
    # differ from the trained one in the last bit.
    return q.detach() + (x - x.detach())


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax 8-bit quantisation (values returned dequantised), straight-through."""
    x_hi = at_least_float32(x)
    scale = 127.0 / x_hi.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    q = ((x_hi * scale).round().clamp(-128, 127) / scale).to(x.dtype)
    return _straight_through(x, q)


def ternarize(w_OF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ternary values as floats in {-1, 0, 1}, scale s) with Q_w(W) = ternary / s."""
    w_hi = at_least_float32(w_OF.detach())
    scale = 1.0 / w_hi.abs().mean().clamp(min=EPS)
    return (w_hi * scale).round().clamp(-1, 1), scale


def bitlinear(x: torch.Tensor, norm: torch.nn.RMSNorm, w_OF: torch.Tensor) -> torch.Tensor:
    return F.linear(quantize_activations(norm(x)), w_OF)


# Quantised weights reused while it is set (see frozen_weights); None: quantise on every call.
_frozen: contextvars.ContextVar[dict | None] = contextvars.ContextVar("bitlinear_frozen", default=None)


@contextlib.contextmanager
def frozen_weights(cache: dict):
    """Inside, each BitLinear (and TernaryLinear) computes its weight once into ``cache`` and
    reuses it: for decoding, one token per forward, where quantising every weight for every token
    would cost as much as the matmuls. The caller promises the weights do not change while ``cache`` lives (a
    generation's inference context). Nothing is keyed on tensor versions: megatron-core's DDP
    and optimizers write parameters through views of their buffers, which never bump the
    parameter's own version counter."""
    token = _frozen.set(cache)
    try:
        yield
    finally:
        _frozen.reset(token)


def _weight_of(layer: torch.nn.Module, quantized_weight) -> torch.Tensor:
    """``quantized_weight()``, computed once per ``frozen_weights`` cache (every call without one)."""
    cache = _frozen.get()
    if cache is None:
        return quantized_weight()
    if layer not in cache:
        cache[layer] = quantized_weight().detach()
    return cache[layer]


class BitLinear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, init_method=None, dtype=None):
        super().__init__()
        self.norm = torch.nn.RMSNorm(in_features, eps=NORM_EPS, dtype=dtype)
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        (init_method or (lambda w: torch.nn.init.normal_(w, std=0.02)))(self.weight)

    def ternary_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 values in {-1, 0, 1}, scale s in at least float32): the layer computes with ternary / s."""
        ternary, scale = ternarize(self.weight)
        return ternary.to(torch.int8), scale

    def _quantized_weight(self) -> torch.Tensor:
        ternary, scale = ternarize(self.weight)
        return _straight_through(self.weight, (ternary / scale).to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bitlinear(x, self.norm, _weight_of(self, self._quantized_weight))


class TernaryLinear(torch.nn.Module):
    """A BitLinear frozen to its ternary values and scale (inference; rebuilt from the packed export)."""

    def __init__(self, ternary_OF: torch.Tensor, scale: torch.Tensor, norm: torch.nn.RMSNorm):
        super().__init__()
        self.norm = norm
        self.register_buffer("ternary", ternary_OF.to(torch.int8))
        self.register_buffer("scale", scale.float().reshape(()))

    def _dequantized_weight(self) -> torch.Tensor:
        return (self.ternary.float() / self.scale).to(self.norm.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bitlinear(x, self.norm, _weight_of(self, self._dequantized_weight))
