"""THANN's transformer layer as megatron-core ModuleSpecs.

Every part is a stock megatron-core module (TransformerLayer, SelfAttention, MoELayer with its
TopKRouter, parallel linears) except three leaves that replace CUDA-extension kernels with
PyTorch: SDPA core attention, grouped-matmul experts and a sequence-parallel-aware torch norm.
Where transformer-engine imports (NVIDIA container), ``use_te`` selects megatron-core's own TE
MoE layer spec instead; its parameter names differ, so checkpoints do not cross between the two.
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from thann.models.common.attention import SDPAttention
from thann.models.common.experts import GroupedExperts
from thann.models.common.init import init_stream
from thann.models.common.norm import Norm


class ThannLayer(TransformerLayer):
    """megatron-core's TransformerLayer, its weights drawn from a stream of the global layer
    number, so every pipeline layout builds the same layer 5 (thann.models.common.init)."""

    stream = "decoder_layer"  # another stack of layers (an image encoder's) names its own

    def __init__(self, config, submodules, layer_number: int = 1, *args, vp_stage=None, **kwargs):
        with init_stream(self.stream, layer_number + get_transformer_layer_offset(config, vp_stage)):
            super().__init__(config, submodules, layer_number, *args, vp_stage=vp_stage, **kwargs)


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def self_attention_spec(mask: AttnMaskType = AttnMaskType.causal) -> ModuleSpec:
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": mask},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=SDPAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )


def thann_block_spec(config, use_te: bool = False, vp_stage=None) -> TransformerBlockSubmodules:
    """This pipeline stage's layers, and the final norm (megatron-core's default for it, without
    apex or transformer-engine, is a torch norm that refuses sequence parallelism). The MLP is the
    MoE layer when ``config.num_moe_experts`` is set, a dense SwiGLU otherwise (the GPT baseline)."""
    if use_te:
        if not transformer_engine_available():
            raise ValueError("model.use_te=true but transformer_engine is not importable")
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        return get_gpt_decoder_block_spec(config, use_transformer_engine=True, vp_stage=vp_stage)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    layer = thann_layer_spec(moe=config.num_moe_experts is not None)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=Norm)


def thann_layer_spec(moe: bool = True, layer: type = ThannLayer, mask: AttnMaskType = AttnMaskType.causal) -> ModuleSpec:
    """THANN's layer; ``layer`` and ``mask`` for another stack (an image encoder: bidirectional)."""
    if moe:
        mlp = ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=GroupedExperts))
    else:
        mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                             linear_fc2=RowParallelLinear))
    return ModuleSpec(
        module=layer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=self_attention_spec(mask),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )
