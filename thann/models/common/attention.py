"""Core attention for megatron-core's SelfAttention through PyTorch's scaled_dot_product_attention.

The kernel is chosen by PyTorch: flash attention on Hopper/Ampere GPUs in bf16, a fused
math kernel on CPU. Shapes follow megatron-core's convention: s sequence, b batch,
n heads, d head dim.
"""

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention.bias import causal_lower_right


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's DotProductAttention (same constructor and forward)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not implement context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("SDPAttention supports neither attention_bias nor packed sequences")
        q_BNSD, k_BNSD, v_BNSD = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # megatron-core masks mark positions to hide with True; SDPA marks positions to keep.
        keep_mask = None if attention_mask is None else ~attention_mask
        is_causal = keep_mask is None and mask_type == AttnMaskType.causal
        if is_causal and q_BNSD.size(2) != k_BNSD.size(2):
            # Queries continuing cached keys (decoding) are the last positions: SDPA's is_causal
            # would align the mask to the top left, hiding keys a query may see.
            keep_mask = causal_lower_right(q_BNSD.size(2), k_BNSD.size(2))
            is_causal = False
        dropout_p = self.dropout_p if self.training else 0.0
        # Heads are split over tensor-parallel ranks: each rank drops different heads' weights.
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout_p > 0 and not self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        with rng:
            out_BNSD = F.scaled_dot_product_attention(
                q_BNSD,
                k_BNSD,
                v_BNSD,
                attn_mask=keep_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
                enable_gqa=q_BNSD.size(1) != k_BNSD.size(1),
            )
        s, b = query.size(0), query.size(1)
        return out_BNSD.permute(2, 0, 1, 3).reshape(s, b, -1)
