"""Classification with ChaosNet or its parameter-matched MLP: the task of train_classifier.py.

Datasets (thann.data.classification): MNIST, Fashion-MNIST and 20 Newsgroups (standing in for
AG News). ``classify.tasks`` names them; the model gets one head per dataset around one shared
core, and one front-end per modality (thann/models/chaosnet/README.md).

What a global batch trains (g: its index = consumed samples / global batch size; K tasks):
- one task: that task;
- several, ``classify.sequential=false``: interleaved, batch g trains tasks[g mod K];
- several, ``classify.sequential=true``: stages of S = train.steps / K steps; stage k,
  batches [k·S, (k+1)·S), trains tasks[k] only. Evaluations report accuracy on every task seen
  so far. When a stage starts, the optimizer's state (Adam moments and step) starts afresh, as a
  new run from the previous stage's weights would. A parameter the stage does not use (earlier
  heads, the text front-end during image stages) then has zero gradient and zero moments, so
  Adam moves it by exactly 0; train.weight_decay=0 is required, because decoupled weight decay
  would shrink it every step and count as forgetting.

Sample order: each task reads its training split in a fresh seeded permutation per epoch; a
task's position is the number of its samples trained so far, a function of g. Within a global
batch, the m-th micro-batch of data-parallel rank r holds rows [(m·D + r)·M, (m·D + r + 1)·M)
(Megatron-LM's order, as thann.data.datasets.micro_batches), so every layout trains the same
samples in every step.

Randomness: neuron death masks and membrane noise (the MLP's dropout masks) come from
torch.Generators seeded from (train.seed, stream, index), never from the global RNG:
- training batch g: the masks of all its rows from (seed, TRAIN, g), each rank keeping its rows;
- evaluation of task k: block b of its evaluation samples (global-batch-sized) from
  (seed, EVAL, k, b), the same at every evaluation and for every death rate (so masks are
  nested: a neuron dead at rate .5 is dead at .9 too, and the noise is the same).
Data-parallel ranks therefore see a single rank's samples and masks (its numbers, up to the
order of floating-point sums), and a resumed run logs the uninterrupted one's numbers. The evaluation samples are a fixed subset of each test split
(``classify.eval_samples``, drawn with seed 0, the same for every run).

Reported: training ``loss`` (cross entropy) and ``accuracy`` of the batch; at every evaluation
the same on ``train.eval_iters`` global batches of the current task's evaluation samples (the
stage's task; the last of classify.tasks when they are interleaved), plus
``accuracy_<task>`` on all evaluation samples of every task seen so far (at
model.eval_death_rate), and at the last evaluation ``accuracy_<task>_death_<rate>`` for each
rate of ``classify.eval_death_rates``.
"""

import math
import os
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from omegaconf import DictConfig, ListConfig, OmegaConf

from thann.config import require
from thann.data.classification import DATASET_INFO, DATASETS, load
from thann.models.chaosnet import build_classifier, chaosnet_transformer_config, check_layout, check_model_config
from thann.parallel import state
from thann.training import steps
from thann.training.optimizer import reset_adam_state
from thann.training.task import Task

TRAIN_ORDER, TRAIN_MASKS, EVAL_MASKS, EVAL_SUBSET = range(4)  # random streams


def generator(seed: int, stream: int, *indices: int) -> torch.Generator:
    """A CPU generator for one stream and index, e.g. (train.seed, TRAIN_MASKS, g). SeedSequence
    mixes the numbers, so neighbouring seeds or indices give unrelated streams."""
    words = np.random.SeedSequence([seed, stream, *indices]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))


