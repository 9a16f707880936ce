"""Console entry points: each composes ``configs/<name>.yaml`` with command-line overrides
(Hydra's syntax: ``group=option``, ``a.b=value``) and runs a recipe on the training loop. The
recipes are named here (EntryPoint.recipe) and imported only when one runs: nothing else in
THANN imports a recipe.

Exit codes (EXIT_CODES below; docs/launching.md): 0 done; 2 invalid config or usage, reported before anything
was built; 3 the loss or the weights became NaN/inf; 75 stopped by a signal after saving (start
again to resume); 1 anything else. Every expected failure is one line naming its cause and the
way forward, printed once.
"""

import difflib
import importlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf

EXIT_FAILED = 1
EXIT_CONFIG = 2  # invalid config or usage, reported before anything was built
EXIT_NONFINITE = 3  # loss or weights became NaN/inf; no checkpoint written for it
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1/SIGINT after saving; start again to resume
EXIT_ABORTED = 130  # 128 + SIGINT: a second Ctrl-C aborted without saving

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


def _verbatim(override: str) -> str:
    """``key=value`` with the value quoted where Hydra's grammar would reject or change it
    (non-ASCII characters, leading or trailing spaces, quotes, commas that would make a sweep), so
    that it arrives as the user typed it: ``prompt=Привет``, ``prompt="  hi"`` (the shell removes
    the double quotes) and ``prompt="Hello, world"`` work unquoted. Values the user quoted for
    Hydra, lists and dicts are left to Hydra."""
    key, sep, value = override.partition("=")
    if not sep or not value or value[0] in "'\"[{":
        return override
    if value.isascii() and value == value.strip():
        try:
            if not OverridesParser.create().parse_override(override).is_sweep_override():
                return override
        except HydraException:
            pass
    # Inside Hydra's quotes a backslash escapes a quote: double those before a quote or the end.
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
    return f"{key}='{escaped}'"


def load_config(config_name: str, overrides: list[str], config_dir: str = CONFIG_DIR) -> DictConfig:
    """The composed config; an unknown key or option is a UsageError naming it. THANN's configs
    are complete, so Hydra's ``+key=value`` (add a key) and ``~key`` (delete it) are refused: one
    would let a typo pass, the other leave a field the code reads undefined."""
    overrides = [_verbatim(o) for o in overrides]
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        base = compose(config_name=config_name)
        for override in overrides:
            key = override.lstrip("+~").split("=", 1)[0]
            if override.startswith("~"):
                raise UsageError(f"invalid config: {override}: keys cannot be deleted (every field is read); "
                                 f"set it instead, e.g. {key}=<value>")
            if "=" not in override:
                raise UsageError(f"invalid config: {override}: expected key=value (or group=option)")
            if override.startswith("+") and OmegaConf.select(base, key, default=None) is None:
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
                raise UsageError(f"invalid config: {group}={option}: no such option (available: "
                                 f"{', '.join(_options(group))})") from None
            first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
            if "LexerNoViableAlt" in first or "no viable alternative" in first:
                first += " (quote a value holding special characters: 'key=\"value\"')"
            raise UsageError(f"invalid config: {first}") from None
        except Exception as e:  # omegaconf's errors about an override Hydra accepted
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"invalid config: {first}") from None


def _options(group: str) -> list[str]:
    directory = os.path.join(CONFIG_DIR, group)
    if not os.path.isdir(directory):
        return []
    return sorted(n.removesuffix(".yaml") for n in os.listdir(directory) if n.endswith(".yaml"))


EXIT_CODES = """exit codes:
  0   done
  1   a fault that is not the config's (disk full, unreadable checkpoint): the message says how to go on
  2   invalid config or usage, reported before anything was built or written
  3   the loss or the weights became NaN/inf (training); no checkpoint of them is written
  75  stopped by SIGTERM, SIGUSR1 or Ctrl-C after saving (training): start again to resume
  130 aborted by a second Ctrl-C, without saving"""


