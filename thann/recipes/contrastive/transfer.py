"""Transfer evaluation, MTEB-style: how useful embeddings are for a task the stage never trained
on, and how their geometry looks.

- **Classification** on a fixed subset of 20 Newsgroups (``TransferSet``: the first ``train``
  texts of a fixed permutation of its train split, the first ``test`` of its test split, 20
  classes; the same texts in every run, whatever its seed): kNN accuracy (cosine, majority vote
  of ``k`` neighbours) and a logistic-regression probe on the frozen embeddings (standardised
  first: the probe asks what is linearly decodable, kNN what the geometry gives), both with
  scikit-learn. TF-IDF vectors of the same texts (the same truncated tokens, decoded) are the
  lexical baseline, through the same kNN and, unscaled, the same probe.
- **Anisotropy**: the mean cosine of distinct texts, the share of variance in the top principal
  component, uniformity (log of the mean Gaussian potential exp(-2·|x-y|²) over distinct texts)
  and alignment (mean |x-y|² over positive pairs), as in Wang & Isola (2020).
"""

from dataclasses import dataclass

import numpy as np
import torch

from thann.data.pairs import fit_text

_SUBSET_SEED = 20  # fixes which texts form the subset: every run evaluates the same ones


@dataclass(frozen=True)
class TransferSet:
    train_texts: list[list[int]]  # token ids, each ending in the end-of-document token
    train_labels: np.ndarray
    test_texts: list[list[int]]
    test_labels: np.ndarray

    @classmethod
    def newsgroups20(cls, train: int, test: int, seq_length: int, tokenizer) -> "TransferSet":
        """The subsets as the run's ``tokenizer`` reads them: the classification cache holds
        cl100k ids, decoded and encoded again for any other tokenizer."""
        from thann.data.classification import load
        from thann.data.tokenizer import build_tokenizer

        cached = build_tokenizer("tiktoken", "cl100k_base")
        same = cached.fingerprint == tokenizer.fingerprint
        parts = []
        for split, size in (("train", train), ("test", test)):
            data = load("newsgroups20", split, max_tokens=seq_length - 1 if same else 4 * seq_length)
            chosen = np.random.default_rng(_SUBSET_SEED).permutation(len(data))[:size]
            ids = [data.inputs[i, : data.lengths[i]].numpy() for i in chosen]
            if not same:
                ids = [tokenizer.encode(cached.decode([int(t) for t in x])) for x in ids]
            parts.append(([fit_text(x, seq_length, tokenizer.eod) for x in ids], data.labels.numpy()[chosen]))
        (train_texts, train_labels), (test_texts, test_labels) = parts
        return cls(train_texts, train_labels, test_texts, test_labels)

    def split(self, embeddings: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of ``train_texts + test_texts`` as (train, test) arrays."""
        array = embeddings.float().cpu().numpy()
        return array[: len(self.train_texts)], array[len(self.train_texts):]


def knn_accuracy(train_x, train_y, test_x, test_y, k: int) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    return float(KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
                 .fit(train_x, train_y).score(test_x, test_y))


def probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Logistic regression; dense embeddings are standardised first, sparse TF-IDF is not."""
    from scipy.sparse import issparse
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = LogisticRegression(max_iter=1000)
    model = probe if issparse(train_x) else make_pipeline(StandardScaler(), probe)
    return float(model.fit(train_x, train_y).score(test_x, test_y))


def classification(train_x, train_y, test_x, test_y, k: int) -> dict[str, float]:
    return {"knn_accuracy": knn_accuracy(train_x, train_y, test_x, test_y, k),
            "probe_accuracy": probe_accuracy(train_x, train_y, test_x, test_y)}


def tfidf_classification(train_texts: list[str], train_y, test_texts: list[str], test_y, k: int) -> dict[str, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(sublinear_tf=True)
    return classification(vectorizer.fit_transform(train_texts), train_y, vectorizer.transform(test_texts), test_y, k)


def anisotropy(embeddings: torch.Tensor) -> dict[str, float]:
    """Mean cosine of distinct rows, top principal component's share of the variance, and
    uniformity, of embeddings [N, D] (rows L2-normalised here)."""
    x = torch.nn.functional.normalize(embeddings.double(), dim=1)
    n = x.size(0)
    distinct = ~torch.eye(n, dtype=torch.bool)
    cosine = (x @ x.T)[distinct]
    squared_distances = (2 - 2 * cosine).clamp(min=0)
    variances = torch.linalg.eigvalsh(torch.cov(x.T))  # ascending
    total = variances.sum()
    return {"mean_cosine": cosine.mean().item(),
            "top_pc_share": (variances[-1] / total).item() if total > 0 else float("nan"),
            "uniformity": torch.log(torch.exp(-2 * squared_distances).mean()).item()}


def alignment(queries: torch.Tensor, positives: torch.Tensor) -> float:
    """Mean squared distance between each query and its positive (rows L2-normalised here)."""
    q, p = (torch.nn.functional.normalize(e.double(), dim=1) for e in (queries, positives))
    return (q - p).pow(2).sum(dim=1).mean().item()
