"""The order in which samples reach data-parallel ranks: Megatron-LM's pretraining sampler, the
one order of every recipe.

Global batch g holds the run's samples [g·G, (g+1)·G); its m-th micro-batch on data-parallel
rank r holds the M samples starting at g·G + (m·D + r)·M (G global batch, M micro-batch, D
data-parallel size). Every layout therefore trains the same samples in every step, and a run's
position is one number: the samples it has consumed.
"""

from dataclasses import dataclass
from typing import Callable, Iterator

import torch


@dataclass(frozen=True)
class SampleOrder:
    global_batch_size: int
    micro_batch_size: int
    dp_size: int
    dp_rank: int

    @classmethod
    def of(cls, layout, global_batch_size: int, micro_batch_size: int) -> "SampleOrder":
        """This rank's order in a layout (thann.parallel.state.Layout)."""
        return cls(global_batch_size, micro_batch_size, layout.dp, layout.dp_rank)

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def rows(self, m: int) -> range:
        """Positions, within a global batch, of this rank's micro-batch ``m``."""
        start = (m * self.dp_size + self.dp_rank) * self.micro_batch_size
        return range(start, start + self.micro_batch_size)

    def rank_rows(self, limit: int | None = None) -> torch.Tensor:
        """This rank's positions within a global batch, micro-batch after micro-batch; those below
        ``limit`` only (a last, shorter block of an evaluation set)."""
        mine = torch.tensor([i for m in range(self.num_microbatches) for i in self.rows(m)])
        return mine if limit is None else mine[mine < limit]

    def micro_batches(self, consumed_samples: int, collate: Callable[[list[int]], dict]) -> Iterator[dict]:
        """Endless micro-batches for this rank after ``consumed_samples``: ``collate`` turns a
        micro-batch's sample numbers (positions in the run's stream of samples) into a batch."""
        step_start = consumed_samples
        while True:
            for m in range(self.num_microbatches):
                yield collate([step_start + i for i in self.rows(m)])
            step_start += self.global_batch_size
