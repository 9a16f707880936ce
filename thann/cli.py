"""Console entry points. Hydra composes ``configs/`` with command-line overrides."""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from thann.config import ConfigError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _run_pretraining(cfg: DictConfig) -> None:
    # megatron-core logs every parameter name and config field at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from thann.models.thann.pretrain import PretrainTask
    from thann.parallel import state
    from thann.training.trainer import Trainer

    try:
        trainer = Trainer(cfg, PretrainTask)
    except ConfigError as e:
        # Every rank runs the same checks on the same config, so every rank stops here, before
        # any collective; one of them says why.
        if os.environ.get("RANK", "0") == "0":
            print(e, file=sys.stderr)
        sys.exit(2)
    trainer.fit()
    state.destroy()


def pretrain() -> None:
    hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")(_run_pretraining)()
