"""The prepared-dataset format: ArrayRecord shards of token ids plus ``manifest.json``.

A prepared dataset is a directory::

    manifest.json              what the pipeline reads (below)
    plan.json                  the work plan of `dsa-train data prepare` (lets it resume)
    shard-00000.arrayrecord    one record per document: the token ids as little-endian int32 bytes
    shard-00000.json           that shard's stats, written after the shard is complete

manifest.json::

    {"format": "dsa-train-tokens", "version": 1, "dtype": "int32",
     "documents": 1234, "tokens": 567890, "max_token_id": 50000,
     "tokenizer_sha256": "...", "vocab_size": 50257, "eos_id": 50256, "bos_id": null,
     "shards": [{"path": "shard-00000.arrayrecord", "documents": 600, "tokens": 280000,
                 "tokenizer_sha256": "...", "bytes": 1126400, "sha256": "..."}, ...],
     ...}  (plus provenance: inputs, text field, options)

A shard's ``bytes`` and ``sha256`` (the file's size and digest) let a copy of a remote dataset be
checked (dsa_train/data/cache.py); datasets prepared before they were recorded lack them and are
read all the same.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dsa_train.data.batch import DataError
from dsa_train.paths import is_uri, run_path

FORMAT = "dsa-train-tokens"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
DTYPE = "int32"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrayrecord"


def shard_stats_name(index: int) -> str:
    return f"shard-{index:05d}.json"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with run_path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_file(path: str | Path) -> Path:
    """`path` itself, or `path/tokenizer.json` for a Hugging Face model directory (local or a URI)."""
    path = run_path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer not found: {path}")
    return path


def write_json_atomic(path: Path, data: dict) -> None:
    """Write-then-rename so a crash never leaves a half-written file that looks complete (local or
    remote: an object store's rename is a copy of a complete object, then a delete)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    if is_uri(path):
        tmp.replace(path)
    else:
        os.replace(tmp, path)


def manifest_path(path: str | Path) -> Path:
    """A dataset is named by its directory or by its manifest.json (local or a URI)."""
    path = run_path(path)
    return path if path.name == MANIFEST or path.suffix == ".json" else path / MANIFEST


def read_manifest(path: str | Path) -> dict:
    """Load and check one manifest; every problem is a one-line DataError naming the file."""
    mpath = manifest_path(path)
    if not mpath.parent.exists():
        raise DataError(f"dataset not found: {mpath.parent}")
    if not mpath.is_file():
        raise DataError(f"{mpath.parent}: no {MANIFEST} (prepare it with `dsa-train data prepare`, "
                        f"or it is still being prepared)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{mpath}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{mpath}: not a dsa-train token dataset manifest")
    if manifest.get("version") != VERSION or manifest.get("dtype") != DTYPE:
        raise DataError(f"{mpath}: unsupported manifest version {manifest.get('version')} / dtype "
                        f"{manifest.get('dtype')} (expected {VERSION} / {DTYPE})")
    for key in ("documents", "tokens", "max_token_id", "tokenizer_sha256", "vocab_size", "shards"):
        if key not in manifest:
            raise DataError(f"{mpath}: manifest lacks '{key}'")
    manifest["_dir"] = str(mpath.parent)
    manifest["_path"] = str(mpath)
    return manifest
