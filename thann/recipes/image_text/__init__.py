"""Image-text contrastive training: a ViT beside THANN's text encoder (pretrain_image_text.py)."""

from thann.recipes.image_text.recipe import ImageText

__all__ = ["ImageText"]
