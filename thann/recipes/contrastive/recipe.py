"""Contrastive pretraining: THANN as an embedding model (pretrain_contrastive.py).

One trainable slot, ``model``: THANN's decoder with a pooled-embedding head (``thann_encoder``),
optionally started from a pretraining checkpoint (``init_from``: its decoder; the head is new).
The encoder maps a text to an L2-normalised vector. The loss is InfoNCE over the whole global
batch: each query against every positive and hard negative of every micro-batch on every
data-parallel rank, scaled by 1/temperature (fixed, or learnt as a parameter of the head). Memory
stays that of one micro-batch (GradCache: StepContext.grad_cache).

Evaluation at every interval: recall@1/10, MRR@10 and nDCG@10 of the held-out pairs' queries
against a pool of their positives; transfer to a task the stage never trains on (kNN and
logistic-probe accuracy on a fixed subset of 20 Newsgroups) and the embeddings' anisotropy
(transfer.py). Each for the model, for the starting model's pooled hidden states (kept in the
checkpoint, so a resumed run still reports them) and, for the tasks, for a lexical baseline on the
same texts (BM25, TF-IDF).
"""

import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.utils import unwrap_model
from omegaconf import DictConfig, OmegaConf

from thann.config import require
from thann.data.checks import check_tokenizer
from thann.data.datasets import dataset_tokenizer
from thann.data.order import SampleOrder
from thann.data.pairs import KINDS, PairDataset, SpanPairDataset, pair_batches, split_documents
from thann.inference.embedding import embed_texts, encode
from thann.models import registry
from thann.parallel import state
from thann.recipes.contrastive.retrieval import bm25_ranks, embedding_ranks, metrics_from_ranks
from thann.recipes.contrastive.transfer import TransferSet, alignment, anisotropy, classification, tfidf_classification
from thann.training.recipe import Recipe
from thann.training.slots import SlotSpec


def encoder_args(cfg: DictConfig) -> DictConfig:
    """The encoder the registry builds: the model config with the contrastive head."""
    c = cfg.contrastive
    return OmegaConf.create({**OmegaConf.to_container(cfg.model, resolve=True), "arch": "thann_encoder",
                             "pooling": c.pooling, "projection_dim": c.projection_dim,
                             "learnt_temperature": c.temperature if c.learnable_temperature else None})


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


