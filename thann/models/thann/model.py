"""THANN: megatron-core's GPTModel with the learnt tokenization between embedding and decoder.

The decoder is a TransformerBlock of THANN layers (spec.py): attention with RoPE and an MoE MLP
of 16 experts with top-4 softmax routing, load-balancing auxiliary loss and no token dropping.
The LM head ("classifier layer") is megatron-core's output layer, tied to the embedding by config.

The same class is the dense GPT baseline (``model.arch=gpt``): no ``num_experts`` (a SwiGLU MLP
of ``ffn_hidden_size``) and no ``tokenization`` block (or ``tokenization.enabled: false``).
"""

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from thann.models.common.init import init_stream
from thann.models.common.kv_cache import GeneratesWithKVCache, KVCacheContext
from thann.models.thann.spec import thann_block_spec
from thann.models.thann.tokenization import LearntTokenization, TokenizationConfig


class ThannInferenceContext(KVCacheContext):
    """megatron-core's static KV cache for the decoder layers, plus the learnt tokenization's own
    state: the last embeddings its convolutions read and a KV cache of its attention, kept apart
    because that attention is built as layer 1 and would share decoder layer 1's entry."""

    def __init__(self, max_batch_size: int, max_sequence_length: int):
        super().__init__(max_batch_size, max_sequence_length)
        self.tokenization = KVCacheContext(max_batch_size, max_sequence_length)
        self.conv_history = None

    def advance(self, tokens: int) -> None:
        super().advance(tokens)
        self.tokenization.advance(tokens)


def tokenization_enabled(model_cfg) -> bool:
    tokenization = model_cfg.get("tokenization")
    return tokenization is not None and tokenization.get("enabled", True)


class ThannModel(GeneratesWithKVCache, GPTModel):
    def __init__(self, config: TransformerConfig, model_cfg, vocab_size: int, max_sequence_length: int,
                 pre_process: bool = True, post_process: bool = True, vp_stage=None):
        tokenization = tokenization_enabled(model_cfg)
        super().__init__(
            config=config,
            transformer_layer_spec=thann_block_spec(config, model_cfg.get("use_te", False), vp_stage),
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=model_cfg.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=model_cfg.rotary_base,
            # The tokenization's convolutions need the whole sequence; it scatters itself.
            scatter_embedding_sequence_parallel=not tokenization,
            vp_stage=vp_stage,
        )
        self.learnt_tokenization = None
        if pre_process and tokenization:
            with init_stream("learnt_tokenization"):
                self.learnt_tokenization = LearntTokenization(
                    config,
                    TokenizationConfig(tuple(model_cfg.tokenization.conv_widths), model_cfg.tokenization.dropout),
                )
        if post_process and not model_cfg.tie_embeddings and config.perform_initialization:
            self._redraw_output_layer()

    def _redraw_output_layer(self) -> None:
        """GPTModel draws an untied LM head after the embedding, so a last pipeline stage that
        holds no embedding would draw other numbers: draw it from its own stream instead."""
        weight = self.output_layer.weight
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        with init_stream("output_layer"), torch.no_grad():
            _initialize_affine_weight_cpu(
                weight, self.vocab_size, self.config.hidden_size, weight.shape[0], 0, self.config.init_method,
                params_dtype=self.config.params_dtype, rank=parallel_state.get_tensor_model_parallel_rank(),
                world_size=tp_size,
                # ColumnParallelLinear marked the weight as split on dim 0 when it first drew it.
                skip_set_tensor_parallel_attributes=True,
            )

    def new_inference_context(self, batch_size: int, max_sequence_length: int) -> ThannInferenceContext:
        return ThannInferenceContext(batch_size, max_sequence_length)

    def _preprocess(self, input_ids, position_ids, decoder_input=None, **kwargs):
        if decoder_input is None and self.learnt_tokenization is not None:
            embeddings = self.embedding(input_ids=input_ids, position_ids=position_ids)
            decoder_input = self.learnt_tokenization(embeddings, kwargs.get("inference_context"))
        return super()._preprocess(input_ids, position_ids, decoder_input=decoder_input, **kwargs)


def transformer_config(model_cfg, parallel_cfg, *, bf16: bool, perform_initialization: bool = True,
                       recompute: str = "none") -> TransformerConfig:
    """megatron-core's TransformerConfig for a THANN model config and a parallel layout."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    experts = model_cfg.get("num_experts")
    moe = {} if experts is None else dict(
        num_moe_experts=experts,
        moe_ffn_hidden_size=model_cfg.moe_ffn_hidden_size,
        moe_router_topk=model_cfg.moe_router_topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,  # softmax over the chosen top-k: weights sum to 1
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=model_cfg.moe_aux_loss_coeff,
        moe_router_dtype="fp32",
        moe_expert_capacity_factor=None,  # dropless
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=model_cfg.get("use_te", False),
    )
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        ffn_hidden_size=model_cfg.moe_ffn_hidden_size if experts is not None else model_cfg.ffn_hidden_size,
        normalization=model_cfg.normalization,
        layernorm_epsilon=1e-5,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        init_method_std=model_cfg.init_method_std,
        **moe,
        tensor_model_parallel_size=parallel_cfg.tp,
        pipeline_model_parallel_size=parallel_cfg.pp,
        expert_model_parallel_size=parallel_cfg.ep,
        expert_tensor_parallel_size=parallel_cfg.etp,
        sequence_parallel=parallel_cfg.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        # Weights are drawn whole on the CPU and sliced, from streams named by their place in the
        # model, so every layout starts from the same weights (thann.models.common.init).
        use_cpu_initialization=True,
        perform_initialization=perform_initialization,
        # Loss = mean over each micro-batch's tokens, averaged over micro-batches and data-parallel
        # ranks: equal to the global token mean because every micro-batch holds the same number
        # of full-length sequences. (megatron-core's per-token mode scales the MoE auxiliary-loss
        # gradient by the rank's local token count, which sequence parallelism divides by tp.)
        calculate_per_token_loss=False,
        # megatron-core's native fused cross-entropy (torch.compile'd; on CPU it needs a C++
        # compiler): fewer passes over the 100k-wide logits, but it returns bf16 logit
        # gradients, so only for bf16 training.
        cross_entropy_loss_fusion=bf16,
        cross_entropy_fusion_impl="native",
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        # Megatron-LM's choices: "selective" recomputes the attention core in backward, "full"
        # keeps only each layer's input and recomputes the layer.
        recompute_granularity=None if recompute == "none" else recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
    )


def tracked_aux_loss(config: TransformerConfig, num_microbatches: int) -> float:
    """The load-balancing loss (coefficient included) of the micro-batches run since the last
    call, averaged over them and over ranks, from megatron-core's tracker, which it clears.
    Collective: every rank calls it."""
    reduce_aux_losses_tracker_across_ranks()
    tracker = get_moe_layer_wise_logging_tracker()
    values = tracker["load_balancing_loss"]["values"] if "load_balancing_loss" in tracker else torch.zeros(1)
    aux = config.moe_aux_loss_coeff * values.sum().item() / num_microbatches
    clear_aux_losses_tracker()
    return aux
