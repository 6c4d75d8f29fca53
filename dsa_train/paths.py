"""Paths that may be local or remote (``gs://``, ``s3://``, any ``etils.epath`` / fsspec scheme).

One rule: a relative path means relative to the working directory the command runs in; a URI is
kept as it is, never resolved against the local filesystem.
"""

from __future__ import annotations

import os

from etils import epath


def is_uri(path) -> bool:
    return "://" in str(path)


def as_path(path) -> epath.Path:
    """An ``epath.Path``: URIs unchanged, local paths made absolute (relative to the working directory)."""
    if isinstance(path, epath.Path) and is_uri(path):
        return path
    if is_uri(path):
        return epath.Path(str(path))
    return epath.Path(os.path.abspath(os.fspath(path)))
