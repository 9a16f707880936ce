"""megatron-core's GPTModel with THANN's attention (SDPA core), a dense SwiGLU MLP and torch
norms: a plain decoder-only transformer, the baseline NNN is measured against (same trainer,
same data, same parameter count: configs/model/gpt_tiny.yaml matches nnn_tiny exactly)."""

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from thann.config import require
from thann.models.common.kv_cache import GeneratesWithKVCache
from thann.models.common.norm import Norm
from thann.models.thann.checks import check_recompute
from thann.models.thann.size import attention_params
from thann.models.thann.spec import ThannLayer, self_attention_spec


def dense_layer_spec() -> ModuleSpec:
    return ModuleSpec(
        module=ThannLayer,  # weights drawn per global layer: the same in every pipeline layout
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=self_attention_spec(),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


class DenseGPT(GeneratesWithKVCache, GPTModel):
    def __init__(self, config: TransformerConfig, model_cfg, vocab_size: int, max_sequence_length: int,
                 pre_process: bool = True, post_process: bool = True):
        layers = get_num_layers_to_build(config)
        super().__init__(
            config=config,
            transformer_layer_spec=TransformerBlockSubmodules(layer_specs=[dense_layer_spec()] * layers,
                                                              layer_norm=Norm),
            vocab_size=vocab_size, max_sequence_length=max_sequence_length, pre_process=pre_process,
            post_process=post_process, share_embeddings_and_output_weights=model_cfg.tie_embeddings,
            position_embedding_type="rope", rotary_base=model_cfg.rotary_base,
        )


def dense_transformer_config(model_cfg, parallel_cfg, *, bf16: bool, recompute: str = "none") -> TransformerConfig:
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=model_cfg.num_layers, hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads, num_query_groups=model_cfg.num_query_groups,
        ffn_hidden_size=model_cfg.ffn_hidden_size, normalization=model_cfg.normalization, layernorm_epsilon=1e-5,
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        hidden_dropout=model_cfg.hidden_dropout, attention_dropout=model_cfg.attention_dropout,
        init_method_std=model_cfg.init_method_std,
        tensor_model_parallel_size=parallel_cfg.tp, pipeline_model_parallel_size=parallel_cfg.pp,
        sequence_parallel=parallel_cfg.sp, params_dtype=dtype, pipeline_dtype=dtype, bf16=bf16,
        use_cpu_initialization=True,  # weights drawn whole and sliced: the same in every layout
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        recompute_granularity=None if recompute == "none" else recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
    )


def num_parameters(model_cfg, vocab_size: int) -> int:
    h, L, F_ = model_cfg.hidden_size, model_cfg.num_layers, model_cfg.ffn_hidden_size
    layer = 2 * h + attention_params(model_cfg) + 3 * h * F_  # norms, qkv and proj, SwiGLU
    embedding = vocab_size * h * (1 if model_cfg.tie_embeddings else 2)
    return embedding + L * layer + h


def check(model_cfg, parallel_cfg, recompute: str) -> None:
    for field in ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size"):
        require(isinstance(model_cfg[field], int) and model_cfg[field] > 0, f"model.{field}", model_cfg[field],
                "must be a positive integer")
    require(model_cfg.hidden_size % model_cfg.num_attention_heads == 0, "model.num_attention_heads",
            model_cfg.num_attention_heads, f"must divide model.hidden_size={model_cfg.hidden_size}")
    require(isinstance(model_cfg.num_query_groups, int) and model_cfg.num_query_groups > 0
            and model_cfg.num_attention_heads % model_cfg.num_query_groups == 0, "model.num_query_groups",
            model_cfg.num_query_groups, f"must divide model.num_attention_heads={model_cfg.num_attention_heads}")
    require(model_cfg.num_attention_heads % parallel_cfg.tp == 0, "parallel.tp", parallel_cfg.tp,
            f"must divide model.num_attention_heads={model_cfg.num_attention_heads}")
    require(model_cfg.num_query_groups % parallel_cfg.tp == 0, "parallel.tp", parallel_cfg.tp,
            f"must divide model.num_query_groups={model_cfg.num_query_groups}")
    require(model_cfg.ffn_hidden_size % parallel_cfg.tp == 0, "parallel.tp", parallel_cfg.tp,
            f"must divide model.ffn_hidden_size={model_cfg.ffn_hidden_size}")
    require(model_cfg.num_layers % parallel_cfg.pp == 0, "parallel.pp", parallel_cfg.pp,
            f"must divide model.num_layers={model_cfg.num_layers}")
    require(parallel_cfg.ep == 1, "parallel.ep", parallel_cfg.ep, "a dense model has no experts: use 1")
    check_recompute(recompute)
