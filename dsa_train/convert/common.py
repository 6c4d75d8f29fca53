"""What the importer and the exporter share: the error type and the write-then-rename output dir."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from dsa_train.paths import is_uri, move, remove_tree, run_path


# The MTP depths' copies of the shared embedding and output head in a HF checkpoint (our model
# shares the main ones): skipped on import, written back from the main tensors on export.
MTP_SHARED_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


def hf_name(key: str, num_hidden_layers: int) -> str:
    """HF tensor name of one of our (per-layer) variable keys: MTP depth k ('mtp/k/...') is HF
    layer num_hidden_layers + k; every other key maps one to one ('/' -> '.')."""
    parts = key.split("/")
    if parts[0] == "mtp":
        parts = ["model", "layers", str(num_hidden_layers + int(parts[1]))] + parts[2:]
    return ".".join(parts)


class ConversionError(ValueError):
    """A user-facing conversion problem, one line naming the tensor or file it is about."""


def one_line(error: BaseException) -> str:
    """The message of an exception on one line (OSError: its strerror and file name)."""
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror + (f": {error.filename}" if error.filename else "")
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; rename it to ``out_dir`` on success.

    On any exception the temporary directory is removed, so a failed or interrupted conversion
    never leaves a partial ``out_dir`` behind. Non-ConversionError exceptions (OSError such as a
    full disk, shape problems, ...) are re-raised as a one-line :class:`ConversionError`.
    """
    if is_uri(out_dir):
        with _remote_output_dir(run_path(out_dir), overwrite=overwrite) as tmp:
            yield tmp
        return
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConversionError(f"output directory {out_dir} already exists and is not empty "
                              "(choose another path or pass overwrite)")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:
        raise ConversionError(f"cannot create a directory beside {out_dir}: {one_line(e)}") from None
    try:
        yield tmp
        if out_dir.exists():  # empty, or overwrite: move the old one aside, then delete it
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, trash / "old")
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except ConversionError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ConversionError(f"writing {out_dir}: {one_line(e)}") from e


@contextlib.contextmanager
def _remote_output_dir(out_dir, *, overwrite: bool) -> Iterator:
    """``atomic_output_dir`` on an object store: written under a temporary prefix beside ``out_dir``,
    then moved into place (objects are copied; readers never see a half-written ``out_dir``)."""
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConversionError(f"output directory {out_dir} already exists and is not empty "
                              "(choose another path or pass overwrite)")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        yield tmp
        if out_dir.exists():
            remove_tree(out_dir)
        move(tmp, out_dir)
    except ConversionError:
        remove_tree(tmp)
        raise
    except BaseException as e:
        remove_tree(tmp)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ConversionError(f"writing {out_dir}: {one_line(e)}") from e
