"""Local copies of prepared datasets kept in object storage (``gs://``, ``s3://``, any ``etils.epath``
/ fsspec scheme): ``data.paths`` may name them, training and eval read the copies.

Why a copy: training reads documents at random, through ArrayRecord's reader (array_record 0.8.6,
under grain 0.2.18's ``ArrayRecordDataSource``), which takes a path string, not a file object. Its
only non-local path is a built-in GCS client for ``gs://`` URIs: another client than the one the
rest of a run uses (fsspec / gcsfs through ``etils.epath``), for that one scheme only, and offline
or without credentials it retries without end instead of failing. grain has no other
random-access source. So each remote dataset is copied once into ``data.cache_dir`` and read from
local disk.

The copy, per dataset (``<cache_dir>/<name>-<hash of the URI>/``):

- every shard, because process ``p`` of ``n`` reads documents ``p, p + n, ...`` of every shard;
- fetched under a temporary name, checked against the manifest (its byte size and SHA-256, which
  `dsa-train data prepare` records; datasets prepared before it did are checked by size against
  the stored object and by record count), then renamed: a kill leaves no file that looks complete;
- reused by the next job when a stamp file beside the shard says it was verified as the
  manifest's entry for it now describes, and the shard's size and mtime are what they were then
  (a truncated or rewritten copy is fetched again; a byte changed in place keeping size and
  mtime is not looked for, to keep start-up from reading the whole dataset);
- fetched once per host: the processes of one host (one per GPU) take an ``fcntl`` lock on the
  dataset's copy in turn, the first fetches, the others find it verified.

Cost: disk on every host equal to the datasets' size (``manifest.json`` ``shards[].bytes``), checked
against the free space before fetching; the first start of a job on a new host waits for the copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from dsa_train.data.batch import DataError
from dsa_train.data.manifest import MANIFEST, read_manifest, write_json_atomic
from dsa_train.paths import run_path

LOCK = ".lock"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dsa-train/datasets`` (``~/.cache/dsa-train/datasets``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dsa-train" / "datasets"


def cache_root(cache_dir: Optional[str]) -> Path:
    """``data.cache_dir`` as a local directory (relative: to the working directory)."""
    return Path(os.path.abspath(os.path.expanduser(cache_dir))) if cache_dir else default_cache_dir()


def copy_dir(uri: str, cache_dir: Optional[str]) -> Path:
    """Where the copy of the dataset at ``uri`` lives."""
    tail = str(uri).rstrip("/").rsplit("/", 1)[-1] or "dataset"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in tail)[:64]
    return cache_root(cache_dir) / f"{safe}-{hashlib.sha256(str(uri).rstrip('/').encode()).hexdigest()[:16]}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _logger() -> logging.Logger:
    logger = logging.getLogger("dsa_train.data")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
        yield
    finally:
        os.close(fd)


def _stamp_path(local: Path) -> Path:
    return local.with_name(f".{local.name}.verified")


def _expected(entry: dict, remote) -> dict:
    """What a good copy of one file is: the manifest's entry, plus the stored object's size when
    the manifest does not record one (datasets prepared before it did)."""
    expected = dict(entry)
    if "bytes" not in expected:
        expected["bytes"] = remote.stat().length
    return expected


def _is_verified(local: Path, expected: dict) -> bool:
    try:
        stamp = json.loads(_stamp_path(local).read_text())
        stat = local.stat()
    except (OSError, ValueError):
        return False
    return (stamp.get("entry") == expected and stat.st_size == expected["bytes"]
            and stamp.get("size") == stat.st_size and stamp.get("mtime_ns") == stat.st_mtime_ns)


def _fetch(remote, local: Path, expected: dict) -> None:
    """Copy ``remote`` to ``local`` through a temporary name, hashing on the way; check, rename, stamp."""
    _stamp_path(local).unlink(missing_ok=True)
    tmp = local.with_name(f"{local.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with remote.open("rb") as fin, open(tmp, "wb") as fout:
            for block in iter(lambda: fin.read(16 << 20), b""):
                digest.update(block)
                fout.write(block)
        size = tmp.stat().st_size
        if size != expected["bytes"]:
            raise DataError(f"{remote}: {size} bytes, but its manifest says {expected['bytes']} (changed or "
                            "partly uploaded; re-run `dsa-train data prepare`)")
        if expected.get("sha256") not in (None, digest.hexdigest()):
            raise DataError(f"{remote}: SHA-256 {digest.hexdigest()[:12]}… differs from its manifest's "
                            f"{expected['sha256'][:12]}… (changed after it was prepared; re-run `dsa-train data prepare`)")
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    stat = local.stat()
    write_json_atomic(_stamp_path(local), {"entry": expected, "sha256": digest.hexdigest(), "size": stat.st_size,
                                           "mtime_ns": stat.st_mtime_ns})


def _free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def localize(uri: str, cache_dir: Optional[str]) -> dict:
    """The manifest of the remote dataset ``uri``, its ``_dir`` a verified local copy (fetched now
    as needed); ``_source`` is ``uri``; ``_fetched``: the files fetched now (empty when reused)."""
    remote_dir = run_path(str(uri).rstrip("/"))
    manifest = read_manifest(remote_dir)
    local_dir = copy_dir(uri, cache_dir)
    try:
        local_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.cache_dir: can't create {local_dir} ({e.strerror})") from None
    files = []  # (name, expected); the shards' stats files only for the tokenizer check
    for shard in manifest["shards"]:
        files.append((shard["path"], dict(shard)))
        stats = (remote_dir / shard["path"]).with_suffix(".json")
        if stats.is_file():
            files.append((stats.name, {"bytes": stats.stat().length}))
    fetched: list[str] = []
    started = time.monotonic()
    with _locked(local_dir):
        for leftover in local_dir.glob("*.partial-*"):  # from a job killed while fetching
            leftover.unlink(missing_ok=True)
        todo = []
        for name, entry in files:
            remote = remote_dir / name
            if not remote.is_file():
                raise DataError(f"{remote_dir}: shard missing: {name}")
            expected = _expected(entry, remote)
            if not _is_verified(local_dir / name, expected):
                todo.append((remote, local_dir / name, expected))
        needed = sum(e["bytes"] for _, _, e in todo)
        if todo and needed > _free_bytes(local_dir):
            raise DataError(f"data.cache_dir: {local_dir} has {_free_bytes(local_dir) / 1e9:.2f} GB free, the copy of "
                            f"{uri} needs {needed / 1e9:.2f} GB (set data.cache_dir to a larger disk)")
        for remote, local, expected in todo:
            _fetch(remote, local, expected)
            fetched.append(local.name)
        # The manifest last: the copy is complete (and verified) once it is there.
        write_json_atomic(local_dir / MANIFEST, {k: v for k, v in manifest.items() if not k.startswith("_")})
    shards = len(manifest["shards"])
    if fetched:
        _logger().info("data: fetched %d file(s), %.1f MB of %s into %s in %.1f s (%d of %d shard(s) were cached)",
                       len(fetched), needed / 1e6, uri, local_dir, time.monotonic() - started,
                       shards - sum(1 for n in fetched if n.endswith(".arrayrecord")), shards)
    else:
        _logger().info("data: %s: all %d shard(s) cached and verified in %s", uri, shards, local_dir)
    local = read_manifest(local_dir)
    local["_source"], local["_fetched"] = str(uri), fetched
    return local
