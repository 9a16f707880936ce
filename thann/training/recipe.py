"""The contract between a recipe and the one training loop.

A recipe owns what makes a stage what it is: its config checks, its named model slots, its data,
its step and its metrics. The trainer (thann.training.trainer) owns the rest: process groups, the
checkpoint directory, building the slots in the run's layout, the cadence of steps, evaluations
and saves, signals, the non-finite policy, metrics files. The two meet in a StepContext
(thann.training.context), the recipe's only door to the machinery; the trainer never imports a
recipe (entry points name one, thann.cli).

    class Distill(Recipe):
        name = "distill"                                   # names its checkpoint part and metrics
        primary = "student"                                # the slot the tools read from its checkpoints

        @staticmethod
        def check(cfg, dp): ...                            # ConfigError naming a field, before anything is built
        @staticmethod
        def slots(cfg): return {"teacher": SlotSpec(...), "student": SlotSpec(..., optim=cfg.train)}

        def __init__(self, cfg, layout): ...               # data
        def train_batches(self, consumed_samples): ...     # an endless iterator of micro-batches
        def step(self, ctx, batches): ...                  # one iteration; returns its metrics, with "loss"
        def evaluate(self, ctx): ...                       # validation metrics, with "loss"

Slots are a pure function of the config, so the resume policy (thann.checkpoint.resume) can
compare them with a checkpoint before anything is built. The first evaluation runs before the
first step of a fresh run; ``state``/``load_state`` is plain JSON the checkpoint keeps for the
recipe (e.g. a baseline measured once); ``on_train_end`` runs after the last step.
"""

from typing import Iterator

from omegaconf import DictConfig

from thann.training.context import StepContext


class Recipe:
    name: str = "recipe"
    primary: str = "model"
    tokenizer = None  # a thann.data.tokenizer.Tokenizer when the recipe reads text; recorded in checkpoints
    tokens_per_sample: int | None = None  # for tokens/s and MFU; None: the recipe counts samples only

    @staticmethod
    def check(cfg: DictConfig, dp: int) -> None:
        """The recipe's own config checks (its models' included), on every rank."""

    @staticmethod
    def slots(cfg: DictConfig) -> dict:
        """{name: thann.training.slots.SlotSpec}, the primary slot among them."""
        raise NotImplementedError

    def __init__(self, cfg: DictConfig, layout):
        self.cfg = cfg
        self.layout = layout

    def train_batches(self, consumed_samples: int) -> Iterator:
        raise NotImplementedError

    def step(self, ctx: StepContext, batches: Iterator) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, ctx: StepContext) -> dict[str, float]:
        raise NotImplementedError

    def state(self) -> dict | None:
        """Plain data to keep in checkpoints (None: nothing)."""
        return None

    def load_state(self, saved: dict) -> None:
        pass

    def on_train_end(self, ctx: StepContext) -> None:
        pass
