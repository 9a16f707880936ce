"""Train a byte-level BPE tokenizer (HF ``tokenizers``) on text or chat files.

    python -m thann.data.train_tokenizer --input corpus.txt --vocab-size 32000 --output-dir tokenizers/my_bpe

reads the inputs as the preprocessor does (``thann.data.readers``; chat records contribute their
rendered template text) and writes ``tokenizer.json``, ``vocab.json`` and ``merges.txt``. Use it
with ``--tokenizer-type huggingface --tokenizer-model DIR`` (preprocess) and
``data.tokenizer.type=huggingface data.tokenizer.model=DIR`` (training).
"""

import argparse
import sys

from thann.data.chat import render
from thann.data.preprocess import ON_ERROR, BadRecord, Skipped, good_documents
from thann.data.readers import TEXT_MODES, InputError, read_inputs
from thann.data.tokenizer import train_bpe


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m thann.data.train_tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", required=True, metavar="PATH", help="file or directory; repeatable")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--json-keys", default="text", help="key (column for parquet) of the document text")
    parser.add_argument("--text-documents", choices=TEXT_MODES, default="file")
    parser.add_argument("--on-error", choices=ON_ERROR, default="fail", help="bad records: stop, or skip and count")
    args = parser.parse_args(argv)
    if args.vocab_size < 260:
        parser.error("--vocab-size must be at least 260: 256 byte symbols and the special tokens")
    skipped = Skipped()
    documents = good_documents(read_inputs(args.input, args.json_keys, args.text_documents), args.on_error, skipped)
    texts = (d.text if d.text is not None else render(list(d.messages)) for d in documents)
    try:
        tokenizer = train_bpe(texts, args.vocab_size, args.output_dir)
    except (InputError, BadRecord) as e:
        sys.exit(f"train_tokenizer: {e}")
    print(f"wrote {args.output_dir}/tokenizer.json, vocab.json, merges.txt: vocabulary {tokenizer.vocab_size}, "
          f"fingerprint {tokenizer.fingerprint}")
    for category, count in skipped.counts.items():
        print(f"skipped {count} records: {category}")


if __name__ == "__main__":
    main()
