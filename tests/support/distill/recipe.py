"""A recipe that is not part of THANN, with two slots: a frozen teacher (a THANN checkpoint) and
a trained student (the MLP language model of model.py, registered from this folder), the student
trained on the teacher's next-token distributions with the KL divergence, token by token."""

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from thann.checkpoint.directory import read_metadata
from thann.checkpoint.weights import checkpoint_path, saved_slots
from thann.data.checks import check_data
from thann.data.datasets import build_datasets, micro_batches
from thann.data.order import SampleOrder
from thann.parallel import state
from thann.training.recipe import Recipe
from thann.training.slots import SlotSpec

from model import MLPLanguageModel  # noqa: F401  importing it registers mlp_lm (the model's one registry line)


def _teacher(cfg: DictConfig) -> tuple[str, dict]:
    path = checkpoint_path(str(cfg.distill.teacher), "distill.teacher")
    return path, saved_slots(read_metadata(path))["model"]


class Distill(Recipe):
    name = "distill"
    primary = "student"

    @staticmethod
    def check(cfg: DictConfig, dp: int) -> None:
        check_data(cfg.data)

    @staticmethod
    def slots(cfg: DictConfig) -> dict:
        path, teacher = _teacher(cfg)
        vocab = check_data(cfg.data).vocab_size
        return {"teacher": SlotSpec(OmegaConf.create(teacher["args"]), "distill.teacher", vocab_size=vocab,
                                    seq_length=cfg.train.seq_length, init=path, init_field="distill.teacher"),
                "student": SlotSpec(cfg.distill.student, "distill.student", vocab_size=vocab,
                                    seq_length=cfg.train.seq_length, optim=cfg.train)}

    def __init__(self, cfg: DictConfig, layout):
        super().__init__(cfg, layout)
        train = cfg.train
        self.tokenizer = check_data(cfg.data)
        self.tokens_per_sample = train.seq_length
        self.train_set, self.valid_set = build_datasets(
            cfg.data, self.tokenizer, train.seq_length, train.seed,
            train_samples=train.steps * train.global_batch_size,
            valid_samples=train.eval_iters * train.global_batch_size)
        self.order = SampleOrder.of(layout, train.global_batch_size, train.micro_batch_size)

    def train_batches(self, consumed_samples: int):
        return micro_batches(self.train_set, self.order, consumed_samples)

    @staticmethod
    def _tokens(batch: dict, model) -> torch.Tensor:
        tokens = batch["tokens"].to(state.device())
        return model(tokens, batch["position_ids"].to(state.device()), None)

    @classmethod
    def _teacher_logits(cls, batch: dict, model):
        return cls._tokens(batch, model), lambda logits: logits

    def _kl(self, teacher_logits: list, batches: list, ctx, forward_only: bool) -> dict:
        vocab = self.tokenizer.vocab_size
        pending = iter(teacher_logits)

        def forward_step(batch, model):
            def loss(student_logits):
                target = F.log_softmax(next(pending)[..., :vocab].float(), dim=-1)
                predicted = F.log_softmax(student_logits[..., :vocab].float(), dim=-1)
                kl = (target.exp() * (target - predicted)).sum()
                return kl, {"kl": torch.stack([kl.detach(), torch.tensor(float(target.shape[0] * target.shape[1]))])}
            return self._tokens(batch, model), loss

        return ctx.forward_backward("student", forward_step, iter(batches), forward_only=forward_only,
                                    count=lambda batch: batch["tokens"].numel(), num_microbatches=len(batches))

    def step(self, ctx, batches) -> dict[str, float]:
        held = [next(batches) for _ in range(self.order.num_microbatches)]
        teacher = ctx.forward("teacher", self._teacher_logits, iter(held))
        means = self._kl(teacher, held, ctx, forward_only=False)
        return {"loss": means["kl"], **means, "grad_norm": ctx.optimizer_step("student", means["kl"])}

    def evaluate(self, ctx) -> dict[str, float]:
        held = list(zip(range(self.cfg.train.eval_iters * self.order.num_microbatches),
                        micro_batches(self.valid_set, self.order, 0)))
        held = [batch for _, batch in held]
        teacher = ctx.forward("teacher", self._teacher_logits, iter(held), num_microbatches=len(held))
        means = self._kl(teacher, held, ctx, forward_only=True)
        return {"loss": means["kl"], **means}