def help_text(program: str, config_name: str, summary: str, keys: tuple[str, ...], examples: tuple[str, ...]) -> str:
    """``--help`` of a Hydra entry point: its config groups and their options, its most used keys
    with their defaults, the exit codes and examples."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name)
        groups = [g for g in cfg if _options(g)]
        lines = [f"usage: {program} [group=option ...] [key=value ...]", "", summary, "",
                 f"config groups (configs/<group>/<option>.yaml; composed by configs/{config_name}.yaml):"]
        choices = _defaults(config_name)
        for group in groups:
            lines.append(f"  {group:11s} {', '.join(_options(group))}   (default: {choices.get(group, '?')})")
        lines += ["", "most used keys (default):"]
        for key in keys:
            value = OmegaConf.select(cfg, key, throw_on_missing=False)
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value)
            lines.append(f"  {key}={value if isinstance(value, str) else json.dumps(value)}")
    lines += ["", "Any key can be set with key=value; an unknown key is an error naming it.", "",
              EXIT_CODES, "", "examples:", *(f"  {e}" for e in examples)]
    return "\n".join(lines)


def _defaults(config_name: str) -> dict[str, str]:
    """The group options a top-level config chooses (its defaults list)."""
    top = OmegaConf.load(os.path.join(CONFIG_DIR, f"{config_name}.yaml"))
    chosen = {}
    for entry in top.get("defaults", []):
        if isinstance(entry, DictConfig):
            for group, option in entry.items():
                if not str(group).startswith("override"):
                    chosen[str(group)] = str(option)
    return chosen


def exit_if_help(argv: list[str], program: str, config_name: str, summary: str, keys: tuple[str, ...],
                 examples: tuple[str, ...]) -> None:
    if "--help" in argv or "-h" in argv:
        print(help_text(program, config_name, summary, keys, examples))
        sys.exit(0)


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


_TRAINING_KEYS = ("train.steps", "train.global_batch_size", "train.micro_batch_size", "train.lr", "train.seed",
                  "parallel.tp", "parallel.pp", "parallel.ep", "parallel.sp", "parallel.distributed_optimizer",
                  "checkpoint.dir", "checkpoint.interval", "checkpoint.keep", "checkpoint.resume",
                  "logging.wandb.enabled")


@dataclass(frozen=True)
class EntryPoint:
    """A training entry point: its recipe, its top-level config and what ``--help`` says."""

    recipe: str  # "module:Class", imported only when the entry point runs
    config_name: str
    program: str
    summary: str
    keys: tuple[str, ...]
    examples: tuple[str, ...]
    config_dir: str = CONFIG_DIR  # a recipe from outside THANN keeps its config in its own folder

    def help(self) -> str:
        return help_text(self.program, self.config_name, self.summary, self.keys, self.examples)


PRETRAIN = EntryPoint(
    "thann.recipes.pretrain:Pretrain", "config", "pretrain_thann.py (thann-pretrain)",
    "Pretrains a language model (model.arch: thann, nnn or gpt) on next-token prediction; resumes the newest "
    "checkpoint in checkpoint.dir.",
    ("train.seq_length", *_TRAINING_KEYS, "data.paths", "train.sample.prompt", "init_from"),
    (".venv/bin/python pretrain_thann.py train.steps=50 train.lr=1e-3",
     ".venv/bin/torchrun --nproc-per-node 2 pretrain_thann.py parallel.tp=2 parallel.sp=true"))
CONTRASTIVE = EntryPoint(
    "thann.recipes.contrastive:Contrastive", "contrastive", "pretrain_contrastive.py (thann-contrastive)",
    "Trains THANN as an embedding model with InfoNCE over the whole global batch (GradCache).",
    ("init_from", "train.seq_length", *_TRAINING_KEYS, "contrastive.pooling", "contrastive.temperature",
     "contrastive.hard_negatives"),
    (".venv/bin/python pretrain_contrastive.py init_from=checkpoints/thann_tiny",))
IMAGE_TEXT = EntryPoint(
    "thann.recipes.image_text:ImageText", "image_text", "pretrain_image_text.py (thann-image-text)",
    "Trains a ViT beside THANN's text encoder, CLIP-style: symmetric InfoNCE over the whole global batch "
    "(GradCache over both towers), several captions per image.",
    ("init_from", "data.source", "data.resize", "image_model.image_size", "image_model.patch_size",
     "contrastive.projection_dim", "contrastive.temperature", *_TRAINING_KEYS),
    (".venv/bin/python pretrain_image_text.py init_from=checkpoints/thann_tiny",
     ".venv/bin/torchrun --nproc-per-node 2 pretrain_image_text.py parallel.tp=2 parallel.sp=true"))
CAPTIONING = EntryPoint(
    "thann.recipes.captioning:Captioning", "captioning", "finetune_captioning.py (thann-caption)",
    "Trains THANN to caption images, LLaVA-style: a frozen image encoder's patch states, projected, before the "
    "text; the projector and the decoder learn (the projector alone with captioning.train_decoder=false).",
    ("init_from", "image_from", "captioning.prompt", "captioning.train_decoder", *_TRAINING_KEYS),
    (".venv/bin/python finetune_captioning.py",
     ".venv/bin/python finetune_captioning.py captioning.train_decoder=false "
     "checkpoint.dir=checkpoints/captioner_projector"))
CLASSIFY = EntryPoint(
    "thann.recipes.classify:Classify", "classify", "train_classifier.py (thann-classify)",
    "Trains ChaosNet (or its matched MLP) on MNIST, Fashion-MNIST or 20 Newsgroups.",
    ("classify.datasets", "classify.sequential", *_TRAINING_KEYS),
    (".venv/bin/python train_classifier.py model=chaosnet_mlp classify.datasets=[newsgroups20]",))


PPO = EntryPoint(
    "thann.recipes.ppo:PPO", "ppo", "finetune_ppo.py (thann-ppo)",
    "Fine-tunes a THANN language model with PPO (or a group baseline): KV-cached rollouts, a reward, a KL penalty "
    "to the starting model.",
    ("init_from", "ppo.reward", "ppo.advantage", "ppo.samples_per_prompt", "ppo.max_new_tokens", "ppo.temperature",
     "ppo.kl_coef", "ppo.kl_in", "ppo.epochs", "ppo.critic.lr", *_TRAINING_KEYS),
    (".venv/bin/python finetune_ppo.py init_from=checkpoints/thann_tiny",
     ".venv/bin/python finetune_ppo.py ppo=grpo train.steps=100"))


def run_recipe(entry: EntryPoint, argv: list[str] | None = None) -> None:
    """Runs ``entry``'s recipe on the training loop; exits with the codes of EXIT_CODES."""
    # Installed before anything heavy is imported, so that a signal during start-up is a clean
    # stop (exit 75), not a traceback.
    from thann.training.signals import StopRequest

    stop_request = StopRequest()
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(entry.help())
        sys.exit(0)
    try:
        cfg = exit_on_bad_input(lambda: load_config(entry.config_name, argv, entry.config_dir))
        # megatron-core logs every parameter name and config field at INFO.
        logging.getLogger("megatron").setLevel(logging.WARNING)
        module, _, name = entry.recipe.partition(":")
        code = _train(getattr(importlib.import_module(module), name), cfg, stop_request)
    except KeyboardInterrupt:
        print("aborted by a second Ctrl-C, without saving: the next start resumes from the last checkpoint",
              file=sys.stderr)
        code = EXIT_ABORTED
    sys.exit(code)


