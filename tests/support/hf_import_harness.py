"""Starts pretraining from an HF Mixtral directory (``init_from=``: the resume policy's check, then
the trainer's start) and writes the whole weights right after the start (rank 0):
    torchrun ... tests/support/hf_import_harness.py OUT.pt MIXTRAL_DIR [hydra overrides]"""

import sys

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from full_state import gather_full, model_sharded_tensors
from thann.cli import CONFIG_DIR
from thann.parallel import state
from thann.recipes.pretrain import Pretrain
from thann.training.trainer import Trainer


if __name__ == "__main__":
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"init_from={sys.argv[2]}", *sys.argv[3:]])
    trainer = Trainer(cfg, Pretrain)
    weights = gather_full(model_sharded_tensors(trainer.slots["model"].chunks))
    if dist.get_rank() == 0:
        torch.save(weights, sys.argv[1])
    trainer.checkpointer.release()
    state.destroy()
