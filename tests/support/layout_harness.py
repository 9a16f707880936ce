"""Runs the first steps of a tiny THANN in one parallel layout and records what the layout tests
compare with the single-rank run. Started by tests/test_parallel.py through torchrun:

    python tests/support/layout_harness.py INIT OUT [hydra overrides]

INIT: full (unsharded) initial weights; written by the first run (a single rank) if missing, so
every layout starts from the same weights; or ``seeded``: start from the weights the seed gives
this layout (to check that they are the single rank's). OUT (rank 0): the first step's loss, its
full gradient gathered into the single-rank layout, the grad norm, the training losses of 6 steps
and, when seeded, the initial weights.
"""

import sys

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from full_state import gather_full, gradients_before_the_update, model_sharded_tensors, start_from_shared_weights
from thann.cli import CONFIG_DIR
from thann.recipes.pretrain import Pretrain
from thann.training.trainer import Trainer


def main(init_path: str, out_path: str, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    trainer = Trainer(cfg, Pretrain)
    slot = trainer.slots["model"]
    initial = None
    if init_path == "seeded":
        tensors = model_sharded_tensors(slot.chunks)
        initial = gather_full(tensors)
    else:
        tensors = start_from_shared_weights(slot.chunks, slot.optimizer, init_path)
    # ZeRO-1 keeps only this rank's shard of the gradient
    gradients = [] if cfg.parallel.distributed_optimizer else gradients_before_the_update(slot, tensors)
    batches = trainer.recipe.train_batches(0)
    first = trainer.train_step(batches)
    losses = [first["lm_loss"]] + [trainer.train_step(batches)["lm_loss"] for _ in range(5)]
    if dist.get_rank() == 0:
        torch.save({"first_loss": first["lm_loss"], "gradients": gradients[0] if gradients else None,
                    "grad_norm": first["grad_norm"], "losses": losses, "initial": initial}, out_path)
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
