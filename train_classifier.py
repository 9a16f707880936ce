"""Train a ChaosNet classifier (or its matched MLP) on MNIST, Fashion-MNIST or 20 Newsgroups:
python train_classifier.py [overrides] or torchrun --nproc-per-node N train_classifier.py [overrides]."""

from thann.cli import classify

if __name__ == "__main__":  # the guard matters: checkpoint writers start spawned processes
    classify()
