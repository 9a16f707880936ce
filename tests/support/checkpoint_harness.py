"""Trains like pretrain_thann.py (resuming when checkpoint.dir holds a checkpoint) and writes the
full model weights, gathered into the single-rank layout, right after building/resuming and
after training (rank 0):  python tests/support/checkpoint_harness.py PREFIX [hydra overrides]
-> PREFIX.start.pt, PREFIX.end.pt"""

import sys

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from full_state import gather_full, model_sharded_tensors
from thann.cli import CONFIG_DIR
from thann.recipes.pretrain import Pretrain
from thann.parallel import state
from thann.training.trainer import Trainer


def dump(trainer, path: str) -> None:
    weights = gather_full(model_sharded_tensors(trainer.slots["model"].chunks))
    if dist.get_rank() == 0:
        torch.save(weights, path)


if __name__ == "__main__":
    prefix = sys.argv[1]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=sys.argv[2:])
    trainer = Trainer(cfg, Pretrain)
    dump(trainer, f"{prefix}.start.pt")
    trainer.fit()
    dump(trainer, f"{prefix}.end.pt")
    state.destroy()
