"""Models for generation (or to start a later stage from) out of a checkpoint, in the layout of
the current run: only the checkpoint's JSON and the model's arrays are read and verified, never
a pickle and never the optimizer state."""

import os

from omegaconf import DictConfig, OmegaConf

from thann.checkpoint import zarr_store
from thann.checkpoint.checkpointer import METADATA, find_checkpoints, read_metadata
from thann.checkpoint.parts import ModelPart
from thann.config import ConfigError
from thann.data.tokenizer import Tokenizer, build_tokenizer


def checkpoint_path(path: str, field: str = "checkpoint") -> str:
    """A checkpoint directory, or a run directory's newest checkpoint; ConfigError otherwise."""
    if os.path.isfile(os.path.join(path, METADATA)):
        return path
    found = find_checkpoints(path)
    if not found:
        raise ConfigError(field, path, "no checkpoint there (neither an iter_* directory nor a run directory "
                                       "holding one)")
    return found[0].path


def saved_run(path: str, field: str = "checkpoint") -> dict:
    """The checkpoint's metadata, refusing formats that would have to be unpickled."""
    metadata = read_metadata(path)
    if metadata["format"] != "zarr":
        raise ConfigError(field, path, f"format {metadata['format']!r} keeps megatron-core's pickled metadata; "
                                       "generation and initialisation read only THANN's zarr checkpoints")
    if not os.path.exists(os.path.join(path, zarr_store.COMMON)):
        raise zarr_store.PickledCheckpoint(path)
    return metadata


def saved_config(metadata: dict) -> DictConfig:
    return OmegaConf.create(metadata["config"])


def saved_tokenizer(metadata: dict, requested: DictConfig | None, field: str) -> Tokenizer:
    """The tokenizer the checkpoint was trained with; ``requested`` (type, model), when given,
    must be the same one."""
    saved = metadata["tokenizer"]
    if saved is None:
        raise ConfigError(field, None, "the checkpoint records no tokenizer: it is not a language model")
    spec = requested if requested is not None else saved
    try:
        tokenizer = build_tokenizer(spec["type"], spec["model"])
    except ValueError as e:
        raise ConfigError(field, dict(spec), str(e)) from None
    if tokenizer.fingerprint != saved["fingerprint"]:
        raise ConfigError(field, f"{spec['type']}:{spec['model']}",
                          f"the checkpoint was trained with {saved['type']}:{saved['model']} "
                          f"({saved['fingerprint']}), whose token ids mean other strings")
    return tokenizer


def load_weights(model_chunks: list, path: str, strict: bool = True) -> list[str]:
    """Collective: fills this rank's model stage from the checkpoint's model arrays (any layout).
    ``strict=False`` loads what the checkpoint has and leaves the rest as initialised (a new head
    on a pretrained decoder); returns the names of what was left."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    part = ModelPart(model_chunks)
    wanted = part.state(is_loading=True)
    fresh = []
    if not strict:
        def saved(leaf) -> bool:
            if isinstance(leaf, ShardedTensor):
                return os.path.isfile(os.path.join(path, leaf.key, "zarr.json"))
            if isinstance(leaf, ShardedObject):
                return os.path.isdir(os.path.join(path, "objects", leaf.key))
            return True

        fresh = sorted(name for name, leaf in wanted.items() if not saved(leaf))
        wanted = {name: leaf for name, leaf in wanted.items() if name not in fresh}
    loaded = zarr_store.load({"model": wanted}, path, verify_all=False)
    part.module.load_state_dict(loaded["model"], strict=strict)
    return fresh
