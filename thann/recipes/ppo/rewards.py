"""What a response is worth (``ppo.reward``), from its decoded text:

    sentiment           VADER's compound score of the response, in [-1, 1] (the vaderSentiment package)
    module:function     a callable imported from the working directory or an installed package,
                        called as function(prompts: list[str], responses: list[str]) -> list[float]
    a checkpoint path   a THANN model with a value head (thann_value), scoring the response's last
                        token: a frozen ``reward`` slot of the recipe (thann.recipes.ppo.recipe)
"""

import importlib
import math
import os
import sys
from typing import Callable

from thann.config import ConfigError, require

SENTIMENT = "sentiment"


class RewardError(ConfigError):
    """The reward callable failed or returned something other than one finite number per response."""


def is_checkpoint(spec: str) -> bool:
    return spec != SENTIMENT and os.path.exists(spec)


def reward_function(spec: str) -> Callable[[list[str], list[str]], list[float]]:
    """The callable ``ppo.reward`` names (not for a checkpoint); ConfigError when it cannot be had."""
    if spec == SENTIMENT:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        analyzer = SentimentIntensityAnalyzer()
        return lambda prompts, responses: [analyzer.polarity_scores(r)["compound"] for r in responses]
    module_name, sep, name = spec.partition(":")
    require(bool(sep and module_name and name), "ppo.reward", spec,
            "must be sentiment, module:function or a checkpoint directory (none exists there)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # "from the working directory", as `python -m` would
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError("ppo.reward", spec, f"cannot import {module_name!r}: {e}") from None
    function = getattr(module, name, None)
    require(callable(function), "ppo.reward", spec, f"{module_name} has no callable {name!r}")
    return function


def scores(function, spec: str, prompts: list[str], responses: list[str]) -> list[float]:
    """function(prompts, responses), checked: one finite number per response (RewardError)."""
    try:
        values = function(list(prompts), list(responses))
    except Exception as e:  # the user's code: whatever it raises is reported in one line
        raise RewardError("ppo.reward", spec, f"raised {type(e).__name__}: {e}") from None
    if not isinstance(values, (list, tuple)) or len(values) != len(responses):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardError("ppo.reward", spec, f"returned {got} for {len(responses)} responses; "
                          "it must return one number per response")
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise RewardError("ppo.reward", spec, "returned something that is not a number") from None
    if not all(math.isfinite(v) for v in values):
        raise RewardError("ppo.reward", spec, "returned a NaN or infinite reward")
    return values
