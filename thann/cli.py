"""Console entry points. Hydra composes ``configs/`` with command-line overrides."""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from thann.config import ConfigError

EXIT_CONFIG = 2  # invalid config, reported before anything was built
EXIT_NONFINITE = 3  # loss became NaN/inf (train.on_nonfinite_loss=stop); no checkpoint written for it
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving; start again to resume

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _run_pretraining(cfg: DictConfig) -> None:
    # megatron-core logs every parameter name and config field at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from thann.models.thann.pretrain import PretrainTask
    from thann.parallel import state
    from thann.training.trainer import NonFiniteLoss, Trainer

    try:
        trainer = Trainer(cfg, PretrainTask)
    except ConfigError as e:
        # Every rank runs the same checks on the same config, so every rank stops here, before
        # any collective; one of them says why.
        if os.environ.get("RANK", "0") == "0":
            print(e, file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    try:
        trainer.fit()
    except NonFiniteLoss as e:
        print(f"[rank {os.environ.get('RANK', '0')}] stopped: {e}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    state.destroy()
    if trainer.stopped_by_signal:
        sys.exit(EXIT_STOPPED)


def pretrain() -> None:
    hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")(_run_pretraining)()
