"""Whole (unsharded) tensors from and to any parallel layout, through megatron-core's sharded
state dicts: each ShardedTensor says which slice of which global tensor a rank holds.

Used to compare layouts against a single rank and to start every layout from the same weights.
Every rank ends up holding every full tensor: meant for small models and tools, not for
checkpointing large ones.
"""

import dataclasses
import os
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica
from megatron.core.utils import unwrap_model


def model_sharded_tensors(model_chunks) -> list[ShardedTensor | ShardedTensorFactory]:
    """Every tensor of the model's sharded state dict; a factory stands for a parameter stored as
    several pieces (a SwiGLU weight: its two halves, each sharded on its own)."""
    tensors = []
    for chunk in model_chunks:
        state = unwrap_model(chunk).sharded_state_dict()
        tensors.extend(t for t in nested_values(state) if isinstance(t, (ShardedTensor, ShardedTensorFactory)))
    return tensors


def _pieces(t: ShardedTensor | ShardedTensorFactory, value: Callable) -> list[tuple[ShardedTensor, torch.Tensor]]:
    """(slice description, its values): a factory's pieces are built from the value (views of it)."""
    if isinstance(t, ShardedTensorFactory):
        return [(piece, piece.data) for piece in nested_values(dataclasses.replace(t, data=value(t)).build())]
    return [(t, value(t))]


def gather_full(tensors: list[ShardedTensor | ShardedTensorFactory], value: Callable = lambda sh: sh.data,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """{key: global tensor} assembled from the main replica of every slice, on every rank.
    ``value`` picks what to gather for a ShardedTensor (its data, or e.g. its gradient)."""
    pieces = [piece for t in tensors for piece in _pieces(t, value)]
    local_shapes = {t.key: tuple(t.global_shape) for t, _ in pieces}
    all_shapes = [None] * dist.get_world_size()
    dist.all_gather_object(all_shapes, local_shapes)
    shapes = {k: v for shapes in all_shapes for k, v in shapes.items()}
    device = pieces[0][1].device if pieces else torch.device("cpu")
    full = {key: torch.zeros(shapes[key], dtype=dtype, device=device) for key in sorted(shapes)}
    for t, data in pieces:
        if is_main_replica(t.replica_id):
            full[t.key][t.global_slice()] = data.to(dtype)
    for key in sorted(full):  # same order on every rank
        dist.all_reduce(full[key])
    return full


@torch.no_grad()
def load_full(tensors: list[ShardedTensor | ShardedTensorFactory], full: dict[str, torch.Tensor]) -> None:
    """Copies each rank's slices out of the global tensors into the model."""
    for t, data in (piece for t in tensors for piece in _pieces(t, lambda t: t.data)):
        if t.key not in full:
            raise KeyError(f"no tensor {t.key!r} in the full state")
        if tuple(full[t.key].shape) != tuple(t.global_shape):
            raise ValueError(f"{t.key}: full state has shape {tuple(full[t.key].shape)}, "
                             f"this layout expects {tuple(t.global_shape)}")
        data.copy_(full[t.key][t.global_slice()])


def start_from_shared_weights(model_chunks, optimizer, path: str) -> list[ShardedTensor]:
    """Every layout of a comparison starts from the same weights: the full weights in ``path``,
    written there first by a world of one when the file is missing. Returns the model's sharded
    tensors."""
    tensors = model_sharded_tensors(model_chunks)
    if not os.path.exists(path):
        if dist.get_world_size() != 1:
            raise SystemExit("the initial weights must come from a single-rank run")
        torch.save(gather_full(tensors), path)
    load_full(tensors, torch.load(path))
    optimizer.reload_model_params()  # the optimizer's fp32 main copies follow
    return tensors


def gradients_before_the_update(slot, tensors: list[ShardedTensor]) -> list:
    """Makes the slot's next optimizer step first gather its full gradient (before clipping and the
    update) into the list returned; collective, as every rank steps together."""
    captured = []
    step = slot.optimizer.step

    def capture_then_step():
        captured.append(gather_full(tensors, value=lambda t: t.data.main_grad))
        slot.optimizer.step = step
        return step()

    slot.optimizer.step = capture_then_step
    return captured
