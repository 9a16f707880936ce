"""Tokenizers: BPE trained here is lossless; files and identities agree; a mismatch fails clearly."""

import os
import shutil

import pytest

from conftest import data_cfg
from thann.config import ConfigError
from thann.data.checks import check_data
from thann.data.preprocess import preprocess
from thann.data.readers import Document, read_inputs
from thann.data.tokenizer import build_tokenizer, train_bpe

TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. 日本語のテキスト。\n"
) * 40
HARD_CASES = [
    "The quick brown fox.",
    "  leading spaces, trailing spaces  \n\n\ttabs\r\nwindows newlines",
    "never seen: ñ, ø, 🦊, ∑, Ωmega, 中文, \x00 nul, \u200b zero-width",
    "special-token text is data: <|endoftext|> <|im_start|>user",
    "",
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    (folder / "train.txt").write_text(TRAINING_TEXT, encoding="utf-8")
    texts = (d.text for d in read_inputs([str(folder / "train.txt")], text_mode="paragraph"))
    train_bpe(texts, vocab_size=500, output_dir=str(folder / "tokenizer"))
    return folder / "tokenizer"


def test_bpe_trained_on_a_text_file_is_lossless(bpe_dir):
    tokenizer = build_tokenizer("huggingface", str(bpe_dir))
    assert 300 < tokenizer.vocab_size <= 500
    assert len(tokenizer.encode("The quick brown fox jumps")) < len("The quick brown fox jumps") / 2  # it learnt merges
    for text in HARD_CASES + [TRAINING_TEXT]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|endoftext|>") != [tokenizer.eod]  # text is never a control token


def test_bpe_loads_from_vocab_and_merges_with_the_same_ids(bpe_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(bpe_dir / name, tmp_path / name)
    from_json, from_files = build_tokenizer("huggingface", str(bpe_dir / "tokenizer.json")), build_tokenizer(
        "huggingface", str(tmp_path))
    assert from_files.fingerprint == from_json.fingerprint
    assert from_files.eod == from_json.eod and from_files.special("<|im_start|>") == from_json.special("<|im_start|>")
    for text in HARD_CASES:
        assert from_files.encode(text) == from_json.encode(text)


def test_missing_tokenizer_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer at .*expected a tokenizer.json"):
        build_tokenizer("huggingface", str(tmp_path))


def _data_cfg(prefix, kind, model):
    return data_cfg(paths=[prefix], tokenizer={"type": kind, "model": model})


def test_dataset_made_with_another_tokenizer_is_refused(bpe_dir, tmp_path):
    prefix = str(tmp_path / "bpe_data")
    preprocess([Document("a", text=t) for t in HARD_CASES[:3]], prefix, "huggingface", str(bpe_dir))
    check_data(_data_cfg(prefix, "huggingface", str(bpe_dir)))  # the same tokenizer: accepted
    with pytest.raises(ConfigError, match=r"data.paths\[0\].*was tokenized with huggingface:.*"
                                          r"but the run uses data.tokenizer=tiktoken:cl100k_base"):
        check_data(_data_cfg(prefix, "tiktoken", "cl100k_base"))
    os.remove(f"{prefix}.json")  # made by another tool: nothing to compare, so a warning
    with pytest.warns(UserWarning, match="has no .*json recording its tokenizer"):
        check_data(_data_cfg(prefix, "tiktoken", "cl100k_base"))
