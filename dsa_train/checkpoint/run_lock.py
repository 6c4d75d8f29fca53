"""An exclusive lock on a run directory: one training job writes a run directory at a time.

Two jobs on one run directory would both resume (or both start) from the same checkpoint,
interleave ``metrics.jsonl`` and collide on Orbax's temporary step directories, losing every
checkpoint. The lock is ``fcntl.flock`` on ``<run_dir>/.lock``: the kernel drops it when its holder
exits, however it exits (SIGKILL included), so a dead job never blocks the next one. The file
holds the holder's host, pid and start time, only to say who holds it.

In a multi-process job only process 0 takes it (on a shared file system the other processes of
the same job would otherwise refuse each other). A remote run directory (``gs://``...) has no
lock: object stores have no advisory locks, so one job per remote run directory is up to the user.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from dsa_train.paths import is_uri, run_path

LOCK_FILE = ".lock"


class RunDirLockedError(ValueError):
    """Another live process holds the run directory: one clear line, nothing touched."""


class RunLock:
    """``with RunLock(run_dir): ...`` — refuse at once (``RunDirLockedError``) if it is held."""

    def __init__(self, run_dir: str | Path):
        self.remote = is_uri(run_dir)
        self.path = run_path(run_dir) / LOCK_FILE
        self._fd: Optional[int] = None
        self.created = False  # whether this lock created the lock file (see release(remove=True))

    def acquire(self) -> "RunLock":
        if self.remote:
            return self  # no locks on an object store (module docstring)
        while True:
            existed = self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirLockedError(
                    f"{self.path.parent} is in use by another training job{holder}; wait for it to end or "
                    "choose another train.run_dir") from None
            # A holder that removed the file (release(remove=True)) between our open and our flock
            # leaves us locking a deleted inode: start again on the file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode())
        self._fd, self.created = fd, not existed
        return self

    def release(self, remove: bool = False) -> None:
        """Drop the lock; ``remove``: also delete the lock file (a run that never started)."""
        if self._fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)  # still holding the lock: nobody else is inside
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f" (pid {info['pid']} on {info['host']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""
