"""Image captioning, the LLaVA pattern (finetune_captioning.py).

Two slots: ``image``, the image encoder of an image-text run (``image_from``: its ``image``
slot), frozen; and ``model`` (primary), THANN reading that encoder's patch states, projected,
before its text (``thann_vlm``: thann.models.thann.vlm), its decoder from a pretraining
checkpoint (``init_from``; the projector is new). The projector and the decoder learn; with
``captioning.train_decoder=false`` the projector alone (LLaVA's first stage).

A sample is an image and one of its captions, read as ``[image] prompt caption <eod>``; the loss
is the cross entropy of the caption's tokens and the end token (the prompt is given). The split
into training and held-out images is the image encoder's own run's (its data.heldout and
train.seed), so neither model saw a held-out image or name.

Evaluation at every interval: the held-out loss; every held-out emoji (its first image)
captioned greedily with the KV cache (``captioning.max_new_tokens``), scored against its names
(quality.py: ``caption_exact``, ``caption_f1``), beside a nearest-neighbour baseline that
returns the first name of the training image closest by the image encoder's embedding
(``nearest_exact``, ``nearest_f1``): what retrieval alone gives.
"""

import numpy as np
import torch
from megatron.core.utils import unwrap_model
from omegaconf import DictConfig, OmegaConf

from thann.checkpoint.weights import checkpoint_path, saved_config, saved_run, saved_slots
from thann.config import ConfigError, require
from thann.data.checks import check_tokenizer
from thann.data.images import Captioned, captioned, to_tensor
from thann.data.order import SampleOrder
from thann.data.pairs import Sampler
from thann.inference.generator import Generator
from thann.inference.sampling import SamplingParams
from thann.models import registry
from thann.parallel import state
from thann.recipes.captioning.quality import caption_scores
from thann.training.recipe import Recipe
from thann.training.slots import SlotSpec


def _image_run(cfg: DictConfig) -> tuple[dict, DictConfig]:
    """(the image slot's record, the config) of the image-text run ``image_from``."""
    require(cfg.image_from is not None, "image_from", None, "give an image-text run (its image encoder is read)")
    path = checkpoint_path(str(cfg.image_from), "image_from")
    metadata = saved_run(path, "image_from")
    slots = saved_slots(metadata)
    require("image" in slots and slots["image"]["args"].get("arch") == "vit", "image_from", cfg.image_from,
            f"holds no image encoder (its slots: {sorted(slots)}): give an image-text run")
    return slots["image"], saved_config(metadata)


