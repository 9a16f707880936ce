"""What a checkpoint holds, and its model weights read into a model of any layout: only the
checkpoint's JSON and the model's arrays are read and verified, never a pickle and never the
optimizer state. Used to start a slot from a checkpoint (``init_from``, a frozen slot) and by the
inference tools (thann.inference.load).

A checkpoint records its slots (``slots``: each slot's model args, vocabulary and sequence length)
and which one is the recipe's ``primary`` (the model it produces: the one the tools read). The
primary slot's arrays carry no prefix; another slot's are under ``<slot>.``.
"""

import os

import torch
from omegaconf import DictConfig, OmegaConf

from thann.checkpoint import zarr_store
from thann.checkpoint.directory import METADATA, find_checkpoints, read_metadata
from thann.checkpoint.parts import ModelPart
from thann.config import ConfigError


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


def primary_slot(metadata: dict) -> str:
    return metadata.get("primary", "model")


def saved_slots(metadata: dict) -> dict[str, dict]:
    """{slot: record} (thann.training.slots.SlotSpec.record). Checkpoints written before slots
    were recorded hold one model, described by their config."""
    if "slots" in metadata:
        return metadata["slots"]
    config = metadata["config"]
    args = dict(config["model"])
    if "contrastive" in config:  # an encoder: THANN's decoder with a pooled head
        c = config["contrastive"]
        args.update(arch="thann_encoder", pooling=c["pooling"], projection_dim=c["projection_dim"],
                    learnt_temperature=c["temperature"] if c["learnable_temperature"] else None)
    if "classify" in config:  # a classifier's heads, one per dataset
        from thann.data.classification import heads

        args["heads"] = heads(config["classify"].get("datasets", config["classify"].get("tasks")))
    tokenizer = metadata["tokenizer"]
    vocab_size = None
    if tokenizer is not None:
        from thann.data.tokenizer import build_tokenizer

        vocab_size = build_tokenizer(tokenizer["type"], tokenizer["model"]).vocab_size
    return {"model": {"args": args, "vocab_size": vocab_size, "seq_length": config["train"]["seq_length"],
                      "trainable": True, "init": config.get("init_from")}}


def slot_prefix(metadata: dict, slot: str) -> str:
    return "" if slot == primary_slot(metadata) else f"{slot}."


def load_weights(model_chunks: list, path: str, prefix: str = "", strict: bool = True) -> list[str]:
    """Collective: fills this rank's model stage from the checkpoint's arrays under ``prefix``
    (any layout). ``strict=False`` loads what the checkpoint has and leaves the rest as
    initialised (a new head on a pretrained decoder); returns the names of what was left."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    part = ModelPart(model_chunks, prefix)
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
    loaded = zarr_store.load({"model": wanted}, path)
    part.module.load_state_dict(loaded["model"], strict=strict)
    return fresh


def load_arrays(model_chunks: list, arrays: dict, strict: bool = True) -> list[str]:
    """Fills this rank's model stage from whole arrays named and shaped as a checkpoint's (an
    imported model's, thann.checkpoint.mixtral): each rank copies its own slices, in any layout.
    ``strict=False`` leaves what ``arrays`` lacks as initialised; returns the names of what was left."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    part = ModelPart(model_chunks)
    wanted = part.state(is_loading=True)
    fresh = [] if strict else sorted(name for name, leaf in wanted.items()
                                     if isinstance(leaf, ShardedTensor) and leaf.key not in arrays)
    wanted = {name: leaf for name, leaf in wanted.items() if name not in fresh}

    def read(leaf):
        if isinstance(leaf, ShardedTensor):
            array = arrays[leaf.key]
            if tuple(array.shape) != tuple(leaf.global_shape):
                raise ValueError(f"{leaf.key}: imported shape {list(array.shape)}, this model expects "
                                 f"{list(leaf.global_shape)}")
            leaf.data.copy_(array[leaf.global_slice()].view(leaf.data.shape))
            return leaf.data
        return leaf.data if isinstance(leaf, ShardedObject) else leaf  # the module's own extra state

    with torch.no_grad():
        dict_list_map_inplace(read, wanted)
    part.module.load_state_dict(wanted, strict=strict)
    return fresh
