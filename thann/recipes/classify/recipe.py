"""Classification with any classifier of the model registry: the recipe of train_classifier.py.

Datasets (thann.data.classification): MNIST, Fashion-MNIST and 20 Newsgroups (standing in for
AG News). ``classify.datasets`` names them; the model (one trainable slot, ``model``) gets one
head per dataset (its ``heads``, derived) around what it shares: ChaosNet's core and a front-end
per modality (thann/models/chaosnet/README.md), NHS-Net's conv net (thann/models/nhsnet/README.md).

What the recipe asks of a classifier (the registry builds it; ``reads_tokens`` is False):
- ``model(inputs, head, *randomness)`` -> logits [B, C], inputs a micro-batch of the dataset's
  tensors (uint8 pixels, token ids);
- optionally ``draw_randomness(batch, generator, rate=None)`` -> a tuple of per-sample tensors
  [batch, ...] (or None): a model whose forward takes randomness (ChaosNet's neuron death, the
  MLP's dropout) draws it from the generator the recipe hands it (below); ``rate`` None is the
  model's own death rate for its mode (training or evaluation), a number a rate of
  ``classify.eval_death_rates``. A model without it takes no randomness;
- optionally ``after_step(step, all_reduce_sum)`` -> the parameters it wrote, and
  ``discard_statistics()``: a model with local rules (NHS-Net's Hebbian update, gate state,
  growth, pruning) gathers statistics in its training forwards and applies the rules after each
  optimizer step, through the slot's after-step hook (so the writes reach megatron-core's fp32
  master weights through ``ctx.weights_changed``). The model decides what must agree across
  ranks: it sums every statistic it reads with ``all_reduce_sum`` (over the data-parallel
  group), so its buffers (masks, gate state) and writes are the same on every rank and equal a
  single rank's on the global batch. A step whose update is skipped (a non-finite loss) discards
  its statistics.

What a global batch trains (g: its index = consumed samples / global batch size; K datasets):
- one dataset: that dataset;
- several, ``classify.sequential=false``: interleaved, batch g trains datasets[g mod K];
- several, ``classify.sequential=true``: stages of S = train.steps / K steps; stage k,
  batches [k·S, (k+1)·S), trains datasets[k] only. Evaluations report accuracy on every dataset
  seen so far. When a stage starts, the optimizer's state (Adam moments and step) starts afresh,
  as a new run from the previous stage's weights would. A parameter the stage does not use
  (earlier heads, the text front-end during image stages) then has zero gradient and zero
  moments, so Adam moves it by exactly 0; train.weight_decay=0 is required, because decoupled
  weight decay would shrink it every step and count as forgetting.

Sample order: each dataset is read in a fresh seeded permutation per epoch; a dataset's position
is the number of its samples trained so far, a function of g. Within a global batch, rows reach
data-parallel ranks in the one order (thann.data.order), so every layout trains the same
samples in every step.

Randomness (for a model that draws it): neuron death masks and membrane noise (the MLP's
dropout masks) come from torch.Generators seeded from (train.seed, stream, index), never from the global RNG, drawn for
a whole global batch (or evaluation block) and sliced to this rank's rows:
- training batch g: from (seed, TRAIN_MASKS, g);
- evaluation of dataset k: block b of its evaluation samples (global-batch-sized) from
  (seed, EVAL_MASKS, k, b), the same at every evaluation and for every death rate (so masks are
  nested: a neuron dead at rate .5 is dead at .9 too, and the noise is the same).
Data-parallel ranks therefore see a single rank's samples and masks (its numbers, up to the
order of floating-point sums), and a resumed run logs the uninterrupted one's numbers. The
evaluation samples are a fixed subset of each test split (``classify.eval_samples``, drawn with
seed 0, the same for every run).

Reported: training ``loss`` (cross entropy) and ``accuracy`` of the batch; at every evaluation
the same on ``train.eval_iters`` global batches of the current dataset's evaluation samples (the
stage's; the last of classify.datasets when they are interleaved), plus ``accuracy_<dataset>``
on all evaluation samples of every dataset seen so far (at the model's evaluation death rate, if
any), and at the last evaluation ``accuracy_<dataset>_death_<rate>`` for each rate of
``classify.eval_death_rates`` (a model with neuron death only).
"""

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model
from omegaconf import DictConfig, ListConfig, OmegaConf

from thann.config import require
from thann.data.classification import DATASET_INFO, DATASETS, heads, load
from thann.data.order import SampleOrder
from thann.models import registry
from thann.parallel import state
from thann.training.recipe import Recipe
from thann.training.slots import SlotSpec

