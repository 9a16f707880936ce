"""THANN's zarr checkpoint format: megatron-core sharded state dicts stored as a zarr v3 hierarchy.

Layout of one checkpoint directory:

    zarr.json                  root group; attributes: step, layout, config, versions (metadata)
    <key>/zarr.json, <key>/c/… one array per ShardedTensor key, with its *global* shape; chunks are
                               this layout's shards (split further to stay under 64 MiB), so every
                               chunk has exactly one writer: the rank holding its main replica
    objects/<key>/<offset>.json  ShardedObjects, one file per shard
    common.json                everything that is not sharded (rank 0's copy)
    <extra files>.json         plain data of each rank (e.g. its RNG streams), named by the caller
    manifest.json              sha256 of every chunk and every other file

Nothing is pickled: arrays are zarr, everything else is JSON (thann.checkpoint.plain), so loading
a checkpoint from anywhere never runs code. Checkpoints of THANN before this format kept
``common.pt`` and ``objects/*.pt`` pickles; ``python -m thann.checkpoint upgrade`` converts them.

Arrays are written and read with tensorstore; any zarr v3 client (zarr-python included) can read
them. A loading rank reads only the slices its own layout needs, so any layout loads any other.
"""

import errno
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import tensorstore as ts
import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge, nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    apply_factory_merges,
    is_main_replica,
)
from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess, save_preprocess
from megatron.core.dist_checkpointing.utils import extract_sharded_base

from thann.checkpoint import plain

MAX_CHUNK_BYTES = 64 * 2**20
_ZARR_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64", torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8"}


COMMON = "common.json"
# Side files of checkpoints written before the pickle-free format.
PICKLED_COMMON = "common.pt"


class CorruptCheckpoint(RuntimeError):
    pass


class CheckpointWriteError(RuntimeError):
    """Writing failed on some rank (disk full, permissions); raised on every rank."""

    @property
    def cause(self) -> str:
        """The operating system's reason alone (tensorstore's messages run to a thousand
        characters of chunk keys and source locations)."""
        detail = str(self)
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.ENOENT):
            if os.strerror(code) in detail:
                return os.strerror(code)
        first = detail.splitlines()[0] if detail else "unknown error"
        return first if len(first) <= 100 else first[:97] + "..."


