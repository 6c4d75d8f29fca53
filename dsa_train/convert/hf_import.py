"""Import a Hugging Face DeepSeek-V3 / V3.1 / V3.2 checkpoint into a model directory.

    import_hf_checkpoint(hf_dir, out_dir) -> ImportReport

What it does, in order:
1. config.json -> our ModelConfig (:mod:`dsa_train.convert.hf_config`); unsupported
   architectures are refused before any tensor is touched.
2. Plan: every variable of our model (its shape and dtype taken from ``nnx.eval_shape`` of the
   model, so nothing is allocated) is matched with its source tensor(s) by name, and every shape
   is checked against the safetensors headers. Missing shards, missing or unexpected tensors and
   shape mismatches fail here, naming the tensor and file.
3. Convert, one tensor at a time, in blocks of rows: read (memmap) -> dequantize FP8 e4m3 with
   its 128x128 block scales (``<name>_scale_inv``) -> cast to the target dtype -> write into a
   memmap-backed scratch file. Per-expert tensors are written into their slot of the stacked
   [E, ...] array; fused ``gate_up_proj`` tensors are split. Indexers that the checkpoint lacks
   (V3 / V3.1) are initialized with our model's own initializer, and the report says so.
4. Orbax writes the tree of scratch memmaps to ``params/`` (no copies, see
   :mod:`dsa_train.checkpoint.model_io`), ``model.yaml`` and ``import_report.json`` go beside it,
   the scratch files are deleted and the temporary directory is renamed to ``out_dir``.

Memory: anonymous memory stays at one block of rows (<= ~64 MB per buffer) plus Orbax's and
tensorstore's own buffers, whatever the model size; converted tensors live in file-backed pages
that the kernel writes back and evicts. Disk: about twice the output size until the scratch files
are deleted at the end. Any error removes the temporary directory, so no partial ``out_dir``
is ever left behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dsa_train.config import ConfigError, ModelConfig
from dsa_train.convert.common import MTP_SHARED_COPIES, ConversionError, atomic_output_dir, hf_name, one_line
from dsa_train.convert.hf_config import HFSourceInfo, model_config_from_hf, read_hf_config
from dsa_train.convert.safetensors_io import DTYPES, SafetensorsCheckpoint
from dsa_train.paths import copy_file, is_uri, run_path

MTP_DIR = "mtp"  # HF-named tensors of the MTP layer(s), only with include_mtp
ASSETS_DIR = "hf_assets"  # tokenizer / generation config of the source, copied back on export
REPORT_FILE = "import_report.json"
SOURCE_CONFIG_FILE = "source_config.json"
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
               "chat_template.jinja", "tokenizer.model")
CHUNK_ELEMENTS = 16 * 2**20  # rows per conversion block: ~64 MB of fp32
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
FP8 = DTYPES["F8_E4M3"]
PARAM_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": DTYPES["BF16"]}
# What a floating-point parameter may be stored as: an integer or bool tensor in its place is a
# broken or foreign checkpoint (casting it would import integers as weights).
FLOAT_SOURCES = {DTYPES[k] for k in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")}


@dataclass
class ImportReport:
    source: str
    out_dir: str
    model_type: str
    config: ModelConfig
    tensors_read: int = 0
    fp8_dequantized: int = 0
    expert_layout: str = "none"  # "per-expert" | "fused" | "none"
    initialized: list[str] = field(default_factory=list)  # what was freshly initialized
    skipped: list[str] = field(default_factory=list)  # source tensors not imported
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        c = self.config
        lines = [f"imported {self.source} ({self.model_type}) -> {self.out_dir}",
                 f"  {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.n_routed_experts} routed experts "
                 f"({self.expert_layout} layout), indexer: {'yes' if c.use_indexer else 'no'}, "
                 f"params {c.param_dtype}",
                 f"  {self.tensors_read} source tensors read, {self.fp8_dequantized} dequantized from fp8"]
        lines += [f"  NOTE: {n}" for n in self.notes]
        lines += [f"  initialized: {n}" for n in self.initialized]
        lines += [f"  skipped: {n}" for n in self.skipped]
        return "\n".join(lines)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["config"] = dataclasses.asdict(self.config)
        return d


# ----------------------------------------------------------------------------------------------
# Planning: which source tensors make each of our variables
# ----------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One 2-D (or 1-D) slab of a source tensor: ``name[index]`` rows ``rows`` (None: all)."""

    name: str
    index: tuple = ()  # leading indices into the source tensor (fused experts: (e,))
    rows: Optional[tuple[int, int]] = None  # row range inside the slab (fused gate/up halves)


