"""NNN, the Node-Neuron Network: a cascade of matmul-free nodes with a local and a global path.

Tokens are embedded (a plain full-precision table, as matmulfreellm), then pass through
``num_nodes`` nodes (node.py), node i feeding node i + 1: the local path. The global path is a
global node that gathers every node's output as a learned per-channel weighted sum,
g = Σ_i w_i ⊙ y_i, and adds it to the last node's output before the final RMSNorm and the
untied full-precision LM head: logits = head(RMSNorm(y_last + g)). The weights w_i start at
zero, so a fresh model is the plain cascade, and training decides, per node and channel, how
much goes to the output directly (the "part of a neuron's activation applied globally" of the
original README). A weighted sum (DenseFormer's depth-weighted average, arXiv 2402.02622)
rather than attention over nodes keeps the global node matmul-free and costs one [B, D]
multiply-add per node and token.

Forget-gate lower bounds (matmulfreellm's HGRN): lb = cumsum_nodes(softmax_nodes(P)) - first
row, P a zero-initialised [N, D] parameter; node i's gate is f = lb_i + (1 - lb_i)·σ(·), so
deeper nodes keep longer memories. lb_0 is exactly 0, so node 0's gate is unbounded without a
special case. The softmax couples every node, so every pipeline stage holds all of P under the
one key ``lower_bounds`` and computes the rows its nodes need. Each stage's gradient only
covers its own nodes' rows of lb; megatron-core's finalize_model_grads sums the copies' gradients
over the pipeline group (its mechanism for replicated conditional embedders: the parameter is
tagged ``pipeline_parallel`` and the config sets ``has_cond_embedder``), so all copies take the
same step. Only stage 0's copy is the main replica in checkpoints and the gradient norm.

Pipeline parallelism: stage p holds the contiguous nodes ``stage_nodes(N, p, P)``, named by
their global index (``nodes.5.token_mixer...``), so a checkpoint key means the same tensor in
every layout. Between stages travels one [S, B, 2D] tensor, concat(local stream, running global
sum); megatron-core's schedules size it from TransformerConfig.hidden_size, hence
``hidden_size = 2D`` in ``nnn_transformer_config``.

Decoding: ``new_inference_context(batch)`` holds each node's last hidden state [B, D]; a forward
with that state continues the sequences and updates it, so a prompt of many tokens (prefill) and
one new token (decode) are the same call. Without cross-node attention the state's size is fixed
whatever the sequence length; with it each node > 0 also keeps the keys and values of every
earlier position (growing like a transformer's KV cache).

Cross-node attention (``cross_node_attention: true``, the original code's idea): node i's output
attends causally to node i-1's output and the result is added. Its scores and weighted sums are
dense matmuls, so it is off by default.

Shape legend: S sequence, B batch, D hidden (model_cfg.hidden_size), N nodes, V vocabulary.
"""

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from thann.config import ConfigError
from thann.models.common.init import init_stream
from thann.models.common.size import Size
from thann.models.nnn.bitlinear import frozen_weights
from thann.models.nnn.node import NORM_EPS, Node, NodeState