class Contrastive(Recipe):
    name = "contrastive"

    @staticmethod
    def check(cfg: DictConfig, dp: int) -> None:
        require(cfg.model.get("arch", "thann") == "thann", "model.arch", cfg.model.get("arch"),
                "the contrastive encoder is THANN's decoder")
        args = encoder_args(cfg)
        registry.spec_of(args).check(args, cfg.parallel, cfg.train.recompute)
        c = cfg.contrastive
        require(c.temperature > 0, "contrastive.temperature", c.temperature, "must be positive")
        require(isinstance(c.hard_negatives, int) and c.hard_negatives >= 0, "contrastive.hard_negatives",
                c.hard_negatives, "must be an integer >= 0")
        require(isinstance(c.eval_pool, int) and c.eval_pool >= 10, "contrastive.eval_pool", c.eval_pool,
                "must be an integer >= 10 (metrics @10)")
        require(isinstance(cfg.train.seq_length, int) and cfg.train.seq_length > 1, "train.seq_length",
                cfg.train.seq_length, "must be an integer > 1")
        t = c.transfer
        for key in ("train", "test", "k"):
            require(isinstance(t[key], int) and t[key] >= 1, f"contrastive.transfer.{key}", t[key],
                    "must be an integer >= 1")
        require(t.k <= t.train, "contrastive.transfer.k", t.k, f"must be at most transfer.train={t.train}")
        _check_data(cfg)

    @staticmethod
    def slots(cfg: DictConfig) -> dict:
        return {"model": SlotSpec(encoder_args(cfg), vocab_size=check_tokenizer(cfg.data).vocab_size,
                                  seq_length=cfg.train.seq_length, optim=cfg.train,
                                  init=None if cfg.init_from is None else str(cfg.init_from), init_strict=False)}

    def __init__(self, cfg: DictConfig, layout):
        super().__init__(cfg, layout)
        self.contrastive = cfg.contrastive
        self.tokenizer = _check_data(cfg)
        train, data = cfg.train, cfg.data
        self.texts_per_sample = 2 + self.contrastive.hard_negatives
        self.texts_per_micro_batch = train.micro_batch_size * self.texts_per_sample
        self.tokens_per_sample = self.texts_per_sample * train.seq_length
        self.order = SampleOrder.of(layout, train.global_batch_size, train.micro_batch_size)
        prefix = data.paths[0]
        indexed = IndexedDataset(prefix)
        documents = indexed.document_indices.size - 1 if data.kind == "pairs" else len(indexed)
        train_docs, valid_docs = split_documents(documents, data.split, train.seed)
        eod = self.tokenizer.eod
        if data.kind == "pairs":
            def make(docs, negatives, same_span=False):
                return PairDataset(prefix, docs, train.seq_length, negatives, eod)
        else:
            def make(docs, negatives, same_span=False):
                return SpanPairDataset(prefix, docs, train.seq_length, train.seed, eod, same_span)
        # Dropout positives are trained on; held-out pairs are two spans, since a text is its own
        # nearest neighbour without dropout.
        self.train_set = make(train_docs, self.contrastive.hard_negatives, same_span=data.kind == "dropout")
        self.valid_set = make(valid_docs, self.contrastive.hard_negatives)
        pool = make(valid_docs[: self.contrastive.eval_pool], 0)
        pairs = [pool[i] for i in range(len(pool))]
        self.pool_queries, self.pool_candidates = [p["query"] for p in pairs], [p["positive"] for p in pairs]
        t = self.contrastive.transfer
        self.transfer = TransferSet.newsgroups20(t.train, t.test, train.seq_length, self.tokenizer)
        self.start_metrics: dict[str, float] = {}
        self.lexical_metrics: dict[str, float] = {}

    def state(self) -> dict:
        return {"start_metrics": self.start_metrics}

    def load_state(self, saved: dict) -> None:
        self.start_metrics = dict(saved["start_metrics"])

    # -- the step -----------------------------------------------------------------------------------

    def _scale(self, model_chunks: list) -> torch.Tensor:
        """1/temperature: the head's learnt value (at most 100, as CLIP's), or the configured one."""
        if self.contrastive.learnable_temperature:
            return unwrap_model(model_chunks[-1]).pooled_embedding.log_scale.float().clamp(max=math.log(100)).exp()
        return torch.tensor(1.0 / self.contrastive.temperature, device=state.device())

    def info_nce(self, embeddings: list[torch.Tensor], model_chunks: list):
        """InfoNCE of the global batch from this rank's micro-batches' embeddings (every
        data-parallel rank computes the same loss, with gradients for its own embeddings)."""
        M, group = self.order.micro_batch_size, parallel_state.get_data_parallel_group()
        dp = dist.get_world_size(group)
        queries = torch.cat([e[:M] for e in embeddings])
        candidates = torch.cat([torch.cat([e[M:2 * M] for e in embeddings]),
                                torch.cat([e[2 * M:] for e in embeddings])])
        gathered_q = [torch.empty_like(queries) for _ in range(dp)]
        gathered_c = [torch.empty_like(candidates) for _ in range(dp)]
        dist.all_gather(gathered_q, queries.detach(), group=group)
        dist.all_gather(gathered_c, candidates.detach(), group=group)
        rank = dist.get_rank(group)
        gathered_q[rank], gathered_c[rank] = queries, candidates  # this rank's: with their gradient
        n = queries.size(0)
        positives = torch.cat([c[:n] for c in gathered_c])  # query i's positive is candidate i
        negatives = torch.cat([c[n:] for c in gathered_c])
        scores = torch.cat(gathered_q) @ torch.cat([positives, negatives]).T * self._scale(model_chunks)
        target = torch.arange(scores.size(0), device=scores.device)
        loss = F.cross_entropy(scores, target)
        correct = (scores.argmax(dim=1) == target).sum()
        report = {"contrastive_loss": torch.stack([loss.detach(), torch.ones_like(loss)]),
                  "batch_accuracy": torch.stack([correct.float(), torch.tensor(float(scores.size(0)))]).to(loss.device)}
        return loss, report

    def _means(self, ctx, batches, forward_only: bool, num_microbatches: int | None = None) -> dict[str, float]:
        chunks = ctx.slots["model"].chunks
        return ctx.grad_cache({"model": lambda batch, model: encode(batch, model)},
                              lambda embeddings: self.info_nce(embeddings["model"], chunks), batches,
                              num_microbatches=num_microbatches, micro_batch_size=self.texts_per_micro_batch,
                              forward_only=forward_only)

    def train_batches(self, consumed_samples: int):
        return pair_batches(self.train_set, self.order, consumed_samples, self.cfg.train.seed,
                            self.cfg.train.seq_length, self.tokenizer.eod)

    def step(self, ctx, batches) -> dict[str, float]:
        means = self._means(ctx, batches, forward_only=False)
        loss = means["contrastive_loss"]
        return {"loss": loss, **means, "grad_norm": ctx.optimizer_step("model", loss)}

    # -- evaluation ---------------------------------------------------------------------------------

    def _embed_texts(self, model_chunks: list, texts: list[list[int]], project: bool) -> torch.Tensor:
        c = self.contrastive
        dim = c.projection_dim if project and c.projection_dim else self.cfg.model.hidden_size
        return embed_texts(model_chunks, texts, self.texts_per_micro_batch, self.cfg.train.seq_length,
                           self.tokenizer.eod, dim, project)

    def _embedding_metrics(self, chunks: list, project: bool) -> dict[str, float]:
        """Retrieval on the pool, transfer classification and anisotropy of one embedding."""
        queries = self._embed_texts(chunks, self.pool_queries, project)
        candidates = self._embed_texts(chunks, self.pool_candidates, project)
        t = self.transfer
        transfer = self._embed_texts(chunks, t.train_texts + t.test_texts, project)
        train_x, test_x = t.split(transfer)
        return {**metrics_from_ranks(embedding_ranks(queries, candidates)),
                **classification(train_x, t.train_labels, test_x, t.test_labels, self.contrastive.transfer.k),
                **anisotropy(transfer), "alignment": alignment(queries, candidates)}

    def _lexical_metrics(self) -> dict[str, float]:
        """BM25 on the pool and TF-IDF on the transfer task, from the texts the model reads."""
        decode, t = self.tokenizer.decode, self.transfer
        bm25 = metrics_from_ranks(bm25_ranks([decode(q[:-1]) for q in self.pool_queries],
                                             [decode(c[:-1]) for c in self.pool_candidates]))
        tfidf = tfidf_classification([decode(x[:-1]) for x in t.train_texts], t.train_labels,
                                     [decode(x[:-1]) for x in t.test_texts], t.test_labels, self.contrastive.transfer.k)
        return {**{f"bm25_{k}": v for k, v in bm25.items()}, **{f"tfidf_{k}": v for k, v in tfidf.items()}}

    def evaluate(self, ctx) -> dict[str, float]:
        valid = pair_batches(self.valid_set, self.order, 0, self.cfg.train.seed + 1, self.cfg.train.seq_length,
                             self.tokenizer.eod)
        means = self._means(ctx, valid, forward_only=True,
                            num_microbatches=self.cfg.train.eval_iters * self.order.num_microbatches)
        chunks = ctx.slots["model"].chunks
        metrics = self._embedding_metrics(chunks, project=True)
        if not self.start_metrics:  # the first evaluation of a fresh run: the starting weights
            # Without a projection the model's embeddings are its pooled states.
            self.start_metrics = (self._embedding_metrics(chunks, project=False) if self.contrastive.projection_dim
                                  else dict(metrics))
        if self.contrastive.learnable_temperature and parallel_state.is_pipeline_last_stage():
            metrics["temperature"] = 1.0 / self._scale(chunks).item()
        if not self.lexical_metrics:
            self.lexical_metrics = self._lexical_metrics()
        return {"loss": means["contrastive_loss"], **means, **metrics,
                **{f"start_{k}": v for k, v in self.start_metrics.items()}, **self.lexical_metrics}