# gloo's words for a peer whose process ended ("Connection closed by peer [10.0.0.2]:4711", "Read
# error [10.0.0.2]:4711: Connection reset by peer") and for one that stopped answering ("Timed out
# waiting 600000ms for recv operation to complete").
_PEER_GONE = re.compile(r"closed by peer|reset by peer|Broken pipe")
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f.:]+)\]:\d+")
_PEER_SILENT = re.compile(r"Timed out waiting (\d+)ms for (?:recv|send) operation")


def lost_peer(error: str) -> str | None:
    """What a collective's error says about a lost peer rank, or None if it is about something else."""
    if _PEER_GONE.search(error):
        address = _PEER_ADDRESS.search(error)
        where = f"the ranks at {address.group(1)}" if address else "a peer rank"
        return f"lost {where}: their processes ended (crashed, killed, or their node lost)"
    silent = _PEER_SILENT.search(error)
    if silent:
        return (f"a peer rank did not answer for {int(silent.group(1)) / 60000:g} min (parallel.timeout_minutes): "
                "its node hangs or its network failed")
    return None


def _train(recipe_class, cfg: DictConfig, stop_request) -> int:
    """Runs the training loop; an expected failure ends the run's output (progress bar and wandb
    closed first) with one line on stderr, its detail in the run's log."""
    from thann.checkpoint.checkpointer import CheckpointError
    from thann.checkpoint.lock import DirectoryInUse
    from thann.checkpoint.zarr_store import PickledCheckpoint
    from thann.config import ConfigError
    from thann.training.trainer import NonFiniteLoss, NonFiniteWeights, Trainer

    rank = os.environ.get("RANK", "0")
    try:
        trainer = Trainer(cfg, recipe_class, stop_request)
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
    failure, detail, every_rank = None, None, False
    try:
        trainer.fit()
        code = EXIT_STOPPED if trainer.stopped_by_signal else 0
    except (NonFiniteLoss, NonFiniteWeights) as e:  # agreed by every rank
        failure, every_rank, code = f"[rank {rank}] stopped: {e}", True, EXIT_NONFINITE
    except CheckpointError as e:  # agreed by every rank
        failure, detail, code = str(e), e.detail, EXIT_FAILED
    except ConfigError as e:  # input only the run could reveal (a reward callable's result), agreed by every rank
        failure, code = str(e), EXIT_CONFIG
    except KeyboardInterrupt:
        trainer.close("aborted by a second Ctrl-C")
        raise
    except RuntimeError as e:
        lost = lost_peer(str(e))
        trainer.checkpointer.release()
        if lost is None:
            raise
        # Another node's ranks are gone: every rank here fails in its next collective, and says so
        # in one line. The process group is left to torchrun, which restarts the job or stops it.
        failure = f"[rank {rank}] {lost}; starting again resumes from the last checkpoint"
        if trainer.metrics is not None:
            trainer.metrics.close(None, failure, str(e))
        print(failure, file=sys.stderr, flush=True)
        return EXIT_FAILED
    except BaseException:
        # Other ranks may be waiting in a collective: free the directory, leave the process group
        # to torchrun (which stops the job when a rank dies).
        trainer.checkpointer.release()
        raise
    trainer.close(failure, detail)
    if failure and (every_rank or _is_rank_zero()):
        print(failure, file=sys.stderr, flush=True)
    return code


def pretrain() -> None:
    run_recipe(PRETRAIN)


def contrastive() -> None:
    run_recipe(CONTRASTIVE)


def image_text() -> None:
    run_recipe(IMAGE_TEXT)


def captioning() -> None:
    run_recipe(CAPTIONING)


def classify() -> None:
    run_recipe(CLASSIFY)


def ppo() -> None:
    run_recipe(PPO)
