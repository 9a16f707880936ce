"""Classification with ChaosNet or its matched MLP (train_classifier.py)."""

from thann.recipes.classify.recipe import Classify

__all__ = ["Classify"]
