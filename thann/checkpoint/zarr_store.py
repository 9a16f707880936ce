"""THANN's zarr checkpoint format: megatron-core sharded state dicts stored as a zarr v3 hierarchy.

Layout of one checkpoint directory:

    zarr.json                  root group; attributes: step, layout, config, versions (metadata)
    <key>/zarr.json, <key>/c/… one array per ShardedTensor key, with its *global* shape; chunks are
                               this layout's shards (split along their leading axes to stay under
                               64 MiB), so every chunk has exactly one writer: the rank holding its
                               main replica. A chunk file is the chunk's bytes in C order, little
                               endian (zarr's ``bytes`` codec, uncompressed)
    objects/<key>/<offset>.json  ShardedObjects, one file per shard
    common.json                everything that is not sharded (rank 0's copy)
    <extra files>.json         plain data of each rank (e.g. its RNG streams), named by the caller
    manifest.json              the digest of every other file (xxh3-128; sha256 before 2026-12-07)

Nothing is pickled: arrays are zarr, everything else is JSON (thann.checkpoint.plain), so loading
a checkpoint from anywhere never runs code. Checkpoints of THANN before this format kept
``common.pt`` and ``objects/*.pt`` pickles; ``python -m thann.checkpoint upgrade`` converts them.

Chunks are written and read here, with plain file I/O on a few threads, straight from and into
the tensors' memory: each chunk is hashed as it is written (no second pass reading it back) and as
it is read (loading verifies exactly the bytes it uses, in the same pass), and flushed to the disk
(thann.checkpoint.durable). Any zarr v3 client (tensorstore, zarr-python) reads the arrays.
Checkpoints written before chunks were plain (tensorstore's sharded chunks) are read through
tensorstore after verifying their files. A loading rank reads only the chunks its own layout
needs, so any layout loads any other.

Saving runs in three steps, so that the writing can happen in the background (checkpoint.async_save):
``prepare`` (collective; copies the state to host memory when asked), ``_write_shards`` (this
rank's files: no collective, any thread) and ``complete`` (collective: errors agreed, the
manifest written). ``save`` runs the three in a row.
"""

import copy
import errno
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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

from thann.checkpoint import durable, plain

MAX_CHUNK_BYTES = 64 * 2**20
# Files written or read at once by one rank: enough to keep a disk's queue busy while others hash.
IO_THREADS = 4
_ZARR_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64", torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8"}
_BYTES_CODEC = [{"name": "bytes", "configuration": {"endian": "little"}}]

ZARR_JSON = "zarr.json"
COMMON = "common.json"
MANIFEST = "manifest.json"
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


def everywhere(read):
    """Collective: ``read()``'s result on this rank; a CorruptCheckpoint on any rank is raised on
    every rank (``read`` itself runs no collective)."""
    error, result = "", None
    try:
        result = read()
    except CorruptCheckpoint as e:
        error = str(e)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if any(errors):
        raise CorruptCheckpoint(next(e for e in errors if e))
    return result


def describe(e: Exception) -> str:
    return f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"


class PickledCheckpoint(RuntimeError):
    """A checkpoint in the old format, whose side files are pickles: never read, only upgraded."""

    def __init__(self, root: str):
        super().__init__(f"{root} was written by an older THANN whose side files are pickles, which can run code "
                         f"when loaded; if you trust its source, convert it once with "
                         f"`python -m thann.checkpoint upgrade {root}`")


def _to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _bytes(t: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor, as bytes (no copy)."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def _chunk_shape(t: ShardedTensor) -> list[int]:
    """The local shard (1 along prepended axes), its leading axes halved while it is too big, so
    that a chunk is a contiguous block of the shard (unless an odd leading axis forces a cut
    further in: such a chunk is copied when written and read)."""
    shape = [1] * t.prepend_axis_num + list(t.local_shape)
    for axis in range(len(shape)):
        while np.prod(shape) * t.data.element_size() > MAX_CHUNK_BYTES and shape[axis] % 2 == 0:
            shape[axis] //= 2
    return shape


def _array_spec(root: str, key: str) -> dict:
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(root, key)}}


