"""Fine-tune a THANN language model with PPO: python finetune_ppo.py [overrides]
or torchrun --nproc-per-node N finetune_ppo.py [overrides]."""

from thann.cli import ppo

if __name__ == "__main__":  # the guard matters: checkpoint writers start spawned processes
    ppo()
