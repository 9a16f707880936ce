"""How well a generated caption names an image: exact match and token-level F1 (SQuAD's) against
the best-matching of its reference captions, after lower-casing and collapsing white space."""

from collections import Counter


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def token_f1(predicted: str, reference: str) -> float:
    p, r = normalise(predicted).split(), normalise(reference).split()
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean exact match and mean F1 over images, each against its best reference."""
    exact = [any(normalise(p) == normalise(r) for r in refs) for p, refs in zip(predictions, references)]
    f1 = [max(token_f1(p, r) for r in refs) for p, refs in zip(predictions, references)]
    return {"exact": sum(exact) / len(exact), "f1": sum(f1) / len(f1)}
