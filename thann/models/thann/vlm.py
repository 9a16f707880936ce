"""THANN reading an image before its text, the LLaVA pattern (megatron-core's
``models/multimodal/llava_model.py``): an image encoder's patch states, projected into the
decoder's width by megatron-core's MultimodalProjector (a two-layer GELU MLP), are the first
positions of the decoder's input; the text follows, embedded and tokenized as THANN's own.

    model(input_ids, position_ids, None, image_states=patches_BPI)   # logits [B, S, V] of the text
    model(input_ids, position_ids, None, labels=labels, image_states=patches_BPI)   # losses [B, S]

The prefix is a sequence of ``image_tokens`` patch states of width ``image_hidden_size`` (the
image encoder's), given by the caller (thann.models.vit.model.ViTEncoder.patch_states), so the
image encoder stays a slot of its own (frozen, or trained apart). Outputs cover the text
positions only. The learnt tokenization reads the text alone (an image has no token
embeddings to convolve); the decoder attends causally over prefix and text. With
``train_decoder: false`` only the projector learns: every other parameter is frozen (and the
router's load-balancing loss is off: a frozen router has nothing to balance).

Generation: the prefix is fed once, with the prompt's first positions; the inference context
then holds it in the decoder's KV cache and nowhere else (PrefixedInferenceContext).
"""

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules

from thann.models.common.init import init_stream
from thann.models.common.kv_cache import KVCacheContext
from thann.models.thann.model import ThannInferenceContext, ThannModel


class PrefixedInferenceContext(ThannInferenceContext):
    """The decoder's cache advances past the image prefix as well as the text fed with it; the
    learnt tokenization's own cache holds text only."""

    def __init__(self, max_batch_size: int, max_sequence_length: int):
        super().__init__(max_batch_size, max_sequence_length)
        self.prefix = 0  # prefix positions in the last forward, not yet advanced past

    def advance(self, tokens: int) -> None:
        KVCacheContext.advance(self, tokens + self.prefix)
        self.tokenization.advance(tokens)
        self.prefix = 0


def projector_config(config):
    """The decoder's config for a two-layer MLP of its own width: GELU, biases, not gated."""
    return dataclasses.replace(config, ffn_hidden_size=config.hidden_size, gated_linear_unit=False,
                               activation_func=F.gelu, add_bias_linear=True, num_moe_experts=None,
                               moe_ffn_hidden_size=None)


class ThannVLM(ThannModel):
    def __init__(self, config, model_cfg, vocab_size: int, max_sequence_length: int, pre_process: bool = True,
                 post_process: bool = True):
        super().__init__(config, model_cfg, vocab_size, max_sequence_length + model_cfg.image_tokens,
                         pre_process=pre_process, post_process=post_process)
        with init_stream("image_projector"):
            self.image_projector = MultimodalProjector(
                projector_config(config), MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                "mlp", model_cfg.image_hidden_size)
        if not model_cfg.train_decoder:
            for name, param in self.named_parameters():
                if not name.startswith("image_projector."):
                    param.requires_grad_(False)

    def new_inference_context(self, batch_size: int, max_sequence_length: int) -> PrefixedInferenceContext:
        return PrefixedInferenceContext(batch_size, max_sequence_length)

    def forward(self, input_ids, position_ids, attention_mask=None, labels=None, image_states=None,
                inference_context=None, **kwargs):
        """``image_states`` [B, P, image_hidden_size]: the image before the text (None: a
        continuation, whose prefix is in ``inference_context``). Logits [B, S, V] or, with
        ``labels`` [B, S], losses [B, S], of the S text positions."""
        embeddings_SBH = self.embedding(input_ids=input_ids, position_ids=position_ids)
        hidden_SBH = embeddings_SBH if self.learnt_tokenization is None else \
            self.learnt_tokenization(embeddings_SBH, inference_context)
        P = 0
        if image_states is not None:
            prefix_PBH = self.image_projector(image_states.transpose(0, 1).to(hidden_SBH.dtype))
            P = prefix_PBH.size(0)
            hidden_SBH = torch.cat([prefix_PBH, hidden_SBH])
            if inference_context is not None:
                inference_context.prefix = P
            if labels is not None:
                labels = torch.cat([labels.new_zeros(labels.size(0), P), labels], dim=1)
        output = super().forward(input_ids, position_ids, attention_mask, decoder_input=hidden_SBH, labels=labels,
                                 inference_context=inference_context, **kwargs)
        # While generating, megatron-core may keep the last position's logits only.
        return output[:, P:] if output.size(1) == P + input_ids.size(1) else output
