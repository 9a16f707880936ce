"""Checkpoint tools, single process, no process group needed:

    python -m thann.checkpoint inspect PATH            step, layout, arrays, sizes, checksum status
    python -m thann.checkpoint verify PATH             exit 1 naming the first corrupt array/chunk
    python -m thann.checkpoint export PATH OUT.safetensors   full model weights in one file

PATH is a checkpoint directory (``.../iter_0000100``) or a run directory holding ``latest``.
"""

import argparse
import json
import os
import sys

import tensorstore as ts
import torch

from thann.checkpoint.checkpointer import latest_checkpoint, read_metadata
from thann.checkpoint.zarr_store import CorruptCheckpoint, _array_spec, _to_torch, read_manifest, verify

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}


def resolve(path: str) -> str:
    if os.path.exists(os.path.join(path, "thann.json")):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        sys.exit(f"{path}: neither a checkpoint (no thann.json) nor a run directory with a 'latest' file")
    return latest


def _zarr_only(path: str, metadata: dict) -> None:
    if metadata["format"] != "zarr":
        sys.exit(f"{path}: format {metadata['format']!r}; this tool reads zarr checkpoints")


def array_keys(path: str) -> list[str]:
    return sorted(name for name in os.listdir(path) if os.path.exists(os.path.join(path, name, "zarr.json")))


def _tokenizer_name(metadata: dict) -> str:
    tokenizer = metadata["tokenizer"]
    return "none" if tokenizer is None else f"{tokenizer['type']}:{tokenizer['model']} ({tokenizer['fingerprint']})"


def inspect(path: str) -> None:
    metadata = read_metadata(path)
    layout = metadata["layout"]
    print(f"checkpoint {path}\n  step {metadata['step']}, consumed samples {metadata['consumed_samples']}, "
          f"format {metadata['format']}, saved {metadata['saved_at']}")
    print(f"  layout tp{layout['tp']} pp{layout['pp']} ep{layout['ep']} etp{layout['etp']} dp{layout['dp']}"
          f"{' sp' if layout['sp'] else ''} on {metadata['world_size']} ranks; tokenizer {_tokenizer_name(metadata)}; "
          + ", ".join(f"{k} {v}" for k, v in metadata["versions"].items()))
    _zarr_only(path, metadata)
    total = 0
    for key in array_keys(path):
        array = ts.open(_array_spec(path, key)).result()
        nbytes = array.dtype.numpy_dtype.itemsize * int(torch.tensor(array.shape).prod())
        total += nbytes
        print(f"  {key:90s} {str(list(array.shape)):22s} {array.dtype.name:9s} {nbytes / 2**20:9.2f} MiB")
    print(f"  {len(array_keys(path))} arrays, {total / 2**30:.3f} GiB")
    try:
        verify(path)
        print(f"  checksums: {len(read_manifest(path))} files OK")
    except CorruptCheckpoint as e:
        print(f"  checksums: FAILED: {e}")


def export(path: str, out: str) -> None:
    from safetensors.torch import save_file

    metadata = read_metadata(path)
    _zarr_only(path, metadata)
    verify(path)
    optimizer_prefixes = ("optimizer.", "chained_")
    weights = {}
    for key in array_keys(path):
        if key.startswith(optimizer_prefixes):
            continue
        array = ts.open(_array_spec(path, key)).result()
        weights[key] = _to_torch(array.read().result(), _TORCH_DTYPES[array.dtype.name]).contiguous()
    save_file(weights, out, metadata={"step": str(metadata["step"]),
                                            "tokenizer": json.dumps(metadata["tokenizer"])})
    print(f"wrote {out}: {len(weights)} tensors, {sum(t.numel() for t in weights.values()):,} parameters")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m thann.checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("inspect", "verify", "export"):
        p = sub.add_parser(name)
        p.add_argument("path")
        if name == "export":
            p.add_argument("out")
    args = parser.parse_args(argv)
    path = resolve(args.path)
    if args.command == "inspect":
        inspect(path)
    elif args.command == "verify":
        _zarr_only(path, read_metadata(path))
        try:
            verify(path)
        except CorruptCheckpoint as e:
            sys.exit(f"verify: {e}")
        print(f"{path}: {len(read_manifest(path))} files, checksums OK")
    else:
        export(path, args.out)


if __name__ == "__main__":
    main()
