"""Input files -> documents, each with the place it came from; bad records become ``Problem``s.

Forms, chosen by file extension:

- ``.jsonl``/``.ndjson`` (and ``.json`` holding JSON lines): one record per line.
- ``.json`` starting with ``[``: one JSON array of records.
- ``.parquet``: one record per row (pyarrow).
- anything else: plain UTF-8 text, one document per file or per blank-line-separated block.

A record is a document when it has the text key (``--json-keys``, a string), or is a chat
conversation (``messages`` or ``conversations``, see ``thann.data.chat``); with ``pairs`` it is
a retrieval pair ``{"query": ..., "positive": ..., "negatives": [...]}`` (negatives optional). Malformed JSON,
wrong types, missing keys, empty documents and invalid UTF-8 are reported with file and line
(``path:line``; ``path:row N`` for parquet, counted from 1) and never silently dropped.
"""

import itertools
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

from thann.data.chat import RecordError, messages_of

TEXT_MODES = ("file", "paragraph")
_EXCERPT = 160


@dataclass(frozen=True)
class Document:
    source: str
    text: str | None = None  # a plain document ...
    messages: tuple | None = None  # ... or a conversation: ((role, content), ...)
    pair: tuple | None = None  # ... or a retrieval pair: (query, positive, *negatives)


@dataclass(frozen=True)
class Problem:
    source: str
    category: str  # short, for the summary: "malformed JSON", "empty document", ...
    message: str
    record: str = ""  # an excerpt of the offending input

    def __str__(self) -> str:
        return f"{self.source}: {self.category}: {self.message}" + (f"\n  record: {self.record}" if self.record else "")

    def one_line(self) -> str:
        return f"{self.source}: {self.category}: {self.message}" + (f" (record: {self.record})" if self.record else "")


class InputError(ValueError):
    """Input that cannot be read at all (a missing file, an unreadable parquet file)."""


def _excerpt(text: str) -> str:
    return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "..."


def input_files(paths: Iterable[str]) -> list[str]:
    """The files named, with directories expanded recursively (sorted; hidden files skipped)."""
    files = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
        else:
            raise InputError(f"--input {path!r}: no such file or directory")
    return files


def record_document(record, key: str, source: str) -> Document | Problem:
    """A parsed JSON record or parquet row -> a document, or the problem with it."""

    def problem(category: str, message: str) -> Problem:  # the excerpt is made for bad records only
        return Problem(source, category, message, _excerpt(json.dumps(record, ensure_ascii=False, default=str)))

    if not isinstance(record, dict):
        return problem("wrong type", f"expected a JSON object, got {type(record).__name__}")
    if key in record:
        text = record[key]
        if not isinstance(text, str):
            return problem("wrong type", f"{key!r} is {type(text).__name__}, expected a string")
        if not text.strip():
            return problem("empty document", f"{key!r} is empty")
        return Document(source, text=text)
    if "messages" in record or "conversations" in record:
        try:
            return Document(source, messages=tuple(messages_of(record)))
        except RecordError as e:
            return problem("empty document" if str(e) == "empty document" else "bad chat record", str(e))
    return problem("missing key", f"no {key!r}, 'messages' or 'conversations' key")


def record_pair(record, source: str) -> Document | Problem:
    """A parsed JSON record -> a retrieval pair, or the problem with it."""

    def problem(category: str, message: str) -> Problem:
        return Problem(source, category, message, _excerpt(json.dumps(record, ensure_ascii=False, default=str)))

    if not isinstance(record, dict):
        return problem("wrong type", f"expected a JSON object, got {type(record).__name__}")
    for key in ("query", "positive"):
        if key not in record:
            return problem("missing key", f"no {key!r} key (a pair is {{\"query\", \"positive\", \"negatives\"}})")
        if not isinstance(record[key], str):
            return problem("wrong type", f"{key!r} is {type(record[key]).__name__}, expected a string")
        if not record[key].strip():
            return problem("empty document", f"{key!r} is empty")
    negatives = record.get("negatives", [])
    if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
        return problem("wrong type", "'negatives' must be a list of non-empty strings")
    return Document(source, pair=(record["query"], record["positive"], *negatives))


def _utf8_lines(path: str) -> Iterator[tuple[int, str | Problem]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, Problem(f"{path}:{number}", "invalid UTF-8",
                                      f"byte 0x{raw[e.start]:02x} at column {e.start + 1}", _excerpt(repr(raw)))


def jsonl_documents(path: str, key: str, pairs: bool = False) -> Iterator[Document | Problem]:
    for number, line in _utf8_lines(path):
        if isinstance(line, Problem):
            yield line
            continue
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            record = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            yield Problem(source, "malformed JSON", f"{e.msg} at column {e.colno}", _excerpt(line.rstrip("\n")))
            continue
        yield record_pair(record, source) if pairs else record_document(record, key, source)


def json_array_documents(path: str, key: str, pairs: bool = False) -> Iterator[Document | Problem]:
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except UnicodeDecodeError as e:
        yield Problem(path, "invalid UTF-8", f"byte 0x{e.object[e.start]:02x} at offset {e.start}")
        return
    except json.JSONDecodeError as e:
        yield Problem(f"{path}:{e.lineno}", "malformed JSON", f"{e.msg} at column {e.colno}")
        return
    for i, record in enumerate(records, 1):
        source = f"{path}:item {i}"
        yield record_pair(record, source) if pairs else record_document(record, key, source)


def parquet_documents(path: str, key: str) -> Iterator[Document | Problem]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise InputError(f"{path}: not a readable parquet file ({e})") from None
    columns = table.schema_arrow.names
    column = next((c for c in (key, "messages", "conversations") if c in columns), None)
    if column is None:
        raise InputError(f"{path}: no column {key!r}, 'messages' or 'conversations' (columns: {columns})")
    row = 0
    for batch in table.iter_batches(columns=[column]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield record_document({column: value}, key, f"{path}:row {row}")


def text_documents(path: str, mode: str) -> Iterator[Document | Problem]:
    if mode == "file":
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            yield Problem(f"{path}:{line}", "invalid UTF-8", f"byte 0x{raw[e.start]:02x}")
            return
        yield Document(path, text=text) if text.strip() else Problem(path, "empty document", "the file is empty")
        return
    block, first, bad = [], 0, None
    for number, line in itertools.chain(_utf8_lines(path), [(None, "\n")]):  # a blank line ends the last block
        if isinstance(line, Problem):
            bad = bad or line
            first = first or number
            continue
        if line.strip():
            block.append(line)
            first = first or number
        elif block or bad:
            yield bad or Document(f"{path}:{first}", text="".join(block).rstrip("\n"))
            block, first, bad = [], 0, None


def file_documents(path: str, key: str, text_mode: str, pairs: bool = False) -> Iterator[Document | Problem]:
    name = path.lower()
    if name.endswith((".jsonl", ".ndjson")):
        return jsonl_documents(path, key, pairs)
    if name.endswith(".json"):
        with open(path, "rb") as f:
            starts_array = f.read(4096).lstrip().startswith(b"[")
        return json_array_documents(path, key, pairs) if starts_array else jsonl_documents(path, key, pairs)
    if pairs:
        raise InputError(f"{path}: pairs are read from JSON lines or a JSON array (.jsonl, .json)")
    if name.endswith(".parquet"):
        return parquet_documents(path, key)
    return text_documents(path, text_mode)


def read_inputs(paths: Iterable[str], key: str = "text", text_mode: str = "file",
                pairs: bool = False) -> Iterator[Document | Problem]:
    for path in input_files(paths):
        yield from file_documents(path, key, text_mode, pairs)
