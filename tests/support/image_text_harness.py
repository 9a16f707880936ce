"""One image-text step (GradCache over both towers) in one parallel layout. Started by
tests/test_image_text.py through torchrun:

    python tests/support/image_text_harness.py INIT_DIR OUT [hydra overrides of configs/image_text.yaml]

INIT_DIR: each slot's full initial weights (image.pt, text.pt), written by the test. OUT (rank
0): the first step's loss, each slot's full gradient gathered into the single-rank layout, and
each rank's CPU RNG state when the step started (the stream its dropout masks come from).
"""

import os
import sys

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from full_state import gradients_before_the_update, start_from_shared_weights
from thann.cli import CONFIG_DIR
from thann.recipes.image_text import ImageText
from thann.training.trainer import Trainer


def main(init_dir: str, out_path: str, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="image_text", overrides=overrides)
    trainer = Trainer(cfg, ImageText)
    gradients = {}
    for name in ("image", "text"):
        slot = trainer.slots[name]
        tensors = start_from_shared_weights(slot.chunks, slot.optimizer, os.path.join(init_dir, f"{name}.pt"))
        gradients[name] = gradients_before_the_update(slot, tensors)
    rng = [None] * dist.get_world_size()
    dist.all_gather_object(rng, torch.get_rng_state())
    loss = trainer.train_step(trainer.recipe.train_batches(0))["contrastive_loss"]
    if dist.get_rank() == 0:
        torch.save({"loss": loss, "gradients": {k: v[0] for k, v in gradients.items()}, "rng": rng}, out_path)
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
