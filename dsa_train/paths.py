"""Paths that may be local or remote (``gs://``, ``s3://``, any ``etils.epath`` / fsspec scheme).

One rule: a relative path means relative to the working directory the command runs in; a URI is
kept as it is, never resolved against the local filesystem (``Path("gs://b/r")`` would be the
local ``./gs:/b/r``). Code that reads or writes a user-given location goes through ``run_path``:
an ``epath.Path`` for a URI, a ``pathlib.Path`` otherwise; both speak the same pathlib subset.

Tools that only write local files (TensorBoard's event writer, W&B, the profiler, appending to a
file, which object stores cannot do) write into a ``LocalStaging`` directory that is copied to the
remote location (``sync``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

from etils import epath

AnyPath = Union[Path, epath.Path]


def is_uri(path) -> bool:
    return "://" in str(path)


def run_path(path, *, absolute: bool = False) -> AnyPath:
    """A URI as an ``epath.Path``, unchanged; a local path as a ``pathlib.Path`` (``absolute``:
    resolved, as Orbax wants)."""
    if is_uri(path):
        return path if isinstance(path, epath.Path) else epath.Path(str(path))
    path = Path(os.fspath(path))
    return path.resolve() if absolute else path


def as_path(path) -> epath.Path:
    """An ``epath.Path``: URIs unchanged, local paths made absolute (relative to the working directory)."""
    if is_uri(path):
        return run_path(path)
    return epath.Path(os.path.abspath(os.fspath(path)))


def remove_tree(path: AnyPath) -> None:
    """Delete a directory tree, local or remote; a missing one is not an error."""
    if is_uri(path):
        if path.exists():
            path.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def move(src: AnyPath, dst: AnyPath) -> None:
    """Move a file or directory tree within one filesystem (an object store copies and deletes)."""
    if is_uri(src) or is_uri(dst):
        run_path(src).rename(run_path(dst))
    else:
        shutil.move(str(src), str(dst))


def copy_file(src: AnyPath, dst: AnyPath) -> None:
    """Copy one file between any two locations (local <-> remote), overwriting ``dst``."""
    if not is_uri(src) and not is_uri(dst):
        shutil.copyfile(src, dst)
        return
    with run_path(src).open("rb") as fin, run_path(dst).open("wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)


class LocalStaging:
    """A local stand-in for a remote directory: write into ``local``, ``sync()`` copies every file
    new or changed since the last sync to ``remote`` (same relative path), ``close()`` syncs and
    deletes ``local``. ``fetch``: files copied from ``remote`` first (to append to them)."""

    def __init__(self, remote: epath.Path, fetch: tuple[str, ...] = ()):
        self.remote = remote
        self.local = Path(tempfile.mkdtemp(prefix="dsa-train-staging-"))
        self._synced: dict[str, tuple[int, int]] = {}
        for name in fetch:
            if (remote / name).is_file():
                copy_file(remote / name, self.local / name)
                self._synced[name] = self._signature(self.local / name)

    @staticmethod
    def _signature(path: Path) -> tuple[int, int]:
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns

    def sync(self) -> None:
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = path.relative_to(self.local).as_posix()
            signature = self._signature(path)
            if self._synced.get(rel) != signature:
                (self.remote / rel).parent.mkdir(parents=True, exist_ok=True)
                copy_file(path, self.remote / rel)
                self._synced[rel] = signature

    def close(self) -> None:
        try:
            self.sync()
        finally:
            shutil.rmtree(self.local, ignore_errors=True)
