"""THANN for HF transformers: Mixtral's decoder (transformers' own classes) after THANN's learnt
tokenization.

Written into every THANN export (python -m thann.export hf) beside configuration_thann.py and
loaded from there with ``trust_remote_code=True``; it imports nothing of THANN.

The learnt tokenization reads the token embeddings: causal depthwise convolutions (one per width),
a linear mix of their outputs, and a causal self-attention over the normalised mix without a
rotary embedding; the embeddings plus the mix plus the attention go to the decoder. Under
``generate`` its state is one more layer of HF's cache, after the decoder's: a hybrid layer
holding the last ``max(widths) - 1`` embeddings (the convolutions' left context) and the
attention's keys and values. Padded positions of a batch read as zeros, as the convolutions'
left padding does. Shapes: B batch, S sequence, D hidden, H head dim.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache, LinearAttentionAndFullAttentionLayer
from transformers.masking_utils import create_causal_mask
from transformers.models.mixtral.modeling_mixtral import (
    MixtralAttention,
    MixtralForCausalLM,
    MixtralModel,
    MixtralRMSNorm,
)

from .configuration_thann import ThannConfig


class ThannLearntTokenization(nn.Module):
    def __init__(self, config: ThannConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.widths = tuple(config.tokenization_conv_widths)
        self.history = max(self.widths) - 1
        self.layer_idx = layer_idx  # its place in the cache
        self.convs = nn.ModuleList(nn.Conv1d(d, d, kernel_size=k, groups=d, bias=False) for k in self.widths)
        self.mix = nn.Linear(len(self.widths) * d, d, bias=False)
        self.norm = MixtralRMSNorm(d, eps=config.rms_norm_eps)
        self.attention = MixtralAttention(config, layer_idx)
        self.dropout = nn.Dropout(config.tokenization_dropout)

    def forward(self, embeddings_BSD, causal_mask, padding_mask, cache):
        x_BDS = embeddings_BSD.transpose(1, 2)
        if padding_mask is not None:
            x_BDS = x_BDS * padding_mask[:, None, -x_BDS.size(-1):].to(x_BDS.dtype)
        if cache is not None and cache.get_conv_state(self.layer_idx) is not None:
            x_BDS = cache.update_conv_state(x_BDS, self.layer_idx)  # the kept embeddings, then these
        else:
            x_BDS = F.pad(x_BDS, (self.history, 0))  # position t reads positions <= t only
            if cache is not None:
                cache.update_conv_state(x_BDS, self.layer_idx, conv_kernel_size=self.history)
        local = [conv(x_BDS[..., self.history - (k - 1):]) for conv, k in zip(self.convs, self.widths)]
        mixed_BSD = self.mix(torch.cat(local, dim=1).transpose(1, 2))
        # No rotary embedding here: Mixtral's attention rotates by cos 1, sin 0, the identity.
        B, S, _ = mixed_BSD.shape
        cos_BSH = mixed_BSD.new_ones(B, S, self.attention.head_dim)
        refined_BSD, _ = self.attention(self.norm(mixed_BSD), (cos_BSH, torch.zeros_like(cos_BSH)), causal_mask,
                                        cache=cache)
        return embeddings_BSD + self.dropout(mixed_BSD + refined_BSD)


class ThannModel(MixtralModel):
    config_class = ThannConfig

    def __init__(self, config: ThannConfig):
        super().__init__(config)
        self.learnt_tokenization = None
        if config.tokenization_conv_widths:
            self.learnt_tokenization = ThannLearntTokenization(config, layer_idx=config.num_hidden_layers)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        if self.learnt_tokenization is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(f"THANN's learnt tokenization keeps its state in a DynamicCache, not a "
                             f"{type(cache).__name__}: generate without cache_implementation")
        if cache is not None and len(cache.layers) == self.config.num_hidden_layers:
            cache.layers.append(LinearAttentionAndFullAttentionLayer())
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        causal_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                         attention_mask=attention_mask, cache=cache, position_ids=position_ids)
        padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        decoder_input = self.learnt_tokenization(inputs_embeds, causal_mask, padding_mask, cache)
        return super().forward(attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                               inputs_embeds=decoder_input, use_cache=use_cache, **kwargs)


class ThannForCausalLM(MixtralForCausalLM):
    config_class = ThannConfig

    def __init__(self, config: ThannConfig):
        super().__init__(config)
        self.model = ThannModel(config)
        self.post_init()


__all__ = ["ThannForCausalLM", "ThannModel"]