@dataclass
class Target:
    key: str  # 'model/layers/3/mlp/experts/gate_proj'
    shape: tuple[int, ...]
    dtype: np.dtype
    sources: list[Source] = field(default_factory=list)  # one per expert for stacked experts
    init: Optional[Callable[[], np.ndarray]] = None  # fresh initialization instead of sources
    stacked: bool = False  # routed experts: sources[e] fills [e]


def _abstract_variables(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    from flax import nnx

    from dsa_train.model import create_model
    from dsa_train.model.layer_layout import layer_stacks, to_per_layer

    state = nnx.state(nnx.eval_shape(lambda: create_model(config)))
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        out["/".join(str(p) for p in path)] = (tuple(value.shape), np.dtype(value.dtype))
    # Model directories hold the layers per layer (HF names), whatever config.scan_layers says.
    return to_per_layer(out, layer_stacks(config), take=lambda meta, j: (meta[0][1:], meta[1]))


def _indexer_init(config: ModelConfig, seed: int) -> Callable[[int], dict[str, np.ndarray]]:
    """Fresh indexer weights of one layer, from our model's own initializer (cached per layer)."""
    cache: dict[int, dict[str, np.ndarray]] = {}

    def layer_weights(layer: int) -> dict[str, np.ndarray]:
        if layer not in cache:
            from flax import nnx

            from dsa_train.model.indexer import Indexer

            cache.clear()
            indexer = Indexer(config, rngs=nnx.Rngs(params=seed * 100003 + layer))
            cache[layer] = {"/".join(str(p) for p in path): np.asarray(v.get_value())
                            for path, v in nnx.to_flat_state(nnx.state(indexer))}
        return cache[layer]

    return layer_weights


def _mismatch(ckpt: SafetensorsCheckpoint, name: str, got, want, key: str) -> ConversionError:
    return ConversionError(f"{name} in {ckpt.info(name).file.name}: shape {tuple(got)} does not match "
                           f"{tuple(want)} expected from config.json (for {key})")


def _expert_sources(ckpt: SafetensorsCheckpoint, layer: int, proj: str, shape, key: str) -> tuple[list[Source], str]:
    e, rows, cols = shape
    prefix = f"model.layers.{layer}.mlp.experts"
    per_expert = [f"{prefix}.{i}.{proj}.weight" for i in range(e)]
    fused = f"{prefix}.gate_up_proj" if proj != "down_proj" else f"{prefix}.down_proj"
    if any(n in ckpt for n in per_expert):
        for n in per_expert:
            if n not in ckpt:
                raise ConversionError(f"missing tensor {n} (other experts of layer {layer} are present)")
            if ckpt.info(n).shape != (rows, cols):
                raise _mismatch(ckpt, n, ckpt.info(n).shape, (rows, cols), key)
        return [Source(n) for n in per_expert], "per-expert"
    if fused in ckpt:
        fused_rows = 2 * rows if proj != "down_proj" else rows
        if ckpt.info(fused).shape != (e, fused_rows, cols):
            raise _mismatch(ckpt, fused, ckpt.info(fused).shape, (e, fused_rows, cols), key)
        # transformers' gate_up_proj holds [gate; up] along its rows (chunk(2) gives gate first).
        half = {"gate_proj": (0, rows), "up_proj": (rows, 2 * rows), "down_proj": None}[proj]
        return [Source(fused, (i,), half) for i in range(e)], "fused"
    raise ConversionError(f"missing tensor {per_expert[0]} (nor the fused {fused}) for layer {layer}")


def _plan(config: ModelConfig, info: HFSourceInfo, ckpt: SafetensorsCheckpoint, seed: int,
          report: ImportReport) -> list[Target]:
    targets = []
    indexer_init = _indexer_init(config, seed)
    fresh_layers = []
    for key, (shape, dtype) in _abstract_variables(config).items():
        parts = key.split("/")
        target = Target(key, shape, dtype)
        m = re.fullmatch(r"(model/layers|mtp)/(\d+)/mlp/experts/(\w+)", key)
        if m:
            layer = int(m[2]) + (config.num_hidden_layers if m[1] == "mtp" else 0)
            target.sources, layout = _expert_sources(ckpt, layer, m[3], shape, key)
            target.stacked = True
            report.expert_layout = layout if report.expert_layout in ("none", layout) else "mixed"
        elif "indexer" in parts and not info.has_indexer:
            # MTP depth k: layer num_hidden_layers + k (its own seed, like any other layer)
            layer = int(parts[2]) if parts[0] == "model" else config.num_hidden_layers + int(parts[1])
            sub = "/".join(parts[parts.index("indexer") + 1:])
            target.init = lambda layer=layer, sub=sub, dtype=dtype: indexer_init(layer)[sub].astype(dtype)
            if layer not in fresh_layers:
                fresh_layers.append(layer)
        else:
            name = hf_name(key, config.num_hidden_layers)
            if name not in ckpt:
                raise ConversionError(f"missing tensor {name} in {ckpt.dir}")
            if ckpt.info(name).shape != shape:
                raise _mismatch(ckpt, name, ckpt.info(name).shape, shape, key)
            target.sources = [Source(name)]
        targets.append(target)
    for target in targets:
        for src in target.sources:
            info_ = ckpt.info(src.name)
            if info_.dtype not in FLOAT_SOURCES:  # every parameter of the model is floating-point
                raise ConversionError(f"{src.name} in {info_.file.name}: dtype {info_.dtype}, expected a "
                                      "floating-point tensor")
    if fresh_layers:
        report.initialized.append(f"lightning indexers of layers {fresh_layers[0]}..{fresh_layers[-1]} "
                                  f"(normal std 0.02, k_norm ones/zeros, seed {seed})")
    return targets


def _check_leftovers(config: ModelConfig, ckpt: SafetensorsCheckpoint, targets: list[Target],
                     include_mtp: bool, report: ImportReport) -> list[str]:
    """Refuse unknown source tensors; return the MTP tensor names to import (if asked)."""
    used = {s.name for t in targets for s in t.sources}
    used |= {n + "_scale_inv" for n in used}
    mtp, dropped_indexer, ignored, shared_copies = [], 0, 0, 0
    for name in ckpt.names():
        if name in used:
            continue
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        modeled_mtp = bool(m) and 0 <= int(m[1]) - config.num_hidden_layers < config.num_nextn_predict_layers
        if modeled_mtp and m[2].removesuffix("_scale_inv") in MTP_SHARED_COPIES:
            shared_copies += not name.endswith("_scale_inv")
        elif modeled_mtp and ".self_attn.indexer." in name and not config.use_indexer:
            dropped_indexer += 1
        elif m and int(m[1]) >= config.num_hidden_layers and not modeled_mtp:
            mtp.append(name)
        elif ".self_attn.indexer." in name and not config.use_indexer:
            dropped_indexer += 1
        elif name.endswith("rotary_emb.inv_freq"):
            ignored += 1
        else:
            raise ConversionError(f"unexpected tensor {name} in {ckpt.info(name).file.name}: not part of "
                                  f"the model described by config.json")
    if shared_copies:
        report.skipped.append(f"{shared_copies} MTP copies of embed_tokens / lm_head (the model shares the main "
                              f"ones; the export writes them back from those)")
    if dropped_indexer:
        report.skipped.append(f"{dropped_indexer} indexer tensors (use_indexer=false)")
    if ignored:
        report.skipped.append(f"{ignored} rotary_emb.inv_freq buffers (recomputed from the config)")
    mtp_weights = [n for n in mtp if not n.endswith("_scale_inv")]
    if mtp and not include_mtp:
        layers = sorted({int(re.match(r"model\.layers\.(\d+)\.", n)[1]) for n in mtp})
        report.skipped.append(f"MTP layer(s) {layers}: {len(mtp_weights)} tensors (pass include_mtp to keep them)")
        return []
    return mtp_weights


# ----------------------------------------------------------------------------------------------
# Conversion: one source slab -> rows of a destination memmap, in bounded blocks
# ----------------------------------------------------------------------------------------------


class Converter:
    def __init__(self, ckpt: SafetensorsCheckpoint, block: Optional[tuple[int, int]], report: ImportReport):
        self.ckpt, self.block, self.report = ckpt, block or (128, 128), report
        self._read: set[str] = set()
        self.non_finite: list[str] = []  # source tensors holding NaN or Inf (checked as they are read)

    def _check_finite(self, name: str, values: np.ndarray) -> None:
        if name not in self.non_finite and not np.isfinite(values.astype(np.float32)).all():
            self.non_finite.append(name)

    def _scale(self, name: str, shape: tuple[int, ...]) -> Optional[np.ndarray]:
        """The block scales of an fp8 tensor (None for other dtypes), checked against its shape."""
        if self.ckpt.info(name).dtype != FP8:
            return None
        if len(shape) < 2:
            raise ConversionError(f"{name}: a 1-D float8 tensor has no block scales; not supported")
        scale_name = name + "_scale_inv"
        if scale_name not in self.ckpt:
            raise ConversionError(f"{name} in {self.ckpt.info(name).file.name} is float8_e4m3fn but "
                                  f"{scale_name} is missing")
        bo, bi = self.block
        want = (*shape[:-2], math.ceil(shape[-2] / bo), math.ceil(shape[-1] / bi))
        if self.ckpt.info(scale_name).shape != want:
            raise _mismatch(self.ckpt, scale_name, self.ckpt.info(scale_name).shape, want, name)
        self._read.add(scale_name)
        return self.ckpt.array(scale_name)

    def copy(self, src: Source, dst: np.ndarray) -> None:
        """Write the (dequantized, cast) slab ``src`` into ``dst`` (same shape), block by block."""
        arr = self.ckpt.array(src.name)
        scale = self._scale(src.name, arr.shape)
        if src.name not in self._read:
            self._read.add(src.name)
            self.report.tensors_read += 1
            self.report.fp8_dequantized += scale is not None
        slab = arr[src.index] if src.index else arr
        if scale is not None and src.index:
            scale = scale[src.index]
        row0, row1 = src.rows or (0, slab.shape[0] if slab.ndim else 0)
        if slab.ndim < 2:
            values = np.asarray(slab)
            self._check_finite(src.name, values)
            dst[...] = values.astype(dst.dtype)
            return
        step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(slab.shape[1:]))))
        if scale is not None:
            step = max(self.block[0], step // self.block[0] * self.block[0])
        for r in range(row0, row1, step):
            rows = np.asarray(slab[r:min(r + step, row1)])
            if scale is not None:
                rows = self._dequantize(rows, scale, r)
            self._check_finite(src.name, rows)
            dst[r - row0:r - row0 + rows.shape[0]] = rows.astype(dst.dtype)

    def _dequantize(self, rows: np.ndarray, scale: np.ndarray, row_start: int) -> np.ndarray:
        """fp8 rows [r, in] starting at source row ``row_start`` -> fp32 value x block scale."""
        bo, bi = self.block
        s = scale[np.arange(row_start, row_start + rows.shape[0]) // bo]  # [r, ceil(in / bi)]
        s = np.repeat(s.astype(np.float32), bi, axis=1)[:, : rows.shape[1]]
        return rows.astype(np.float32) * s


def _stage(path: Path, shape, dtype) -> np.ndarray:
    if 0 in shape:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="w+", shape=tuple(shape))


def _reopen(path: Path, shape, dtype) -> np.ndarray:
    if 0 in shape:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=tuple(shape))


