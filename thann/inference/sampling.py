"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p, each row
from a random stream of its own (so a sequence's tokens do not depend on what it is batched
with, nor on the parallel layout)."""

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: every token
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    seed: int = 1234
    stop_strings: tuple[str, ...] = ()

    def check(self) -> None:
        """Raises ValueError naming the first bad field."""
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: must be an integer >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r}: must be >= 0 (0 is greedy)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1]")


def row_generator(seed: int, row: int) -> torch.Generator:
    """The random stream of sequence ``row`` (its index among all prompts of a request)."""
    digest = hashlib.sha256(f"{seed}:{row}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def without_unused(logits: torch.Tensor, unused_ids: tuple[int, ...]) -> torch.Tensor:
    """``logits`` (last axis: the tokenizer's ids) with the ids no token has at -inf: never
    chosen, probability 0 (a model trained on text gives them little, not nothing)."""
    if not unused_ids:
        return logits
    return logits.index_fill(-1, torch.tensor(unused_ids, device=logits.device), float("-inf"))


def choose(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token from one row's logits (float32, real vocabulary only)."""
    if params.temperature == 0:
        return int(logits_V.argmax())
    scores = logits_V.float().cpu() / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1:
        sorted_scores, order = scores.sort(descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = (cumulative - sorted_scores.softmax(-1)) >= params.top_p
        scores[order[drop]] = float("-inf")
    # Inverse CDF with one uniform draw: the first token whose cumulative probability exceeds it
    # (torch.multinomial takes ~10-30 ms per row over a 100k vocabulary on 2 CPU cores; this, ~1 ms).
    cdf = scores.softmax(-1).cumsum(-1)
    u = torch.rand((), generator=generator) * cdf[-1]
    return int(torch.searchsorted(cdf, u, right=True).clamp(max=cdf.numel() - 1))
