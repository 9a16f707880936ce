"""Transfer evaluation and embedding geometry: the kNN, probe and TF-IDF numbers are
scikit-learn's run directly on the same inputs (kNN also a vote computed here); the anisotropy
metrics take their known values on constructed embeddings; centring and whitening do what they
say."""

import numpy as np
import pytest
import torch

from thann.inference.embedding import apply_statistics, output_statistics
from thann.recipes.contrastive.transfer import alignment, anisotropy, classification, tfidf_classification


def _clustered(rng, n_train, n_test, classes=4, dim=16):
    """Noisy points around one random centre per class, shifted by a shared offset (anisotropic,
    as pooled hidden states are): (train_x, train_y, test_x, test_y)."""
    centres = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, size=n_train + n_test)
    points = centres[labels] + 1.2 * rng.normal(size=(n_train + n_test, dim)) + 1.0
    return points[:n_train], labels[:n_train], points[n_train:], labels[n_train:]


def test_knn_and_probe_equal_scikit_learn_run_directly():
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    train_x, train_y, test_x, test_y = _clustered(rng, 120, 60)
    got = classification(train_x, train_y, test_x, test_y, k=7)

    knn = KNeighborsClassifier(n_neighbors=7, metric="cosine").fit(train_x, train_y).score(test_x, test_y)
    # The same vote by hand: the 7 most cosine-similar training points, the most frequent label
    # (ties to the smallest label, as scikit-learn's mode).
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    nearest = np.argsort(-(unit(test_x) @ unit(train_x).T), axis=1)[:, :7]
    votes = np.array([np.bincount(train_y[row], minlength=4).argmax() for row in nearest])
    scaler = StandardScaler().fit(train_x)
    probe = LogisticRegression(max_iter=1000).fit(scaler.transform(train_x), train_y)
    assert got["knn_accuracy"] == knn == np.mean(votes == test_y)
    assert got["probe_accuracy"] == probe.score(scaler.transform(test_x), test_y)
    assert 0.25 < got["knn_accuracy"] < 1.0 and 0.25 < got["probe_accuracy"] < 1.0  # a task, not a given


def test_tfidf_baseline_equals_scikit_learn_run_directly():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(1)
    words = [["space", "orbit", "rocket", "nasa"], ["hockey", "goal", "season", "team"],
             ["windows", "driver", "disk", "file"]]
    filler = ["the", "a", "of", "and", "is", "it"]

    def texts(n):
        labels = rng.integers(0, 3, size=n)
        return [" ".join(rng.choice(words[y] + filler, size=12)) for y in labels], labels

    train_texts, train_y = texts(60)
    test_texts, test_y = texts(30)
    got = tfidf_classification(train_texts, train_y, test_texts, test_y, k=5)
    vectorizer = TfidfVectorizer(sublinear_tf=True).fit(train_texts)
    train_x, test_x = vectorizer.transform(train_texts), vectorizer.transform(test_texts)
    assert got["knn_accuracy"] == (KNeighborsClassifier(n_neighbors=5, metric="cosine").fit(train_x, train_y)
                                   .score(test_x, test_y))
    assert got["probe_accuracy"] == LogisticRegression(max_iter=1000).fit(train_x, train_y).score(test_x, test_y)


def test_anisotropy_of_identical_vectors():
    same = torch.tensor([[3.0, 4.0, 0.0]]).repeat(5, 1)  # normalised: (0.6, 0.8, 0)
    got = anisotropy(same)
    assert got["mean_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert got["uniformity"] == pytest.approx(0.0, abs=1e-12)  # log of exp(0): the most collapsed
    assert alignment(same, same) == pytest.approx(0.0, abs=1e-12)


def test_anisotropy_of_an_orthonormal_set():
    n = 6
    random = torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    basis = torch.linalg.qr(random)[0][:, :n].T  # 6 orthonormal rows in 10 dimensions
    got = anisotropy(basis)
    assert got["mean_cosine"] == pytest.approx(0.0, abs=1e-12)
    assert got["uniformity"] == pytest.approx(-4.0, abs=1e-12)  # every distance squared is 2: log exp(-2·2)
    # Centred, n orthonormal vectors span n-1 directions of equal variance.
    assert got["top_pc_share"] == pytest.approx(1.0 / (n - 1), abs=1e-12)
    assert alignment(basis[:3], basis[3:]) == pytest.approx(2.0, abs=1e-12)


def test_top_component_share_of_two_points_and_of_a_circle():
    two = torch.tensor([[1.0, 0.0, 0.0]] * 3 + [[0.0, 0.6, 0.8]] * 5, dtype=torch.float64)
    assert anisotropy(two)["top_pc_share"] == pytest.approx(1.0, abs=1e-9)  # varies along one chord only
    # 8 points evenly around the unit circle of a plane: equal variance in two directions.
    angles = torch.arange(8, dtype=torch.float64) * torch.pi / 4
    circle = torch.stack([torch.cos(angles), torch.sin(angles), torch.zeros(8, dtype=torch.float64)], dim=1)
    assert anisotropy(circle)["top_pc_share"] == pytest.approx(0.5, abs=1e-9)


def test_whitening_gives_unit_covariance_and_centering_removes_the_mean():
    rng = np.random.default_rng(2)
    matrix = (rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8)) + 3.0).astype(np.float32)
    white = output_statistics(matrix, "whiten")
    decorrelated = (matrix - white["mean"]) @ white["transform"]
    np.testing.assert_allclose(np.cov(decorrelated.T), np.eye(8), atol=1e-6)
    centred = apply_statistics(matrix, output_statistics(matrix, "center"))
    expected = matrix.astype(np.float64) - matrix.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(centred, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)


def test_dropout_pairs_are_one_span_twice(tiny_corpus):
    """data.kind=dropout: the positive is the query itself (dropout makes the views differ), a
    contiguous span of its document ending in the end-of-document token; data.kind=spans draws the
    same first span and another one."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from thann.data.pairs import SpanPairDataset
    from thann.data.tokenizer import build_tokenizer

    eod, documents = build_tokenizer("tiktoken", "cl100k_base").eod, np.arange(20)
    same = SpanPairDataset(tiny_corpus, documents, 64, 7, eod, same_span=True)
    two = SpanPairDataset(tiny_corpus, documents, 64, 7, eod)
    tokens = IndexedDataset(tiny_corpus)
    differ = 0
    for i in range(len(documents)):
        pair = same[i]
        assert pair["query"] == pair["positive"] and pair["negatives"] == []
        body, document = pair["query"][:-1], [int(t) for t in tokens[int(documents[i])]]
        assert pair["query"][-1] == eod and len(pair["query"]) <= 64
        assert any(document[s:s + len(body)] == body for s in range(len(document) - len(body) + 1))
        assert two[i]["query"] == pair["query"]
        differ += two[i]["positive"] != pair["query"]
    assert differ >= 15
