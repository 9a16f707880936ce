"""The contract between a task and the one training loop.

A task checks its own part of the config, builds its model for a pipeline stage, chooses the
step the loop runs (megatron-core's pipeline schedule over micro-batches by default), turns a
micro-batch into (output, loss function), supplies its data and says which numbers it reports.
Pretraining a language model is one task (thann.tasks.lm_pretrain); contrastive pretraining,
classification and PPO are others on the same loop. The trainer never imports a task.

Loss functions follow megatron-core's convention: ``loss_fn(output)`` returns
``(loss, num_tokens, report)`` (the schedule divides the loss by num_tokens and the number of
micro-batches), where ``report`` maps each name in ``report_keys`` to a 2-element tensor
[sum, count]; the trainer sums them over the whole global batch and hands ``metrics`` the means.
"""

from typing import Callable, Iterator

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from omegaconf import DictConfig

from thann.training import steps


class Task:
    transformer_config: TransformerConfig  # read by megatron-core's schedules, DDP and optimizer
    report_keys: tuple[str, ...] = ()
    tokenizer = None  # a thann.data.tokenizer.Tokenizer when the task reads text; recorded in checkpoints
    flops_per_token: float | None = None  # model FLOPs per trained token (forward + backward), for MFU
    tokens_per_sample: int | None = None  # for tokens/s; None: the task counts samples only
    pipeline_seq_length: int = 1  # sequence length of the activations passed between pipeline stages

    # The step the loop runs for one global batch: forward and (unless forward_only) backward.
    forward_backward: Callable = staticmethod(steps.pipelined)

    @staticmethod
    def check_config(cfg: DictConfig, dp: int) -> None:
        """The task's own checks (model, data), on every rank before anything is built;
        raise thann.config.ConfigError naming the field."""

    @staticmethod
    def resumable_model_changes(cfg: DictConfig) -> tuple[str, ...]:
        """Model config fields a resumed run may change (anything else under ``model`` is the
        model's shape, which a checkpoint cannot change)."""
        return ("name",)

    def build_model(self, pre_process: bool, post_process: bool) -> MegatronModule:
        raise NotImplementedError

    def forward_step(self, data_iterator: Iterator, model: MegatronModule) -> tuple[torch.Tensor, Callable]:
        raise NotImplementedError

    def train_batches(self, consumed_samples: int) -> Iterator:
        raise NotImplementedError

    def valid_batches(self) -> Iterator:
        raise NotImplementedError

    def metrics(self, means: dict[str, float], split: str) -> dict[str, float]:
        """The logged numbers of a step or an evaluation from the reported means; ``loss`` is
        the one whose non-finiteness stops (or skips) a step."""
        return {"loss": means[self.report_keys[0]], **means}

    def evaluate(self, model_chunks: list) -> dict[str, float]:
        """Evaluation beyond the validation loss (e.g. retrieval metrics), at every evaluation."""
        return {}

    def initialize(self, model_chunks: list) -> str | None:
        """Called on a fresh start (not on resume) once the model is built: e.g. load weights of an
        earlier stage (``init_from``). Returns what was done, to be printed."""
        return None

    def checkpoint_parts(self) -> dict:
        """Named stateful parts the task owns besides the trainer's (thann.checkpoint.parts)."""
        return {}

    def on_train_end(self, model_chunks: list, message: Callable[[str], None]) -> None:
        pass
