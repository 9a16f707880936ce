"""What a resumed run changes with respect to the run that saved its checkpoint.

The rules (README, "Resuming"): the weights, optimizer moments, step, data position and RNG
streams come from the checkpoint; everything configurable comes from the new config. So a
longer ``train.steps`` or another ``train.lr`` continues training with a schedule rebuilt from
the new values, a new global batch size continues at the same number of consumed samples, and
a new layout reshards on load. What cannot change is the model's shape: such a change is
refused, naming the field, before anything is built.
"""

from omegaconf import DictConfig, OmegaConf

from thann.config import ConfigError

_NOTES = {
    "train.steps": "the schedule follows the new config",
    "train.lr": "the schedule follows the new config",
    "train.min_lr": "the schedule follows the new config",
    "train.warmup_steps": "the schedule follows the new config",
    "train.schedule": "the schedule follows the new config",
    "train.global_batch_size": "training continues at the same number of consumed samples",
    "parallel": "the checkpoint is resharded on load; RNG streams start afresh",
}


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _note(key: str) -> str:
    return _NOTES.get(key) or _NOTES.get(key.split(".")[0], "")


def config_changes(saved: dict, cfg: DictConfig, resumable_model_changes: tuple[str, ...], path: str) -> list[str]:
    """One line per changed field (``old -> new``, with what it does); raises ConfigError for a
    change of the model's shape."""
    old = _flatten(saved)
    new = _flatten(OmegaConf.to_container(cfg, resolve=True))
    lines = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, "<absent>"), new.get(key, "<absent>")
        if before == after:
            continue
        if (key.startswith("model.") and key in old
                and not key.removeprefix("model.").endswith(resumable_model_changes)):
            raise ConfigError(key, after, f"the checkpoint {path} holds a model with {key}={before!r}; a model of "
                              "another shape cannot resume it: use another checkpoint.dir")
        note = _note(key)
        lines.append(f"  {key}: {before!r} -> {after!r}" + (f" ({note})" if note else ""))
    return lines
