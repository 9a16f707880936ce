"""A run directory's layout, and the complete checkpoints it holds:

    <checkpoint.dir>/.lock                       held by the one run using the directory
    <checkpoint.dir>/iter_0000100/               one directory per saved step (zarr or torch_dist inside)
                     thann.json                  step, run id, layout, slots, config, tokenizer, versions, time
    <checkpoint.dir>/iter_0000100.tmp/           a save in progress (or one that never completed)
    <checkpoint.dir>/latest                      name of the newest complete checkpoint
    <checkpoint.dir>/archive/<time>/             an earlier run's files, set aside, never removed
"""

import json
import os
import time
from dataclasses import dataclass, field

LATEST = "latest"
METADATA = "thann.json"
ARCHIVE = "archive"


def iteration_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def latest_checkpoint(root: str) -> str | None:
    """The checkpoint ``latest`` names, if the file exists (whether or not that checkpoint does)."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return os.path.join(root, f.read().strip())


def read_metadata(path: str) -> dict:
    with open(os.path.join(path, METADATA)) as f:
        return json.load(f)


@dataclass
class Candidate:
    """A complete checkpoint a run could resume from."""
    path: str
    metadata: dict
    notes: list[str] = field(default_factory=list)  # why it was chosen over `latest`

    @property
    def step(self) -> int:
        return self.metadata["step"]


def find_checkpoints(root: str) -> list[Candidate]:
    """Complete checkpoints under ``root``, the one ``latest`` names first when it is one of
    them, then the others newest first (by the time they were saved)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not name.startswith("iter_") or name.endswith(".tmp") or not os.path.isdir(path):
            continue
        try:
            found.append(Candidate(path, read_metadata(path)))
        except (OSError, ValueError):
            continue  # no readable thann.json: not a complete checkpoint
    found.sort(key=lambda c: (c.metadata.get("saved_at_unix", 0.0), c.step), reverse=True)
    named = latest_checkpoint(root)
    first = next((c for c in found if named and os.path.basename(c.path) == os.path.basename(named)), None)
    if first is not None:
        found.remove(first)
        return [first] + found
    if found:
        reason = (f"'{LATEST}' names {os.path.basename(named)}, which is missing or incomplete" if named
                  else f"there is no '{LATEST}' file")
        found[0].notes.append(reason)
    return found


def set_aside(root: str, names: list[str]) -> str:
    """Moves ``names`` (entries of ``root``) into a new ``root/archive/<time>/``; returns it."""
    base = os.path.join(root, ARCHIVE, time.strftime("%Y%m%d-%H%M%S"))
    target, n = base, 1
    while os.path.exists(target):
        n += 1
        target = f"{base}-{n}"
    os.makedirs(target)
    for name in names:
        os.replace(os.path.join(root, name), os.path.join(target, name))
    return target


def interrupted_saves(root: str) -> list[str]:
    """``iter_*.tmp`` directories: saves that never completed (a killed or aborted run)."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if n.startswith("iter_") and n.endswith(".tmp"))