def agree(error: str) -> None:
    """Collective: every rank raises the first rank's error, so none waits for a rank that failed."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), "")
    if first:
        raise CheckpointWriteError(first)


def _describe(e: Exception) -> str:
    return f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"


class PickledCheckpoint(RuntimeError):
    """A checkpoint in the old format, whose side files are pickles: never read, only upgraded."""

    def __init__(self, root: str):
        super().__init__(f"{root} was written by an older THANN whose side files are pickles, which can run code "
                         f"when loaded; if you trust its source, convert it once with "
                         f"`python -m thann.checkpoint upgrade {root}`")


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _chunk_shape(t: ShardedTensor) -> list[int]:
    """The local shard (1 along prepended axes), halved along its largest axis while too big."""
    shape = [1] * t.prepend_axis_num + list(t.local_shape)
    while np.prod(shape) * t.data.element_size() > MAX_CHUNK_BYTES:
        axis = int(np.argmax(shape))
        if shape[axis] % 2:
            break
        shape[axis] //= 2
    return shape


def _array_spec(root: str, key: str) -> dict:
    # Chunks equal to the fill value (all zeros: e.g. the Adam moments of a parameter that has had
    # no gradient yet) are written too: tensorstore skips them by default, and the manifest lists
    # every chunk of every shard.
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(root, key)},
            "store_data_equal_to_fill_value": True}


def _chunk_files(root: str, t: ShardedTensor, chunk: list[int]) -> list[str]:
    """Relative paths of the chunk files covering this shard (zarr v3 default key encoding)."""
    start = [s.start if isinstance(s, slice) else s for s in t.global_slice()]
    stop = [s.stop if isinstance(s, slice) else s + 1 for s in t.global_slice()]
    ranges = [range(a // c, -(-b // c)) for a, b, c in zip(start, stop, chunk)]
    return [os.path.join(t.key, "c", *map(str, index)) for index in np.ndindex(*[len(r) for r in ranges])
            for index in [tuple(r[i] for r, i in zip(ranges, index))]]


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _object_path(obj: ShardedObject) -> str:
    return os.path.join("objects", obj.key, "_".join(map(str, obj.global_offset)) + ".json")


# -- save -------------------------------------------------------------------------------------


def save(sharded_state_dict: dict, root: str, metadata: dict, rank_files: dict[str, object] | None = None) -> None:
    """Collective: every rank calls it with its own sharded state dict for the same ``root``.
    ``rank_files`` maps a relative path to plain data this rank writes as JSON (its own names)."""
    sharded, common = save_preprocess(sharded_state_dict, validate_access_integrity=True)
    tensors = [t for t in nested_values(sharded) if isinstance(t, ShardedTensor)]
    objects = [o for o in nested_values(sharded) if isinstance(o, ShardedObject)]
    for t in tensors:
        if t.flattened_range is not None:
            raise NotImplementedError(f"{t.key}: flattened shards cannot be stored as zarr arrays")
    # Every rank checks that its non-tensor state has a plain encoding before any collective, so
    # an unconvertible object stops all ranks here, naming it, instead of leaving them waiting.
    plain.encode(common, "common")
    for obj in objects:
        plain.encode(obj.data, obj.key)

    # Rank 0 creates the hierarchy from everyone's view of the arrays, then all ranks write.
    arrays = {}
    for t in tensors:
        arrays.setdefault(t.key, (list(t.global_shape), _ZARR_DTYPES[t.dtype], _chunk_shape(t)))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, arrays)
    error = ""
    if dist.get_rank() == 0:
        try:
            _create(root, metadata, {k: v for per_rank in gathered for k, v in per_rank.items()}, common)
        except Exception as e:  # noqa: BLE001 - any failure is reported on every rank
            error = _describe(e)
    agree(error)

    digests, error = {}, ""
    try:
        digests = _write_shards(root, tensors, objects, arrays, rank_files or {})
    except Exception as e:  # noqa: BLE001
        error = _describe(e)
    agree(error)
    all_digests = [None] * dist.get_world_size()
    dist.all_gather_object(all_digests, digests)
    error = ""
    if dist.get_rank() == 0:
        manifest = {"files": {p: d for per_rank in all_digests for p, d in sorted(per_rank.items())}}
        try:
            with open(os.path.join(root, "manifest.json"), "w") as f:
                json.dump(manifest, f, indent=0)
        except OSError as e:
            error = _describe(e)
    agree(error)


def _create(root: str, metadata: dict, specs: dict, common: dict) -> None:
    import zarr

    group = zarr.open_group(root, mode="w", zarr_format=3)
    group.attrs.update(metadata)
    for key, (shape, dtype, chunk) in sorted(specs.items()):
        ts.open({**_array_spec(root, key), "metadata": {
            "shape": shape, "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
        }}, create=True, delete_existing=True).result()
    plain.dump(common, os.path.join(root, COMMON), "common")


def _write_shards(root: str, tensors: list, objects: list, arrays: dict, rank_files: dict) -> dict[str, str]:
    """Writes this rank's main-replica shards, objects and files; returns their sha256 digests."""
    written = {}
    mine = [t for t in tensors if is_main_replica(t.replica_id)]
    opened = {key: ts.open(_array_spec(root, key)).result() for key in sorted({t.key for t in mine})}
    futures = [opened[t.key][t.global_slice()].write(_to_numpy(t.data)) for t in mine]
    for future in futures:
        future.result()
    for t in mine:
        for path in _chunk_files(root, t, arrays[t.key][2]):
            written[path] = None
    for obj in objects:
        if is_main_replica(obj.replica_id):
            path = _object_path(obj)
            os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
            plain.dump(obj.data, os.path.join(root, path), obj.key)
            written[path] = None
    for path, value in rank_files.items():
        os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
        plain.dump(value, os.path.join(root, path), path)
        written[path] = None
    if dist.get_rank() == 0:
        written[COMMON] = None
    with ThreadPoolExecutor(8) as pool:
        return dict(zip(written, pool.map(lambda p: _sha256(os.path.join(root, p)), written)))


# -- verify and load --------------------------------------------------------------------------