def model_args(cfg: DictConfig, image: DictConfig) -> DictConfig:
    """The decoder's config as an image-conditioned model reading ``image``'s patch states."""
    c = cfg.captioning
    extra = {"arch": "thann_vlm", "image_tokens": (image.image_size // image.patch_size) ** 2,
             "image_hidden_size": image.hidden_size, "train_decoder": c.train_decoder}
    if not c.train_decoder and cfg.model.get("num_experts") is not None:
        extra["moe_aux_loss_coeff"] = 0.0  # a frozen router has nothing to balance
    return OmegaConf.create({**OmegaConf.to_container(cfg.model, resolve=True), **extra})


class Captioning(Recipe):
    name = "captioning"

    @staticmethod
    def check(cfg: DictConfig, dp: int) -> None:
        require(cfg.model.get("arch", "thann") == "thann", "model.arch", cfg.model.get("arch"),
                "the captioner is THANN's language model")
        record, image_cfg = _image_run(cfg)
        require(cfg.data.source == image_cfg.data.source, "data.source", cfg.data.source,
                f"must be the image encoder's ({image_cfg.data.source}): its held-out images are held out here too")
        c = cfg.captioning
        require(isinstance(c.prompt, str) and c.prompt.strip() != "", "captioning.prompt", c.prompt,
                "must be a non-empty text (what the decoder reads after the image)")
        require(isinstance(c.max_new_tokens, int) and c.max_new_tokens > 0, "captioning.max_new_tokens",
                c.max_new_tokens, "must be a positive integer")
        require(isinstance(c.train_decoder, bool), "captioning.train_decoder", c.train_decoder, "must be true or false")
        args = model_args(cfg, OmegaConf.create(record["args"]))
        registry.spec_of(args).check(args, cfg.parallel, cfg.train.recompute)

    @staticmethod
    def slots(cfg: DictConfig) -> dict:
        record, _ = _image_run(cfg)
        image = OmegaConf.create(record["args"])
        return {"image": SlotSpec(image, field="image_from", init=str(cfg.image_from), init_slot="image",
                                  init_field="image_from"),
                "model": SlotSpec(model_args(cfg, image), vocab_size=check_tokenizer(cfg.data).vocab_size,
                                  seq_length=cfg.train.seq_length, optim=cfg.train,
                                  init=None if cfg.init_from is None else str(cfg.init_from), init_strict=False)}

    def __init__(self, cfg: DictConfig, layout):
        super().__init__(cfg, layout)
        self.c = cfg.captioning
        self.tokenizer = check_tokenizer(cfg.data)
        train = cfg.train
        self.order = SampleOrder.of(layout, train.global_batch_size, train.micro_batch_size)
        record, image_cfg = _image_run(cfg)
        self.image_args = OmegaConf.create(record["args"])
        try:
            data = captioned(OmegaConf.merge(image_cfg.data, {"resize": cfg.data.resize}),
                             self.image_args.image_size)
        except ValueError as e:
            raise ConfigError("data.source", cfg.data.source, str(e)) from None
        self.train_set, self.heldout = data.split(image_cfg.data.heldout, image_cfg.train.seed)
        self.prompt = self.tokenizer.encode(self.c.prompt)
        require(len(self.prompt) + 2 <= train.seq_length, "captioning.prompt", self.c.prompt,
                f"is {len(self.prompt)} tokens: train.seq_length={train.seq_length} leaves no room for a caption")
        self.first_images = [int(np.flatnonzero(self.heldout.groups == g)[0])
                             for g in range(len(self.heldout.captions))]
        self._nearest = None  # the nearest-neighbour baseline's scores: the frozen encoder's, computed once

    # -- data ---------------------------------------------------------------------------------------

    def _sequence(self, caption: str) -> tuple[list[int], int]:
        """[prompt, caption, eod] within train.seq_length + 1 tokens, and how many are the caption's."""
        seq = self.cfg.train.seq_length
        caption_ids = self.tokenizer.encode(" " + caption)[: seq - len(self.prompt)] + [self.tokenizer.eod]
        return self.prompt + caption_ids, len(caption_ids)

    def _batches(self, data: Captioned, consumed_samples: int, seed: int):
        pairs = data.pairs()
        sample, S = Sampler(len(pairs), seed), self.cfg.train.seq_length

        def collate(samples: list[int]) -> dict:
            chosen = [pairs[sample(i)] for i in samples]
            tokens = torch.full((len(chosen), S + 1), self.tokenizer.eod, dtype=torch.long)
            mask = torch.zeros(len(chosen), S)
            for row, (image, c) in enumerate(chosen):
                sequence, caption = self._sequence(data.captions[data.groups[image]][c])
                tokens[row, :len(sequence)] = torch.tensor(sequence)
                mask[row, len(self.prompt) - 1:len(self.prompt) - 1 + caption] = 1  # positions predicting the caption
            return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
                    "position_ids": torch.arange(S).expand(len(chosen), S),
                    "images": to_tensor(data.pixels[[image for image, _ in chosen]])}

        return self.order.micro_batches(consumed_samples, collate)

    def train_batches(self, consumed_samples: int):
        return self._batches(self.train_set, consumed_samples, self.cfg.train.seed)

    # -- the step -----------------------------------------------------------------------------------

    def _with_image_states(self, ctx, held: list[dict]) -> list[dict]:
        """Each micro-batch with its images' patch states from the frozen image encoder."""
        states = ctx.forward("image", lambda batch, model: (
            unwrap_model(model).patch_states(batch["images"].to(state.device())), lambda output: output),
            iter(held), num_microbatches=len(held))
        return [{**batch, "image_states": s} for batch, s in zip(held, states)]

    def forward_step(self, batch: dict, model):
        batch = {k: v.to(state.device()) for k, v in batch.items()}
        losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       image_states=batch["image_states"])
        return losses, lambda output: self._loss(batch["loss_mask"], output)

    @staticmethod
    def _loss(mask: torch.Tensor, token_losses: torch.Tensor):
        loss_sum = (token_losses.float() * mask).sum()
        return loss_sum, {"caption_loss": torch.stack([loss_sum.detach(), mask.sum()])}

    def _means(self, ctx, batches, num_microbatches: int, forward_only: bool) -> dict[str, float]:
        held = self._with_image_states(ctx, [next(batches) for _ in range(num_microbatches)])
        return ctx.forward_backward("model", self.forward_step, iter(held), count=lambda b: b["loss_mask"].sum(),
                                    num_microbatches=num_microbatches, forward_only=forward_only)

    def step(self, ctx, batches) -> dict[str, float]:
        means = self._means(ctx, batches, self.order.num_microbatches, False)
        loss = means["caption_loss"] + means.get("aux_loss", 0.0)
        return {"loss": loss, **means, "grad_norm": ctx.optimizer_step("model", loss)}

    # -- evaluation ---------------------------------------------------------------------------------

    def evaluate(self, ctx) -> dict[str, float]:
        train = self.cfg.train
        means = self._means(ctx, self._batches(self.heldout, 0, train.seed + 1),
                            train.eval_iters * self.order.num_microbatches, True)
        captions = self.caption(ctx, self.heldout.pixels[self.first_images])
        scores = caption_scores(captions, self.heldout.captions)  # a group's first image, its names
        if self._nearest is None:
            self._nearest = caption_scores(self._nearest_names(ctx), self.heldout.captions)
        return {"loss": means["caption_loss"], **means, "caption_exact": scores["exact"], "caption_f1": scores["f1"],
                "nearest_exact": self._nearest["exact"], "nearest_f1": self._nearest["f1"]}

    @torch.no_grad()
    def _image_encoder(self, ctx, pixels: np.ndarray, method: str) -> torch.Tensor:
        encoder, M = unwrap_model(ctx.slots["image"].chunks[0]), self.cfg.train.micro_batch_size
        run = getattr(encoder, method)
        return torch.cat([run(to_tensor(pixels[i:i + M]).to(state.device())) for i in range(0, len(pixels), M)])

    def caption(self, ctx, pixels: np.ndarray) -> list[str]:
        """Greedy captions of images (uint8 [N, H, W, 3]), on every rank."""
        generator = Generator(ctx.slots["model"].chunks, self.tokenizer, self.cfg.train.seq_length)
        params = SamplingParams(max_new_tokens=min(self.c.max_new_tokens, self.cfg.train.seq_length - len(self.prompt)),
                                temperature=0.0)
        states, M = self._image_encoder(ctx, pixels, "patch_states"), self.cfg.train.micro_batch_size
        texts = []
        for i in range(0, len(pixels), M):
            rows = states[i:i + M]
            texts += [r.text for r in generator.generate([self.prompt] * len(rows), params, image_states=rows)]
        return texts

    def _nearest_names(self, ctx) -> list[str]:
        """For each held-out emoji, the first name of the training image nearest by embedding."""
        train = self._image_encoder(ctx, self.train_set.pixels, "forward")
        heldout = self._image_encoder(ctx, self.heldout.pixels[self.first_images], "forward")
        nearest = (heldout @ train.T).argmax(dim=1).cpu().numpy()
        return [self.train_set.captions[self.train_set.groups[i]][0] for i in nearest]
