"""One node of the Node-Neuron Network: matmulfreellm's HGRN-bit block on BitLinear.

    x = x + TokenMixer(RMSNorm(x))      HGRN: a gated linear recurrence over the sequence
    x = x + ChannelMixer(RMSNorm(x))    GLU
    x = x + CrossNodeAttention(x, input)  only with cross-node attention, nodes > 0

Token mixer (per channel): f = lb + (1 - lb)·σ(BL_f(x)), i = SiLU(BL_i(x))·(1 - f),
h_t = f_t ⊙ h_{t-1} + i_t, o = BL_o(RMSNorm(BL_g(x)) ⊙ SiLU(h)). The lower bound lb comes from
the model (it couples all nodes). The recurrence is the node's whole memory of the past: h_S is
all a continuation needs, so decoding carries one [B, D] state per node.

Shape legend: S sequence (this call's tokens), B batch, D hidden, I channel-mixer inner,
H attention heads, E head dim, T key positions (earlier calls' and this call's), C scan chunk,
K chunks.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from thann.models.nnn.bitlinear import BitLinear, at_least_float32

NORM_EPS = 1e-6  # matmulfreellm's rms_norm_eps
SCAN_CHUNK = 64


def linear_recurrence(f_SBD: torch.Tensor, i_SBD: torch.Tensor, h0_BD: torch.Tensor) -> torch.Tensor:
    """h_t = f_t ⊙ h_{t-1} + i_t for every t, starting from h_{-1} = h0.

    Within chunks of SCAN_CHUNK steps all chunks are scanned at once (Hillis-Steele: log2(C)
    rounds of elementwise products, stable because only products of gates in (0, 1) appear);
    the state then crosses chunk boundaries in a loop over S / C chunks.
    """
    S, B, D = f_SBD.shape
    C = min(SCAN_CHUNK, S)
    pad = -S % C
    # Padding steps (f = 1, i = 0) come after every real step, so they change nothing.
    a_KCBD = F.pad(f_SBD, (0, 0, 0, 0, 0, pad), value=1.0).view(-1, C, B, D)
    b_KCBD = F.pad(i_SBD, (0, 0, 0, 0, 0, pad), value=0.0).view(-1, C, B, D)
    step = 1
    while step < C:
        # Compose step c with step c - step: (a', b')(a, b) = (a·a', a·b' + b).
        b_KCBD = torch.cat([b_KCBD[:, :step], a_KCBD[:, step:] * b_KCBD[:, :-step] + b_KCBD[:, step:]], dim=1)
        a_KCBD = torch.cat([a_KCBD[:, :step], a_KCBD[:, step:] * a_KCBD[:, :-step]], dim=1)
        step *= 2
    # Now b[k, c] is h at (k, c) had chunk k started from zero, a[k, c] the gate product since its start.
    h_BD, chunks = h0_BD, []
    for a_CBD, b_CBD in zip(a_KCBD, b_KCBD):
        chunks.append(b_CBD + a_CBD * h_BD)
        h_BD = chunks[-1][-1]
    return torch.cat(chunks)[:S]


@dataclass
class NodeState:
    """What a node needs to continue a sequence: its last hidden state, and with cross-node
    attention the keys and values of every earlier position."""

    hidden_BD: torch.Tensor
    keys_BHTE: Optional[torch.Tensor] = None
    values_BHTE: Optional[torch.Tensor] = None


class TokenMixer(torch.nn.Module):
    def __init__(self, d: int, init_method, output_init_method, dtype):
        super().__init__()
        self.i_proj = BitLinear(d, d, init_method, dtype)
        self.f_proj = BitLinear(d, d, init_method, dtype)
        self.g_proj = BitLinear(d, d, init_method, dtype)
        self.g_norm = torch.nn.RMSNorm(d, eps=NORM_EPS, dtype=dtype)
        self.o_proj = BitLinear(d, d, output_init_method, dtype)

    def forward(self, x_SBD: torch.Tensor, lower_bound_D: torch.Tensor,
                h0_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the mixer output and the last hidden state."""
        f_SBD = torch.sigmoid(self.f_proj(x_SBD))
        f_SBD = lower_bound_D + (1 - lower_bound_D) * f_SBD
        i_SBD = F.silu(self.i_proj(x_SBD)) * (1 - f_SBD)
        h_SBD = linear_recurrence(at_least_float32(f_SBD), at_least_float32(i_SBD), h0_BD)
        o_SBD = self.g_norm(self.g_proj(x_SBD)) * F.silu(h_SBD).to(x_SBD.dtype)
        return self.o_proj(o_SBD), h_SBD[-1]


