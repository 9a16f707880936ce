"""Tokenize text or chat corpora into megatron-core's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

    python -m thann.data.preprocess --corpus sharegpt_text --output-prefix data/sharegpt_text
    python -m thann.data.preprocess --input docs.jsonl --json-keys text --output-prefix data/docs
    python -m thann.data.preprocess --input corpus_dir/ --text-documents paragraph --output-prefix data/books
    python -m thann.data.preprocess --input chats.jsonl --loss-mask --output-prefix data/chats \\
        --tokenizer-type huggingface --tokenizer-model tokenizers/my_bpe

Inputs (files or directories, forms in ``thann.data.readers``): plain text, JSON lines or a JSON
array with a text key or chat records (smoltalk ``messages`` / ShareGPT ``conversations``,
rendered with the ChatML template of ``thann.data.chat``), parquet. Each document is followed
by the end-of-document token. ``--loss-mask`` also writes ``PREFIX_loss_mask.bin/.idx``: 1 on
the tokens of assistant replies (every token of plain-text documents), for fine-tuning.

Bad records stop the run at the first one, shown with file and line (``--on-error fail``), or
are skipped and counted by reason in the summary (``--on-error skip``). Outputs are written
under temporary names and renamed only when complete, ``.idx`` last (its presence marks a
complete dataset): a failed run leaves no dataset, or the previous one intact.
``PREFIX.json`` records the tokenizer and the summary next to the data.
"""

import argparse
import collections
import json
import os
import sys
import time
from multiprocessing import Pool
from typing import Iterable, Iterator

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from thann.data.chat import encode_chat
from thann.data.corpora import CORPORA
from thann.data.readers import TEXT_MODES, Document, InputError, Problem, read_inputs
from thann.data.tokenizer import TOKENIZER_TYPES, Tokenizer, build_tokenizer

ON_ERROR = ("fail", "skip")
_CHUNK = 128  # documents per worker task
_EXAMPLES = 5  # skipped records shown in the summary
_worker = None  # per process: (tokenizer, append_eod)


def loss_mask_prefix(prefix: str) -> str:
    """Where the loss-mask companion of the dataset at ``prefix`` lives."""
    return f"{prefix}_loss_mask"


class BadRecord(ValueError):
    """The first bad record under ``on_error="fail"``."""


def _use_in_this_process(tokenizer: Tokenizer, append_eod: bool) -> None:
    global _worker
    _worker = (tokenizer, append_eod)


def _init_worker(tokenizer_type: str, tokenizer_model: str, append_eod: bool) -> None:
    _use_in_this_process(build_tokenizer(tokenizer_type, tokenizer_model), append_eod)


def _encode(documents: list[Document]) -> list[tuple[list[int], list[int], list[int]]]:
    """(token ids, loss mask, sequence lengths) per document: one sequence, or for a retrieval
    pair one per text (query, positive, negatives), each with its end-of-document token."""
    tokenizer, append_eod = _worker
    plain = [d.text for d in documents if d.text is not None]
    texts = iter(tokenizer.encode_batch(plain))
    encoded = []
    for document in documents:
        if document.pair is not None:
            sequences = [ids + [tokenizer.eod] for ids in tokenizer.encode_batch(list(document.pair))]
            ids = [t for sequence in sequences for t in sequence]
            encoded.append((ids, [1] * len(ids), [len(s) for s in sequences]))
            continue
        if document.text is not None:
            ids = next(texts) + [tokenizer.eod]
            mask = [1] * len(ids)
        else:
            ids, mask = encode_chat(tokenizer, list(document.messages))
        ids, mask = (ids, mask) if append_eod else (ids[:-1], mask[:-1])
        encoded.append((ids, mask, [len(ids)]))
    return encoded


class Skipped:
    """Bad records skipped under ``on_error="skip"``: counts by reason and a few examples."""

    def __init__(self):
        self.counts, self.examples = collections.Counter(), []

    def add(self, problem: Problem) -> None:
        self.counts[problem.category] += 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(str(problem))