def _array_metadata(shape: list[int], dtype: str, chunk: list[int]) -> dict:
    return {"zarr_format": 3, "node_type": "array", "shape": shape, "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0 if dtype.startswith(("int", "uint")) else 0.0, "codecs": _BYTES_CODEC,
            "attributes": {}}


def _region(t: ShardedTensor) -> tuple[list[int], list[int]]:
    """The shard's [start, stop) in the global array, along every axis (prepended ones included)."""
    start = list(t.global_offset)
    stop = [a + n for a, n in zip(start, [1] * t.prepend_axis_num + list(t.local_shape))]
    return start, stop


def _chunks_of(start: list[int], stop: list[int], chunk: list[int]):
    """(chunk index, chunk start) of every chunk the region [start, stop) touches."""
    ranges = [range(a // c, -(-b // c)) for a, b, c in zip(start, stop, chunk)]
    for index in np.ndindex(*[len(r) for r in ranges]):
        k = tuple(r[i] for r, i in zip(ranges, index))
        yield k, [i * c for i, c in zip(k, chunk)]


def _chunk_path(key: str, index) -> str:
    return os.path.join(key, "c", *map(str, index))


def _chunk_files(root: str, t: ShardedTensor, chunk: list[int]) -> list[str]:
    """Relative paths of the chunk files covering this shard (zarr v3 default key encoding)."""
    return [_chunk_path(t.key, k) for k, _ in _chunks_of(*_region(t), chunk)]


def file_digest(path: str, recorded: str | None = None) -> str:
    return durable.file_digest(path, recorded)


def _object_path(obj: ShardedObject) -> str:
    return os.path.join("objects", obj.key, "_".join(map(str, obj.global_offset)) + ".json")


def _mismatch(root: str, path: str) -> CorruptCheckpoint:
    array, _, chunk = path.partition("/c/")
    where = f"array {array!r}, chunk {chunk.replace('/', '.')}" if chunk else f"file {path!r}"
    return CorruptCheckpoint(f"{root}: checksum mismatch in {where}")


# -- save -------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """What one rank writes of a checkpoint, taken when it is saved: files of bytes (its chunks:
    views of the state's tensors or of host copies of them; on rank 0 every zarr.json), and plain
    data written as JSON."""
    root: str
    blobs: list[tuple[str, torch.Tensor]]  # relative path, the file's values
    plain: list[tuple[str, object, str]]  # relative path, value, what it is (named in errors)
    sync: bool


def _json_bytes(content: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(content).encode()), dtype=torch.uint8)


def prepare(sharded_state_dict: dict, root: str, metadata: dict, rank_files: dict[str, object] | None = None, *,
            host: dict | None = None, sync: bool = True) -> Snapshot:
    """Collective: every rank calls it with its own sharded state dict for the same ``root``.
    ``rank_files`` maps a relative path to plain data this rank writes as JSON (its own names).
    ``host``: the snapshot holds copies of the state in host memory, so that training may change
    the state while it is written: buffers kept in ``host`` from one save to the next (a fresh
    allocation costs more than the copy: the kernel maps and zeroes every page). None: the
    snapshot holds views, to be written before the state changes."""
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

    arrays = {}
    for t in tensors:
        arrays.setdefault(t.key, (list(t.global_shape), _ZARR_DTYPES[t.dtype], _chunk_shape(t)))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, arrays)
    specs = {}
    for per_rank in gathered:
        for key, spec in per_rank.items():
            if specs.setdefault(key, spec) != spec:  # the same on every rank: each raises it
                raise ValueError(f"{key}: ranks hold shards of different shapes ({specs[key]} and {spec}); "
                                 "a zarr array has one chunk shape")

    keep = (lambda value: value) if host is None else copy.deepcopy
    blobs = []
    if dist.get_rank() == 0:
        blobs.append((ZARR_JSON, _json_bytes({"zarr_format": 3, "node_type": "group", "attributes": metadata})))
        blobs += [(os.path.join(key, ZARR_JSON), _json_bytes(_array_metadata(*spec)))
                  for key, spec in sorted(specs.items())]
    for t in tensors:
        if not is_main_replica(t.replica_id):
            continue
        data = t.data.detach()
        if host is not None:
            name = (t.key, tuple(t.global_offset))
            if name not in host or host[name].shape != data.shape or host[name].dtype != data.dtype:
                host[name] = torch.empty(data.shape, dtype=data.dtype, pin_memory=torch.cuda.is_available())
            data = host[name].copy_(data)
        data = data.cpu().view([1] * t.prepend_axis_num + list(t.local_shape))
        start, stop = _region(t)
        chunk = specs[t.key][2]
        for index, lo in _chunks_of(start, stop, chunk):
            # Chunks follow the saving layout's shards, so no chunk crosses a shard's edge.
            blobs.append((_chunk_path(t.key, index), data[tuple(
                slice(a - s, a - s + c) for a, s, c in zip(lo, start, chunk))]))
    files = [(_object_path(o), keep(o.data), o.key) for o in objects if is_main_replica(o.replica_id)]
    files += [(path, keep(value), path) for path, value in (rank_files or {}).items()]
    if dist.get_rank() == 0:
        files.append((COMMON, keep(common), "common"))
    return Snapshot(root, blobs, files, sync)


class Abandoned(RuntimeError):
    """A background write stopped because the run is ending without publishing it."""


def _write_shards(snapshot: Snapshot, abandon: threading.Event | None = None) -> dict[str, str]:
    """Writes this rank's part of the snapshot (no collective: on any thread) and flushes it
    (files, then the directories holding them); returns the digest of every file written.
    Stops, raising Abandoned, soon after ``abandon`` is set."""
    root = snapshot.root

    def write(item) -> str:
        path, values = item
        if abandon is not None and abandon.is_set():
            raise Abandoned(root)
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        return durable.write(full, _bytes(values.contiguous()), snapshot.sync)

    with ThreadPoolExecutor(IO_THREADS) as pool:
        digests = dict(zip([path for path, _ in snapshot.blobs], pool.map(write, snapshot.blobs)))
    for path, value, where in snapshot.plain:
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        plain.dump(value, full, where)
        durable.flush_file(full, snapshot.sync)
        digests[path] = file_digest(full)
    durable.flush_dirs([d for path in digests for d in durable.parents(root, path)], snapshot.sync)
    return digests


def complete(root: str, digests: dict[str, str], error: str, sync: bool = True) -> None:
    """Collective, after every rank's ``_write_shards``: raises the first rank's error on every
    rank (CheckpointWriteError), else rank 0 writes the manifest of every rank's files."""
    agree(error)
    all_digests = [None] * dist.get_world_size()
    dist.all_gather_object(all_digests, digests)
    error = ""
    if dist.get_rank() == 0:
        manifest = {"files": {p: d for per_rank in all_digests for p, d in sorted(per_rank.items())}}
        try:
            durable.write(os.path.join(root, MANIFEST), memoryview(json.dumps(manifest, indent=0).encode()), sync)
            durable.flush_dirs([root], sync)
        except OSError as e:
            error = describe(e)
    agree(error)


def save(sharded_state_dict: dict, root: str, metadata: dict, rank_files: dict[str, object] | None = None,
         sync: bool = True) -> None:
    """Collective: ``prepare``, ``_write_shards`` and ``complete`` in a row."""
    snapshot = prepare(sharded_state_dict, root, metadata, rank_files, sync=sync)
    digests, error = {}, ""
    try:
        digests = _write_shards(snapshot)
    except Exception as e:  # noqa: BLE001 - any failure is reported on every rank
        error = describe(e)
    complete(root, digests, error, sync)


# -- verify and load --------------------------------------------------------------------------


def read_manifest(root: str) -> dict[str, str]:
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
        raise CorruptCheckpoint(f"{root}: no manifest.json (incomplete checkpoint)")
    if not os.path.exists(os.path.join(root, COMMON)) and os.path.exists(os.path.join(root, PICKLED_COMMON)):
        raise PickledCheckpoint(root)
    try:
        with open(path) as f:
            return json.load(f)["files"]
    except (ValueError, KeyError, TypeError):
        raise CorruptCheckpoint(f"{root}: manifest.json is not a THANN manifest") from None


def _read_verified(root: str, path: str, manifest: dict[str, str]) -> bytes:
    """A small file's bytes, checked against the manifest (which must list it)."""
    if path not in manifest:
        raise CorruptCheckpoint(f"{root}: {path} is not in the manifest")
    try:
        with open(os.path.join(root, path), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{root}: missing file {path}") from None
    if durable.digest_of(data, manifest[path]) != manifest[path]:
        raise _mismatch(root, path)
    return data


def read_plain(root: str, path: str, manifest: dict[str, str] | None = None):
    """Plain data of a checkpoint (common.json, an object, a rank's file), verified."""
    data = _read_verified(root, path, read_manifest(root) if manifest is None else manifest)
    try:
        return plain.loads(data, os.path.join(root, path))
    except ValueError as e:
        raise CorruptCheckpoint(str(e)) from None


def verify(root: str, paths: list[str] | None = None, manifest: dict[str, str] | None = None) -> None:
    """Checks the digests of the given files (all of the manifest by default) against the
    checkpoint's manifest (or ``manifest``, already read); names the first that fails."""
    manifest = read_manifest(root) if manifest is None else manifest
    paths = sorted(manifest) if paths is None else paths

    def check(path: str) -> str:
        full = os.path.join(root, path)
        if not os.path.exists(full):
            return f"{root}: missing file {path}"
        return "" if file_digest(full, manifest[path]) == manifest[path] else str(_mismatch(root, path))

    with ThreadPoolExecutor(IO_THREADS) as pool:
        failed = next((e for e in pool.map(check, paths) if e), "")
    if failed:
        raise CorruptCheckpoint(failed)


def _array(root: str, key: str, manifest: dict[str, str]) -> dict:
    """An array's zarr.json (verified when the manifest lists it: checkpoints before plain chunks
    did not)."""
    path = os.path.join(key, ZARR_JSON)
    if not os.path.exists(os.path.join(root, path)):
        raise KeyError(f"{root}: no array {key!r} in the checkpoint")
    if path in manifest:
        return json.loads(_read_verified(root, path, manifest))
    with open(os.path.join(root, path)) as f:
        return json.load(f)


class _Reader:
    """Fills tensors from chunk files: each file read once, straight into the tensor when the
    chunk is a contiguous block of it, hashed as it is read."""

    def __init__(self, root: str, manifest: dict[str, str]):
        self.root, self.manifest = root, manifest
        self.files: dict[str, tuple[list[int], list[int], torch.dtype, list]] = {}

    def add(self, key: str, chunk: list[int], dtype: torch.dtype, target: torch.Tensor, start: list[int]) -> None:
        """``target`` (a CPU tensor with every global axis) receives the region at ``start``."""
        stop = [a + n for a, n in zip(start, target.shape)]
        for index, lo in _chunks_of(start, stop, chunk):
            self.files.setdefault(_chunk_path(key, index), (lo, chunk, dtype, []))[3].append((target, start))

    def read(self) -> None:
        with ThreadPoolExecutor(IO_THREADS) as pool:
            for _ in pool.map(self._read_file, self.files.items()):
                pass

    def _read_file(self, item) -> None:
        path, (lo, chunk, dtype, targets) = item
        hi = [a + c for a, c in zip(lo, chunk)]
        pieces = []  # (destination, source index in the chunk)
        for target, start in targets:
            a = [max(x, s) for x, s in zip(lo, start)]
            b = [min(x, s + n) for x, s, n in zip(hi, start, target.shape)]
            pieces.append((target[tuple(slice(i - s, j - s) for i, j, s in zip(a, b, start))],
                           tuple(slice(i - x, j - x) for i, j, x in zip(a, b, lo))))
        direct = len(pieces) == 1 and list(pieces[0][0].shape) == chunk and pieces[0][0].is_contiguous()
        buffer = pieces[0][0] if direct else torch.empty(chunk, dtype=dtype)
        if path not in self.manifest:
            raise CorruptCheckpoint(f"{self.root}: {path} is not in the manifest")
        try:
            digest = durable.read_into(os.path.join(self.root, path), _bytes(buffer), self.manifest[path])
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{self.root}: missing file {path}") from None
        except EOFError:  # a truncated or extended chunk
            digest = None
        if digest != self.manifest[path]:
            raise _mismatch(self.root, path)
        if not direct:
            for destination, source in pieces:
                destination.copy_(buffer[source])


def _read_with_tensorstore(root: str, leaf: ShardedTensor, chunk: list[int], manifest: dict[str, str],
                           target: torch.Tensor) -> None:
    """An array of a checkpoint written before chunks were plain: its files verified, then read."""
    verify(root, _chunk_files(root, leaf, chunk), manifest)
    value = ts.open(_array_spec(root, leaf.key)).result()[leaf.global_slice()].read().result()
    target.copy_(_to_torch(value, leaf.dtype).view(target.shape))


@torch.no_grad()
def load(sharded_state_dict: dict, root: str) -> dict:
    """Fills this rank's sharded state dict from the checkpoint; returns the loaded state dict.
    Every byte read is checked against the manifest as it is read. Collective: a damaged file on
    any rank raises CorruptCheckpoint on every rank."""
    manifest = read_manifest(root)
    sharded, nonpersistent, factories = load_preprocess(sharded_state_dict)
    sharded, _ = extract_sharded_base(sharded)  # the rest comes from common.json
    leaves = [v for v in nested_values(sharded) if isinstance(v, (ShardedTensor, ShardedObject))]

    def read() -> tuple[dict, dict]:
        common = read_plain(root, COMMON, manifest)
        reader, values, late = _Reader(root, manifest), {}, []
        for leaf in leaves:
            if isinstance(leaf, ShardedObject):
                values[id(leaf)] = read_plain(root, _object_path(leaf), manifest)
                continue
            array = _array(root, leaf.key, manifest)
            if list(array["shape"]) != list(leaf.global_shape):
                raise ValueError(f"{leaf.key}: checkpoint shape {list(array['shape'])}, "
                                 f"this model expects {list(leaf.global_shape)}")
            into_place = (leaf.data is not None and leaf.flattened_range is None and leaf.data.device.type == "cpu"
                          and leaf.data.dtype == leaf.dtype and leaf.data.is_contiguous())
            value = leaf.data if into_place else torch.empty(leaf.local_shape, dtype=leaf.dtype)
            # Detached: filled in place on the reader's threads, where no_grad does not reach.
            target = value.detach().view([1] * leaf.prepend_axis_num + list(leaf.local_shape))
            chunk = array["chunk_grid"]["configuration"]["chunk_shape"]
            if array.get("codecs") == _BYTES_CODEC:
                reader.add(leaf.key, chunk, leaf.dtype, target, list(leaf.global_offset))
            else:
                late.append((leaf, chunk, target))
            values[id(leaf)] = value
        reader.read()
        for leaf, chunk, target in late:
            _read_with_tensorstore(root, leaf, chunk, manifest, target)
        return common, values

    common, values = everywhere(read)

    def place(leaf):
        if isinstance(leaf, ShardedTensor):
            value = values[id(leaf)]
            if leaf.flattened_range is not None:
                value = value.flatten()[leaf.flattened_range]
            if leaf.data is None:
                return value
            if value is not leaf.data:
                leaf.data.copy_(value.view(leaf.data.shape))
            return leaf.data
        if isinstance(leaf, ShardedObject):
            return values[id(leaf)]
        return leaf

    dict_list_map_inplace(place, sharded)
    merge(common, nonpersistent)
    merge(common, sharded)
    return apply_factory_merges(common, factories)
