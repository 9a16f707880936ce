"""Corpus -> indexed dataset -> the same text back; bad input reported where it is."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from thann.data.chat import encode_chat, encode_prompt, render
from thann.data.corpora import CORPORA
from thann.data.preprocess import BadRecord, preprocess
from thann.data.readers import Document, read_inputs
from thann.data.tokenizer import TiktokenTokenizer, padded_vocab_size

TEXTS = ["Hello world.", "Ünïcödé ✓ and <|endoftext|> <|im_start|> as plain text", "line one\nline two\n  indented"]
CHAT = [
    [("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "4.")],
    [("user", "Say <|im_end|> literally"), ("assistant", "<|im_end|>\n\nthere")],
]
SMOLTALK = [{"messages": [{"role": r, "content": c} for r, c in chat]} for chat in CHAT]
SHAREGPT = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(r, r), "value": c}
                               for r, c in chat]} for chat in CHAT]


def _text(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path, records):
    return _text(path, "".join(json.dumps(r) + "\n" for r in records))


def _parquet(path, columns):
    pq.write_table(pa.table(columns), path)
    return path


def _text_files(folder):
    folder.mkdir()
    for i, text in enumerate(TEXTS):
        _text(folder / f"{i}.txt", text)
    return folder


INPUT_FORMS = {
    # form -> (writer(tmp_path) -> input path, read_inputs options, expected document texts)
    "text, one file per document": (lambda p: _text_files(p / "docs"), {}, TEXTS),
    "text, blank-line blocks": (lambda p: _text(p / "b.txt", "\n\n\n".join(TEXTS) + "\n"),
                                {"text_mode": "paragraph"}, TEXTS),
    "jsonl, chosen key": (lambda p: _jsonl(p / "d.jsonl", [{"body": t, "id": i} for i, t in enumerate(TEXTS)]),
                          {"key": "body"}, TEXTS),
    "json array": (lambda p: _text(p / "d.json", json.dumps([{"text": t} for t in TEXTS])), {}, TEXTS),
    "chat, smoltalk form": (lambda p: _jsonl(p / "c.jsonl", SMOLTALK), {}, [render(c) for c in CHAT]),
    "chat, sharegpt form": (lambda p: _jsonl(p / "c.jsonl", SHAREGPT), {}, [render(c) for c in CHAT]),
    "parquet, chosen column": (lambda p: _parquet(p / "t.parquet", {"content": TEXTS}), {"key": "content"}, TEXTS),
    "parquet, chat column": (lambda p: _parquet(p / "c.parquet", {"messages": [s["messages"] for s in SMOLTALK]}),
                             {}, [render(c) for c in CHAT]),
}


@pytest.mark.parametrize("form", INPUT_FORMS)
def test_each_input_form_round_trips(tmp_path, form):
    write, options, expected = INPUT_FORMS[form]
    source = write(tmp_path)
    summary = preprocess(read_inputs([str(source)], **options), str(tmp_path / "out"), workers=2)
    assert summary["documents"] == len(expected) and summary["skipped"] == {}
    tokenizer = TiktokenTokenizer()
    dataset = IndexedDataset(str(tmp_path / "out"))
    assert len(dataset) == len(expected)
    for text, ids in zip(expected, dataset):
        assert ids[-1] == tokenizer.eod
        assert tokenizer.decode(np.asarray(ids[:-1]).tolist()) == text
    assert json.loads((tmp_path / "out.json").read_text())["tokenizer"]["fingerprint"] == tokenizer.fingerprint


def test_assistant_loss_mask_covers_exactly_the_assistant_replies(tmp_path):
    _jsonl(tmp_path / "c.jsonl", SMOLTALK)
    preprocess(read_inputs([str(tmp_path / "c.jsonl")]), str(tmp_path / "chat"), loss_mask=True)
    tokenizer = TiktokenTokenizer()
    tokens, masks = IndexedDataset(str(tmp_path / "chat")), IndexedDataset(str(tmp_path / "chat_loss_mask"))
    for chat, ids, mask in zip(CHAT, tokens, masks):
        assert len(ids) == len(mask)
        learnt = tokenizer.decode([int(i) for i, m in zip(ids, mask) if m])
        assert learnt == "".join(f"{content}<|im_end|>" for role, content in chat if role == "assistant")


def test_chat_prompt_is_a_training_conversation_up_to_the_assistant_reply():
    tokenizer = TiktokenTokenizer()
    prompt = encode_prompt(tokenizer, "What is 2+2?", "chat")
    trained, _ = encode_chat(tokenizer, [("user", "What is 2+2?"), ("assistant", "4.")])
    assert trained[:len(prompt)] == prompt and trained[len(prompt):-1] == tokenizer.encode("4.") + \
        [tokenizer.special("<|im_end|>"), *tokenizer.encode("\n")]
    assert tokenizer.decode(encode_prompt(tokenizer, "Hi", "User: {prompt}\n\nAssistant:")) == "User: Hi\n\nAssistant:"


BAD_RECORDS = {
    # what -> (file content, the reported place, the reported reason)
    "malformed JSON": (b'{"text": "ok"}\n{"text": "ok"}\n{"text": "cut\n', "bad.jsonl:3", "malformed JSON"),
    "wrong type": (b'{"text": "ok"}\n{"text": ["a list"]}\n', "bad.jsonl:2", "'text' is list, expected a string"),
    "empty document": (b'{"text": "ok"}\n\n{"text": "  "}\n', "bad.jsonl:3", "empty document"),
    "invalid UTF-8": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "bad.jsonl:2", "invalid UTF-8"),
    "unknown chat role": (b'{"messages": [{"role": "wizard", "content": "hi"}]}\n', "bad.jsonl:1", "unknown role"),
    "not an object": (b'{"text": "ok"}\n[1, 2]\n', "bad.jsonl:2", "expected a JSON object"),
}


@pytest.mark.parametrize("what", BAD_RECORDS)
def test_bad_record_is_reported_with_file_and_line(tmp_path, what):
    content, place, reason = BAD_RECORDS[what]
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(BadRecord, match=rf"bad.jsonl:{place.split(':')[1]}: .*{reason}"):
        preprocess(read_inputs([str(tmp_path / "bad.jsonl")]), str(tmp_path / "bad"), workers=2)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # nothing written, no temporary files left


def test_invalid_utf8_in_a_text_file_names_the_line(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "t.txt").write_bytes(b"first line\nsecond line\nthird \xff line\n")
    with pytest.raises(BadRecord, match=r"t.txt:3: invalid UTF-8: byte 0xff"):
        preprocess(read_inputs([str(tmp_path / "in")]), str(tmp_path / "out"))


def test_skip_counts_bad_records_by_reason(tmp_path):
    (tmp_path / "mixed.jsonl").write_bytes(b"".join(content for content, _, _ in BAD_RECORDS.values()))
    summary = preprocess(read_inputs([str(tmp_path / "mixed.jsonl")]), str(tmp_path / "out"), on_error="skip")
    assert summary["documents"] == 6  # the six '{"text": "ok"}' lines
    assert summary["skipped"] == {"malformed JSON": 1, "wrong type": 2, "empty document": 1, "invalid UTF-8": 1,
                                  "bad chat record": 1}
    assert len(IndexedDataset(str(tmp_path / "out"))) == 6


def test_a_failed_run_leaves_the_previous_dataset_intact(tmp_path):
    prefix = str(tmp_path / "data")
    preprocess([Document("a", text=t) for t in TEXTS], prefix)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def interrupted():
        yield Document("b", text="a new document")
        raise KeyboardInterrupt  # the user gives up half-way

    with pytest.raises(KeyboardInterrupt):
        preprocess(interrupted(), prefix)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_cli_shows_the_first_bad_record_and_writes_nothing(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "fine"}\n{"txt": "typo"}\n')
    cmd = [sys.executable, "-m", "thann.data.preprocess", "--input", str(tmp_path / "in.jsonl"),
           "--output-prefix", str(tmp_path / "out"), "--workers", "1"]
    failed = subprocess.run(cmd, capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1  # bad input: exit 2, one line
    assert "in.jsonl:2: missing key" in failed.stderr and '{"txt": "typo"}' in failed.stderr
    assert not list(tmp_path.glob("out*"))
    skipped = subprocess.run(cmd + ["--on-error", "skip"], capture_output=True, text=True)
    assert skipped.returncode == 0, skipped.stderr
    assert "1 documents" in skipped.stdout and "skipped 1 records: missing key" in skipped.stdout


def test_cli_refuses_an_output_inside_an_input_directory(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("a document")
    cmd = [sys.executable, "-m", "thann.data.preprocess", "--input", str(tmp_path / "docs"), "--workers", "1",
           "--output-prefix", str(tmp_path / "docs" / "tokens" / "out")]
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 2 and "lies inside the input directory" in refused.stderr
    assert os.listdir(tmp_path / "docs") == ["a.txt"]
    cmd[-1] = str(tmp_path / "docs_tokens")  # a sibling whose name starts like the input's
    written = subprocess.run(cmd, capture_output=True, text=True)
    assert written.returncode == 0, written.stderr


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_named_corpora_read_offline(tmp_path, name):
    summary = preprocess(CORPORA[name](), str(tmp_path / name), limit=20, loss_mask=True)
    assert summary["documents"] == 20 and summary["tokens"] > 20 * 10
    if name == "sharegpt_chat":  # a chat corpus: the assistant replies are what is learnt
        masks = IndexedDataset(str(tmp_path / f"{name}_loss_mask"))
        assert 0 < sum(int(m.sum()) for m in masks) < summary["tokens"]


def test_vocab_is_padded_for_tensor_parallelism():
    assert TiktokenTokenizer().vocab_size == 100277
    assert padded_vocab_size(100277, 1) == 100352
    assert padded_vocab_size(100277, 4) % (128 * 4) == 0
