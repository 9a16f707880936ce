"""Trains like pretrain_thann.py (resuming from checkpoint.dir when it holds a checkpoint) and,
right after building and resuming, writes the full model weights gathered into the single-rank
layout (rank 0) to OUT:  python tests/checkpoint_harness.py OUT [hydra overrides]"""

import sys

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from thann.checkpoint.full_state import gather_full, model_sharded_tensors
from thann.cli import CONFIG_DIR
from thann.models.thann.pretrain import PretrainTask
from thann.parallel import state
from thann.training.trainer import Trainer

if __name__ == "__main__":
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=sys.argv[2:])
    trainer = Trainer(cfg, PretrainTask)
    weights = gather_full(model_sharded_tensors(trainer.model))
    if dist.get_rank() == 0:
        torch.save(weights, sys.argv[1])
    trainer.fit()
    state.destroy()
