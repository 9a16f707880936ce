"""Tokenize a corpus into megatron-core's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

    python -m thann.data.preprocess --corpus sharegpt_text --output-prefix data/sharegpt_text
    python -m thann.data.preprocess --input docs.jsonl --json-keys text --output-prefix data/docs

Every document is followed by the tokenizer's end-of-document token. Outputs are written under
temporary names and renamed only when complete, so a half-written dataset never looks finished.
``PREFIX.json`` records the tokenizer and the counts next to the data.
"""

import argparse
import json
import os
import sys
import time
from multiprocessing import Pool
from typing import Iterable, Iterator

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tqdm import tqdm

from thann.data.corpora import CORPORA
from thann.data.tokenizer import Tokenizer

_CHUNK = 256  # documents per worker task
_tokenizer = None


def _init_worker(tokenizer_name: str) -> None:
    global _tokenizer
    _tokenizer = Tokenizer(tokenizer_name)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    return [ids + [_tokenizer.eod] for ids in _tokenizer.encode_batch(texts)]


def jsonl_documents(path: str, key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[key]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_number}: not a JSON object with a {key!r} key ({e})") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_number}: {key!r} is {type(text).__name__}, expected a string")
            yield text


def _chunks(documents: Iterable[str], limit: int | None) -> Iterator[list[str]]:
    chunk, count = [], 0
    for text in documents:
        if limit is not None and count >= limit:
            break
        if text:
            chunk.append(text)
            count += 1
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def preprocess(documents: Iterable[str], output_prefix: str, tokenizer_name: str = "cl100k_base",
               workers: int = 1, limit: int | None = None) -> dict:
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp_bin, tmp_idx = f"{output_prefix}.bin.tmp", f"{output_prefix}.idx.tmp"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=np.int32)
    n_docs = n_tokens = 0
    start = time.perf_counter()
    with Pool(workers, initializer=_init_worker, initargs=(tokenizer_name,)) as pool, \
            tqdm(desc="tokenizing", unit=" docs", disable=not sys.stderr.isatty()) as bar:
        for encoded in pool.imap(_encode_chunk, _chunks(documents, limit)):
            for ids in encoded:
                builder.add_document(torch.tensor(ids, dtype=torch.int32), [len(ids)])
                n_tokens += len(ids)
            n_docs += len(encoded)
            bar.update(len(encoded))
    builder.finalize(tmp_idx)
    summary = {"tokenizer": tokenizer_name, "documents": n_docs, "tokens": n_tokens,
               "seconds": round(time.perf_counter() - start, 2)}
    os.replace(tmp_bin, f"{output_prefix}.bin")
    with open(f"{output_prefix}.json", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp_idx, f"{output_prefix}.idx")  # last: its presence marks a complete dataset
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="a JSON-lines file with one document per line")
    source.add_argument("--corpus", choices=sorted(CORPORA), help="an offline corpus by name")
    parser.add_argument("--json-keys", default="text", help="key of the document text in each JSON line")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer", default="cl100k_base")
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--limit-documents", type=int, default=None)
    args = parser.parse_args(argv)
    documents = CORPORA[args.corpus]() if args.corpus else jsonl_documents(args.input, args.json_keys)
    try:
        summary = preprocess(documents, args.output_prefix, args.tokenizer, args.workers, args.limit_documents)
    except ValueError as e:
        sys.exit(f"preprocess: {e}")
    print(f"wrote {args.output_prefix}.bin/.idx: {summary['documents']} documents, "
          f"{summary['tokens']} tokens in {summary['seconds']} s")


if __name__ == "__main__":
    main()