def read_manifest(root: str) -> dict[str, str]:
    path = os.path.join(root, "manifest.json")
    if not os.path.exists(path):
        raise CorruptCheckpoint(f"{root}: no manifest.json (incomplete checkpoint)")
    if not os.path.exists(os.path.join(root, COMMON)) and os.path.exists(os.path.join(root, PICKLED_COMMON)):
        raise PickledCheckpoint(root)
    try:
        with open(path) as f:
            return json.load(f)["files"]
    except (ValueError, KeyError, TypeError):
        raise CorruptCheckpoint(f"{root}: manifest.json is not a THANN manifest") from None


def read_plain(root: str, path: str):
    """Plain data of a verified checkpoint (common.json, an object, a rank's file)."""
    try:
        return plain.load(os.path.join(root, path))
    except ValueError as e:
        raise CorruptCheckpoint(str(e)) from None


def verify(root: str, paths: list[str] | None = None, manifest: dict[str, str] | None = None) -> None:
    """Checks the sha256 of the given files (all of the manifest by default) against the
    checkpoint's manifest (or ``manifest``, already read)."""
    manifest = read_manifest(root) if manifest is None else manifest
    paths = sorted(manifest) if paths is None else paths
    for path in paths:
        full = os.path.join(root, path)
        if not os.path.exists(full):
            raise CorruptCheckpoint(f"{root}: missing file {path}")
        if _sha256(full) != manifest[path]:
            array, _, chunk = path.partition("/c/")
            where = f"array {array!r}, chunk {chunk.replace('/', '.')}" if chunk else f"file {path!r}"
            raise CorruptCheckpoint(f"{root}: checksum mismatch in {where}")


def _files_of(manifest: dict[str, str], sharded_state_dict: dict) -> list[str]:
    """The manifest's files a load of ``sharded_state_dict`` reads: its arrays' chunks, its
    objects and the common state."""
    leaves = [v for v in nested_values(sharded_state_dict) if isinstance(v, (ShardedTensor, ShardedObject))]
    arrays = {leaf.key for leaf in leaves if isinstance(leaf, ShardedTensor)}
    objects = {os.path.join("objects", leaf.key) for leaf in leaves if isinstance(leaf, ShardedObject)}
    return [path for path in sorted(manifest)
            if path == COMMON or path.partition("/c/")[0] in arrays or os.path.dirname(path) in objects]


@torch.no_grad()
def load(sharded_state_dict: dict, root: str, verify_all: bool = True) -> dict:
    """Fills this rank's sharded state dict from the checkpoint; returns the loaded state dict.
    Collective: all ranks verify a share of the files first (every file, or with ``verify_all``
    false only those this load reads, e.g. the weights without the optimizer), and fail together."""
    manifest = read_manifest(root)
    files = sorted(manifest) if verify_all else _files_of(manifest, sharded_state_dict)
    share = files[dist.get_rank()::dist.get_world_size()]
    error = ""
    try:
        verify(root, share)
    except CorruptCheckpoint as e:
        error = str(e)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if any(errors):
        raise CorruptCheckpoint(next(e for e in errors if e))

    common = read_plain(root, COMMON)
    sharded, nonpersistent, factories = load_preprocess(sharded_state_dict)
    merge(common, nonpersistent)
    sharded, _ = extract_sharded_base(sharded)  # the rest comes from common.json
    opened = {}

    def read(leaf):
        if isinstance(leaf, ShardedTensor):
            if leaf.key not in opened:
                try:
                    opened[leaf.key] = ts.open(_array_spec(root, leaf.key)).result()
                except ValueError:
                    raise KeyError(f"{root}: no array {leaf.key!r} in the checkpoint") from None
            array = opened[leaf.key]
            if list(array.shape) != list(leaf.global_shape):
                raise ValueError(f"{leaf.key}: checkpoint shape {list(array.shape)}, "
                                 f"this model expects {list(leaf.global_shape)}")
            value = _to_torch(array[leaf.global_slice()].read().result(), leaf.dtype)
            if leaf.flattened_range is not None:
                value = value.flatten()[leaf.flattened_range]
            if leaf.data is None:
                return value.to(leaf.dtype)
            leaf.data.copy_(value.view(leaf.data.shape))
            return leaf.data
        if isinstance(leaf, ShardedObject):
            return read_plain(root, _object_path(leaf))
        return leaf

    dict_list_map_inplace(read, sharded)
    merge(common, sharded)
    return apply_factory_merges(common, factories)
