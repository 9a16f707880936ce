"""A model that is not part of THANN, registered from outside it: a small MLP language model
(embedding -> residual MLP blocks -> RMSNorm -> untied LM head) that runs under pipeline and
data parallelism. Its blocks are named by their global index and drawn from their own init
stream, so every layout builds the same model."""

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from thann.config import require
from thann.models.common.init import init_stream
from thann.models.common.size import Size
from thann.models.registry import ModelSpec, register


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = torch.nn.RMSNorm(width)
        self.up = torch.nn.Linear(width, 4 * width, bias=False)
        self.down = torch.nn.Linear(4 * width, width, bias=False)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class MLPLanguageModel(MegatronModule):
    def __init__(self, config: TransformerConfig, args, vocab_size: int, pre_process: bool, post_process: bool):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron-core's schedules
        self.share_embeddings_and_output_weights = False
        self.pre_process, self.post_process = pre_process, post_process
        self.input_tensor = None
        stage, stages = (parallel_state.get_pipeline_model_parallel_rank(),
                         parallel_state.get_pipeline_model_parallel_world_size())
        per_stage = args.num_layers // stages
        h = args.hidden_size
        if pre_process:
            with init_stream("mlp_lm", "embedding"):
                self.embedding = torch.nn.Embedding(vocab_size, h)
        blocks = {}
        for i in range(stage * per_stage, (stage + 1) * per_stage):
            with init_stream("mlp_lm", "block", i):
                blocks[str(i)] = Block(h)
        self.blocks = torch.nn.ModuleDict(blocks)
        if post_process:
            with init_stream("mlp_lm", "head"):
                self.norm = torch.nn.RMSNorm(h)
                self.head = torch.nn.Linear(h, vocab_size, bias=False)

    def set_input_tensor(self, input_tensor) -> None:
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def forward(self, input_ids, position_ids=None, attention_mask=None, labels=None):
        """Last stage: logits [B, S, V]; other stages: hidden states [S, B, H]."""
        x = self.embedding(input_ids).transpose(0, 1).contiguous() if self.pre_process else self.input_tensor
        for block in self.blocks.values():
            x = block(x)
        if not self.post_process:
            return x
        return self.head(self.norm(x)).transpose(0, 1)


def _config(args, parallel_cfg, *, bf16: bool, recompute: str = "none") -> TransformerConfig:
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=1,
                             pipeline_model_parallel_size=parallel_cfg.pp, params_dtype=dtype, pipeline_dtype=dtype,
                             bf16=bf16, use_cpu_initialization=True)


def _check(args, parallel_cfg, recompute: str) -> None:
    require(args.num_layers % parallel_cfg.pp == 0, "parallel.pp", parallel_cfg.pp,
            f"must divide distill.student.num_layers={args.num_layers}")
    require(parallel_cfg.tp == 1 and parallel_cfg.ep == 1, "parallel.tp", parallel_cfg.tp,
            "the MLP language model runs data- and pipeline-parallel only")


def _size(args, vocab_size: int) -> Size:
    h, L = args.hidden_size, args.num_layers
    blocks = L * (h + 8 * h * h)
    total = 2 * vocab_size * h + blocks + h
    return Size(total, total, matmul=L * 8 * h * h + vocab_size * h)


register(ModelSpec(
    arch="mlp_lm", check=_check, transformer_config=_config,
    build=lambda config, args, vocab_size, max_sequence_length, pre, post: MLPLanguageModel(
        config, args, vocab_size, pre, post),
    size=_size, shape_fields=("hidden_size", "num_layers")))
