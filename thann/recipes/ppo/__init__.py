"""PPO fine-tuning of a THANN language model (finetune_ppo.py)."""

from thann.recipes.ppo.recipe import PPO

__all__ = ["PPO"]
