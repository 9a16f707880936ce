"""Embeddings of texts with an encoder (thann.models.thann.encoder) and of images with an image
encoder (thann.models.vit), in any parallel layout, and their optional centering or whitening."""

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from thann.data.pairs import pad_texts
from thann.parallel import state


def encode(batch: dict, model, project: bool = True) -> torch.Tensor:
    """One micro-batch of texts (``tokens`` [B, S], ``lengths`` [B]) through one pipeline stage."""
    tokens = batch["tokens"].to(state.device())
    positions = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)
    return model(tokens, positions, batch["lengths"].to(state.device()), project=project)


@torch.no_grad()
def embed_texts(model_chunks: list, texts: list[list[int]], micro_batch_size: int, seq_length: int, eod: int,
                dim: int, project: bool = True) -> torch.Tensor:
    """Embeddings [N, dim] of token lists (each ending in ``eod``), on every rank. Every
    data-parallel replica that calls this embeds all of ``texts``; the pipeline passes fixed
    shapes, so the last micro-batch is padded with copies of its last text."""
    return _embed_all(model_chunks, texts, lambda chunk: pad_texts(chunk, seq_length, eod),
                      lambda batch, model: encode(batch, model, project), micro_batch_size, seq_length, dim)


def encode_images(batch: dict, model, project: bool = True) -> torch.Tensor:
    """One micro-batch of images (``images`` [B, 3, H, W] floats) through an image encoder."""
    return model(batch["images"].to(state.device()), project=project)


@torch.no_grad()
def embed_images(model_chunks: list, images: torch.Tensor, micro_batch_size: int, dim: int,
                 project: bool = True) -> torch.Tensor:
    """Embeddings [N, dim] of images [N, 3, H, W] (thann.data.images.to_tensor), on every rank."""
    return _embed_all(model_chunks, list(images), lambda chunk: {"images": torch.stack(chunk)},
                      lambda batch, model: encode_images(batch, model, project), micro_batch_size, 1, dim)


def _embed_all(model_chunks: list, items: list, collate, forward, micro_batch_size: int, seq_length: int,
               dim: int) -> torch.Tensor:
    outputs = []
    for start in range(0, len(items), micro_batch_size):
        chunk = items[start:start + micro_batch_size]
        batch = collate(chunk + chunk[-1:] * (micro_batch_size - len(chunk)))

        def step(data_iterator, model):
            return forward(next(data_iterator), model), lambda out, non_loss_data=False: out

        collected = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([batch]), model=model_chunks, num_microbatches=1,
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True, collect_non_loss_data=True)
        last = parallel_state.is_pipeline_last_stage()
        result = collected[0].float() if last else torch.zeros(micro_batch_size, dim, device=state.device())
        dist.broadcast(result, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        outputs.append(result[: len(chunk)])
    return torch.cat(outputs)


POSTPROCESSING = ("none", "center", "whiten")


def output_statistics(matrix: np.ndarray, postprocess: str) -> dict[str, np.ndarray]:
    """What ``postprocess`` subtracts and multiplies by, from embeddings [N, D]: their mean and
    the identity (``center``), or their mean and U·diag(1/sqrt(S)) from the SVD of their
    covariance, which decorrelates the dimensions and gives each unit variance (``whiten``, as
    BERT-whitening: Su et al. 2021). Anisotropic embeddings share one dominant direction that
    cosine similarity then mostly measures; both take it out."""
    mean = matrix.mean(axis=0, dtype=np.float64)
    if postprocess == "center":
        return {"mean": mean, "transform": np.eye(matrix.shape[1])}
    u, s, _ = np.linalg.svd(np.cov(matrix.T.astype(np.float64)))
    return {"mean": mean, "transform": u / np.sqrt(s)}


def apply_statistics(matrix: np.ndarray, statistics: dict[str, np.ndarray]) -> np.ndarray:
    """(matrix - mean) · transform, rows L2-normalised again, float32."""
    out = (matrix.astype(np.float64) - statistics["mean"]) @ statistics["transform"]
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)
