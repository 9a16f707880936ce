"""BitLinear (matmulfreellm, arXiv 2406.02528): y = Q_a(RMSNorm(x)) · Q_w(W)ᵀ, no bias.

Q_a quantises each token's activations to 8 bits (absmax, scale 127/max|x|); Q_w quantises the
whole weight to ternary values {-1, 0, 1} times one scale (absmean, s = 1/mean|W|). Training
keeps W in full precision and passes gradients through both roundings unchanged
(straight-through estimators). The forward still multiplies dense dequantised matrices, as
matmulfreellm's training kernels do; the ternary weights are what make an addition-only
inference kernel possible (not built here).

Shape legend: O output features, F input features.
"""

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


class BitLinear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, init_method=None, dtype=None):
        super().__init__()
        self.norm = torch.nn.RMSNorm(in_features, eps=NORM_EPS, dtype=dtype)
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        (init_method or (lambda w: torch.nn.init.normal_(w, std=0.02)))(self.weight)
        self._inference_weight = (None, None)  # (the weight's version, its dequantised ternary form)

    def ternary_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 values in {-1, 0, 1}, scale s in at least float32): the layer computes with ternary / s."""
        ternary, scale = ternarize(self.weight)
        return ternary.to(torch.int8), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            ternary, scale = ternarize(self.weight)
            return bitlinear(x, self.norm, _straight_through(self.weight, (ternary / scale).to(self.weight.dtype)))
        # Without gradients (generation, evaluation) the weight is quantised once per version
        # of it (an optimizer step makes a new one), not once per token.
        version = (self.weight._version, self.weight.data_ptr(), self.weight.dtype)
        if self._inference_weight[0] != version:
            ternary, scale = ternarize(self.weight)
            self._inference_weight = (version, (ternary / scale).to(self.weight.dtype))
        return bitlinear(x, self.norm, self._inference_weight[1])


class TernaryLinear(torch.nn.Module):
    """A BitLinear frozen to its ternary values and scale (inference; rebuilt from the packed export)."""

    def __init__(self, ternary_OF: torch.Tensor, scale: torch.Tensor, norm: torch.nn.RMSNorm):
        super().__init__()
        self.norm = norm
        self.register_buffer("ternary", ternary_OF.to(torch.int8))
        self.register_buffer("scale", scale.float().reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bitlinear(x, self.norm, (self.ternary.float() / self.scale).to(self.norm.weight.dtype))
