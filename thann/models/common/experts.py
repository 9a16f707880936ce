"""The experts of one MoE layer, computed with grouped matrix multiplies.

Shape legend: T routed tokens on this rank, D model dim, E local experts, F expert FFN dim on
this expert-tensor-parallel rank, G = 2 for gated units (gate and up projections).

Weights are stored with their global layout so that a sharded checkpoint is a plain slice:
fc1 [E, D, G, F] (experts split over expert-parallel ranks, F over expert-tensor-parallel
ranks) and fc2 [E, F, D].
"""

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _has_grouped_mm_kernel(x: torch.Tensor, w: torch.Tensor) -> bool:
    if _GROUPED_MM is None:
        return False
    # The kernels read rows in 16-byte units.
    if (x.shape[-1] * x.element_size()) % 16 or (w.shape[-1] * w.element_size()) % 16:
        return False
    if x.device.type == "cpu":
        return hasattr(F, "grouped_mm")  # torch >= 2.13 ships a CPU kernel
    return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)


def grouped_matmul(x_TD: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Rows of x are grouped by expert (tokens_per_expert rows each); group e is multiplied by w[e]."""
    if _has_grouped_mm_kernel(x_TD, w_EDF):
        offsets = torch.cumsum(tokens_per_expert.to(x_TD.device), 0, dtype=torch.int32)
        return _GROUPED_MM(x_TD, w_EDF, offs=offsets)
    counts = tokens_per_expert.tolist()
    return torch.cat([x @ w for x, w in zip(torch.split(x_TD, counts), w_EDF)])


class GroupedExperts(MegatronModule):
    """SwiGLU (or plain-activation) experts; the ``experts`` submodule of megatron-core's MoELayer."""

    def __init__(self, num_local_experts: int, config, pg_collection=None, name: Optional[str] = None):
        super().__init__(config=config)
        if config.add_bias_linear:
            raise ValueError("GroupedExperts has no biases: set add_bias_linear=False")
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        tp_size = self.tp_group.size()
        if config.moe_ffn_hidden_size % tp_size:
            raise ValueError(
                f"moe_ffn_hidden_size={config.moe_ffn_hidden_size} is not divisible by the "
                f"expert tensor-parallel size {tp_size}"
            )
        ffn = config.moe_ffn_hidden_size // tp_size
        gates = 2 if config.gated_linear_unit else 1
        empty = dict(dtype=config.params_dtype)
        self.fc1_weight = torch.nn.Parameter(
            torch.empty(num_local_experts, config.hidden_size, gates, ffn, **empty)
        )
        self.fc2_weight = torch.nn.Parameter(torch.empty(num_local_experts, ffn, config.hidden_size, **empty))
        set_tensor_model_parallel_attributes(self.fc1_weight, is_parallel=True, dim=3, stride=1)
        set_tensor_model_parallel_attributes(self.fc2_weight, is_parallel=True, dim=1, stride=1)
        if config.perform_initialization:
            self._initialize(config)
        for weight in (self.fc1_weight, self.fc2_weight):
            # Always an expert parameter for megatron-core's DDP, so its gradient is reduced over
            # the expert-data-parallel group: with expert_tensor_parallel_size 1 under tensor
            # parallelism, the tp ranks run the same experts on different tokens and that group
            # (not the dense data-parallel group) is the one holding all replicas.
            weight.allreduce = False

    @torch.no_grad()
    def _initialize(self, config) -> None:
        """Draws every expert of the layer whole, as one rank would, and keeps this rank's
        experts and FFN slice: the weights do not depend on the expert-parallel layout
        (megatron-core's own init draws each rank's experts from a per-rank stream)."""
        if not config.use_cpu_initialization:
            raise ValueError("GroupedExperts draws its weights on the CPU: set use_cpu_initialization=True")
        E, D, G, F_ = self.fc1_weight.shape
        ep_rank, tp_rank = self.ep_group.rank(), self.tp_group.rank()
        experts = slice(ep_rank * E, (ep_rank + 1) * E)
        ffn = slice(tp_rank * F_, (tp_rank + 1) * F_)
        fc1_EDGF = torch.empty(E * self.ep_group.size(), D, G, F_ * self.tp_group.size())
        config.init_method(fc1_EDGF)
        fc2_EFD = torch.empty(E * self.ep_group.size(), F_ * self.tp_group.size(), D)
        config.output_layer_init_method(fc2_EFD)
        self.fc1_weight.copy_(fc1_EDGF[experts, :, :, ffn])
        self.fc2_weight.copy_(fc2_EFD[experts, ffn])

    def _activation(self, h_TGF: torch.Tensor) -> torch.Tensor:
        if self.config.gated_linear_unit:
            return self.config.activation_func(h_TGF[:, 0]) * h_TGF[:, 1]
        return self.config.activation_func(h_TGF[:, 0])

    def forward(self, x_TD: torch.Tensor, tokens_per_expert: torch.Tensor, probs_T: torch.Tensor, **unused):
        E, D, G, F_ = self.fc1_weight.shape
        h_TGF = grouped_matmul(x_TD, self.fc1_weight.view(E, D, G * F_), tokens_per_expert).view(-1, G, F_)
        a_TF = (self._activation(h_TGF) * probs_T.unsqueeze(-1)).to(x_TD.dtype)
        return grouped_matmul(a_TF, self.fc2_weight, tokens_per_expert), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        prepend = len(sharded_offsets)
        ep = (self.ep_group.rank(), self.ep_group.size())
        tp = (self.tp_group.rank(), self.tp_group.size())
        replica_id = (0, 0, self.dp_group.rank())

        def sharded(name: str, weight: torch.Tensor, tp_axis: int) -> ShardedTensor:
            return ShardedTensor.from_rank_offsets(
                f"{prefix}{name}",
                weight,
                *sharded_offsets,
                (prepend, *ep),
                (prepend + tp_axis, *tp),
                replica_id=replica_id,
                prepend_axis_num=prepend,
            )

        return {
            f"{prefix}fc1_weight": sharded("fc1_weight", self.fc1_weight, 3),
            f"{prefix}fc2_weight": sharded("fc2_weight", self.fc2_weight, 1),
        }
