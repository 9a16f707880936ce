"""Heads on a decoder's final hidden states that are not a language-model head.

``PooledEmbedding``: one vector per sequence, for retrieval: the hidden state of the last real
token (sequences end with the end-of-document token), the mean over real tokens, or
``first_last``: the mean of the token embeddings (the embedding table's rows, before dropout and
the learnt tokenization) and the mean of the final hidden states, each
L2-normalised, added (the "first-last average" of Su et al. 2021; normalised apart because the
final norm's states are ~50x the embeddings' scale and would drown them). Optionally projected,
L2-normalised. Shapes: S sequence, B batch, H hidden, P projection.
"""

import math

import torch
import torch.nn.functional as F

POOLINGS = ("last", "mean", "first_last")


class PooledEmbedding(torch.nn.Module):
    def __init__(self, hidden_size: int, pooling: str, projection_dim: int | None, init_method, dtype,
                 learnt_temperature: float | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        if learnt_temperature is not None:
            # log(1/temperature), the scale of similarity scores, learnt with the model (as CLIP);
            # one-dimensional so that megatron-core leaves it out of weight decay, as CLIP does
            self.log_scale = torch.nn.Parameter(torch.tensor([-math.log(learnt_temperature)], dtype=torch.float32))
        self.projection = None
        if projection_dim:
            self.projection = torch.nn.Linear(hidden_size, projection_dim, bias=False, dtype=dtype)
            init_method(self.projection.weight)

    def forward(self, hidden_SBH: torch.Tensor, lengths_B: torch.Tensor, project: bool = True,
                embeddings_SBH: torch.Tensor | None = None) -> torch.Tensor:
        """``project=False``: the pooled states, unprojected (what the model itself gives).
        ``embeddings_SBH``: the token embeddings, which ``first_last`` pooling reads."""
        B = hidden_SBH.size(1)
        if self.pooling == "last":
            pooled_BH = hidden_SBH[lengths_B - 1, torch.arange(B, device=hidden_SBH.device)]
        else:
            real_SB = (torch.arange(hidden_SBH.size(0), device=hidden_SBH.device)[:, None] < lengths_B[None, :])

            def mean(states_SBH):
                return (states_SBH * real_SB[..., None]).sum(0) / lengths_B[:, None]

            pooled_BH = mean(hidden_SBH)
            if self.pooling == "first_last":
                pooled_BH = F.normalize(mean(embeddings_SBH), dim=-1) + F.normalize(pooled_BH, dim=-1)
        if project and self.projection is not None:
            pooled_BH = self.projection(pooled_BH)
        return F.normalize(pooled_BH.float(), dim=-1)
