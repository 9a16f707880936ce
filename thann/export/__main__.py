"""``thann-export`` / ``python -m thann.export hf CHECKPOINT OUT``: a THANN checkpoint as an HF
transformers model directory (thann.export.hf). Bad usage or input is one line with exit code 2,
before anything is read or written."""

DESCRIPTION = """Writes a THANN checkpoint (a run directory's newest, or one iter_* directory; any parallel layout)
as an HF transformers model directory OUT:

  default     THANN with its learnt tokenization: config.json (model_type thann, auto_map),
              configuration_thann.py and modeling_thann.py (transformers' Mixtral decoder after the
              learnt tokenization), model.safetensors, generation_config.json and the tokenizer;
              load it with AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)
  --mixtral   plain MixtralForCausalLM weights in the Hub's Mixtral format, no remote code, for a
              model trained with model.tokenization.enabled=false (refused otherwise); init_from=OUT
              starts THANN training from it again (docs/hf_export.md)

Single process, no GPU needed; nothing is written until the checks pass, and OUT appears only
when complete."""

EPILOG = """exit codes:
  0   done
  1   a damaged checkpoint (a checksum fails) or a failed write (disk full): the message says which
  2   invalid usage or input: a missing checkpoint, a model the export cannot write (NNN, ChaosNet,
      an encoder, a dense GPT), --mixtral with the learnt tokenization on, an existing OUT without
      --force

examples:
  .venv/bin/python -m thann.export hf checkpoints/thann_tiny checkpoints/thann_tiny_hf
  .venv/bin/python -m thann.export hf checkpoints/mixtral_tiny checkpoints/mixtral_tiny_hf --mixtral"""

import argparse
import sys

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every THANN tool reports bad usage
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see --help)\n")


def _size(text: str) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        return parse_size_to_int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None) -> None:
    parser = _Parser(prog="python -m thann.export", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="format", required=True, parser_class=_Parser)
    hf = sub.add_parser("hf", help="an HF transformers model directory", description=DESCRIPTION, epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    hf.add_argument("checkpoint", help="a run directory (its newest checkpoint) or one iter_* directory")
    hf.add_argument("out", help="the model directory to write")
    hf.add_argument("--mixtral", action="store_true", help="plain MixtralForCausalLM (learnt tokenization off)")
    hf.add_argument("--force", action="store_true", help="replace OUT if it holds an earlier export")
    hf.add_argument("--max-shard-size", type=_size, default="5GB",
                    help="safetensors files above this size are split (default 5GB; KB, MB, GB, TB)")
    args = parser.parse_args(argv)
    from thann.checkpoint.zarr_store import CorruptCheckpoint, PickledCheckpoint
    from thann.config import ConfigError
    from thann.export.hf import export

    try:
        print(export(args.checkpoint, args.out, mixtral=args.mixtral, force=args.force,
                     max_shard_size=args.max_shard_size))
    except (ConfigError, PickledCheckpoint) as e:
        print(e, file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except CorruptCheckpoint as e:  # exit 1, as every failure that is not the input's
        sys.exit(f"cannot export the checkpoint: {e}")
    except OSError as e:  # a full disk, a failed read: nothing of OUT is left
        sys.exit(f"cannot export to {args.out}: {e}")


if __name__ == "__main__":
    main()
