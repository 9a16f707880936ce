"""The contract between a model and the one training loop.

A task builds its model for a pipeline stage, turns a micro-batch into (output, loss function)
for megatron-core's pipeline schedules, and supplies its data. Pretraining THANN is one task;
contrastive pretraining, PPO and the small variant models are others on the same loop.

Loss functions follow megatron-core's convention: ``loss_fn(output)`` returns
``(loss_sum, num_tokens, report)`` (the schedule divides by num_tokens), where ``report`` maps each name in ``report_keys`` to a
2-element tensor [sum, count]; the trainer logs sum/count over the whole global batch.
"""

from typing import Callable, Iterator, Protocol

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from thann.data.tokenizer import Tokenizer


class Task(Protocol):
    transformer_config: TransformerConfig  # read by megatron-core's schedules, DDP and optimizer
    report_keys: tuple[str, ...]
    flops_per_token: float  # model FLOPs per trained token (forward + backward), for MFU
    tokenizer: Tokenizer | None  # recorded in checkpoints; None for models that read no text

    def build_model(self, pre_process: bool, post_process: bool) -> MegatronModule: ...

    def forward_step(self, data_iterator: Iterator, model: MegatronModule) -> tuple[torch.Tensor, Callable]: ...

    def train_batches(self, consumed_samples: int) -> Iterator: ...

    def valid_batches(self) -> Iterator: ...

    def on_train_end(self, model: list[MegatronModule], message: Callable[[str], None]) -> None: ...
