"""Retrieval metrics over a candidate pool where query i's one relevant candidate is candidate i:
recall@1, recall@10, MRR@10 and nDCG@10, from any ranking (embeddings or BM25)."""

import numpy as np
import torch


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """``ranks[i]``: the 1-based rank of query i's relevant candidate."""
    ranks = np.asarray(ranks, dtype=np.float64)
    top10 = ranks <= 10
    return {
        "recall@1": float(np.mean(ranks <= 1)),
        "recall@10": float(np.mean(top10)),
        "mrr@10": float(np.mean(np.where(top10, 1.0 / ranks, 0.0))),
        # One relevant candidate: the ideal DCG is 1, so nDCG is the discount at its rank.
        "ndcg@10": float(np.mean(np.where(top10, 1.0 / np.log2(ranks + 1), 0.0))),
    }


def embedding_ranks(queries: torch.Tensor, candidates: torch.Tensor) -> np.ndarray:
    """Ranks by cosine similarity of L2-normalised embeddings (ties counted against the query)."""
    scores = queries.float() @ candidates.float().T
    relevant = scores.diagonal().unsqueeze(1)
    return ((scores >= relevant).sum(dim=1)).cpu().numpy()


def bm25_ranks(queries: list[str], candidates: list[str]) -> np.ndarray:
    """Ranks by BM25 (the ``bm25s`` package, English stopwords removed); ties, such as candidates
    sharing no word with the query, are counted against the query, as for embeddings."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(candidates, stopwords="en", show_progress=False), show_progress=False)
    documents, scores = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False),
                                           k=len(candidates), show_progress=False)
    relevant = scores[np.arange(len(queries)), np.argmax(documents == np.arange(len(queries))[:, None], axis=1)]
    return (scores >= relevant[:, None]).sum(axis=1)
