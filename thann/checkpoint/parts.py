"""The named stateful parts a checkpoint is made of.

A part gives the checkpointer a state dict to write (megatron-core ShardedTensors and plain
data) and takes the loaded one back. The trainer registers, for every trainable slot, its model,
optimizer and schedule (named ``model``, ``optimizer``, ``scheduler`` for the recipe's primary
slot, ``<slot>.model`` and so on for the others, whose arrays carry the ``<slot>.`` prefix so
that they never collide), its own position, and the recipe's plain state.
"""

from typing import Callable, Protocol

from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding
from megatron.core.utils import unwrap_model


class Part(Protocol):
    def state(self, is_loading: bool) -> dict: ...

    def load(self, loaded: dict) -> None: ...


class ModelPart:
    def __init__(self, chunks: list, prefix: str = ""):
        if len(chunks) != 1:
            raise NotImplementedError("checkpointing supports one model chunk per rank")
        self.chunks = chunks
        self.prefix = prefix

    @property
    def module(self):
        return unwrap_model(self.chunks[0])

    def state(self, is_loading: bool = False) -> dict:
        state = self.module.sharded_state_dict()
        if self.prefix:
            add_prefix_for_sharding(state, self.prefix)
        return state

    def load(self, loaded: dict) -> None:
        self.module.load_state_dict(loaded)


class OptimizerPart:
    """megatron-core's optimizer, its state saved in model space (``fully_reshardable``) so that
    any layout loads it. Loading takes the state (moments, steps) from the checkpoint and keeps
    the hyper-parameters this run was configured with: a resumed run follows its new config."""

    def __init__(self, optimizer, model: ModelPart, after_load: Callable = lambda optimizer: None):
        self.optimizer = optimizer
        self.model = model
        self.after_load = after_load  # e.g. repairs of the optimizer's state after megatron-core loads it

    def state(self, is_loading: bool) -> dict:
        return self.optimizer.sharded_state_dict(
            self.model.state(is_loading), is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"},
        )

    def load(self, loaded: dict) -> None:
        configured = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(loaded)
        self.after_load(self.optimizer)
        for group, values in zip(self.optimizer.param_groups, configured):
            group.update(values)


class SchedulerPart:
    """megatron-core's OptimizerParamScheduler, built to override the checkpoint's schedule with
    the run's config: only the step count comes from the checkpoint."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def state(self, is_loading: bool) -> dict:
        return self.scheduler.state_dict()

    def load(self, loaded: dict) -> None:
        self.scheduler.load_state_dict(loaded)


class PlainPart:
    """Plain data (JSON-encodable) read from and written back to its owner."""

    def __init__(self, get: Callable[[], dict], set: Callable[[dict], None]):
        self._get, self._set = get, set

    def state(self, is_loading: bool) -> dict:
        return self._get()

    def load(self, loaded: dict) -> None:
        self._set(loaded)
