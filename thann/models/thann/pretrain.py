"""Language-model pretraining of THANN: the task the training loop runs for pretrain_thann.py."""

from functools import partial

import torch
from megatron.core import parallel_state

from thann.data.chat import encode_prompt
from thann.data.datasets import Batching, build_datasets, micro_batches
from thann.data.tokenizer import build_tokenizer, padded_vocab_size
from thann.models.thann.generate import greedy_generate
from thann.models.thann.model import ThannModel, transformer_config
from thann.models.thann.size import model_size
from thann.parallel import state


def lm_loss(loss_mask: torch.Tensor, token_losses: torch.Tensor):
    """Per-token cross entropy (from the model's vocab-parallel softmax) summed over the tokens
    that count; megatron-core's schedule divides by ``num_tokens`` and the micro-batch count."""
    loss_mask = loss_mask.float()
    loss_sum = (token_losses.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm_loss": torch.stack([loss_sum.detach(), loss_mask.sum()])}


class PretrainTask:
    report_keys = ("lm_loss",)

    def __init__(self, cfg, layout, bf16: bool):
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.data.tokenizer.type, cfg.data.tokenizer.model)
        self.vocab_size = padded_vocab_size(self.tokenizer.vocab_size, layout.tp)
        self.transformer_config = transformer_config(
            cfg.model, cfg.parallel, bf16=bf16, use_cpu_initialization=not torch.cuda.is_available(),
            recompute=cfg.train.recompute,
        )
        train = cfg.train
        self.flops_per_token = model_size(cfg.model, self.vocab_size).flops_per_token(
            cfg.model, self.vocab_size, train.seq_length
        )
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

    def build_model(self, pre_process: bool, post_process: bool) -> ThannModel:
        return ThannModel(self.transformer_config, self.cfg.model, self.vocab_size, self.cfg.train.seq_length,
                          pre_process=pre_process, post_process=post_process)

    def forward_step(self, data_iterator, model):
        batch = {k: v.to(state.device(), non_blocking=True) for k, v in next(data_iterator).items()}
        token_losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return token_losses, partial(lm_loss, batch["loss_mask"])

    def train_batches(self, consumed_samples: int):
        return micro_batches(self.train_set, self.batching, consumed_samples)

    def valid_batches(self):
        return micro_batches(self.valid_set, self.batching, 0)

    def on_train_end(self, model_chunks, message) -> None:
        sample = self.cfg.train.sample
        prompt = encode_prompt(self.tokenizer, sample.prompt, self.cfg.data.prompt_template)
        ids = greedy_generate(model_chunks, prompt, sample.new_tokens, self.tokenizer.vocab_size, self.tokenizer.eod)
        message(f"sample (greedy): {self.tokenizer.decode(prompt)!r} -> {self.tokenizer.decode(ids[len(prompt):])!r}")
