"""Training and validation data of language models: megatron-core's GPTDataset over indexed
datasets, in the one data-parallel sample order (thann.data.order)."""

import copy
import json
import os
from typing import Iterator

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from thann.data.order import SampleOrder
from thann.data.preprocess import loss_mask_prefix
from thann.data.tokenizer import Tokenizer

LOSS_MASKS = ("all", "assistant")


class AssistantMaskedGPTDataset(GPTDataset):
    """A GPTDataset whose loss counts only the tokens the ``PREFIX_loss_mask`` companion marks
    (assistant replies, written by ``preprocess --loss-mask``). The mask is read through the
    same document, sample and shuffle indices as the tokens, so the two always line up."""

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        masks = IndexedDataset(loss_mask_prefix(dataset_path))
        if not np.array_equal(masks.sequence_lengths, indexed_dataset.sequence_lengths):
            raise ValueError(f"{loss_mask_prefix(dataset_path)} does not match {dataset_path} document for "
                             "document; make both again with `preprocess --loss-mask`")
        self._masks = copy.copy(self)  # shares the indices; reads the mask instead of the tokens
        self._masks.dataset = masks

    def __getitem__(self, idx):
        sample = super().__getitem__(idx)
        mask, _ = self._masks._query_document_sample_shuffle_indices(idx)
        # Sample i covers tokens [0, L] of which labels are [1, L]: the mask of a label is its own.
        sample["loss_mask"] = sample["loss_mask"] * torch.from_numpy(mask[1:] == 1).float()
        return sample


def dataset_tokenizer(prefix: str) -> dict | None:
    """The tokenizer identity recorded next to a dataset by the preprocessor (None if absent)."""
    path = f"{prefix}.json"
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tokenizer = json.load(f).get("tokenizer")
    return tokenizer if isinstance(tokenizer, dict) else None  # older sidecars named it only


def build_datasets(data_cfg, tokenizer: Tokenizer, seq_length: int, seed: int,
                   train_samples: int, valid_samples: int) -> tuple[GPTDataset, GPTDataset]:
    """Train and validation sets over ``data.paths`` blended by ``data.weights`` (None: in
    proportion to their sizes, as megatron-core does), each split by ``data.split``."""
    weights = None if data_cfg.weights is None else [float(w) for w in data_cfg.weights]
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(list(data_cfg.paths), weights),
        split=data_cfg.split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal attention is implied; SDPA uses its causal kernel
        path_to_cache=None,  # indices are cheap and deterministic: every rank builds its own
    )
    dataset_class = AssistantMaskedGPTDataset if data_cfg.loss_mask == "assistant" else GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(
        dataset_class, [train_samples, valid_samples, 0], lambda: True, config
    ).build()
    return train, valid


def _collate(samples: list[dict]) -> dict:
    return {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask", "position_ids")}


def micro_batches(dataset, order: SampleOrder, consumed_samples: int = 0) -> Iterator[dict]:
    """Endless micro-batches for this data-parallel rank, starting after ``consumed_samples``."""
    return order.micro_batches(consumed_samples, lambda samples: _collate([dataset[i % len(dataset)] for i in samples]))
