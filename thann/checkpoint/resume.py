"""The one resume policy: which checkpoint a run continues, what it restores, which config
changes it accepts, and which checkpoints may start a slot.

- **Which checkpoint** (thann.checkpoint.checkpointer.find_checkpoints): the one ``latest`` names,
  else the newest complete one; one that fails verification is passed over for the next, saying
  why. ``checkpoint.resume=false``, or nothing to resume, starts from scratch, and an earlier
  run's files are set aside in ``archive/`` (never overwritten or pruned).
- **What it restores**: every trainable slot's weights, optimizer moments and schedule step, the
  step count and data position, the recipe's own state, and every rank's RNG streams when the
  layout is the one that saved them (another layout reshards on load; its streams start afresh).
- **What may change**: everything configurable, listed on resume, except each slot's shape (its
  model's declared ``shape_fields``, thann.models.registry, matched exactly) and the tokenizer;
  ``train.steps`` may not drop below the checkpoint's step.
- **What may start a slot** (``init_from``, a frozen slot's source): a checkpoint of the same
  tokenizer whose slot has the same shape, or the shape of an arch the slot's model is
  ``initialised_by`` (an encoder from a language model).

Every refusal is a ConfigError naming the field, raised before any model is built.
"""

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from thann.checkpoint import mixtral
from thann.checkpoint.directory import Candidate, find_checkpoints
from thann.checkpoint.weights import checkpoint_path, primary_slot, saved_run, saved_slots
from thann.config import ConfigError, require
from thann.models import registry

_NOTES = {
    "train.steps": "the schedule follows the new config",
    "train.lr": "the schedule follows the new config",
    "train.min_lr": "the schedule follows the new config",
    "train.warmup_steps": "the schedule follows the new config",
    "train.schedule": "the schedule follows the new config",
    "train.global_batch_size": "training continues at the same number of consumed samples",
    "parallel": "the checkpoint is resharded on load; RNG streams start afresh",
}


@dataclass
class Plan:
    candidates: list[Candidate]  # to resume from, the preferred first; empty: a fresh start
    changes: list[str]  # how the config differs from the checkpoint's, one line each


def plan(cfg: DictConfig, specs: dict, tokenizer: dict | None, checkpointer, run_files: list[str]) -> Plan:
    """Collective (the checkpoint directory's housekeeping). Raises ConfigError for a checkpoint
    this run cannot continue; on a fresh start checks the slots' ``init`` sources."""
    ckpt = cfg.checkpoint
    checkpointer.tidy()
    found = find_checkpoints(ckpt.dir)
    if not ckpt.resume or not found:
        for spec in specs.values():
            check_init(spec, tokenizer, cfg.parallel.tp)
        checkpointer.start_fresh(run_files, "checkpoint.resume=false" if found else "nothing to resume")
        return Plan([], [])
    newest = found[0]
    require(cfg.train.steps >= newest.step, "train.steps", cfg.train.steps,
            f"the checkpoint {newest.path} is already at step {newest.step}; raise train.steps to continue training")
    check_tokenizer(newest.metadata.get("tokenizer"), tokenizer, newest.path)
    saved = saved_slots(newest.metadata)
    for name, spec in specs.items():
        if spec.trainable:
            require(name in saved, "checkpoint.dir", str(ckpt.dir),
                    f"the checkpoint {newest.path} holds no slot {name!r} (it holds {sorted(saved)}); "
                    "use another checkpoint.dir")
            check_shape(saved[name]["args"], spec, newest.path)
        else:
            check_init(spec, tokenizer, cfg.parallel.tp)
    return Plan(found, config_changes(newest.metadata["config"], cfg))


def check_tokenizer(saved: dict | None, tokenizer: dict | None, path: str) -> None:
    if (saved and saved["fingerprint"]) != (tokenizer and tokenizer["fingerprint"]):
        raise ConfigError("data.tokenizer", tokenizer and f"{tokenizer['type']}:{tokenizer['model']}",
                          f"the checkpoint {path} was trained with tokenizer {saved and saved['model']}, whose token "
                          "ids mean other strings; use its tokenizer or another checkpoint.dir")


def check_shape(saved_args: dict, spec, path: str) -> None:
    """``spec``'s model has the shape of ``saved_args`` (a checkpoint's slot); ConfigError naming
    the first field that differs."""
    saved, wanted = registry.shape(OmegaConf.create(saved_args)), registry.shape(spec.args)
    for field, value in wanted.items():
        if saved.get(field) != value:
            raise ConfigError(f"{spec.field}.{field}", value, f"the checkpoint {path} holds a model with "
                              f"{field}={saved.get(field)!r}; a model of another shape cannot resume it: "
                              "use another checkpoint.dir")


def check_init(spec, tokenizer: dict | None, tp: int) -> None:
    """``spec.init`` (when set) can start the slot: a zarr checkpoint of ``tokenizer`` (the run's)
    holding a model of its shape, or of a shape it is initialised by, or an HF Mixtral directory of
    its shape and of the embedding rows the run's tokenizer gives it at tensor-parallel size ``tp``
    (ConfigError naming ``spec.init_field``, or the model field that differs)."""
    if spec.init is None:
        return
    field = spec.init_field
    if mixtral.is_model_dir(str(spec.init)):  # an HF Mixtral directory: its config has the shape
        rows = registry.padded_vocab(registry.spec_of(spec.args), spec.vocab_size, tp)
        mixtral.check_init(str(spec.init), spec.args, rows, field, spec.field)
        return
    path = checkpoint_path(str(spec.init), field)
    metadata = saved_run(path, field)
    slots = saved_slots(metadata)
    name = spec.init_slot or primary_slot(metadata)
    require(name in slots, field, spec.init, f"holds no slot {name!r} (it holds {sorted(slots)})")
    if spec.vocab_size is not None:
        saved = metadata["tokenizer"]
        require(saved is not None and tokenizer is not None and saved["fingerprint"] == tokenizer["fingerprint"],
                field, spec.init, f"was trained with tokenizer {saved and saved['model']}, not "
                f"{tokenizer and tokenizer['type'] + ':' + tokenizer['model']}")
    source = OmegaConf.create(slots[name]["args"])
    target = registry.spec_of(spec.args)
    source_arch = registry.spec_of(source).arch
    require(source_arch == target.arch or source_arch in target.initialised_by, field, spec.init,
            f"holds a {source_arch} model, which cannot start a {target.arch}")
    # The fields both share: a head the source lacks starts fresh.
    source_shape = registry.shape(source)
    for key, value in registry.shape(spec.args).items():
        if key in source_shape and key != "arch" and source_shape[key] != value:
            raise ConfigError(f"{spec.field}.{key}", value, f"{field}={spec.init} holds a model with "
                              f"{key}={source_shape[key]!r}")


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _note(key: str) -> str:
    return _NOTES.get(key) or _NOTES.get(key.split(".")[0], "")


def config_changes(saved: dict, cfg: DictConfig) -> list[str]:
    """One line per changed field (``old -> new``, with what it does)."""
    old = _flatten(saved)
    new = _flatten(OmegaConf.to_container(cfg, resolve=True))
    lines = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, "<absent>"), new.get(key, "<absent>")
        if before != after:
            note = _note(key)
            lines.append(f"  {key}: {before!r} -> {after!r}" + (f" ({note})" if note else ""))
    return lines


def restores_rng(metadata: dict, layout: dict, world_size: int) -> bool:
    """RNG streams belong to ranks: restored only in the layout that saved them."""
    return metadata["layout"] == layout and metadata["world_size"] == world_size
