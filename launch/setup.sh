#!/usr/bin/env bash
# Sets up THANN on a fresh machine, idempotently: a virtualenv in .venv, PyTorch (the CPU build
# where there is no GPU), THANN with its extras, and the default corpora in data/ (text and pairs).
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[wandb,tensorboard,dev]"

if [ ! -f data/sharegpt_text.idx ]; then
    .venv/bin/python -m thann.data.preprocess --corpus sharegpt_text --output-prefix data/sharegpt_text --workers 2
fi
if [ ! -f data/sharegpt_pairs.idx ]; then  # retrieval pairs for pretrain_contrastive.py (~5 s)
    .venv/bin/python -m thann.data.preprocess --corpus sharegpt_pairs --output-prefix data/sharegpt_pairs --workers 2
fi
if [ ! -d data/classification/newsgroups20 ]; then  # MNIST, Fashion-MNIST, 20 Newsgroups for train_classifier.py (~10 s)
    .venv/bin/python -m thann.data.classification
fi
