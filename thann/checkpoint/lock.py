"""One run per checkpoint directory: an exclusive advisory lock on ``<checkpoint.dir>/.lock``.

The lock is ``flock``: the kernel drops it when the holding process exits, however it exits, so
a lock left by a killed run is never in the way. The file also names its holder (pid, host,
start time, command) for the message a second run gets, and is emptied on a clean release:
finding it non-empty and free means the previous holder died without releasing it.
"""

import fcntl
import json
import os
import socket
import sys
import time

LOCK_FILE = ".lock"


class DirectoryInUse(RuntimeError):
    pass


class DirectoryLock:
    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_FILE)
        self._file = None
        self.stale_holder: dict | None = None  # who held it last without releasing it

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _parse(f.read())
            f.close()
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}" if holder
                   else "another process")
            raise DirectoryInUse(f"{os.path.dirname(self.path)} is in use by another run ({who}); wait for it to "
                                 "finish or stop it, or choose another checkpoint.dir") from None
        f.seek(0)
        self.stale_holder = _parse(f.read())
        f.seek(0)
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}, f)
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.close()  # closing drops the flock
        self._file = None


def _parse(text: str) -> dict | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None
