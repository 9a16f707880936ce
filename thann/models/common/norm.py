"""RMSNorm / LayerNorm from PyTorch that also works under sequence parallelism.

megatron-core's own torch fallback (WrappedTorchNorm) refuses sequence parallelism; the fused
versions need apex or transformer-engine. Under sequence parallelism each tensor-parallel rank
normalises a different slice of the sequence, so the norm weights' gradients are partial sums:
the ``sequence_parallel`` tag makes megatron-core's finalize_model_grads all-reduce them over
the tensor-parallel group.
"""

import torch


class Norm:
    """A ModuleSpec-compatible factory: ``Norm(config, hidden_size, eps)`` returns the torch norm."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norms = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization must be one of {sorted(norms)}, got {config.normalization!r}")
        norm = norms[config.normalization](hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