TRAIN_ORDER, TRAIN_MASKS, EVAL_MASKS, EVAL_SUBSET = range(4)  # random streams


def generator(seed: int, stream: int, *indices: int) -> torch.Generator:
    """A CPU generator for one stream and index, e.g. (train.seed, TRAIN_MASKS, g). SeedSequence
    mixes the numbers, so neighbouring seeds or indices give unrelated streams."""
    words = np.random.SeedSequence([seed, stream, *indices]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))


def model_config(cfg: DictConfig) -> DictConfig:
    """The model config with its heads, {dataset: {modality, num_classes}} from classify.datasets."""
    return OmegaConf.create({**OmegaConf.to_container(cfg.model, resolve=True), "heads": heads(cfg.classify.datasets)})


@dataclass(frozen=True)
class Schedule:
    """Which dataset global batch g trains, and how many batches of a dataset came before it."""

    datasets: tuple[str, ...]
    sequential: bool
    stage_steps: int  # S; read when sequential

    def dataset_of(self, g: int) -> int:
        if self.sequential:
            return min(g // self.stage_steps, len(self.datasets) - 1)
        return g % len(self.datasets)

    def batches_before(self, g: int, k: int) -> int:
        """Global batches of dataset k before batch g (g trains dataset k)."""
        if self.sequential:
            return g - k * self.stage_steps
        return (g - k + len(self.datasets) - 1) // len(self.datasets)

    def seen(self, done: int) -> list[int]:
        """The datasets trained (or being trained) after ``done`` global batches: every one unless
        sequential, else those of the stages up to the current one."""
        if not self.sequential:
            return list(range(len(self.datasets)))
        return list(range(self.dataset_of(max(done - 1, 0)) + 1))

    def stage_starts(self, g: int) -> bool:
        return self.sequential and g > 0 and self.dataset_of(g) != self.dataset_of(g - 1)


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_classify(cfg: DictConfig) -> None:
    c, train = cfg.classify, cfg.train
    datasets = c.datasets
    require(isinstance(datasets, (list, ListConfig)) and len(datasets) > 0, "classify.datasets", datasets,
            f"must be a non-empty list of datasets from {list(DATASETS)}")
    for name in datasets:
        require(name in DATASETS, "classify.datasets", list(datasets), f"{name!r} is not one of {list(DATASETS)}")
    require(len(set(datasets)) == len(datasets), "classify.datasets", list(datasets), "names a dataset twice")
    require(isinstance(c.sequential, bool), "classify.sequential", c.sequential, "must be true or false")
    if c.sequential:
        K = len(datasets)
        require(train.steps % K == 0, "train.steps", train.steps,
                f"sequential training splits it into {K} equal stages (one per classify.datasets): use a "
                f"multiple of {K}")
        S = train.steps // K
        require(S % train.eval_interval == 0, "train.eval_interval", train.eval_interval,
                f"must divide the stage length train.steps/{K}={S}, so that an evaluation ends every stage")
        require(train.weight_decay == 0, "train.weight_decay", train.weight_decay,
                "sequential training needs 0: weight decay shrinks the parameters a stage does not use "
                "(earlier datasets' heads), which would count as forgetting")
    require(c.data_dir is None or os.path.isdir(str(c.data_dir)), "classify.data_dir", c.data_dir,
            "does not exist (the dataset cache: null means data/classification, built on first use; "
            "`python -m thann.data.classification` builds it)")
    require(c.eval_samples is None or _is_int(c.eval_samples, 1), "classify.eval_samples", c.eval_samples,
            "must be null (the whole test split) or a positive integer")
    rates = c.eval_death_rates
    require(isinstance(rates, (list, ListConfig)) and all(isinstance(r, (int, float)) and 0 <= r < 1 for r in rates),
            "classify.eval_death_rates", rates, "must be a list of death rates in [0, 1)")
    require(not rates or "eval_death_rate" in cfg.model, "classify.eval_death_rates", rates,
            f"model {cfg.model.arch} has no neuron death (no model.eval_death_rate): use []")


def classification_loss(labels: torch.Tensor, logits: torch.Tensor):
    """Summed cross entropy over the micro-batch (the step context averages over the global
    batch); reports it and the accuracy."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    correct = (logits.argmax(dim=-1) == labels).float().sum()
    count = torch.tensor(float(len(labels)), device=logits.device)
    return losses.sum(), {"cross_entropy": torch.stack([losses.sum().detach(), count]),
                          "accuracy": torch.stack([correct, count])}


def _data_parallel_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
    return tensor


class Classify(Recipe):
    name = "classify"

    @staticmethod
    def check(cfg: DictConfig, dp: int) -> None:
        _check_classify(cfg)
        args = model_config(cfg)
        registry.spec_of(args).check(args, cfg.parallel, cfg.train.recompute)

    @staticmethod
    def slots(cfg: DictConfig) -> dict:
        return {"model": SlotSpec(model_config(cfg), optim=cfg.train)}

    def __init__(self, cfg: DictConfig, layout):
        super().__init__(cfg, layout)
        self.c = cfg.classify
        self.model_cfg = model_config(cfg)
        train = cfg.train
        K = len(self.c.datasets)
        self.schedule = Schedule(tuple(self.c.datasets), bool(self.c.sequential), train.steps // K)
        self.G = train.global_batch_size
        self.order = SampleOrder.of(layout, train.global_batch_size, train.micro_batch_size)
        data_dir = None if self.c.data_dir is None else str(self.c.data_dir)
        self.train_sets, self.eval_sets = [], []
        # a text front-end's document length; image datasets ignore it (and image models have none)
        text = {"max_tokens": self.model_cfg.text.max_tokens} if "text" in self.model_cfg else {}
        for name in self.c.datasets:
            train_set = load(name, "train", cache_dir=data_dir, **text)
            test_set = load(name, "test", cache_dir=data_dir, **text)
            self._check_data(name, train_set)
            n = len(test_set) if self.c.eval_samples is None else min(self.c.eval_samples, len(test_set))
            subset = torch.randperm(len(test_set), generator=generator(0, EVAL_SUBSET, DATASETS.index(name)))[:n]
            self.train_sets.append(train_set)
            self.eval_sets.append((test_set.inputs[subset], test_set.labels[subset]))
        if any(DATASET_INFO[name][0] == "text" for name in self.c.datasets):
            from thann.data.tokenizer import build_tokenizer

            self.tokenizer = build_tokenizer("tiktoken", "cl100k_base")  # the one classification.py encodes with
        self._orders: dict[int, tuple[int, torch.Tensor]] = {}
        self.current = 0  # the dataset of the current step or evaluation
        self._hooked = False  # the model's local rules are on the slot's after-step hooks

    def _check_data(self, name: str, data) -> None:
        m = self.model_cfg
        if data.modality == "text":
            require(data.pad_id == m.text.vocab_size, "model.text.vocab_size", m.text.vocab_size,
                    f"must be {data.pad_id}, the vocabulary of {name}'s tokenizer (its padding id)")
        else:
            shape = (m.image.channels, m.image.size, m.image.size)
            require(tuple(data.inputs.shape[1:]) == shape, "model.image.size", m.image.size,
                    f"{name} images are {tuple(data.inputs.shape[1:])}, the model expects {shape} "
                    "(model.image.channels, size, size)")

    # -- the step -----------------------------------------------------------------------------------

    def _randomness(self, model, stream: tuple, rate: float | None) -> tuple:
        """The randomness of a global-batch-sized block, from its stream, for a model that draws
        some; () for one that does not."""
        draw = getattr(unwrap_model(model), "draw_randomness", None)
        return () if draw is None else draw(self.G, generator(self.cfg.train.seed, *stream), rate)

    def forward_step(self, batch: dict, model):
        """One micro-batch; its randomness is drawn for the whole block the batch belongs to (from
        its stream) and sliced to the batch's rows."""
        device, rows = state.device(), batch["rows"]
        randomness = [None if r is None else r[rows].to(device) for r in self._randomness(model, batch["stream"], None)]
        logits = model(batch["inputs"].to(device), batch["head"], *randomness)
        labels = batch["labels"].to(device)
        return logits, lambda output: classification_loss(labels, output)

    def _apply_local_rules(self, ctx) -> None:
        """Puts the model's local rules (if it has any) on the slot's after-step hooks, once."""
        self._hooked = True
        slot = ctx.slots["model"]
        if hasattr(slot.module, "after_step"):
            # ctx.position counts the steps done before this one, hence + 1
            slot.after_step.append(lambda target: target.module.after_step(ctx.position.step + 1, _data_parallel_sum))

    def step(self, ctx, batches) -> dict[str, float]:
        """A step that starts a sequential stage first resets the optimizer's state."""
        if not self._hooked:
            self._apply_local_rules(ctx)
        done = ctx.position.consumed_samples // self.G
        self.current = self.schedule.dataset_of(done)
        if self.schedule.stage_starts(done):
            ctx.reset_optimizer("model")
            ctx.message(f"step {ctx.position.step + 1}: stage {self.current + 1}/{len(self.c.datasets)} trains "
                        f"{self.c.datasets[self.current]} (optimizer state reset)")
        means = ctx.forward_backward("model", self.forward_step, batches, seq_length=1)
        loss = means["cross_entropy"]
        grad_norm = ctx.optimizer_step("model", loss)
        if ctx.skipped and hasattr(ctx.slots["model"].module, "discard_statistics"):
            ctx.slots["model"].module.discard_statistics()
        return {"loss": loss, **means, "grad_norm": grad_norm, "dataset": self.c.datasets[self.current]}

    # -- data ---------------------------------------------------------------------------------------

    def _order(self, k: int, epoch: int) -> torch.Tensor:
        cached = self._orders.get(k)
        if cached is None or cached[0] != epoch:
            size = len(self.train_sets[k])
            cached = (epoch, torch.randperm(size, generator=generator(self.cfg.train.seed, TRAIN_ORDER, k, epoch)))
            self._orders[k] = cached
        return cached[1]

    def _sample_indices(self, k: int, start: int, count: int) -> torch.Tensor:
        """Training samples at positions [start, start + count) of dataset k's stream (epochs of
        fresh permutations, one after another)."""
        size, parts = len(self.train_sets[k]), []
        while count > 0:
            epoch, offset = divmod(start, size)
            take = min(count, size - offset)
            parts.append(self._order(k, epoch)[offset:offset + take])
            start, count = start + take, count - take
        return torch.cat(parts)

    def _micro_batches(self, k: int, inputs, labels, stream: tuple):
        """This rank's micro-batches of one global-batch-sized block."""
        for m in range(self.order.num_microbatches):
            rows = torch.tensor(list(self.order.rows(m)))
            yield {"head": self.c.datasets[k], "inputs": inputs[rows], "labels": labels[rows], "rows": rows,
                   "stream": stream}

    def train_batches(self, consumed_samples: int):
        g = consumed_samples // self.G
        while True:
            k = self.schedule.dataset_of(g)
            data = self.train_sets[k]
            samples = self._sample_indices(k, self.schedule.batches_before(g, k) * self.G, self.G)
            yield from self._micro_batches(k, data.inputs[samples], data.labels[samples], (TRAIN_MASKS, g))
            g += 1

    def _eval_rows(self, k: int, b: int) -> torch.Tensor:
        """Block b (global-batch-sized, wrapping around) of dataset k's evaluation samples."""
        return (torch.arange(self.G) + b * self.G) % len(self.eval_sets[k][1])

    def valid_batches(self, k: int):
        """train.eval_iters global batches of dataset k's evaluation samples."""
        inputs, labels = self.eval_sets[k]
        b = 0
        while True:
            rows = self._eval_rows(k, b)
            yield from self._micro_batches(k, inputs[rows], labels[rows], (EVAL_MASKS, k, b))
            b += 1

    # -- evaluation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def accuracy(self, model, k: int, rate: float | None = None) -> float:
        """Accuracy on all of dataset k's evaluation samples (at death rate ``rate``; None: the
        model's own); every data-parallel rank classifies its rows of each block and the counts
        are summed."""
        device, name = state.device(), self.c.datasets[k]
        inputs, labels = self.eval_sets[k]
        total = len(labels)
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        for b in range(math.ceil(total / self.G)):
            mine = self.order.rank_rows(total - b * self.G)
            if len(mine) == 0:
                continue
            rows = self._eval_rows(k, b)[mine]
            randomness = [None if r is None else r[mine].to(device)
                          for r in self._randomness(model, (EVAL_MASKS, k, b), rate)]
            logits = model(inputs[rows].to(device), name, *randomness)
            counts[0] += (logits.argmax(dim=-1).cpu() == labels[rows]).sum().item()
            counts[1] += len(mine)
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        return (counts[0] / counts[1]).item()

    def evaluate(self, ctx) -> dict[str, float]:
        done = ctx.position.consumed_samples // self.G
        self.current = self.schedule.seen(done)[-1]
        means = ctx.forward_backward("model", self.forward_step, self.valid_batches(self.current), seq_length=1,
                                     forward_only=True,
                                     num_microbatches=self.cfg.train.eval_iters * self.order.num_microbatches)
        record = {"loss": means["cross_entropy"], **means, "dataset": self.c.datasets[self.current]}
        model = ctx.slots["model"].chunks[0]
        final = ctx.position.step == self.cfg.train.steps
        for k in self.schedule.seen(done):
            name = self.c.datasets[k]
            record[f"accuracy_{name}"] = self.accuracy(model, k)
            if final:
                for rate in self.c.eval_death_rates:
                    record[f"accuracy_{name}_death_{rate:g}"] = self.accuracy(model, k, float(rate))
        return record
