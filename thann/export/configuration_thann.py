"""THANN's configuration for HF transformers: Mixtral's, plus the learnt tokenization's.

Written into every THANN export (python -m thann.export hf) beside modeling_thann.py, and loaded
from there with ``trust_remote_code=True``; it imports nothing of THANN.
"""

from huggingface_hub.dataclasses import strict
from transformers import MixtralConfig


@strict
class ThannConfig(MixtralConfig):
    model_type = "thann"

    # Widths of the learnt tokenization's causal depthwise convolutions; None: no learnt
    # tokenization (the model is Mixtral).
    tokenization_conv_widths: list[int] | None = None
    tokenization_dropout: float = 0.0


__all__ = ["ThannConfig"]
