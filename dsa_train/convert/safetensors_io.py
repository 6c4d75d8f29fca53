"""Streaming access to safetensors files, tensor by tensor, with bounded memory.

The format is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` and the raw
little-endian tensor bytes. We read it directly with ``np.memmap`` instead of
``safetensors.safe_open``: the latter's NumPy backend cannot represent ``float8_e4m3fn`` (the
dtype of the DeepSeek FP8 checkpoints; it raises AttributeError) and its torch backend would make
torch a runtime dependency. A memmap view costs no memory until read, and reading a slice (one
expert of a fused expert tensor, a block of rows) touches only those bytes.

Writing is streamed too: the header is computed from the planned shapes, then each tensor's bytes
are appended chunk by chunk, so an export never holds more than one chunk of one tensor.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import ml_dtypes
import numpy as np

from dsa_train.convert.common import ConversionError, one_line
from dsa_train.paths import is_uri, run_path

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, absolute offset of the data section) of one safetensors file."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ConversionError(f"{path}: not a safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 2**20:
                raise ConversionError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ConversionError(f"missing checkpoint file {path}") from None
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {one_line(e)}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConversionError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: not a safetensors file (header is not a mapping)")
    return header, 8 + n


class SafetensorsCheckpoint:
    """All tensors of a HF checkpoint directory: ``model.safetensors.index.json`` + shards, or a
    single ``model.safetensors``. Every referenced shard is checked up front (a missing shard is
    reported before anything is converted)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = run_path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise ConversionError(f"{index}: not a valid safetensors index (no 'weight_map')") from None
            except OSError as e:
                raise ConversionError(f"cannot read {index}: {one_line(e)}") from None
            files = {name: self.dir / file for name, file in weight_map.items()}
        elif (self.dir / SINGLE_FILE).is_file():
            files = None
        else:
            raise ConversionError(f"{self.dir}: no {INDEX_FILE} or {SINGLE_FILE}")
        self.tensors: dict[str, TensorInfo] = {}
        shard_paths = sorted(set(files.values())) if files is not None else [self.dir / SINGLE_FILE]
        for shard in shard_paths:
            if not shard.is_file():
                example = next(n for n, f in files.items() if f == shard)
                raise ConversionError(f"missing shard {shard.name} in {self.dir} (holds {example})")
            header, data_start = read_header(shard)
            for name, entry in header.items():
                if name == "__metadata__" or (files is not None and files.get(name) != shard):
                    continue
                try:
                    dtype = DTYPES[entry["dtype"]]
                    begin, end = entry["data_offsets"]
                    shape = tuple(int(d) for d in entry["shape"])
                except KeyError as e:
                    raise ConversionError(f"{shard.name}: tensor {name} has an unsupported or missing {e}") from None
                if end - begin != int(np.prod(shape)) * dtype.itemsize:
                    raise ConversionError(f"{shard.name}: tensor {name} has {end - begin} bytes for shape {shape}")
                self.tensors[name] = TensorInfo(name, shard, dtype, shape, data_start + begin)
        if files is not None:
            for name, shard in files.items():
                if name not in self.tensors:
                    raise ConversionError(f"tensor {name} is listed in {INDEX_FILE} but not in {shard.name}")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def array(self, name: str) -> np.ndarray:
        """A read-only memmap view of one tensor (no bytes are read until it is indexed); from a
        remote directory, the tensor's bytes (one ranged read: memory for one tensor)."""
        t = self.tensors[name]
        if 0 in t.shape:
            return np.zeros(t.shape, t.dtype)
        if is_uri(t.file):
            nbytes = int(np.prod(t.shape)) * t.dtype.itemsize
            with t.file.open("rb") as f:
                f.seek(t.offset)
                data = f.read(nbytes)
            if len(data) != nbytes:
                raise ConversionError(f"{t.file.name}: tensor {name} is cut short ({len(data)} of {nbytes} bytes)")
            return np.frombuffer(data, dtype=t.dtype).reshape(t.shape)
        return np.memmap(t.file, dtype=t.dtype, mode="r", offset=t.offset, shape=t.shape)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


@dataclass
class PlannedTensor:
    """One tensor to write: its dtype and shape, and a generator of C-ordered chunks whose
    concatenation (flattened) is the tensor."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def write_safetensors(path: Path, tensors: list[PlannedTensor], metadata: Optional[dict] = None) -> None:
    """Write ``tensors`` into one safetensors file, streaming each tensor's chunks."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[np.dtype(t.dtype)], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with path.open("wb") as f:  # local or remote (streamed)
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            written = 0
            for chunk in t.chunks():
                chunk = np.ascontiguousarray(chunk, dtype=t.dtype)
                f.write(chunk.reshape(-1).view(np.uint8).data)
                written += chunk.nbytes
            if written != t.nbytes:
                raise ConversionError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
