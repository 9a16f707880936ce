"""Language-model pretraining (next-token prediction): the recipe of pretrain_thann.py.

One trainable slot, ``model``: any language model of the registry (``model.arch``: thann, gpt,
nnn). The objective is the mean cross entropy over every token that counts in the global batch
(``data.loss_mask``: all tokens, or assistant replies only), the number logged as ``lm_loss``,
however those tokens are spread over micro-batches and data-parallel ranks (the step context's
global mean); ``loss`` adds the MoE load-balancing loss. At the end, a greedy sample of
``train.sample.prompt`` shows what the model learnt.
"""

import torch
from omegaconf import DictConfig

from thann.config import require
from thann.data.chat import encode_prompt
from thann.data.checks import check_data, check_prompt_template
from thann.data.datasets import build_datasets, micro_batches
from thann.data.order import SampleOrder
from thann.inference.generator import Generator
from thann.inference.sampling import SamplingParams
from thann.models import registry
from thann.parallel import state
from thann.training.recipe import Recipe
from thann.training.slots import SlotSpec


def lm_loss(loss_mask, token_losses):
    """Cross entropy summed over the tokens that count; reports the sum and count."""
    loss_mask = loss_mask.float()
    loss_sum = (token_losses.float() * loss_mask).sum()
    return loss_sum, {"lm_loss": torch.stack([loss_sum.detach(), loss_mask.sum()])}


class Pretrain(Recipe):
    name = "pretrain"

    @staticmethod
    def check(cfg: DictConfig, dp: int) -> None:
        registry.spec_of(cfg.model).check(cfg.model, cfg.parallel, cfg.train.recompute)
        require(isinstance(cfg.train.seq_length, int) and cfg.train.seq_length > 0, "train.seq_length",
                cfg.train.seq_length, "must be a positive integer")
        require(isinstance(cfg.train.sample.new_tokens, int) and cfg.train.sample.new_tokens >= 0,
                "train.sample.new_tokens", cfg.train.sample.new_tokens, "must be an integer >= 0")
        check_prompt_template(cfg.data)
        check_data(cfg.data)

    @staticmethod
    def slots(cfg: DictConfig) -> dict:
        from thann.data.checks import check_tokenizer

        return {"model": SlotSpec(cfg.model, vocab_size=check_tokenizer(cfg.data).vocab_size,
                                  seq_length=cfg.train.seq_length, optim=cfg.train,
                                  init=None if cfg.init_from is None else str(cfg.init_from))}

    def __init__(self, cfg: DictConfig, layout):
        super().__init__(cfg, layout)
        train = cfg.train
        self.tokenizer = check_data(cfg.data)
        self.tokens_per_sample = train.seq_length
        evaluations = train.steps // train.eval_interval + 2
        self.train_set, self.valid_set = build_datasets(
            cfg.data, self.tokenizer, train.seq_length, train.seed,
            train_samples=train.steps * train.global_batch_size,
            valid_samples=evaluations * train.eval_iters * train.global_batch_size,
        )
        self.order = SampleOrder.of(layout, train.global_batch_size, train.micro_batch_size)

    def forward_step(self, batch: dict, model):
        batch = {k: v.to(state.device(), non_blocking=True) for k, v in batch.items()}
        token_losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return token_losses, lambda output: lm_loss(batch["loss_mask"], output)

    @staticmethod
    def _tokens_that_count(batch: dict):
        return batch["loss_mask"].sum()

    def train_batches(self, consumed_samples: int):
        return micro_batches(self.train_set, self.order, consumed_samples)

    def step(self, ctx, batches) -> dict[str, float]:
        means = ctx.forward_backward("model", self.forward_step, batches, count=self._tokens_that_count)
        loss = means["lm_loss"] + means.get("aux_loss", 0.0)
        return {"loss": loss, **means, "grad_norm": ctx.optimizer_step("model", loss)}

    def evaluate(self, ctx) -> dict[str, float]:
        means = ctx.forward_backward("model", self.forward_step, micro_batches(self.valid_set, self.order, 0),
                                     count=self._tokens_that_count, forward_only=True,
                                     num_microbatches=self.cfg.train.eval_iters * self.order.num_microbatches)
        return {"loss": means["lm_loss"], **means}

    def on_train_end(self, ctx) -> None:
        sample = self.cfg.train.sample
        if not sample.new_tokens:
            return
        prompt = encode_prompt(self.tokenizer, sample.prompt, self.cfg.data.prompt_template)
        generator = Generator(ctx.slots["model"].chunks, self.tokenizer, len(prompt) + sample.new_tokens)
        result = generator.generate([prompt], SamplingParams(max_new_tokens=sample.new_tokens))[0]
        ctx.message(f"sample (greedy): {self.tokenizer.decode(prompt)!r} -> {result.text!r}")
