"""Image captioning, LLaVA-style: THANN reading a frozen image encoder's projected patch states
before its text (finetune_captioning.py)."""

from thann.recipes.captioning.recipe import Captioning

__all__ = ["Captioning"]
