"""Corpus -> indexed dataset -> the same text back."""

import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from thann.data.preprocess import jsonl_documents, preprocess
from thann.data.tokenizer import Tokenizer, padded_vocab_size


def test_jsonl_round_trip(tmp_path):
    texts = ["Hello world.", "Ünïcödé ✓ and <|endoftext|> as plain text", "line one\n\nline two"]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    summary = preprocess(jsonl_documents(str(source), "text"), str(tmp_path / "docs"), workers=2)
    assert summary["documents"] == 3
    tokenizer = Tokenizer()
    dataset = IndexedDataset(str(tmp_path / "docs"))
    assert len(dataset) == 3
    for text, ids in zip(texts, dataset):
        assert ids[-1] == tokenizer.eod
        assert tokenizer.decode(np.asarray(ids[:-1]).tolist()) == text
    assert json.loads((tmp_path / "docs.json").read_text())["tokenizer"] == "cl100k_base"


def test_malformed_line_is_reported_with_its_line_number(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        preprocess(jsonl_documents(str(source), "text"), str(tmp_path / "bad"))
    assert not (tmp_path / "bad.idx").exists()


def test_vocab_is_padded_for_tensor_parallelism():
    assert Tokenizer().vocab_size == 100277
    assert padded_vocab_size(100277, 1) == 100352
    assert padded_vocab_size(100277, 4) % (128 * 4) == 0
