"""Preprocessing throughput (tokens/s) with 1 and 2 workers, as ``python -m thann.data.preprocess``
runs it: read a JSON-lines file, tokenize with cl100k_base, write ``.bin/.idx``.

    python benchmarks/preprocess_throughput.py [--documents 6000] [--workers 1 2] [--chat]

The input is the first ``--documents`` ShareGPT conversations (``--chat``: as chat records with
the assistant loss mask), written once to a temporary JSON-lines file. With 1 worker the main
process reads and tokenizes; with N > 1, it reads while N worker processes tokenize.
"""

import argparse
import itertools
import json
import os
import tempfile

from thann.data.corpora import sharegpt_chat, sharegpt_text
from thann.data.preprocess import preprocess
from thann.data.readers import read_inputs


def write_input(path: str, documents: int, chat: bool) -> None:
    source = sharegpt_chat() if chat else sharegpt_text()
    with open(path, "w", encoding="utf-8") as f:
        for document in itertools.islice(source, documents):
            record = ({"messages": [{"role": r, "content": c} for r, c in document.messages]} if chat
                      else {"text": document.text})
            f.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=6000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chat", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "input.jsonl")
        write_input(source, args.documents, args.chat)
        megabytes = os.path.getsize(source) / 2**20
        rows = []
        for workers in args.workers:
            runs = [preprocess(read_inputs([source]), os.path.join(tmp, f"out{workers}"), workers=workers,
                               loss_mask=args.chat) for _ in range(args.repeats)]
            best = min(runs, key=lambda s: s["seconds"])
            rows.append((workers, best["documents"], best["tokens"], best["seconds"], best["tokens"] / best["seconds"]))
    print(f"input: {args.documents} ShareGPT {'chat records' if args.chat else 'documents'}, "
          f"{megabytes:.1f} MiB of JSON lines; CPU cores: {os.cpu_count()}")
    print(f"{'workers':>7} {'documents':>9} {'tokens':>11} {'seconds':>8} {'tokens/s':>10} {'speedup':>7}")
    for workers, documents, tokens, seconds, rate in rows:
        print(f"{workers:>7} {documents:>9} {tokens:>11,} {seconds:>8.2f} {rate:>10,.0f} {rate / rows[0][4]:>6.2f}x")


if __name__ == "__main__":
    main()