class ChannelMixer(torch.nn.Module):
    def __init__(self, d: int, inner: int, init_method, output_init_method, dtype):
        super().__init__()
        self.gate_proj = BitLinear(d, 2 * inner, init_method, dtype)
        self.down_proj = BitLinear(inner, d, output_init_method, dtype)

    def forward(self, x_SBD: torch.Tensor) -> torch.Tensor:
        gate_SBI, y_SBI = self.gate_proj(x_SBD).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate_SBI) * y_SBI)


class CrossNodeAttention(torch.nn.Module):
    """Queries from this node's output, keys and values from its input (the previous node's
    output), causal over positions, projections on BitLinear. No position encoding: the node's
    recurrence already tells positions apart."""

    def __init__(self, d: int, heads: int, init_method, output_init_method, dtype):
        super().__init__()
        self.heads = heads
        self.q_proj = BitLinear(d, d, init_method, dtype)
        self.k_proj = BitLinear(d, d, init_method, dtype)
        self.v_proj = BitLinear(d, d, init_method, dtype)
        self.o_proj = BitLinear(d, d, output_init_method, dtype)

    def _heads(self, x_SBD: torch.Tensor) -> torch.Tensor:
        S, B, D = x_SBD.shape
        return x_SBD.view(S, B, self.heads, D // self.heads).permute(1, 2, 0, 3)

    def forward(self, y_SBD: torch.Tensor, previous_SBD: torch.Tensor, state: Optional[NodeState]) -> torch.Tensor:
        q_BHSE = self._heads(self.q_proj(y_SBD))
        k_BHTE = self._heads(self.k_proj(previous_SBD))
        v_BHTE = self._heads(self.v_proj(previous_SBD))
        if state is not None:
            k_BHTE = state.keys_BHTE = torch.cat([state.keys_BHTE, k_BHTE], dim=2)
            v_BHTE = state.values_BHTE = torch.cat([state.values_BHTE, v_BHTE], dim=2)
        S, T = q_BHSE.shape[2], k_BHTE.shape[2]
        # Query s sits at position T - S + s and may read keys up to that position.
        mask_ST = torch.ones(S, T, dtype=torch.bool, device=y_SBD.device).tril(diagonal=T - S)
        a_BHSE = F.scaled_dot_product_attention(q_BHSE, k_BHTE, v_BHTE, attn_mask=mask_ST)
        return self.o_proj(a_BHSE.permute(2, 0, 1, 3).flatten(2))


class Node(torch.nn.Module):
    def __init__(self, d: int, inner: int, cross_attention_heads: Optional[int], init_method,
                 output_init_method, dtype):
        super().__init__()
        self.mixer_norm = torch.nn.RMSNorm(d, eps=NORM_EPS, dtype=dtype)
        self.token_mixer = TokenMixer(d, init_method, output_init_method, dtype)
        self.channel_norm = torch.nn.RMSNorm(d, eps=NORM_EPS, dtype=dtype)
        self.channel_mixer = ChannelMixer(d, inner, init_method, output_init_method, dtype)
        self.cross_attention = (
            CrossNodeAttention(d, cross_attention_heads, init_method, output_init_method, dtype)
            if cross_attention_heads else None
        )
        # This node's share of the global path (see model.py); zero: training starts from the
        # plain cascade and learns how much of each node to send there.
        self.global_weight = torch.nn.Parameter(torch.zeros(d, dtype=dtype))

    def new_state(self, batch_size: int) -> NodeState:
        d = self.global_weight.shape[0]
        device, dtype = self.global_weight.device, self.global_weight.dtype
        state = NodeState(torch.zeros(batch_size, d, dtype=torch.promote_types(dtype, torch.float32), device=device))
        if self.cross_attention is not None:
            heads = self.cross_attention.heads
            state.keys_BHTE = torch.zeros(batch_size, heads, 0, d // heads, dtype=dtype, device=device)
            state.values_BHTE = torch.zeros_like(state.keys_BHTE)
        return state

    def forward(self, x_SBD: torch.Tensor, lower_bound_D: torch.Tensor, state: Optional[NodeState]) -> torch.Tensor:
        """The node's output; ``state`` (if given) is continued and updated in place."""
        S, B, D = x_SBD.shape
        h0_BD = state.hidden_BD if state is not None else at_least_float32(x_SBD.new_zeros(B, D))
        mixed_SBD, h_BD = self.token_mixer(self.mixer_norm(x_SBD), lower_bound_D, h0_BD)
        y_SBD = x_SBD + mixed_SBD
        y_SBD = y_SBD + self.channel_mixer(self.channel_norm(y_SBD))
        if state is not None:
            state.hidden_BD = h_BD
        if self.cross_attention is not None:
            y_SBD = y_SBD + self.cross_attention(y_SBD, x_SBD, state)
        return y_SBD
