"""Pretrain THANN (like Megatron-LM's pretrain_gpt.py): python pretrain_thann.py [overrides]
or torchrun --nproc-per-node N pretrain_thann.py [overrides]."""

from thann.cli import pretrain

if __name__ == "__main__":  # the guard matters: checkpoint writers start spawned processes
    pretrain()
