"""Contrastive pretraining of THANN as an embedding model (pretrain_contrastive.py)."""

from thann.recipes.contrastive.recipe import Contrastive

__all__ = ["Contrastive"]
