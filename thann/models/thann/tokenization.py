"""THANN's learnt tokenization: the layer between the token embedding and the transformer.

Depthwise 1-D convolutions of widths 3, 5 and 7 read each position's local neighbourhood,
a linear layer mixes them into one hidden vector per position, a causal self-attention
refines it over the whole prefix, and the result (with dropout) is added to the embedding.

Causality: every convolution is padded on the left only (width k sees positions t-k+1..t),
and the attention is causal, so position t never sees a later position. Shapes: S sequence,
B batch, D hidden, K number of convolution widths.
"""

import contextlib
from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from thann.models.common.norm import Norm
from thann.models.thann.spec import self_attention_spec


@dataclass
class TokenizationConfig:
    conv_widths: tuple = (3, 5, 7)
    dropout: float = 0.1


class LearntTokenization(MegatronModule):
    def __init__(self, config, tokenization: TokenizationConfig):
        super().__init__(config=config)
        d = config.hidden_size
        factory = dict(dtype=config.params_dtype)
        self.widths = tuple(tokenization.conv_widths)
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv1d(d, d, kernel_size=k, groups=d, bias=False, **factory) for k in self.widths
        )
        self.mix = torch.nn.Linear(len(self.widths) * d, d, bias=False, **factory)
        if config.perform_initialization:
            config.init_method(self.mix.weight)
        self.norm = Norm(config, d, eps=config.layernorm_epsilon)
        self.attention = build_module(self_attention_spec(), config=config, layer_number=1)
        self.dropout = torch.nn.Dropout(tokenization.dropout)

    def forward(self, embeddings_SBD: torch.Tensor, inference_context=None) -> torch.Tensor:
        """``inference_context`` (a thann.models.thann.model.ThannInferenceContext): the
        sequences continue earlier calls; the convolutions read the last ``max(widths) - 1``
        embeddings it keeps, and the attention its own KV cache."""
        history = max(self.widths) - 1
        if inference_context is None or inference_context.conv_history is None:
            # Left padding with zeros: position t sees only positions <= t.
            before_SBD = embeddings_SBD.new_zeros(history, *embeddings_SBD.shape[1:])
        else:
            before_SBD = inference_context.conv_history
        x_SBD = torch.cat([before_SBD, embeddings_SBD])
        if inference_context is not None:
            inference_context.conv_history = x_SBD[x_SBD.size(0) - history:]
        x_BDS = x_SBD.permute(1, 2, 0)
        local_BDS = [conv(x_BDS[..., history - (k - 1):]) for conv, k in zip(self.convs, self.widths)]
        mixed_SBD = self.mix(torch.cat(local_BDS, dim=1).permute(2, 0, 1))
        if self.config.sequence_parallel:
            # Convolutions need the whole sequence; from here on each tensor-parallel rank keeps
            # its slice, as megatron-core's embedding would have handed it to the first layer.
            embeddings_SBD = tensor_parallel.scatter_to_sequence_parallel_region(embeddings_SBD)
            mixed_SBD = tensor_parallel.scatter_to_sequence_parallel_region(mixed_SBD)
        attention_context = inference_context.tokenization if inference_context is not None else None
        refined_SBD, _ = self.attention(self.norm(mixed_SBD), attention_mask=None, inference_context=attention_context)
        # Under sequence parallelism ranks hold different positions, so their dropout masks
        # must differ: draw them from the tensor-parallel RNG stream, as megatron-core does.
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        with rng:
            return embeddings_SBD + self.dropout(mixed_SBD + refined_SBD)
