"""Image-text contrastive training, CLIP-style (pretrain_image_text.py).

Two trainable slots: ``image``, a ViT (``image_model``, thann.models.vit), and ``text``, THANN's
decoder with a pooled-embedding head (``thann_encoder``), optionally started from a pretraining
checkpoint (``init_from``: its decoder; the head is new). Both project into one space of
``contrastive.projection_dim`` and L2-normalise. The loss is symmetric InfoNCE over the whole
global batch with several positives per image and per caption (a group's images and captions are
all positives: loss.py), scaled by 1/temperature (fixed, or learnt as a parameter of the image
head, at most 100 as CLIP's). Memory stays that of one micro-batch in both towers (GradCache over
the two slots: StepContext.grad_cache).

Data (thann.data.images): the emoji package's images and names, Fashion-MNIST's classes through
caption templates, or a user's caption file, its groups split into training and held-out ones.
Evaluation at every interval: the held-out loss, recall@1/5/10 from each held-out image to every
held-out caption and back, and (zero_shot.py) zero-shot Fashion-MNIST accuracy beside a linear
probe on the frozen image states, and zero-shot emoji-category accuracy of the held-out emoji.
"""

import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model
from omegaconf import DictConfig, OmegaConf

from thann.config import ConfigError, require
from thann.data.checks import check_tokenizer
from thann.data.images import EMOJI_SIZE, Captioned, ImageDataError, caption_file, captioned, to_tensor
from thann.data.order import SampleOrder
from thann.data.pairs import Sampler, pad_texts
from thann.inference.embedding import embed_images, embed_texts, encode, encode_images
from thann.models import registry
from thann.parallel import state
from thann.recipes.contrastive.transfer import probe_accuracy
from thann.recipes.image_text.loss import recall_at, symmetric_info_nce
from thann.recipes.image_text.zero_shot import EXCLUDED_CATEGORIES, FashionMNIST, captions
from thann.training.recipe import Recipe
from thann.training.slots import SlotSpec


def image_args(cfg: DictConfig) -> DictConfig:
    c = cfg.contrastive
    return OmegaConf.create({**OmegaConf.to_container(cfg.image_model, resolve=True),
                             "projection_dim": c.projection_dim,
                             "learnt_temperature": c.temperature if c.learnable_temperature else None})


def text_args(cfg: DictConfig) -> DictConfig:
    c = cfg.contrastive
    return OmegaConf.create({**OmegaConf.to_container(cfg.model, resolve=True), "arch": "thann_encoder",
                             "pooling": c.pooling, "projection_dim": c.projection_dim, "learnt_temperature": None})


