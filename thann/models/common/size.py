"""A model's size from its shape alone, and the one formula for its training FLOPs.

Training FLOPs per token (forward + backward = 3 x forward): every parameter that multiplies an
activation costs 2 FLOPs per token forward (a multiply and an add), hence 6; attention scores
(QKᵀ and the weighted sum of V, 2·h·s FLOPs each per token forward) cost 12·h·s per attention
layer, counted over the whole sequence as the kernels compute them (causal masking saves nothing
in a dense kernel). Lookups (an untied input embedding), norms and element-wise work are not
counted. ``tests/test_model_registry.py`` checks the formula against torch's FlopCounterMode.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    total: int  # every parameter (a tied embedding counted once)
    active: int  # parameters a token (or sample) passes through: all but unrouted experts
    matmul: int  # active parameters that multiply an activation (a tied embedding counts as the LM head)
    attention_layers: int = 0  # layers computing attention scores over the sequence
    attention_width: int = 0  # the width of those scores (heads x head dimension)

    def flops_per_token(self, seq_length: int) -> float:
        return 6 * self.matmul + 12 * self.attention_layers * self.attention_width * seq_length