def intermediate_size(model_cfg) -> int:
    """The channel mixer's inner width: model_cfg.intermediate_size, or matmulfreellm's
    256·⌈(8D/3)/256⌉ when it is null."""
    if model_cfg.intermediate_size is not None:
        return int(model_cfg.intermediate_size)
    return 256 * -(-(8 * model_cfg.hidden_size // 3) // 256)


def stage_nodes(num_nodes: int, stage: int, num_stages: int) -> range:
    """The global indices of the nodes on pipeline stage ``stage``: contiguous, sizes differing by
    at most one, the larger stages first (the last stage also runs the LM head's large matmul)."""
    size, extra = divmod(num_nodes, num_stages)
    start = stage * size + min(stage, extra)
    return range(start, start + size + (stage < extra))


def _pipeline_stage() -> tuple[int, int]:
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1  # built outside a distributed run (e.g. the packed-export loader)
    return (parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_pipeline_model_parallel_world_size())


def check_model_config(model_cfg) -> None:
    def require(ok: bool, field: str, reason: str) -> None:
        if not ok:
            raise ConfigError(f"model.{field}", model_cfg[field], reason)

    def positive_int(field: str) -> bool:
        value = model_cfg[field]
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    require(model_cfg.arch == "nnn", "arch", "must be nnn for this model")
    for field in ("hidden_size", "num_nodes", "cross_attention_heads"):
        require(positive_int(field), field, "must be a positive integer")
    require(model_cfg.intermediate_size is None or positive_int("intermediate_size"), "intermediate_size",
            "must be a positive integer, or null for 256·⌈(8·hidden_size/3)/256⌉")
    require(isinstance(model_cfg.cross_node_attention, bool), "cross_node_attention", "must be true or false")
    require(not model_cfg.cross_node_attention or model_cfg.hidden_size % model_cfg.cross_attention_heads == 0,
            "cross_attention_heads", f"must divide model.hidden_size={model_cfg.hidden_size}")
    require(model_cfg.init_method_std > 0, "init_method_std", "must be positive")


def model_size(model_cfg, vocab_size: int) -> Size:
    """Every parameter of the whole model (all pipeline stages, lower_bounds counted once)."""
    d, n, inner = model_cfg.hidden_size, model_cfg.num_nodes, intermediate_size(model_cfg)
    token_mixer = 4 * d * d  # i, f, g, o projections
    channel_mixer = d * 2 * inner + inner * d
    cross_attention = 4 * d * d if model_cfg.cross_node_attention else 0
    weights = n * (token_mixer + channel_mixer) + (n - 1) * cross_attention
    # per BitLinear its input RMSNorm (fan_in); per node g_norm, two block norms, global_weight
    norms = n * (4 * d + d + inner + 4 * d) + (n - 1) * (4 * d if model_cfg.cross_node_attention else 0)
    embedding = head = vocab_size * d
    total = embedding + weights + norms + n * d + d + head  # n·d: lower_bounds; d: final norm
    return Size(total=total, active=total, matmul=weights + head,
                attention_layers=n - 1 if model_cfg.cross_node_attention else 0, attention_width=d)


def num_parameters(model_cfg, vocab_size: int) -> int:
    return model_size(model_cfg, vocab_size).total


def nnn_transformer_config(model_cfg, parallel_cfg, *, bf16: bool) -> TransformerConfig:
    """megatron-core's TransformerConfig for an NNN: what its schedules, DDP and optimizer read."""
    if parallel_cfg.tp != 1:
        raise ConfigError("parallel.tp", parallel_cfg.tp, "NNN has no tensor-parallel BitLinear: use 1")
    if parallel_cfg.pp > model_cfg.num_nodes:
        raise ConfigError("parallel.pp", parallel_cfg.pp,
                          f"every pipeline stage needs a node; model.num_nodes={model_cfg.num_nodes}")
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = TransformerConfig(
        num_layers=model_cfg.num_nodes,
        # The schedules send [S, B, hidden_size] between stages: the local stream and the
        # running global sum, side by side. The model itself reads model_cfg.hidden_size.
        hidden_size=2 * model_cfg.hidden_size,
        num_attention_heads=1,  # required by TransformerConfig; NNN reads model_cfg.cross_attention_heads
        init_method_std=model_cfg.init_method_std,
        add_bias_linear=False,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=parallel_cfg.pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        calculate_per_token_loss=False,
    )
    # finalize_model_grads sums the gradients of parameters tagged ``pipeline_parallel`` (here
    # lower_bounds, held by every stage) over the pipeline group when this is set.
    config.has_cond_embedder = True
    return config


@dataclass
class InferenceState:
    """The recurrent state of this stage's nodes for a batch of sequences (see the module
    docstring), and their BitLinear weights quantised once for the whole generation."""

    nodes: dict[int, NodeState]
    weights: dict = field(default_factory=dict)

    def advance(self, tokens: int) -> None:
        """Nothing to do: the forward pass already moved every node's state on."""


class NNNModel(MegatronModule):
    def __init__(self, config: TransformerConfig, model_cfg, vocab_size: int,
                 pre_process: bool = True, post_process: bool = True):
        super().__init__(config=config)
        # Read by megatron-core's pipeline schedules and finalize_model_grads (the head is untied).
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        self.model_cfg = model_cfg
        self.vocab_size = vocab_size
        self.pre_process, self.post_process = pre_process, post_process
        self.input_tensor = None
        d, n, dtype = model_cfg.hidden_size, model_cfg.num_nodes, config.params_dtype
        self.stage, num_stages = _pipeline_stage()
        # Each part draws its initial weights from a stream named after it (global node index
        # included), so a seed gives the same weights in every pipeline layout.
        if pre_process:
            with init_stream("embedding"):
                self.embedding = torch.nn.Embedding(vocab_size, d, dtype=dtype)
                config.init_method(self.embedding.weight)
        self.lower_bounds = torch.nn.Parameter(torch.zeros(n, d, dtype=dtype))
        self.lower_bounds.pipeline_parallel = True  # gradient summed over stages (module docstring)
        # Under the distributed optimizer a parameter all-reduced across stages needs a bucket of
        # its own, so that every stage shards it the same way over data-parallel ranks.
        self.lower_bounds.shared_embedding = True
        self.lower_bounds.shared = self.stage > 0  # counted once in the gradient norm
        heads = model_cfg.cross_attention_heads if model_cfg.cross_node_attention else None

        def node(i: int) -> Node:
            with init_stream("node", i):
                return Node(d, intermediate_size(model_cfg), heads if i > 0 else None,
                            config.init_method, config.output_layer_init_method, dtype)

        self.nodes = torch.nn.ModuleDict({str(i): node(i) for i in stage_nodes(n, self.stage, num_stages)})
        if post_process:
            self.final_norm = torch.nn.RMSNorm(d, eps=NORM_EPS, dtype=dtype)
            with init_stream("lm_head"):
                self.lm_head = torch.nn.Linear(d, vocab_size, bias=False, dtype=dtype)
                config.init_method(self.lm_head.weight)

    def set_input_tensor(self, input_tensor) -> None:
        """The previous stage's output, handed over by megatron-core's pipeline schedules."""
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "NNN takes one tensor from the previous stage"
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def new_inference_context(self, batch_size: int, max_sequence_length: int | None = None) -> InferenceState:
        """The recurrent state of a batch; its size does not depend on ``max_sequence_length``."""
        return InferenceState({int(i): node.new_state(batch_size) for i, node in self.nodes.items()})

    def forward(self, input_ids, position_ids, attention_mask, labels=None, inference_context=None):
        """Last stage: per-token cross entropy [B, S] with ``labels``, else logits [B, S, V].
        Other stages: the [S, B, 2D] payload for the next. position_ids and attention_mask are
        accepted for the shared call shape and unused (the recurrence orders the tokens)."""
        if self.pre_process:
            local_SBD = self.embedding(input_ids).transpose(0, 1)
            global_SBD = torch.zeros_like(local_SBD)
        else:
            local_SBD, global_SBD = self.input_tensor.chunk(2, dim=-1)
        probs_ND = self.lower_bounds.softmax(dim=0)
        lower_bounds_ND = probs_ND.cumsum(dim=0) - probs_ND[0]
        decoding = inference_context is not None
        with frozen_weights(inference_context.weights) if decoding else contextlib.nullcontext():
            for i, node in self.nodes.items():
                i = int(i)
                state = inference_context.nodes[i] if decoding else None
                local_SBD = node(local_SBD, lower_bounds_ND[i], state)
                global_SBD = global_SBD + node.global_weight * local_SBD
        if not self.post_process:
            return torch.cat([local_SBD, global_SBD], dim=-1)
        logits_SBV = self.lm_head(self.final_norm(local_SBD + global_SBD))
        if labels is None:
            return logits_SBV.transpose(0, 1).contiguous()
        S, B, V = logits_SBV.shape
        losses = F.cross_entropy(logits_SBV.float().view(S * B, V), labels.t().reshape(S * B), reduction="none")
        return losses.view(S, B).t().contiguous()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        # Every stage holds lower_bounds; the pipeline rank leads its replica id so that only
        # stage 0's copy is the main replica (the one saved).
        bounds = sharded[f"{prefix}lower_bounds"]
        bounds.replica_id = (self.stage, *bounds.replica_id[1:])
        return sharded
