"""Models for inference out of a checkpoint, in the layout of the current run, built the one way
(thann.models.registry) from what the checkpoint records of its slots (thann.checkpoint.weights):
no run config is needed, and only the model's arrays are read.

    path, metadata = saved("checkpoints/thann_tiny", "load")    # a run or iter_* directory
    record = slot_record(metadata)                              # the primary slot: args, vocabulary, length
    check_layout(record, parallel_cfg)                          # before process groups exist
    chunks = build_from_checkpoint(path, record, parallel_cfg, precision="auto")
"""

from omegaconf import DictConfig, OmegaConf

from thann.checkpoint.weights import checkpoint_path, load_weights, primary_slot, saved_run, saved_slots
from thann.config import ConfigError
from thann.data.tokenizer import Tokenizer, build_tokenizer
from thann.models import registry


def saved(path: str, field: str) -> tuple[str, dict]:
    """(checkpoint directory, its metadata) of a run or checkpoint directory; refuses pickles."""
    checkpoint = checkpoint_path(path, field)
    return checkpoint, saved_run(checkpoint, field)


def slot_record(metadata: dict, slot: str | None = None) -> dict:
    """The record of ``slot`` (default: the recipe's primary): args, vocab_size, seq_length."""
    return saved_slots(metadata)[slot or primary_slot(metadata)]


def slot_args(record: dict) -> DictConfig:
    return OmegaConf.create(record["args"])


def check_layout(record: dict, parallel_cfg) -> None:
    """The slot's model runs in ``parallel_cfg`` (ConfigError naming the field)."""
    args = slot_args(record)
    registry.spec_of(args).check(args, parallel_cfg, "none")


def build_from_checkpoint(path: str, record: dict, parallel_cfg, precision: str, prefix: str = "") -> list:
    """Collective: this rank's stage of the model ``record`` describes (a slot of the checkpoint
    at ``path``, its arrays under ``prefix``) with the checkpoint's weights, in evaluation mode
    (process groups must exist)."""
    model, _ = registry.build(slot_args(record), parallel_cfg, vocab_size=record["vocab_size"],
                              max_sequence_length=record["seq_length"], bf16=registry.use_bf16(precision))
    load_weights([model], path, prefix)
    return [model.eval()]


def saved_tokenizer(metadata: dict, requested: DictConfig | None, field: str) -> Tokenizer:
    """The tokenizer the checkpoint was trained with; ``requested`` (type, model), when given,
    must be the same one."""
    recorded = metadata["tokenizer"]
    if recorded is None:
        raise ConfigError(field, None, "the checkpoint records no tokenizer: it is not a language model")
    spec = requested if requested is not None else recorded
    try:
        tokenizer = build_tokenizer(spec["type"], spec["model"])
    except ValueError as e:
        raise ConfigError(field, dict(spec), str(e)) from None
    if tokenizer.fingerprint != recorded["fingerprint"]:
        raise ConfigError(field, f"{spec['type']}:{spec['model']}",
                          f"the checkpoint was trained with {recorded['type']}:{recorded['model']} "
                          f"({recorded['fingerprint']}), whose token ids mean other strings")
    return tokenizer
