"""The image-text objective and its retrieval metrics, on whole (gathered) batches.

Symmetric InfoNCE with several positives (CLIP's loss where an image may have several captions
and a caption several images): for image i, with P(i) the texts of its group,

    loss_i = logsumexp_j s_ij - logsumexp_{j in P(i)} s_ij,        s = scale · images · textsᵀ

(the negative log of the probability the softmax over all texts puts on its positives), the mean
over images, and the same from each text to the images; the loss is the mean of both directions.
With one positive per row it is CLIP's cross-entropy.
"""

import torch


def symmetric_info_nce(images: torch.Tensor, texts: torch.Tensor, image_groups: torch.Tensor,
                       text_groups: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, image-to-text accuracy: the share of images whose best text is a positive)."""
    scores = images.float() @ texts.float().T * scale
    positive = image_groups[:, None] == text_groups[None, :]

    def one_way(s, p):
        return (torch.logsumexp(s, dim=1) - torch.logsumexp(s.masked_fill(~p, float("-inf")), dim=1)).mean()

    loss = (one_way(scores, positive) + one_way(scores.T, positive.T)) / 2
    best = scores.argmax(dim=1)
    return loss, positive[torch.arange(len(best), device=best.device), best].float().mean()


def recall_at(scores: torch.Tensor, positive: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """recall@k of each row: 1 if one of its positives is among its k best columns (a negative
    tied with the best positive counts as better), averaged over rows."""
    best_positive = scores.masked_fill(~positive, float("-inf")).max(dim=1).values
    rank = (scores.masked_fill(positive, float("-inf")) >= best_positive[:, None]).sum(dim=1) + 1
    return {f"recall@{k}": (rank <= k).float().mean().item() for k in ks}