def _mtp_dtype(src_dtype: np.dtype, name: str, param_dtype: np.dtype) -> np.dtype:
    """Target dtype of an MTP tensor: floats become the import dtype, router biases stay fp32."""
    if name.endswith("e_score_correction_bias"):
        return np.dtype(np.float32)
    floats = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), DTYPES["BF16"], FP8}
    return param_dtype if src_dtype in floats else src_dtype


def import_hf_checkpoint(hf_dir: str | Path, out_dir: str | Path, *, include_mtp: bool = False,
                         dtype: str = "float32", compute_dtype: str = "bfloat16",
                         use_indexer: Optional[bool] = None, index_n_heads: Optional[int] = None,
                         index_head_dim: Optional[int] = None, index_topk: Optional[int] = None,
                         seed: int = 0, overwrite: bool = False, mtp: bool = False) -> ImportReport:
    """Convert the HF checkpoint in ``hf_dir`` into a model directory ``out_dir``.

    ``dtype``: parameter dtype of the result ("float32" or "bfloat16"; the indexer's
    weights_proj and the router stay fp32, as in our model). ``use_indexer`` / ``index_*``
    override the indexer settings (V3 checkpoints get fresh indexers by default). ``seed``: for
    freshly initialized indexers. ``include_mtp``: also keep the MTP layer(s) (under ``mtp/``,
    HF names, not used by our model; the exporter writes them back). ``mtp``: make the MTP
    layer(s) part of the model instead (model.num_nextn_predict_layers from config.json; trained
    and exported under the released names; a V3 / V3.1 MTP layer gets a fresh indexer). Raises ConfigError /
    ConversionError with one line naming the problem; ``out_dir`` then does not exist.
    """
    hf_dir = run_path(hf_dir)
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    hf = read_hf_config(hf_dir)
    config, info = model_config_from_hf(
        hf, origin=str(hf_dir / "config.json"), param_dtype=dtype, compute_dtype=compute_dtype,
        use_indexer=use_indexer, index_n_heads=index_n_heads, index_head_dim=index_head_dim, index_topk=index_topk)
    if mtp:
        if not info.num_mtp_layers:
            raise ConfigError(f"{hf_dir / 'config.json'}: num_nextn_predict_layers is 0: the checkpoint has no "
                              f"MTP layer to import")
        config = dataclasses.replace(config, num_nextn_predict_layers=info.num_mtp_layers)
    report = ImportReport(source=str(hf_dir), out_dir=str(run_path(out_dir, absolute=True)), model_type=info.model_type,
                          config=config, notes=list(info.notes))
    ckpt = SafetensorsCheckpoint(hf_dir)
    targets = _plan(config, info, ckpt, seed, report)
    mtp_names = _check_leftovers(config, ckpt, targets, include_mtp, report)

    from dsa_train.checkpoint import model_io

    converter = Converter(ckpt, info.fp8_block_size, report)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        # Memory-mapped staging needs a local file system: beside the output, or a local temporary
        # directory when the output is remote.
        staging = Path(tempfile.mkdtemp(prefix="dsa-train-import-")) if is_uri(tmp) else tmp / ".staging"
        staging.mkdir(exist_ok=True)
        staged: dict[str, np.ndarray] = {}
        for i, t in enumerate(targets):
            where = t.sources[0].name if t.sources else t.key
            try:
                dst = _stage(staging / f"{i}.bin", t.shape, t.dtype)
                if t.init is not None:
                    dst[...] = t.init()
                elif not t.stacked:
                    converter.copy(t.sources[0], dst)
                else:  # stacked experts: one source slab per expert
                    for e, src in enumerate(t.sources):
                        where = src.name
                        converter.copy(src, dst[e])
                if isinstance(dst, np.memmap):
                    dst.flush()  # write back now: dirty pages never pile up
                del dst
                staged[t.key] = _reopen(staging / f"{i}.bin", t.shape, t.dtype)
            except ConversionError:
                raise
            except (OSError, ValueError, TypeError) as e:
                raise ConversionError(f"{where} ({ckpt.info(where).file.name if where in ckpt else t.key}): "
                                      f"{one_line(e)}") from e
        if converter.non_finite:
            names = converter.non_finite
            raise ConversionError(f"{len(names)} tensor(s) hold NaN or Inf: " + ", ".join(names[:5])
                                  + (f" (+{len(names) - 5} more)" if len(names) > 5 else "") + "; nothing written")
        model_io.save_model_state(tmp, model_io.nest(staged), config)
        if mtp_names:
            mtp_staged = {}
            for i, name in enumerate(mtp_names):
                src = ckpt.info(name)
                out_dtype = _mtp_dtype(src.dtype, name, PARAM_DTYPES[dtype])
                try:
                    dst = _stage(staging / f"mtp{i}.bin", src.shape, out_dtype)
                    converter.copy(Source(name), dst)
                    if isinstance(dst, np.memmap):
                        dst.flush()
                    del dst
                except (OSError, ValueError, TypeError) as e:
                    raise ConversionError(f"{name} ({src.file.name}): {one_line(e)}") from e
                mtp_staged[name.replace(".", "/")] = _reopen(staging / f"mtp{i}.bin", src.shape, out_dtype)
            model_io.save_tree(tmp / MTP_DIR, model_io.nest(mtp_staged))
            report.notes.append(f"kept {len(mtp_names)} MTP tensors under {MTP_DIR}/ (not used by the model)")
        shutil.rmtree(staging)
        assets = tmp / ASSETS_DIR
        assets.mkdir()
        (assets / SOURCE_CONFIG_FILE).write_text(json.dumps(hf, indent=2))
        for name in ASSET_FILES:
            if (hf_dir / name).is_file():
                copy_file(hf_dir / name, assets / name)
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2, default=str))
    return report
