"""Retrieval pairs for contrastive training, from indexed datasets.

Three sources (``data.kind``):

- ``pairs``: a dataset made by ``preprocess --pairs`` (or ``--corpus sharegpt_pairs``); each of
  its documents is the sequences query, positive, negatives..., each ending in the
  end-of-document token.
- ``spans``: any plain indexed dataset; a pair is two independent random spans of one document
  (the unsupervised form), drawn from a stream of the sample's index, so the same sample is the
  same pair in every layout and after a resume.
- ``dropout``: any plain indexed dataset; a pair is one random span twice, the two made different
  only by the encoder's dropout masks (SimCSE, Gao et al. 2021).

A sample is a dict of token lists (query, positive, negatives); a micro-batch stacks M samples
as one [M·(2+K), S] batch of texts (queries, then positives, then K hard negatives per query),
right-padded with the end-of-document token, with their lengths. Samples reach data-parallel
ranks in the one order (thann.data.order): the position is consumed samples.
"""

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from thann.data.order import SampleOrder

KINDS = ("pairs", "spans", "dropout")


def split_documents(num_documents: int, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation document indices: a seeded permutation cut by the split weights."""
    weights = np.array([float(w) for w in str(split).split(",")])
    order = np.random.default_rng(seed).permutation(num_documents)
    train_end = int(round(num_documents * weights[0] / weights.sum()))
    valid_end = train_end + max(1, int(round(num_documents * weights[1] / weights.sum())))
    return np.sort(order[:train_end]), np.sort(order[train_end:valid_end])


def fit_text(ids: np.ndarray, seq_length: int, eod: int) -> list[int]:
    """A text as at most seq_length tokens, always ending in the end-of-document token (the
    position last-token pooling reads)."""
    ids = [int(t) for t in ids]
    if ids and ids[-1] == eod:
        ids = ids[:-1]
    return ids[: seq_length - 1] + [eod]


class PairDataset:
    def __init__(self, prefix: str, documents: np.ndarray, seq_length: int, hard_negatives: int, eod: int):
        self.data = IndexedDataset(prefix)
        self.documents, self.seq_length, self.hard_negatives, self.eod = documents, seq_length, hard_negatives, eod

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> dict:
        first = int(self.data.document_indices[self.documents[index]])
        texts = [fit_text(self.data[first + i], self.seq_length, self.eod) for i in range(2 + self.hard_negatives)]
        return {"query": texts[0], "positive": texts[1], "negatives": texts[2:]}


class SpanPairDataset:
    def __init__(self, prefix: str, documents: np.ndarray, seq_length: int, seed: int, eod: int,
                 same_span: bool = False):
        self.data = IndexedDataset(prefix)
        self.documents, self.seq_length, self.seed, self.eod = documents, seq_length, seed, eod
        self.same_span = same_span

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> dict:
        tokens = self.data[int(self.documents[index])]
        tokens = tokens[:-1] if len(tokens) and tokens[-1] == self.eod else tokens
        rng = np.random.default_rng([self.seed, index])
        longest = max(1, min(self.seq_length - 1, len(tokens) // 2))
        spans = []
        for _ in range(1 if self.same_span else 2):
            length = int(rng.integers(max(1, longest // 2), longest + 1))
            start = int(rng.integers(0, len(tokens) - length + 1))
            spans.append(fit_text(tokens[start:start + length], self.seq_length, self.eod))
        return {"query": spans[0], "positive": spans[-1], "negatives": []}


class Sampler:
    """Sample ``i`` of the run -> an item of the dataset, reshuffled every epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._epoch, self._order = None, None

    def __call__(self, i: int) -> int:
        epoch, position = divmod(i, self.size)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return int(self._order[position])


def pad_texts(texts: list[list[int]], seq_length: int, eod: int) -> dict:
    """Texts as one batch: ``tokens`` [N, S] right-padded with ``eod``, and their ``lengths``."""
    tokens = torch.full((len(texts), seq_length), eod, dtype=torch.long)
    for row, ids in enumerate(texts):
        tokens[row, : len(ids)] = torch.tensor(ids)
    return {"tokens": tokens, "lengths": torch.tensor([len(t) for t in texts])}


def collate(samples: list[dict], seq_length: int, eod: int) -> dict:
    return pad_texts([s["query"] for s in samples] + [s["positive"] for s in samples]
                     + [n for s in samples for n in s["negatives"]], seq_length, eod)


def pair_batches(dataset, order: SampleOrder, consumed_samples: int, seed: int, seq_length: int, eod: int):
    """Endless micro-batches of pairs for this data-parallel rank, after ``consumed_samples``."""
    sample = Sampler(len(dataset), seed)
    return order.micro_batches(consumed_samples,
                               lambda samples: collate([dataset[sample(i)] for i in samples], seq_length, eod))
