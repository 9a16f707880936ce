"""Checkpoint tools, single process, no process group needed; none of them unpickles anything:

    python -m thann.checkpoint inspect PATH            step, layout, arrays, sizes, checksum status (exit 1: damaged)
    python -m thann.checkpoint verify PATH             exit 1 naming the first corrupt array/chunk
    python -m thann.checkpoint export PATH OUT.safetensors [--force]   full model weights in one file
    python -m thann.checkpoint upgrade PATH            convert checkpoints of older THANN (pickled side
                                                       files) to JSON, once, trusting their source

PATH is a checkpoint directory (``.../iter_0000100``) or a run directory (the checkpoint its
``latest`` names, or the newest complete one).
"""

import argparse
import json
import os
import sys

import tensorstore as ts
import torch

from thann.checkpoint import plain
from thann.checkpoint.directory import METADATA, find_checkpoints, read_metadata
from thann.checkpoint.zarr_store import (
    COMMON,
    PICKLED_COMMON,
    CorruptCheckpoint,
    PickledCheckpoint,
    _array_spec,
    _to_torch,
    file_digest,
    read_manifest,
    verify,
)
from thann.config import ConfigError
from thann.outputs import atomic_write, check_output

EXIT_DAMAGED, EXIT_USAGE = 1, 2
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}


class ToolError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def resolve(path: str) -> str:
    if os.path.exists(os.path.join(path, METADATA)):
        return path
    found = find_checkpoints(path)
    if not found:
        raise ToolError(f"{path}: neither a checkpoint (no {METADATA}) nor a run directory holding one")
    return found[0].path


def _zarr_only(path: str, metadata: dict) -> None:
    if metadata["format"] != "zarr":
        raise ToolError(f"{path}: format {metadata['format']!r} (megatron-core's torch_dist pickles its metadata); "
                        "these tools read only THANN's zarr format")


def array_keys(path: str) -> list[str]:
    return sorted(name for name in os.listdir(path) if os.path.exists(os.path.join(path, name, "zarr.json")))


def _tokenizer_name(metadata: dict) -> str:
    tokenizer = metadata["tokenizer"]
    return "none" if tokenizer is None else f"{tokenizer['type']}:{tokenizer['model']} ({tokenizer['fingerprint']})"


def inspect(path: str) -> int:
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
    except CorruptCheckpoint as e:
        print(f"  checksums: FAILED: {e}")
        return EXIT_DAMAGED
    print(f"  checksums: {len(read_manifest(path))} files OK")
    return 0


def export(path: str, out: str, force: bool) -> None:
    from safetensors.torch import save_file

    metadata = read_metadata(path)
    _zarr_only(path, metadata)
    check_output(out, force=force, inputs={"the run directory": os.path.dirname(os.path.abspath(path))},
                 field="out", force_flag="--force")
    verify(path)
    optimizer_prefixes = ("optimizer.", "chained_")
    weights = {}
    for key in array_keys(path):
        if key.startswith(optimizer_prefixes):
            continue
        array = ts.open(_array_spec(path, key)).result()
        weights[key] = _to_torch(array.read().result(), _TORCH_DTYPES[array.dtype.name]).contiguous()
    with atomic_write(out) as temporary:
        save_file(weights, temporary, metadata={"step": str(metadata["step"]),
                                                 "tokenizer": json.dumps(metadata["tokenizer"])})
    print(f"wrote {out}: {len(weights)} tensors, {sum(t.numel() for t in weights.values()):,} parameters")


def _pickled_files(path: str) -> list[str]:
    found = [PICKLED_COMMON] if os.path.exists(os.path.join(path, PICKLED_COMMON)) else []
    for sub in ("objects", "rng"):
        for directory, _, files in os.walk(os.path.join(path, sub)):
            found += [os.path.relpath(os.path.join(directory, f), path) for f in files if f.endswith(".pt")]
    return sorted(found)


def upgrade(path: str) -> None:
    """Converts one old-format checkpoint: verifies it, reads each pickled side file (this is
    the one place THANN unpickles, on the user's word that the source is trusted), writes it as
    JSON, records the new files in the manifest, then removes the pickles."""
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)["files"]
    pickled = _pickled_files(path)
    try:
        verify(path, sorted(manifest), manifest)
    except CorruptCheckpoint as e:
        raise ToolError(f"{e}; not converting a damaged checkpoint", EXIT_DAMAGED) from None
    for relative in pickled:
        value = torch.load(os.path.join(path, relative), weights_only=False, map_location="cpu")
        converted = relative[:-3] + ".json"
        plain.dump(value, os.path.join(path, converted), relative)
        manifest.pop(relative, None)
        manifest[converted] = file_digest(os.path.join(path, converted))
    with open(os.path.join(path, "manifest.json.tmp"), "w") as f:
        json.dump({"files": dict(sorted(manifest.items()))}, f, indent=0)
    os.replace(os.path.join(path, "manifest.json.tmp"), os.path.join(path, "manifest.json"))
    for relative in pickled:
        os.remove(os.path.join(path, relative))
    print(f"upgraded {path}: {len(pickled)} pickled files now JSON")


def _upgrade_all(path: str) -> None:
    targets = [path] if os.path.exists(os.path.join(path, METADATA)) else [c.path for c in find_checkpoints(path)]
    old = [t for t in targets if not os.path.exists(os.path.join(t, COMMON)) and _pickled_files(t)]
    if not targets:
        raise ToolError(f"{path}: no checkpoint there")
    if not old:
        print(f"{path}: nothing to upgrade (no pickled side files)")
    for target in old:
        if read_metadata(target)["format"] != "zarr":
            raise ToolError(f"{target}: torch_dist checkpoints keep megatron-core's own pickled format")
        upgrade(target)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m thann.checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("inspect", "verify", "export", "upgrade"):
        p = sub.add_parser(name)
        p.add_argument("path")
        if name == "export":
            p.add_argument("out")
            p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = parser.parse_args(argv)
    try:
        if args.command == "upgrade":
            _upgrade_all(args.path)
            return
        path = resolve(args.path)
        if args.command == "inspect":
            sys.exit(inspect(path))
        elif args.command == "verify":
            _zarr_only(path, read_metadata(path))
            verify(path)
            print(f"{path}: {len(read_manifest(path))} files, checksums OK")
        else:
            export(path, args.out, args.force)
    except CorruptCheckpoint as e:
        sys.exit(f"{args.command}: {e}")
    except (ConfigError, PickledCheckpoint, ToolError) as e:
        print(f"{args.command}: {e}", file=sys.stderr)
        sys.exit(getattr(e, "code", EXIT_USAGE))


if __name__ == "__main__":
    main()
