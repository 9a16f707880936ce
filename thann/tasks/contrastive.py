"""Contrastive pretraining: THANN as an embedding model (pretrain_contrastive.py).

The encoder (thann.models.thann.encoder) maps a text to an L2-normalised vector. The loss is
InfoNCE over the whole global batch: each query against every positive and hard negative of
every micro-batch on every data-parallel rank, scaled by 1/temperature (fixed, or learnt as a
parameter of the head). Memory stays that of one micro-batch (GradCache, thann.training.steps).

Evaluation at every interval: recall@1/10, MRR@10 and nDCG@10 of the held-out pairs' queries
against a pool of their positives, for the model, for the starting model's pooled hidden states
(kept in the checkpoint, so a resumed run still reports them) and for BM25 on the same texts.
"""

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.utils import unwrap_model
from omegaconf import DictConfig

from thann.checkpoint.parts import PlainPart
from thann.config import require
from thann.data.checks import check_tokenizer
from thann.data.datasets import Batching, dataset_tokenizer
from thann.data.pairs import KINDS, PairDataset, SpanPairDataset, pair_batches, split_documents
from thann.data.tokenizer import padded_vocab_size
from thann.inference.embedding import embed_texts, encode
from thann.models.common.heads import POOLINGS
from thann.models.thann.checks import check_layout, check_model, check_recompute
from thann.models.thann.encoder import ThannEncoder
from thann.models.thann.model import tracked_aux_loss, transformer_config
from thann.models.thann.size import model_size
from thann.parallel import state
from thann.tasks.retrieval import bm25_ranks, embedding_ranks, metrics_from_ranks
from thann.training import steps
from thann.training.task import Task


def _check_data(cfg: DictConfig):
    data, contrastive = cfg.data, cfg.contrastive
    require(data.kind in KINDS, "data.kind", data.kind, f"must be one of {list(KINDS)}")
    require(len(data.paths) == 1, "data.paths", list(data.paths), "contrastive training reads one dataset")
    tokenizer = check_tokenizer(data)
    prefix = data.paths[0]
    missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if not os.path.isfile(p)]
    hint = "--corpus sharegpt_pairs (or --input PAIRS.jsonl --pairs)" if data.kind == "pairs" else "--input ..."
    require(not missing, "data.paths[0]", prefix, f"no indexed dataset there (missing {', '.join(missing)}); "
            f"create it with `python -m thann.data.preprocess {hint}`")
    recorded = dataset_tokenizer(prefix)
    require(recorded is None or recorded.get("fingerprint") == tokenizer.fingerprint, "data.paths[0]", prefix,
            f"was tokenized with {recorded and recorded.get('model')}, not data.tokenizer={data.tokenizer.model}")
    if data.kind == "pairs":
        indexed = IndexedDataset(prefix)  # named: its arrays are views of a memory map it closes when freed
        fewest = int(np.diff(indexed.document_indices).min()) - 2
        require(fewest >= 0, "data.paths[0]", prefix, "holds plain documents, not pairs: use data.kind=spans "
                "or preprocess pairs with --pairs")
        require(contrastive.hard_negatives <= fewest, "contrastive.hard_negatives", contrastive.hard_negatives,
                f"some pairs of {prefix} have only {fewest} negatives")
    return tokenizer


def _check_init_from(cfg: DictConfig, tokenizer) -> None:
    from thann.inference.loading import checkpoint_path, saved_config, saved_run

    if cfg.init_from is None:
        return
    metadata = saved_run(checkpoint_path(str(cfg.init_from), "init_from"), "init_from")
    saved = metadata["tokenizer"]
    require(saved is not None and saved["fingerprint"] == tokenizer.fingerprint, "init_from", cfg.init_from,
            f"was trained with tokenizer {saved and saved['model']}, not data.tokenizer={cfg.data.tokenizer.model}")
    model = saved_config(metadata).model
    for field in ("arch", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "num_experts",
                  "moe_ffn_hidden_size", "normalization", "tie_embeddings"):
        require(model.get(field, "thann") == cfg.model[field], f"model.{field}", cfg.model[field],
                f"init_from={cfg.init_from} holds a model with {field}={model.get(field)}")
    require(list(model.tokenization.conv_widths) == list(cfg.model.tokenization.conv_widths),
            "model.tokenization.conv_widths", list(cfg.model.tokenization.conv_widths),
            f"init_from={cfg.init_from} has {list(model.tokenization.conv_widths)}")