def model_config(cfg: DictConfig) -> DictConfig:
    """The model config with its heads: ``tasks`` {name: {modality, num_classes}} from classify.tasks."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["tasks"] = {name: {"modality": DATASET_INFO[name][0], "num_classes": DATASET_INFO[name][1]}
                      for name in cfg.classify.tasks}
    return OmegaConf.create(model)


@dataclass(frozen=True)
class Schedule:
    """Which task global batch g trains, and how many batches of a task came before it."""

    tasks: tuple[str, ...]
    sequential: bool
    stage_steps: int  # S; read when sequential

    def task_of(self, g: int) -> int:
        if self.sequential:
            return min(g // self.stage_steps, len(self.tasks) - 1)
        return g % len(self.tasks)

    def batches_before(self, g: int, k: int) -> int:
        """Global batches of task k before batch g (g trains task k)."""
        if self.sequential:
            return g - k * self.stage_steps
        return (g - k + len(self.tasks) - 1) // len(self.tasks)

    def seen(self, done: int) -> list[int]:
        """The tasks trained (or being trained) after ``done`` global batches: every task unless
        sequential, else those of the stages up to the current one."""
        if not self.sequential:
            return list(range(len(self.tasks)))
        return list(range(self.task_of(max(done - 1, 0)) + 1))

    def stage_starts(self, g: int) -> bool:
        return self.sequential and g > 0 and self.task_of(g) != self.task_of(g - 1)


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_classify(cfg: DictConfig) -> None:
    c, train = cfg.classify, cfg.train
    tasks = c.tasks
    require(isinstance(tasks, (list, ListConfig)) and len(tasks) > 0, "classify.tasks", tasks,
            f"must be a non-empty list of datasets from {list(DATASETS)}")
    for name in tasks:
        require(name in DATASETS, "classify.tasks", list(tasks), f"{name!r} is not one of {list(DATASETS)}")
    require(len(set(tasks)) == len(tasks), "classify.tasks", list(tasks), "names a dataset twice")
    require(isinstance(c.sequential, bool), "classify.sequential", c.sequential, "must be true or false")
    if c.sequential:
        K = len(tasks)
        require(train.steps % K == 0, "train.steps", train.steps,
                f"sequential training splits it into {K} equal stages (one per classify.tasks): use a multiple of {K}")
        S = train.steps // K
        require(S % train.eval_interval == 0, "train.eval_interval", train.eval_interval,
                f"must divide the stage length train.steps/{K}={S}, so that an evaluation ends every stage")
        require(train.weight_decay == 0, "train.weight_decay", train.weight_decay,
                "sequential training needs 0: weight decay shrinks the parameters a stage does not use "
                "(earlier tasks' heads), which would count as forgetting")
    require(c.data_dir is None or os.path.isdir(str(c.data_dir)), "classify.data_dir", c.data_dir,
            "does not exist (the dataset cache: null means data/classification, built on first use; "
            "`python -m thann.data.classification` builds it)")
    require(c.eval_samples is None or _is_int(c.eval_samples, 1), "classify.eval_samples", c.eval_samples,
            "must be null (the whole test split) or a positive integer")
    rates = c.eval_death_rates
    require(isinstance(rates, (list, ListConfig)) and all(isinstance(r, (int, float)) and 0 <= r < 1 for r in rates),
            "classify.eval_death_rates", rates, "must be a list of death rates in [0, 1)")


def _check_resumed_tasks(cfg: DictConfig) -> None:
    """The heads are part of the model's shape: a run cannot resume a checkpoint of other tasks."""
    from thann.checkpoint.checkpointer import find_checkpoints

    if not cfg.checkpoint.resume:
        return
    found = find_checkpoints(str(cfg.checkpoint.dir))
    if found:
        saved = found[0].metadata.get("config", {}).get("classify", {}).get("tasks")
        require(saved == list(cfg.classify.tasks), "classify.tasks", list(cfg.classify.tasks),
                f"the checkpoint {found[0].path} has heads for {saved}; use those tasks or another checkpoint.dir")


