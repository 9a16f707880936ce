"""Language-model pretraining (pretrain_thann.py)."""

from thann.recipes.pretrain.recipe import Pretrain

__all__ = ["Pretrain"]