class ContrastiveTask(Task):
    report_keys = ("contrastive_loss", "batch_accuracy")
    forward_backward = staticmethod(steps.grad_cache)

    @staticmethod
    def resumable_model_changes(cfg) -> tuple[str, ...]:
        return ("name", "dropout", "moe_aux_loss_coeff", "init_method_std")

    @staticmethod
    def check_config(cfg, dp: int) -> None:
        require(cfg.model.get("arch", "thann") == "thann", "model.arch", cfg.model.get("arch"),
                "the contrastive encoder is THANN's decoder")
        check_model(cfg.model)
        check_layout(cfg.model, cfg.parallel)
        check_recompute(cfg.train.recompute)
        c = cfg.contrastive
        require(c.pooling in POOLINGS, "contrastive.pooling", c.pooling, f"must be one of {list(POOLINGS)}")
        require(c.projection_dim is None or c.projection_dim > 0, "contrastive.projection_dim", c.projection_dim,
                "must be null or positive")
        require(c.temperature > 0, "contrastive.temperature", c.temperature, "must be positive")
        require(isinstance(c.hard_negatives, int) and c.hard_negatives >= 0, "contrastive.hard_negatives",
                c.hard_negatives, "must be an integer >= 0")
        require(isinstance(c.eval_pool, int) and c.eval_pool >= 10, "contrastive.eval_pool", c.eval_pool,
                "must be an integer >= 10 (metrics @10)")
        require(isinstance(cfg.train.seq_length, int) and cfg.train.seq_length > 1, "train.seq_length",
                cfg.train.seq_length, "must be an integer > 1")
        _check_init_from(cfg, _check_data(cfg))

    def __init__(self, cfg, layout, bf16: bool):
        self.cfg, self.contrastive = cfg, cfg.contrastive
        self.tokenizer = _check_data(cfg)
        self.vocab_size = padded_vocab_size(self.tokenizer.vocab_size, layout.tp)
        self.transformer_config = transformer_config(cfg.model, cfg.parallel, bf16=bf16, recompute=cfg.train.recompute)
        train, data = cfg.train, cfg.data
        self.pipeline_seq_length = train.seq_length
        self.texts_per_sample = 2 + self.contrastive.hard_negatives
        self.pipeline_micro_batch_size = train.micro_batch_size * self.texts_per_sample
        self.tokens_per_sample = self.texts_per_sample * train.seq_length
        self.flops_per_token = model_size(cfg.model, self.vocab_size).flops_per_token(
            cfg.model, self.vocab_size, train.seq_length)
        self.batching = Batching(train.global_batch_size, train.micro_batch_size, layout.dp,
                                 parallel_state.get_data_parallel_rank())
        prefix = data.paths[0]
        indexed = IndexedDataset(prefix)
        documents = indexed.document_indices.size - 1 if data.kind == "pairs" else len(indexed)
        train_docs, valid_docs = split_documents(documents, data.split, train.seed)
        eod = self.tokenizer.eod
        if data.kind == "pairs":
            def make(docs, negatives):
                return PairDataset(prefix, docs, train.seq_length, negatives, eod)
        else:
            def make(docs, negatives):
                return SpanPairDataset(prefix, docs, train.seq_length, train.seed, eod)
        self.train_set = make(train_docs, self.contrastive.hard_negatives)
        self.valid_set = make(valid_docs, self.contrastive.hard_negatives)
        pool = make(valid_docs[: self.contrastive.eval_pool], 0)
        pairs = [pool[i] for i in range(len(pool))]
        self.pool_queries, self.pool_candidates = [p["query"] for p in pairs], [p["positive"] for p in pairs]
        self.start_metrics: dict[str, float] = {}
        self.bm25_metrics: dict[str, float] = {}

    # -- model ---------------------------------------------------------------------------------

    def build_model(self, pre_process: bool, post_process: bool) -> ThannEncoder:
        c = self.contrastive
        return ThannEncoder(self.transformer_config, self.cfg.model, self.vocab_size, self.cfg.train.seq_length,
                            c.pooling, c.projection_dim, c.temperature if c.learnable_temperature else None,
                            pre_process=pre_process, post_process=post_process)

    def initialize(self, model_chunks: list) -> str | None:
        if self.cfg.init_from is None:
            return None
        from thann.inference.loading import checkpoint_path, load_weights

        path = checkpoint_path(str(self.cfg.init_from), "init_from")
        fresh = load_weights(model_chunks, path, strict=False)
        return f"initialised from {path} (new: {', '.join(fresh) or 'nothing'})"

    def checkpoint_parts(self) -> dict:
        def get() -> dict:
            return {"start_metrics": self.start_metrics}

        def put(saved: dict) -> None:
            self.start_metrics = dict(saved["start_metrics"])

        return {"contrastive": PlainPart(get, put)}

    # -- the step (thann.training.steps.grad_cache) -----------------------------------------------

    def embed(self, batch: dict, model):
        return encode(batch, model)

    def _scale(self, model_chunks: list) -> torch.Tensor:
        """1/temperature: the head's learnt value, or the configured one."""
        if self.contrastive.learnable_temperature:
            return unwrap_model(model_chunks[-1]).pooled_embedding.log_scale.float().exp()
        return torch.tensor(1.0 / self.contrastive.temperature, device=state.device())

    def embedding_loss(self, embeddings: list[torch.Tensor], forward_only: bool, model_chunks: list):
        """InfoNCE of the global batch from this rank's micro-batches' embeddings (every
        data-parallel rank computes the same loss); returns its report and the gradients of
        this rank's embeddings, scaled for megatron-core's averaging (see steps.grad_cache)."""
        M, group = self.batching.micro_batch_size, parallel_state.get_data_parallel_group()
        dp = dist.get_world_size(group)
        local = [e.detach().float().requires_grad_(not forward_only) for e in embeddings]
        queries = torch.cat([e[:M] for e in local])
        candidates = torch.cat([torch.cat([e[M:2 * M] for e in local]), torch.cat([e[2 * M:] for e in local])])
        gathered_q = [torch.empty_like(queries) for _ in range(dp)]
        gathered_c = [torch.empty_like(candidates) for _ in range(dp)]
        dist.all_gather(gathered_q, queries.detach(), group=group)
        dist.all_gather(gathered_c, candidates.detach(), group=group)
        rank = dist.get_rank(group)
        gathered_q[rank], gathered_c[rank] = queries, candidates  # this rank's: with their gradient
        n = queries.size(0)
        positives = torch.cat([c[:n] for c in gathered_c])  # query i's positive is candidate i
        negatives = torch.cat([c[n:] for c in gathered_c])
        scale = self._scale(model_chunks)
        scores = torch.cat(gathered_q) @ torch.cat([positives, negatives]).T * scale
        target = torch.arange(scores.size(0), device=scores.device)
        loss = F.cross_entropy(scores, target)
        correct = (scores.argmax(dim=1) == target).sum()
        report = {"contrastive_loss": torch.stack([loss.detach(), torch.ones_like(loss)]),
                  "batch_accuracy": torch.stack([correct.float(), torch.tensor(float(scores.size(0)))]).to(loss.device)}
        if forward_only:
            return report, []
        loss.backward()
        # megatron-core divides each micro-batch's loss by their number and DDP averages ranks.
        factor = len(embeddings) * dp
        return report, [e.grad * factor for e in local]

    def forward_step(self, data_iterator, model):
        raise NotImplementedError("contrastive steps run through thann.training.steps.grad_cache")

    # -- data and metrics ----------------------------------------------------------------------

    def train_batches(self, consumed_samples: int):
        return pair_batches(self.train_set, self.batching, consumed_samples, self.cfg.train.seed,
                            self.cfg.train.seq_length, self.tokenizer.eod)

    def valid_batches(self):
        return pair_batches(self.valid_set, self.batching, 0, self.cfg.train.seed + 1, self.cfg.train.seq_length,
                            self.tokenizer.eod)

    def metrics(self, means: dict[str, float], split: str) -> dict[str, float]:
        """(With a learnt temperature the trainer's records show it as ``temperature``: see evaluate.)"""
        # grad_cache embeds every training micro-batch twice, but megatron-core's router records
        # the load-balancing loss only with gradients enabled (the second pass): one per micro-batch.
        aux = tracked_aux_loss(self.transformer_config, self.batching.num_microbatches)
        record = {"loss": means["contrastive_loss"], **means}
        if split == "train":
            record["aux_loss"] = aux
        return record

    def _embed_texts(self, model_chunks: list, texts: list[list[int]], project: bool) -> torch.Tensor:
        c = self.contrastive
        dim = c.projection_dim if project and c.projection_dim else self.cfg.model.hidden_size
        return embed_texts(model_chunks, texts, self.pipeline_micro_batch_size, self.cfg.train.seq_length,
                           self.tokenizer.eod, dim, project)

    def evaluate(self, model_chunks: list) -> dict[str, float]:
        queries = self._embed_texts(model_chunks, self.pool_queries, project=True)
        candidates = self._embed_texts(model_chunks, self.pool_candidates, project=True)
        metrics = metrics_from_ranks(embedding_ranks(queries, candidates))
        if self.contrastive.learnable_temperature and parallel_state.is_pipeline_last_stage():
            metrics["temperature"] = 1.0 / self._scale(model_chunks).item()
        if not self.start_metrics:
            pooled = [self._embed_texts(model_chunks, texts, project=False)
                      for texts in (self.pool_queries, self.pool_candidates)]
            self.start_metrics = metrics_from_ranks(embedding_ranks(*pooled))
        if not self.bm25_metrics:
            decode = self.tokenizer.decode
            self.bm25_metrics = metrics_from_ranks(bm25_ranks(
                [decode(q[:-1]) for q in self.pool_queries], [decode(c[:-1]) for c in self.pool_candidates]))
        return {**metrics, **{f"start_{k}": v for k, v in self.start_metrics.items()},
                **{f"bm25_{k}": v for k, v in self.bm25_metrics.items()}}