def classification_loss(labels: torch.Tensor, logits: torch.Tensor):
    """Summed cross entropy over the micro-batch, divided by its size by megatron-core's schedule
    (the size is the returned count), so that the step's loss is the global batch's mean."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    correct = (logits.argmax(dim=-1) == labels).float().sum()
    count = torch.tensor(float(len(labels)), device=logits.device)
    report = {"cross_entropy": torch.stack([losses.sum().detach(), count]), "accuracy": torch.stack([correct, count])}
    return losses.sum(), torch.tensor(len(labels), dtype=torch.int), report


class ClassifyTask(Task):
    report_keys = ("cross_entropy", "accuracy")

    @staticmethod
    def resumable_model_changes(cfg) -> tuple[str, ...]:
        # What does not change a parameter's shape; max_tokens only truncates the documents.
        return ("name", "train_death_rate", "eval_death_rate", "sigma", "theta", "rho", "leak", "mode", "max_tokens")

    @staticmethod
    def check_config(cfg, dp: int) -> None:
        check_layout(cfg.parallel)
        _check_classify(cfg)
        check_model_config(model_config(cfg))
        _check_resumed_tasks(cfg)

    def __init__(self, cfg, layout, bf16: bool):
        self.cfg, self.c = cfg, cfg.classify
        self.model_cfg = model_config(cfg)
        self.transformer_config = chaosnet_transformer_config(self.model_cfg, bf16=bf16)
        train = cfg.train
        K = len(self.c.tasks)
        self.schedule = Schedule(tuple(self.c.tasks), bool(self.c.sequential), train.steps // K)
        self.G, self.M, self.D = train.global_batch_size, train.micro_batch_size, layout.dp
        self.rank = parallel_state.get_data_parallel_rank()
        data_dir = None if self.c.data_dir is None else str(self.c.data_dir)
        self.train_sets, self.eval_sets = [], []
        for name in self.c.tasks:
            train_set = load(name, "train", max_tokens=self.model_cfg.text.max_tokens, cache_dir=data_dir)
            test_set = load(name, "test", max_tokens=self.model_cfg.text.max_tokens, cache_dir=data_dir)
            self._check_data(name, train_set)
            n = len(test_set) if self.c.eval_samples is None else min(self.c.eval_samples, len(test_set))
            subset = torch.randperm(len(test_set), generator=generator(0, EVAL_SUBSET, DATASETS.index(name)))[:n]
            self.train_sets.append(train_set)
            self.eval_sets.append((test_set.inputs[subset], test_set.labels[subset]))
        if any(DATASET_INFO[name][0] == "text" for name in self.c.tasks):
            from thann.data.tokenizer import build_tokenizer

            self.tokenizer = build_tokenizer("tiktoken", "cl100k_base")  # the one classification.py encodes with
        self._orders: dict[int, tuple[int, torch.Tensor]] = {}
        self.module = None
        self.done = 0  # global batches trained when the current step or evaluation started
        self.step = 0
        self.current = 0  # the task of the current step or evaluation

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

    # -- model and step ------------------------------------------------------------------------

    def build_model(self, pre_process: bool, post_process: bool):
        self.module = build_classifier(self.transformer_config, self.model_cfg)
        return self.module

    def forward_backward(self, trainer, batches, num_microbatches: int, forward_only: bool) -> list[dict]:
        """megatron-core's schedule (thann.training.steps.pipelined); a training step that starts
        a sequential stage first resets the optimizer's state."""
        self.done, self.step = trainer.consumed_samples // self.G, trainer.step
        if forward_only:
            self.current = self.schedule.seen(self.done)[-1]
        else:
            self.current = self.schedule.task_of(self.done)
            if self.schedule.stage_starts(self.done):
                reset_adam_state(trainer.optimizer)
                trainer.message(f"step {trainer.step + 1}: stage {self.current + 1}/{len(self.c.tasks)} trains "
                                f"{self.c.tasks[self.current]} (optimizer state reset)")
        return steps.pipelined(trainer, batches, num_microbatches, forward_only)

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        device = state.device()
        noise = batch["noise"]
        logits = model(batch["inputs"].to(device), batch["task"], batch["mask"].to(device),
                       None if noise is None else noise.to(device))
        return logits, partial(classification_loss, batch["labels"].to(device))

    # -- data ----------------------------------------------------------------------------------

    def _order(self, k: int, epoch: int) -> torch.Tensor:
        cached = self._orders.get(k)
        if cached is None or cached[0] != epoch:
            size = len(self.train_sets[k])
            cached = (epoch, torch.randperm(size, generator=generator(self.cfg.train.seed, TRAIN_ORDER, k, epoch)))
            self._orders[k] = cached
        return cached[1]

    def _sample_indices(self, k: int, start: int, count: int) -> torch.Tensor:
        """Training samples at positions [start, start + count) of task k's stream (epochs of
        fresh permutations, one after another)."""
        size, parts = len(self.train_sets[k]), []
        while count > 0:
            epoch, offset = divmod(start, size)
            take = min(count, size - offset)
            parts.append(self._order(k, epoch)[offset:offset + take])
            start, count = start + take, count - take
        return torch.cat(parts)

    def _rank_rows(self, rows: int) -> torch.Tensor:
        """This rank's rows of a global-batch-sized block, micro-batch after micro-batch."""
        M, D, r = self.M, self.D, self.rank
        mine = torch.cat([torch.arange((m * D + r) * M, (m * D + r + 1) * M) for m in range(self.G // (M * D))])
        return mine[mine < rows]

    def _micro_batches(self, name: str, inputs, labels, mask, noise):
        """Splits this rank's rows of one global batch into its micro-batches."""
        mine = self._rank_rows(self.G)
        for m in range(self.G // (self.M * self.D)):
            rows = mine[m * self.M:(m + 1) * self.M]
            yield {"task": name, "inputs": inputs[rows], "labels": labels[rows], "mask": mask[rows],
                   "noise": None if noise is None else noise[rows]}

    def train_batches(self, consumed_samples: int):
        g = consumed_samples // self.G
        rate = self.model_cfg.train_death_rate
        while True:
            k = self.schedule.task_of(g)
            data = self.train_sets[k]
            samples = self._sample_indices(k, self.schedule.batches_before(g, k) * self.G, self.G)
            mask, noise = self.module.draw_randomness(self.G, generator(self.cfg.train.seed, TRAIN_MASKS, g), rate)
            yield from self._micro_batches(self.c.tasks[k], data.inputs[samples], data.labels[samples], mask, noise)
            g += 1

    def _eval_block(self, k: int, b: int, rate: float):
        """Block b (global-batch-sized, wrapping around) of task k's evaluation samples and its masks."""
        inputs, labels = self.eval_sets[k]
        rows = (torch.arange(self.G) + b * self.G) % len(labels)
        mask, noise = self.module.draw_randomness(self.G, generator(self.cfg.train.seed, EVAL_MASKS, k, b), rate)
        return inputs[rows], labels[rows], mask, noise

    def valid_batches(self):
        """train.eval_iters global batches of the current task's evaluation samples. A generator:
        the task is chosen when the evaluation's first micro-batch is drawn, after forward_backward
        has recorded the position."""
        b = 0
        while True:
            k = self.current
            yield from self._micro_batches(self.c.tasks[k], *self._eval_block(k, b, self.model_cfg.eval_death_rate))
            b += 1

    # -- metrics -------------------------------------------------------------------------------

    def metrics(self, means: dict[str, float], split: str) -> dict[str, float]:
        return {"loss": means["cross_entropy"], **means, "task": self.c.tasks[self.current]}

    @torch.no_grad()
    def accuracy(self, model_chunks: list, k: int, rate: float) -> float:
        """Accuracy on all of task k's evaluation samples at death rate ``rate``; every
        data-parallel rank classifies its rows of each block and the counts are summed."""
        model, device, name = model_chunks[0], state.device(), self.c.tasks[k]
        total = len(self.eval_sets[k][1])
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        for b in range(math.ceil(total / self.G)):
            inputs, labels, mask, noise = self._eval_block(k, b, rate)
            mine = self._rank_rows(total - b * self.G)
            if len(mine) == 0:
                continue
            logits = model(inputs[mine].to(device), name, mask[mine].to(device),
                           None if noise is None else noise[mine].to(device))
            counts[0] += (logits.argmax(dim=-1).cpu() == labels[mine]).sum().item()
            counts[1] += len(mine)
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        return (counts[0] / counts[1]).item()

    def evaluate(self, model_chunks: list) -> dict[str, float]:
        record = {}
        final = self.step == self.cfg.train.steps
        for k in self.schedule.seen(self.done):
            name = self.c.tasks[k]
            record[f"accuracy_{name}"] = self.accuracy(model_chunks, k, self.model_cfg.eval_death_rate)
            if final:
                for rate in self.c.eval_death_rates:
                    record[f"accuracy_{name}_death_{rate:g}"] = self.accuracy(model_chunks, k, float(rate))
        return record


__all__ = ["ClassifyTask", "Schedule", "classification_loss", "generator", "model_config"]