def good_documents(items: Iterable[Document | Problem], on_error: str, skipped: Skipped,
                   limit: int | None = None) -> Iterator[Document]:
    """The documents among ``items``; a Problem raises BadRecord (``fail``) or is counted (``skip``)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: expected one of {ON_ERROR}")
    count = 0
    for item in items:
        if isinstance(item, Problem):
            if on_error == "fail":
                raise BadRecord(item.one_line() + " (--on-error skip skips bad records and counts them)")
            skipped.add(item)
        elif limit is None or count < limit:
            count += 1
            yield item
        else:
            return


def _chunks(documents: Iterator[Document]) -> Iterator[list[Document]]:
    chunk = []
    for document in documents:
        chunk.append(document)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encoded_chunks(chunks: Iterator[list[Document]], workers: int, tokenizer: Tokenizer,
                    append_eod: bool) -> Iterator[list]:
    """Encoded chunks in input order; reading stays in this process, so a bad record is raised
    here, at its place in the input, with at most ``2 * workers`` chunks in flight."""
    if workers == 1:
        _use_in_this_process(tokenizer, append_eod)
        yield from map(_encode, chunks)
        return
    init_args = (tokenizer.kind, tokenizer.model, append_eod)
    with Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def preprocess(items: Iterable[Document | Problem], output_prefix: str, tokenizer_type: str = "tiktoken",
               tokenizer_model: str = "cl100k_base", workers: int = 1, on_error: str = "fail",
               loss_mask: bool = False, append_eod: bool = True, limit: int | None = None,
               inputs: list[str] | None = None) -> dict:
    """Writes the dataset and returns its summary (also saved as ``PREFIX.json``)."""
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    bin_path, idx_path, json_path = (f"{output_prefix}.{ext}" for ext in ("bin", "idx", "json"))
    mask_bin, mask_idx = (f"{loss_mask_prefix(output_prefix)}.{ext}" for ext in ("bin", "idx"))
    # In the order they are made visible: the token .idx, which marks a complete dataset, last.
    final = [*([mask_bin, mask_idx] if loss_mask else []), bin_path, json_path, idx_path]
    tmp = {path: path + ".tmp" for path in final}
    tokens_out = IndexedDatasetBuilder(tmp[bin_path], dtype=DType.optimal_dtype(tokenizer.vocab_size))
    mask_out = IndexedDatasetBuilder(tmp[mask_bin], dtype=np.uint8) if loss_mask else None
    skipped = Skipped()
    n_docs = n_tokens = n_pairs = 0
    start = time.perf_counter()
    try:
        with tqdm(desc="tokenizing", unit=" docs", disable=not sys.stderr.isatty()) as bar:
            chunks = _chunks(good_documents(items, on_error, skipped, limit))
            for encoded in _encoded_chunks(chunks, workers, tokenizer, append_eod):
                for ids, mask, lengths in encoded:
                    n_pairs += len(lengths) > 1
                    tokens_out.add_document(ids, lengths)  # lists go straight into numpy
                    if mask_out:
                        mask_out.add_document(mask, lengths)
                    n_tokens += len(ids)
                n_docs += len(encoded)
                bar.update(len(encoded))
        if n_docs == 0:
            raise InputError("no documents in the input")
        tokens_out.finalize(tmp[idx_path])
        if mask_out:
            mask_out.finalize(tmp[mask_idx])
        seconds = time.perf_counter() - start
        summary = {"tokenizer": tokenizer.identity, "documents": n_docs, "tokens": n_tokens, "pairs": n_pairs,
                   "skipped": dict(skipped.counts), "skipped_examples": skipped.examples, "loss_mask": loss_mask,
                   "append_eod": append_eod, "inputs": inputs or [], "seconds": round(seconds, 2),
                   "tokens_per_s": round(n_tokens / seconds)}
        with open(tmp[json_path], "w") as f:
            json.dump(summary, f, indent=1)
    except BaseException:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        raise
    # An older dataset at this prefix stops looking complete before any of its files is replaced.
    for stale in (idx_path, mask_bin, mask_idx):
        if os.path.exists(stale):
            os.remove(stale)
    for path in final:
        os.replace(tmp[path], path)
    return summary


def _arguments(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m thann.data.preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", action="append", metavar="PATH",
                        help="a file or a directory (recursively); may be repeated")
    source.add_argument("--corpus", choices=sorted(CORPORA), help="an offline corpus by name")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    parser.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                        help="key (column for parquet) of the document text; chat records need none")
    parser.add_argument("--pairs", action="store_true",
                        help='retrieval pairs {"query", "positive", "negatives"} (JSON lines or array): each '
                             "becomes one document of sequences query, positive, negatives, for contrastive training")
    parser.add_argument("--text-documents", choices=TEXT_MODES, default="file",
                        help="plain text: one document per file, or per blank-line-separated paragraph block")
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="tiktoken")
    parser.add_argument("--tokenizer-model", default="cl100k_base",
                        help="tiktoken: an encoding name; huggingface: tokenizer.json or a directory with it "
                             "or with vocab.json + merges.txt")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="end-of-document token after each document (default: on)")
    parser.add_argument("--loss-mask", action="store_true",
                        help=f"also write {loss_mask_prefix('PREFIX')}.bin/.idx (assistant turns only) for fine-tuning")
    parser.add_argument("--on-error", choices=ON_ERROR, default="fail",
                        help="bad records: stop at the first (default) or skip and count them")
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--limit-documents", type=int, default=None)
    args = parser.parse_args(argv)
    if len(args.json_keys) != 1:
        parser.error("--json-keys takes one key: THANN writes one dataset per run")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    output_dir = os.path.realpath(os.path.dirname(os.path.abspath(args.output_prefix)))
    for path in args.input or []:
        if os.path.isdir(path) and os.path.commonpath([output_dir, os.path.realpath(path)]) == os.path.realpath(path):
            parser.error(f"--output-prefix {args.output_prefix!r} lies inside the input directory {path!r}, "
                         "whose files are all read as input: write the dataset elsewhere")
    return args


def main(argv=None) -> None:
    args = _arguments(argv)
    if args.corpus:
        items, inputs = CORPORA[args.corpus](), [f"corpus:{args.corpus}"]
    else:
        items, inputs = read_inputs(args.input, args.json_keys[0], args.text_documents, args.pairs), args.input
    try:
        summary = preprocess(items, args.output_prefix, args.tokenizer_type, args.tokenizer_model, args.workers,
                             args.on_error, args.loss_mask, args.append_eod, args.limit_documents, inputs)
    except (InputError, BadRecord, ValueError) as e:
        # Bad input, like a bad config, is exit code 2 (thann.cli), in one line.
        print(f"preprocess: {e}; nothing written to {args.output_prefix}.*", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.output_prefix}.bin/.idx: {summary['documents']} documents, {summary['tokens']} tokens "
          f"in {summary['seconds']} s ({summary['tokens_per_s']} tokens/s)")
    for category, count in summary["skipped"].items():
        print(f"skipped {count} records: {category}")
    for example in summary["skipped_examples"]:
        print(f"  e.g. {example}")


if __name__ == "__main__":
    main()
