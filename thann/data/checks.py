"""Checks of a data config for indexed datasets (``data.paths`` and friends); each failure
names the field. Recipes that read indexed datasets run them before anything is built."""

import os
import warnings
from collections.abc import Sequence

from omegaconf import DictConfig

from thann.config import ConfigError, require
from thann.data.tokenizer import Tokenizer, build_tokenizer


def _formats_prompt(template: str) -> bool:
    try:
        return template.format(prompt="a") != template.format(prompt="b")
    except (KeyError, IndexError, ValueError):
        return False


def check_tokenizer(data: DictConfig) -> Tokenizer:
    try:
        return build_tokenizer(data.tokenizer.type, data.tokenizer.model)
    except ValueError as e:
        raise ConfigError("data.tokenizer", dict(data.tokenizer), str(e)) from None


def check_prompt_template(data: DictConfig) -> None:
    require(data.prompt_template == "chat" or _formats_prompt(data.prompt_template), "data.prompt_template",
            data.prompt_template, "must be chat or a format string whose one field is {prompt}")


def check_data(data: DictConfig) -> Tokenizer:
    """Checks ``data`` and returns its tokenizer (loaded once, for the recipe to keep)."""
    from thann.data.datasets import LOSS_MASKS, dataset_tokenizer
    from thann.data.preprocess import loss_mask_prefix

    paths = data.paths
    require(isinstance(paths, Sequence) and not isinstance(paths, str) and len(paths) > 0, "data.paths", paths,
            "must be a non-empty list of indexed dataset prefixes")
    if data.weights is not None:
        require(isinstance(data.weights, Sequence) and len(data.weights) == len(paths), "data.weights",
                data.weights, f"must be null or one weight per path ({len(paths)})")
        require(all(float(w) > 0 for w in data.weights), "data.weights", data.weights, "must all be positive")
    parts = str(data.split).split(",")
    require(len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts)
            and float(parts[0]) > 0 and float(parts[1]) > 0, "data.split", data.split,
            "must be 'train,valid,test' weights with positive train and valid, e.g. '98,2,0'")
    require(data.loss_mask in LOSS_MASKS, "data.loss_mask", data.loss_mask, f"must be one of {list(LOSS_MASKS)}")
    tokenizer = check_tokenizer(data)
    for i, prefix in enumerate(paths):
        field = f"data.paths[{i}]"
        needed = [f"{prefix}.bin", f"{prefix}.idx"]
        if data.loss_mask == "assistant":
            needed += [f"{loss_mask_prefix(prefix)}.bin", f"{loss_mask_prefix(prefix)}.idx"]
        missing = [p for p in needed if not os.path.isfile(p)]
        require(not missing, field, prefix, f"no indexed dataset there (missing {', '.join(missing)}); create it "
                "with `python -m thann.data.preprocess`" + (" --loss-mask" if data.loss_mask == "assistant" else ""))
        recorded = dataset_tokenizer(prefix)
        if recorded is None:
            warnings.warn(f"{field}={prefix!r} has no {prefix}.json recording its tokenizer; "
                          f"assuming it was made with {tokenizer.identity['model']}")
            continue
        require(recorded.get("fingerprint") == tokenizer.fingerprint, field, prefix,
                f"was tokenized with {recorded.get('type')}:{recorded.get('model')} ({recorded.get('fingerprint')}), "
                f"but the run uses data.tokenizer={data.tokenizer.type}:{data.tokenizer.model} "
                f"({tokenizer.fingerprint}); set data.tokenizer to match or preprocess the data again")
    return tokenizer
