"""Contrastive pretraining of THANN as an embedding model: python pretrain_contrastive.py
[overrides] or torchrun --nproc-per-node N pretrain_contrastive.py [overrides]."""

from thann.cli import contrastive

if __name__ == "__main__":  # the guard matters: checkpoint writers start spawned processes
    contrastive()
