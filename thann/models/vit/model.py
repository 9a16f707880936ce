"""An image encoder for image-text training: megatron-core's CLIPViTModel, composed with THANN's
layer spec, pooled and projected to one L2-normalised vector per image.

What is taken as it is from megatron-core: the patch embedding (a strided convolution), the learnt
position embeddings, the pre-norm and the TransformerBlock. What is THANN's:

- the layers: THANN's dense layer (SDPA attention, SwiGLU MLP, torch norms) with a
  *bidirectional* mask (megatron-core's local ViT spec is causal, so its class token would see
  only itself), their weights drawn from streams of their own (``vit_layer`` n), and the patch
  and position embeddings redrawn from a stream named for them: every layout starts equal;
- no class token: the image's vector is the mean of the patch states after a final norm, so the
  sequence is the patches alone and divides by the tensor-parallel size;
- sequence parallelism around megatron-core's block, which expects its input already split
  along the sequence: forward hooks scatter the patches before it and gather them after. The
  norm before the block (``ln_pre``) then sees whole sequences on every rank, and so does the
  final one: their gradients are whole, not partial sums to reduce, and they are not tagged
  ``sequence_parallel``;
- the head: PooledEmbedding (mean pooling, projection, optional learnt temperature), the text
  encoder's, so both towers end the same way.

Images arrive as [B, 3, H, W] floats; one pipeline stage (megatron-core's ViT always runs its
patch embedding, so it does not split into stages). Shapes: B batch, S patches, H hidden.
"""

import torch
from megatron.core import tensor_parallel
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.transformer.enums import AttnMaskType, ModelType
from megatron.core.transformer.module import MegatronModule

from thann.models.common.heads import PooledEmbedding
from thann.models.common.init import init_stream
from thann.models.common.norm import Norm
from thann.models.thann.spec import ThannLayer, thann_layer_spec


class ViTLayer(ThannLayer):
    stream = "vit_layer"


def _whole_sequence(norm: torch.nn.Module) -> torch.nn.Module:
    for param in norm.parameters():
        param.sequence_parallel = False
    return norm


class ViTEncoder(MegatronModule):
    model_type = ModelType.encoder_or_decoder  # what megatron-core's schedules read

    def __init__(self, config, args):
        super().__init__(config)
        self.vit = CLIPViTModel(config, thann_layer_spec(moe=False, layer=ViTLayer, mask=AttnMaskType.no_mask),
                                ln_pre_impl=Norm, add_class_token=False, patch_dim=args.patch_size,
                                img_h=args.image_size, img_w=args.image_size)
        _whole_sequence(self.vit.ln_pre)
        with init_stream("vit_embedding"):
            config.init_method(self.vit.conv1.weight)
            config.init_method(self.vit.position_embeddings.weight)
        if config.sequence_parallel:
            self.vit.decoder.register_forward_pre_hook(_scatter_sequence)
            self.vit.decoder.register_forward_hook(_gather_sequence)
        self.final_norm = _whole_sequence(Norm(config, config.hidden_size, config.layernorm_epsilon))
        with init_stream("pooled_embedding"):
            self.pooled_embedding = PooledEmbedding(config.hidden_size, "mean", args.projection_dim,
                                                    config.init_method, config.params_dtype,
                                                    args.get("learnt_temperature"))

    def set_input_tensor(self, input_tensor) -> None:
        self.vit.set_input_tensor(input_tensor)

    def patch_states(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Each patch's final (normed) state [B, S, H]: what an image-conditioned decoder reads."""
        return self.final_norm(self.vit(images_BCHW.to(self.vit.conv1.weight.dtype)))

    def forward(self, images_BCHW: torch.Tensor, project: bool = True) -> torch.Tensor:
        """L2-normalised embeddings [B, P] (``project=False``: the pooled states [B, H])."""
        hidden_BSH = self.patch_states(images_BCHW)
        patches = torch.full((hidden_BSH.size(0),), hidden_BSH.size(1), device=hidden_BSH.device)
        return self.pooled_embedding(hidden_BSH.transpose(0, 1), patches, project)


def _scatter_sequence(module, args):
    hidden_SBH, *rest = args
    return (tensor_parallel.scatter_to_sequence_parallel_region(hidden_SBH), *rest)


def _gather_sequence(module, args, output_SBH):
    # The pooled head is computed whole on every rank: its gradient is split back, not summed.
    return tensor_parallel.gather_from_sequence_parallel_region(output_SBH, tensor_parallel_output_grad=False)
