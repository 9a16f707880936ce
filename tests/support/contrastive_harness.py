"""One contrastive step (GradCache) of a tiny THANN encoder in one parallel layout. Started by
tests/test_contrastive.py through torchrun:

    python tests/support/contrastive_harness.py INIT OUT [hydra overrides of configs/contrastive.yaml]

INIT: full initial weights, written by the first (single-rank) run if missing. OUT (rank 0): the
first step's loss, its full gradient gathered into the single-rank layout, and each rank's CPU
RNG state when the step started (the stream its dropout masks come from).
"""

import sys

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from full_state import gradients_before_the_update, start_from_shared_weights
from thann.cli import CONFIG_DIR
from thann.recipes.contrastive import Contrastive
from thann.training.trainer import Trainer


def main(init_path: str, out_path: str, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="contrastive", overrides=overrides)
    trainer = Trainer(cfg, Contrastive)
    slot = trainer.slots["model"]
    tensors = start_from_shared_weights(slot.chunks, slot.optimizer, init_path)
    rng = [None] * dist.get_world_size()
    dist.all_gather_object(rng, torch.get_rng_state())
    gradients = gradients_before_the_update(slot, tensors)
    loss = trainer.train_step(trainer.recipe.train_batches(0))["contrastive_loss"]
    if dist.get_rank() == 0:
        torch.save({"loss": loss, "gradients": gradients[0], "rng": rng}, out_path)
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
