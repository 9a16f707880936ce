"""Training and validation data: megatron-core's GPTDataset over indexed datasets, and the
order in which micro-batches reach each data-parallel rank.

Sample order follows Megatron-LM's pretraining sampler: global batch g holds samples
[g*G, (g+1)*G); its m-th micro-batch on data-parallel rank r holds the M samples starting at
g*G + (m*D + r)*M (G global batch, M micro-batch, D data-parallel size). Any layout therefore
sees the same samples per step, and the position is one number: consumed samples.
"""

from dataclasses import dataclass
from typing import Iterator

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from thann.data.tokenizer import Tokenizer


@dataclass
class Batching:
    global_batch_size: int
    micro_batch_size: int
    dp_size: int
    dp_rank: int

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)


def build_datasets(data_cfg, tokenizer: Tokenizer, seq_length: int, seed: int,
                   train_samples: int, valid_samples: int) -> tuple[GPTDataset, GPTDataset]:
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([data_cfg.path], None),
        split=data_cfg.split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal attention is implied; SDPA uses its causal kernel
        path_to_cache=None,  # indices are cheap and deterministic: every rank builds its own
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config
    ).build()
    return train, valid


def _collate(samples: list[dict]) -> dict:
    return {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask", "position_ids")}


def micro_batches(dataset, batching: Batching, consumed_samples: int = 0) -> Iterator[dict]:
    """Endless micro-batches for this data-parallel rank, starting after ``consumed_samples``."""
    M, D, r = batching.micro_batch_size, batching.dp_size, batching.dp_rank
    step_start = consumed_samples
    while True:
        for m in range(batching.num_microbatches):
            first = step_start + (m * D + r) * M
            yield _collate([dataset[(first + i) % len(dataset)] for i in range(M)])
        step_start += batching.global_batch_size
