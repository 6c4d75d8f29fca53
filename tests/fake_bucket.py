"""An offline ``gs://`` for tests: object storage backed by a local directory.

Everything above the storage layer sees real ``gs://`` URIs: ``etils.epath`` reaches the bucket
through fsspec (here a directory-rooted filesystem registered for the ``gs``/``gcs`` protocols,
where ``gcsfs`` would be in production), and Orbax's TensorStore kvstore for a ``gs://`` path
(the ``gcs`` driver in production) becomes the ``file`` driver on the same directory. A code path
that turns a URI into a local path (``Path("gs://b/r")`` -> ``./gs:/b/r``) writes outside the
bucket, where the tests look for it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import fsspec
from fsspec.registry import _registry as fsspec_implementations
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils


def _without_scheme(path: str) -> str:
    for scheme in ("gs://", "gcs://"):
        if path.startswith(scheme):
            return path[len(scheme):]
    return path


@contextlib.contextmanager
def fake_gcs(root: Path, monkeypatch) -> Iterator[Path]:
    """``gs://BUCKET/KEY`` is ``root/BUCKET/KEY`` while the context is open."""
    root.mkdir(parents=True, exist_ok=True)

    class BucketDirectory(DirFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, **kwargs):
            super().__init__(path=str(root), fs=LocalFileSystem())

        @classmethod
        def _strip_protocol(cls, path):
            return _without_scheme(str(path)).rstrip("/")

    def file_kvstore(ckpt_path: str) -> dict:
        return {"driver": "file", "path": str(root / _without_scheme(str(ckpt_path)))}

    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, BucketDirectory, clobber=True)
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", file_kvstore)
    # A flat-namespace bucket: Orbax asks the GCS client otherwise.
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        yield root
    finally:
        epath_backend.fsspec_backend._get_filesystem.cache_clear()
        for protocol in ("gs", "gcs"):
            fsspec_implementations.pop(protocol, None)
