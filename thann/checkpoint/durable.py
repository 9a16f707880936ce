"""Writing files so that they survive a machine crash, not only a process crash.

A rename is atomic, but without flushes the kernel may write the renamed directory entry to the
disk before the data it points at: after a power loss ``latest`` could name a checkpoint whose
chunks or manifest are empty. So every file of a checkpoint is flushed (``fdatasync``: its data
and size) and every directory holding new entries is flushed (``fsync``) before the checkpoint is
renamed into place; the parent directory is flushed after each rename (the checkpoint's and
``latest``'s), and ``latest`` moves only once the checkpoint's rename is on the disk.

``sync=False`` (``checkpoint.fsync=false``) skips every flush: for a tmpfs, or a file system
whose durability does not matter. The renames stay atomic for a process crash either way.

Every file's bytes are digested as they are written and as they are read. A digest names its
algorithm: ``xxh3_128:<hex>`` (xxHash's XXH3, 128 bits: a checksum against torn and corrupted
files at ~7 GB/s per core, where sha256 runs at ~1.3 and cost a 2-core machine about 3 s of CPU
per 3.7 GB saved); a bare hex string is sha256, what checkpoints recorded before 2026-12-07,
still read and verified.
"""

import hashlib
import os

import xxhash

# Written and hashed in pieces, so the bytes are still in the CPU's cache when they are hashed.
_PIECE = 4 * 2**20


_XXH3 = "xxh3_128:"


class Digest:
    """The digest of bytes fed in pieces, in the algorithm of ``recorded`` (a digest as a
    manifest holds it), or in that of new checkpoints."""

    def __init__(self, recorded: str | None = None):
        self.sha256 = recorded is not None and not recorded.startswith(_XXH3)
        self._hash = hashlib.sha256() if self.sha256 else xxhash.xxh3_128()

    def update(self, data) -> None:
        self._hash.update(data)

    def value(self) -> str:
        return self._hash.hexdigest() if self.sha256 else _XXH3 + self._hash.hexdigest()


def digest_of(data, recorded: str | None = None) -> str:
    digest = Digest(recorded)
    digest.update(data)
    return digest.value()


def write(path: str, data: memoryview, sync: bool) -> str:
    """Writes ``data`` (bytes) as a new file, flushed when ``sync``; returns the digest of the
    bytes written."""
    digest = Digest()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start in range(0, len(data), _PIECE):
            piece = data[start:start + _PIECE]
            digest.update(piece)
            while piece:
                piece = piece[os.write(fd, piece):]
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)
    return digest.value()


def read_into(path: str, out: memoryview, recorded: str | None = None) -> str:
    """Fills ``out`` (writable bytes) from the file, which must be exactly as long; returns the
    digest of the bytes read (in ``recorded``'s algorithm), or raises EOFError when the file's
    length differs."""
    digest = Digest(recorded)
    with open(path, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_size != len(out):
            raise EOFError(path)
        for start in range(0, len(out), _PIECE):
            piece = out[start:start + _PIECE]
            filled = 0
            while filled < len(piece):
                n = f.readinto(piece[filled:])
                if not n:
                    raise EOFError(path)
                filled += n
            digest.update(piece)
    return digest.value()


def file_digest(path: str, recorded: str | None = None) -> str:
    """The digest of a file's bytes, in ``recorded``'s algorithm (None: that of new checkpoints)."""
    digest = Digest(recorded)
    with open(path, "rb", buffering=0) as f:
        while piece := f.read(_PIECE):
            digest.update(piece)
    return digest.value()


def flush_file(path: str, sync: bool) -> None:
    """Flushes a file that was written by other code (closed already: any descriptor flushes it)."""
    if sync:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)


def flush_dirs(paths, sync: bool) -> None:
    """Flushes the entries of each directory (files and directories created in it)."""
    if sync:
        for path in sorted(set(paths)):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def parents(root: str, relative: str) -> list[str]:
    """The directories from ``root`` down to the one holding ``relative``: where writing
    ``relative`` may have created entries."""
    found = [root]
    for part in os.path.dirname(relative).split(os.sep) if os.path.dirname(relative) else ():
        found.append(os.path.join(found[-1], part))
    return found


def flush_tree(root: str, sync: bool) -> None:
    """Flushes every file and directory under ``root`` (written by a library that flushes only
    some of them: megatron-core's torch_dist writer syncs its data files, not its metadata)."""
    if sync:
        for directory, _, files in os.walk(root):
            for name in files:
                flush_file(os.path.join(directory, name), sync)
            flush_dirs([directory], sync)


def replace(source: str, target: str, sync: bool) -> None:
    """Renames ``source`` to ``target`` (atomic), then flushes the directory holding ``target``
    so that the rename itself is on the disk."""
    os.replace(source, target)
    flush_dirs([os.path.dirname(os.path.abspath(target))], sync)
