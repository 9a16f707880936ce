"""Console entry points: each composes ``configs/<name>.yaml`` with command-line overrides
(Hydra's syntax: ``group=option``, ``a.b=value``) and runs a task on the training loop.

Exit codes (README, "Exit codes"): 0 done; 2 invalid config or usage, reported before anything
was built; 3 the loss or the weights became NaN/inf; 75 stopped by a signal after saving (start
again to resume); 1 anything else. Every expected failure is one line naming its cause and the
way forward, printed once.
"""

import difflib
import importlib
import logging
import os
import sys

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

EXIT_FAILED = 1
EXIT_CONFIG = 2  # invalid config or usage, reported before anything was built
EXIT_NONFINITE = 3  # loss or weights became NaN/inf; no checkpoint written for it
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1/SIGINT after saving; start again to resume

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class UsageError(ValueError):
    pass


def _keys(cfg, prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, DictConfig):
            keys.extend(_keys(value, f"{prefix}{key}."))
    return keys


def _unknown_key(key: str, known: list[str]) -> UsageError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return UsageError(f"invalid config: {key}: no such field{hint}")


def load_config(config_name: str, overrides: list[str]) -> DictConfig:
    """The composed config; an unknown key or option is a UsageError naming it. THANN's configs
    are complete, so Hydra's ``+key=value`` (add a key) is refused too: it would let a typo pass."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        base = compose(config_name=config_name)
        for override in overrides:
            if override.startswith("+"):
                key = override.lstrip("+").split("=", 1)[0]
                if OmegaConf.select(base, key, default=None) is None:
                    raise _unknown_key(key, _keys(base))
        try:
            return compose(config_name=config_name, overrides=overrides)
        except HydraException as e:
            text = str(e)
            if "Could not override '" in text:
                key = text.split("Could not override '", 1)[1].split("'", 1)[0]
                raise _unknown_key(key, _keys(base)) from None
            if "Could not find '" in text:
                group, _, option = text.split("Could not find '", 1)[1].split("'", 1)[0].rpartition("/")
                available = sorted(n.removesuffix(".yaml") for n in os.listdir(os.path.join(CONFIG_DIR, group))
                                   if n.endswith(".yaml")) if os.path.isdir(os.path.join(CONFIG_DIR, group)) else []
                raise UsageError(f"invalid config: {group}={option}: no such option (available: "
                                 f"{', '.join(available)})") from None
            first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
            raise UsageError(f"invalid config: {first}") from None


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def exit_on_bad_input(prepare):
    """``prepare()``'s result; a config or input problem (exit 2) or a checkpoint that cannot be
    read (exit 1) ends the process with one line, printed by rank 0, before anything is written."""
    from thann.checkpoint.zarr_store import CorruptCheckpoint, PickledCheckpoint
    from thann.config import ConfigError

    try:
        return prepare()
    except (UsageError, ConfigError, PickledCheckpoint) as e:
        code, message = EXIT_CONFIG, str(e)
    except CorruptCheckpoint as e:
        code, message = EXIT_FAILED, f"cannot load the checkpoint: {e}"
    if _is_rank_zero():
        print(message, file=sys.stderr)
    sys.exit(code)


def run_task(task: str, config_name: str, argv: list[str] | None = None) -> None:
    """Runs the task class named ``task`` ("module:Class") on the training loop with
    ``configs/<config_name>.yaml``; exits with the codes above."""
    # Installed before anything heavy is imported, so that a signal during start-up is a clean
    # stop (exit 75), not a traceback.
    from thann.training.signals import StopRequest

    stop_request = StopRequest()
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(f"usage: {os.path.basename(sys.argv[0])} [key=value ...]   (configs/{config_name}.yaml; README)")
        sys.exit(0)
    cfg = exit_on_bad_input(lambda: load_config(config_name, argv))
    # megatron-core logs every parameter name and config field at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    module, _, name = task.partition(":")
    sys.exit(_train(getattr(importlib.import_module(module), name), cfg, stop_request))


def _train(task_class, cfg: DictConfig, stop_request) -> int:
    from thann.checkpoint.checkpointer import CheckpointError
    from thann.checkpoint.lock import DirectoryInUse
    from thann.checkpoint.zarr_store import PickledCheckpoint
    from thann.config import ConfigError
    from thann.training.trainer import NonFiniteLoss, NonFiniteWeights, Trainer

    rank = os.environ.get("RANK", "0")
    try:
        trainer = Trainer(cfg, task_class, stop_request)
    except (ConfigError, DirectoryInUse, PickledCheckpoint) as e:
        # Every rank runs the same checks on the same config (or learns the lock's outcome),
        # so every rank stops here, before any collective; one of them says why.
        if _is_rank_zero():
            print(e, file=sys.stderr)
        return EXIT_CONFIG
    except CheckpointError as e:
        if _is_rank_zero():
            print(e, file=sys.stderr)
        return EXIT_FAILED
    try:
        trainer.fit()
        code = EXIT_STOPPED if trainer.stopped_by_signal else 0
    except (NonFiniteLoss, NonFiniteWeights) as e:  # agreed by every rank
        print(f"[rank {rank}] stopped: {e}", file=sys.stderr)
        code = EXIT_NONFINITE
    except CheckpointError as e:  # agreed by every rank
        if _is_rank_zero():
            print(e, file=sys.stderr)
        code = EXIT_FAILED
    except BaseException:
        # Other ranks may be waiting in a collective: free the directory, leave the process group
        # to torchrun (which stops the job when a rank dies).
        trainer.checkpointer.release()
        raise
    trainer.close()
    return code


def pretrain() -> None:
    run_task("thann.tasks.lm_pretrain:PretrainTask", "config")


def contrastive() -> None:
    run_task("thann.tasks.contrastive:ContrastiveTask", "contrastive")


def classify() -> None:
    run_task("thann.tasks.classify:ClassifyTask", "classify")