class ImageText(Recipe):
    name = "image_text"
    primary = "image"

    @staticmethod
    def check(cfg: DictConfig, dp: int) -> None:
        require(cfg.model.get("arch", "thann") == "thann", "model.arch", cfg.model.get("arch"),
                "the text encoder is THANN's decoder")
        require(cfg.image_model.get("arch") == "vit", "image_model.arch", cfg.image_model.get("arch"),
                "the image encoder is a vit")
        c = cfg.contrastive
        require(isinstance(c.projection_dim, int) and c.projection_dim > 0, "contrastive.projection_dim",
                c.projection_dim, "must be a positive integer (the shared image-text space)")
        require(c.temperature > 0, "contrastive.temperature", c.temperature, "must be positive")
        for args in (image_args(cfg), text_args(cfg)):
            registry.spec_of(args).check(args, cfg.parallel, "none" if args.arch == "vit" else cfg.train.recompute)
        require(isinstance(cfg.train.seq_length, int) and cfg.train.seq_length > 1, "train.seq_length",
                cfg.train.seq_length, "must be an integer > 1")
        require(0 < cfg.data.heldout < 1, "data.heldout", cfg.data.heldout, "must be between 0 and 1")
        z = cfg.zero_shot
        for key in ("train", "test"):
            require(isinstance(z[key], int) and z[key] >= 10, f"zero_shot.{key}", z[key], "must be an integer >= 10")
        for key in ("fashion_templates", "category_templates"):
            require(len(z[key]) > 0 and all("{}" in t for t in z[key]), f"zero_shot.{key}", list(z[key]),
                    "must be a non-empty list of captions with {} where the class name goes")
        check_tokenizer(cfg.data)
        size = cfg.image_model.image_size
        if cfg.data.source == "emoji":
            require(cfg.data.resize or size == EMOJI_SIZE, "image_model.image_size", size,
                    f"the emoji images are {EMOJI_SIZE}x{EMOJI_SIZE}: use {EMOJI_SIZE} or data.resize=true")
            return
        if cfg.data.source == "fashion_mnist":
            templates = cfg.data.get("templates")
            require(bool(templates) and all("{}" in t for t in templates), "data.templates", templates,
                    "must be a non-empty list of captions with {} where the class name goes")
            limit = cfg.data.get("limit")
            require(limit is None or (isinstance(limit, int) and limit > 0), "data.limit", limit,
                    "must be null (all 60,000 training images) or a positive integer")
            return
        require(os.path.isfile(str(cfg.data.source)), "data.source", cfg.data.source,
                'must be emoji, fashion_mnist or a JSON-lines file of {"image": path, "caption": text}')
        try:  # every line and image, before anything is built
            caption_file(str(cfg.data.source), size, cfg.data.resize)
        except ImageDataError as e:
            raise ConfigError("data.source", cfg.data.source, str(e)) from None

    @staticmethod
    def slots(cfg: DictConfig) -> dict:
        return {"image": SlotSpec(image_args(cfg), field="image_model", optim=cfg.train),
                "text": SlotSpec(text_args(cfg), vocab_size=check_tokenizer(cfg.data).vocab_size,
                                 seq_length=cfg.train.seq_length, optim=cfg.train,
                                 init=None if cfg.init_from is None else str(cfg.init_from), init_strict=False)}

    def __init__(self, cfg: DictConfig, layout):
        super().__init__(cfg, layout)
        self.contrastive = cfg.contrastive
        self.tokenizer = check_tokenizer(cfg.data)
        train = cfg.train
        self.order = SampleOrder.of(layout, train.global_batch_size, train.micro_batch_size)
        data = captioned(cfg.data, cfg.image_model.image_size)
        self.train_set, self.heldout = data.split(cfg.data.heldout, train.seed)
        self.train_pairs, self.heldout_pairs = self.train_set.pairs(), self.heldout.pairs()
        self.train_captions, self.heldout_captions = (
            [[self._tokens(t) for t in texts] for texts in d.captions] for d in (self.train_set, self.heldout))
        z = cfg.zero_shot
        self.fashion = FashionMNIST.subset(z.train, z.test, cfg.image_model.image_size)
        self.categories = sorted(set(self.train_set.categories + self.heldout.categories) - {"", *EXCLUDED_CATEGORIES})

    def _tokens(self, caption: str) -> list[int]:
        return self.tokenizer.encode(caption)[: self.cfg.train.seq_length - 1] + [self.tokenizer.eod]

    def _batches(self, data: Captioned, pairs: list, captions: list, consumed_samples: int, seed: int):
        sample = Sampler(len(pairs), seed)

        def collate(samples: list[int]) -> dict:
            chosen = [pairs[sample(i)] for i in samples]
            groups = [int(data.groups[image]) for image, _ in chosen]
            batch = pad_texts([captions[g][c] for g, (_, c) in zip(groups, chosen)], self.cfg.train.seq_length,
                              self.tokenizer.eod)
            return {**batch, "images": to_tensor(data.pixels[[image for image, _ in chosen]]),
                    "groups": torch.tensor(groups)}

        return self.order.micro_batches(consumed_samples, collate)

    def train_batches(self, consumed_samples: int):
        return self._batches(self.train_set, self.train_pairs, self.train_captions, consumed_samples,
                             self.cfg.train.seed)

    # -- the step -----------------------------------------------------------------------------------

    def _scale(self, image_chunks: list) -> torch.Tensor:
        """1/temperature: the image head's learnt value (at most 100, as CLIP's), or the configured one."""
        if self.contrastive.learnable_temperature:
            return unwrap_model(image_chunks[-1]).pooled_embedding.log_scale.float().clamp(max=math.log(100)).exp()
        return torch.tensor(1.0 / self.contrastive.temperature, device=state.device())

    def clip_loss(self, embeddings: dict, held: list[dict], image_chunks: list):
        """The loss of the global batch from this rank's micro-batches' embeddings (every
        data-parallel rank computes the same loss, with gradients for its own embeddings)."""
        group = parallel_state.get_data_parallel_group()
        dp, rank = dist.get_world_size(group), dist.get_rank(group)
        local = {"image": torch.cat(embeddings["image"]), "text": torch.cat(embeddings["text"]),
                 "groups": torch.cat([b["groups"] for b in held]).to(state.device())}
        gathered = {}
        for key, value in local.items():
            parts = [torch.empty_like(value) for _ in range(dp)]
            dist.all_gather(parts, value.detach(), group=group)
            parts[rank] = value  # this rank's: with their gradient
            gathered[key] = torch.cat(parts)
        loss, accuracy = symmetric_info_nce(gathered["image"], gathered["text"], gathered["groups"],
                                            gathered["groups"], self._scale(image_chunks))
        n = torch.tensor(float(len(gathered["groups"])), device=loss.device)
        return loss, {"contrastive_loss": torch.stack([loss.detach(), torch.ones_like(loss)]),
                      "batch_accuracy": torch.stack([accuracy * n, n])}

    def _means(self, ctx, batches, forward_only: bool, num_microbatches: int) -> dict[str, float]:
        held = [next(batches) for _ in range(num_microbatches)]
        image_chunks = ctx.slots["image"].chunks
        return ctx.grad_cache({"image": encode_images, "text": encode},
                              lambda embeddings: self.clip_loss(embeddings, held, image_chunks), iter(held),
                              num_microbatches=num_microbatches, forward_only=forward_only)

    def step(self, ctx, batches) -> dict[str, float]:
        means = self._means(ctx, batches, False, self.order.num_microbatches)
        loss = means["contrastive_loss"]
        return {"loss": loss, **means, "grad_norm": ctx.optimizer_step("image", loss),
                "grad_norm_text": ctx.optimizer_step("text", loss)}

    # -- evaluation ---------------------------------------------------------------------------------

    def evaluate(self, ctx) -> dict[str, float]:
        train = self.cfg.train
        valid = self._batches(self.heldout, self.heldout_pairs, self.heldout_captions, 0, train.seed + 1)
        means = self._means(ctx, valid, True, train.eval_iters * self.order.num_microbatches)
        image_chunks, text_chunks = ctx.slots["image"].chunks, ctx.slots["text"].chunks
        dim = self.contrastive.projection_dim
        images = embed_images(image_chunks, to_tensor(self.heldout.pixels), train.micro_batch_size, dim)
        flat = [(g, tokens) for g, captions in enumerate(self.heldout_captions) for tokens in captions]
        texts = embed_texts(text_chunks, [tokens for _, tokens in flat], train.micro_batch_size, train.seq_length,
                            self.tokenizer.eod, dim)
        text_groups = torch.tensor([g for g, _ in flat], device=texts.device)
        positive = torch.as_tensor(self.heldout.groups, device=images.device)[:, None] == text_groups[None, :]
        scores = images @ texts.T
        metrics = {**{f"i2t_{k}": v for k, v in recall_at(scores, positive).items()},
                   **{f"t2i_{k}": v for k, v in recall_at(scores.T, positive.T).items()}}
        metrics.update(self._zero_shot(image_chunks, text_chunks, images))
        if self.contrastive.learnable_temperature:
            metrics["temperature"] = 1.0 / self._scale(image_chunks).item()
        return {"loss": means["contrastive_loss"], **means, **metrics}

    def _class_embeddings(self, text_chunks: list, names: list[str], templates) -> torch.Tensor:
        """Each class's caption embeddings (one per template), averaged and normalised."""
        train, dim = self.cfg.train, self.contrastive.projection_dim
        texts = embed_texts(text_chunks, [self._tokens(c) for c in captions(names, list(templates))],
                            train.micro_batch_size, train.seq_length, self.tokenizer.eod, dim)
        return F.normalize(texts.view(len(names), len(templates), dim).mean(dim=1), dim=1)

    def _zero_shot(self, image_chunks: list, text_chunks: list, heldout_images: torch.Tensor) -> dict[str, float]:
        z, f, M = self.cfg.zero_shot, self.fashion, self.cfg.train.micro_batch_size
        test = embed_images(image_chunks, to_tensor(f.test_pixels), M, self.contrastive.projection_dim)
        classes = self._class_embeddings(text_chunks, f.class_names, z.fashion_templates)
        fashion = float(np.mean((test @ classes.T).argmax(dim=1).cpu().numpy() == f.test_labels))
        hidden = self.cfg.image_model.hidden_size
        probe = probe_accuracy(
            embed_images(image_chunks, to_tensor(f.train_pixels), M, hidden, project=False).cpu().numpy(),
            f.train_labels,
            embed_images(image_chunks, to_tensor(f.test_pixels), M, hidden, project=False).cpu().numpy(),
            f.test_labels)
        metrics = {"fashion_zero_shot_accuracy": fashion, "fashion_probe_accuracy": probe}
        names = {c: i for i, c in enumerate(self.categories)}
        labels = np.array([names.get(self.heldout.categories[g], -1) for g in self.heldout.groups])
        if (labels >= 0).any():
            keep = torch.as_tensor(labels >= 0, device=heldout_images.device)
            categories = self._class_embeddings(text_chunks, [c.lower() for c in self.categories], z.category_templates)
            predicted = (heldout_images[keep] @ categories.T).argmax(dim=1).cpu().numpy()
            metrics["category_zero_shot_accuracy"] = float(np.mean(predicted == labels[labels >= 0]))
        return metrics
