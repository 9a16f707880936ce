"""Language-model pretraining (next-token prediction): the task of pretrain_thann.py.

The objective is the mean cross entropy over every token that counts in the global batch
(``data.loss_mask``: all tokens, or assistant replies only), the same number that is logged as
``lm_loss``, however the tokens that count are spread over micro-batches and data-parallel
ranks. megatron-core's default divides each micro-batch's loss by its own token count and
averages micro-batches and ranks, a different mean when masks are uneven; its per-token mode
gets the main loss right but scales the MoE auxiliary loss by each rank's local token count
(which sequence parallelism divides by tp). So each micro-batch carries the global batch's
count of tokens that count (one all-reduce over data-parallel ranks per step) and its loss is
scaled to that count, inside the default mode that already scales the auxiliary loss right.
"""

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from thann.config import require
from thann.data.chat import encode_prompt
from thann.data.checks import check_data, check_prompt_template
from thann.data.datasets import Batching, build_datasets, micro_batches
from thann.data.tokenizer import padded_vocab_size
from thann.models import language
from thann.inference.generator import Generator
from thann.inference.sampling import SamplingParams
from thann.models.thann.model import tracked_aux_loss
from thann.parallel import state
from thann.training.task import Task


def lm_loss(loss_mask: torch.Tensor, loss_scale: torch.Tensor, token_losses: torch.Tensor):
    """Cross entropy summed over the tokens that count, times ``loss_scale`` (see
    ``with_global_token_count``); reports the plain sum and count."""
    loss_mask = loss_mask.float()
    loss_sum = (token_losses.float() * loss_mask).sum()
    report = {"lm_loss": torch.stack([loss_sum.detach(), loss_mask.sum()])}
    return loss_sum * loss_scale, torch.ones((), dtype=torch.int), report


def with_global_token_count(batches, num_microbatches: int):
    """Adds to each micro-batch ``loss_scale = num_microbatches * dp / N`` (N: tokens that count
    in the whole global batch), so that megatron-core's division by the micro-batch count and
    the data-parallel gradient average leave exactly sum(token losses) / N."""
    group = parallel_state.get_data_parallel_group()
    scale = num_microbatches * dist.get_world_size(group)
    while True:
        step = [next(batches) for _ in range(num_microbatches)]
        count = torch.stack([b["loss_mask"].sum() for b in step]).sum().double().to(state.device())
        dist.all_reduce(count, group=group)
        loss_scale = (scale / count.clamp(min=1)).cpu().float()
        for batch in step:
            yield {**batch, "loss_scale": loss_scale}


class PretrainTask(Task):
    """Next-token prediction with any language model of thann.models.language (``model.arch``)."""

    report_keys = ("lm_loss",)

    @staticmethod
    def resumable_model_changes(cfg) -> tuple[str, ...]:
        return language.family(cfg.model).resumable_changes

    @staticmethod
    def check_config(cfg, dp: int) -> None:
        language.family(cfg.model).check(cfg.model, cfg.parallel, cfg.train.recompute)
        require(isinstance(cfg.train.seq_length, int) and cfg.train.seq_length > 0, "train.seq_length",
                cfg.train.seq_length, "must be a positive integer")
        require(isinstance(cfg.train.sample.new_tokens, int) and cfg.train.sample.new_tokens >= 0,
                "train.sample.new_tokens", cfg.train.sample.new_tokens, "must be an integer >= 0")
        check_prompt_template(cfg.data)
        check_data(cfg.data)

    def __init__(self, cfg, layout, bf16: bool):
        self.cfg = cfg
        self.tokenizer = check_data(cfg.data)
        self.vocab_size = padded_vocab_size(self.tokenizer.vocab_size, layout.tp)
        self.family = language.family(cfg.model)
        self.transformer_config = self.family.transformer_config(cfg.model, cfg.parallel, bf16=bf16,
                                                                 recompute=cfg.train.recompute)
        train = cfg.train
        self.tokens_per_sample = self.pipeline_seq_length = train.seq_length
        self.flops_per_token = self.family.flops_per_token(cfg.model, self.vocab_size, train.seq_length)
        evaluations = train.steps // train.eval_interval + 2
        self.train_set, self.valid_set = build_datasets(
            cfg.data, self.tokenizer, train.seq_length, train.seed,
            train_samples=train.steps * train.global_batch_size,
            valid_samples=evaluations * train.eval_iters * train.global_batch_size,
        )
        self.batching = Batching(
            train.global_batch_size, train.micro_batch_size, layout.dp,
            parallel_state.get_data_parallel_rank(),
        )

    def build_model(self, pre_process: bool, post_process: bool):
        return self.family.build(self.transformer_config, self.cfg.model, self.vocab_size, self.cfg.train.seq_length,
                                 pre_process, post_process)

    def forward_step(self, data_iterator, model):
        batch = {k: v.to(state.device(), non_blocking=True) for k, v in next(data_iterator).items()}
        token_losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return token_losses, partial(lm_loss, batch["loss_mask"], batch["loss_scale"])

    def train_batches(self, consumed_samples: int):
        batches = micro_batches(self.train_set, self.batching, consumed_samples)
        return with_global_token_count(batches, self.batching.num_microbatches)

    def valid_batches(self):
        return with_global_token_count(micro_batches(self.valid_set, self.batching, 0), self.batching.num_microbatches)

    def metrics(self, means: dict[str, float], split: str) -> dict[str, float]:
        if self.transformer_config.num_moe_experts is None:
            return {"loss": means["lm_loss"], **means}
        aux_loss = tracked_aux_loss(self.transformer_config, self.batching.num_microbatches)
        if split != "train":
            return {"loss": means["lm_loss"], **means}
        return {"loss": means["lm_loss"] + aux_loss, **means, "aux_loss": aux_loss}

    def on_train_end(self, model_chunks, message) -> None:
        sample = self.cfg.train.sample
        if not sample.new_tokens:
            return
        prompt = encode_prompt(self.tokenizer, sample.prompt, self.cfg.data.prompt_template)
        generator = Generator(model_chunks, self.tokenizer, len(prompt) + sample.new_tokens)
        result = generator.generate([prompt], SamplingParams(max_new_tokens=sample.new_tokens))[0]
        message(f"sample (greedy): {self.tokenizer.decode(prompt)!r} -> {result.text!r}")
