"""Export a model directory, a training run (or one of its steps) or a live CausalLM as a Hugging
Face DeepSeek-V3.2 checkpoint.

    export_hf_checkpoint(model_dir_or_run_dir_or_model, out_dir) -> ExportReport

Writes ``config.json`` (loads as DeepseekV32ForCausalLM; a model without indexers as
DeepseekV3ForCausalLM), ``model.safetensors.index.json`` and shards of at most
``max_shard_size`` bytes (a single larger tensor gets a shard of its own). Tensors are bf16 by
default; the MoE router biases and the indexer's ``weights_proj`` stay fp32, as our model keeps
them. Routed experts are written per expert (``mlp.experts.{e}.gate_proj.weight``), the layout
of DeepSeek's releases, which transformers' loader fuses itself. MTP tensors kept by the importer
(``mtp/``) and the source's tokenizer files (``hf_assets/``) are written back.

Memory: from a model directory, arrays are read with Orbax in groups of at most ``read_budget``
bytes (a single larger array alone), and every tensor is cast and written in row blocks, so the
whole model is never in memory. Output goes to a temporary directory renamed at the end.
"""

from __future__ import annotations

import json
import re
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import numpy as np

from dsa_train.config import ConfigError, ModelConfig
from dsa_train.convert.common import MTP_SHARED_COPIES, ConversionError, atomic_output_dir, hf_name
from dsa_train.convert.hf_config import hf_config_from_model_config
from dsa_train.convert.hf_import import ASSET_FILES, ASSETS_DIR, MTP_DIR, SOURCE_CONFIG_FILE
from dsa_train.convert.safetensors_io import DTYPES, INDEX_FILE, PlannedTensor, write_safetensors
from dsa_train.paths import copy_file, run_path

EXPORT_DTYPES = {"bfloat16": DTYPES["BF16"], "float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
FP32_TENSORS = ("e_score_correction_bias", "indexer.weights_proj.weight")
PASSTHROUGH_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
CHUNK_ELEMENTS = 16 * 2**20


@dataclass
class ExportReport:
    out_dir: str
    model_type: str
    tensors: int
    shards: int
    total_bytes: int

    def summary(self) -> str:
        return (f"exported {self.model_type} -> {self.out_dir}: {self.tensors} tensors in {self.shards} shard(s), "
                f"{self.total_bytes / 2**30:.2f} GiB")


def parse_size(size: Union[int, str]) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ConfigError(f"max_shard_size: cannot parse {size!r} (e.g. 5GB, 500MB)")
    base = 1024 if m[3] else 1000
    return int(float(m[1]) * base ** " KMGT".index(m[2].upper() or " "))


# ----------------------------------------------------------------------------------------------
# Sources of arrays: a model directory (read in bounded groups) or a live model
# ----------------------------------------------------------------------------------------------


class _DirArrays:
    """Arrays of an Orbax tree, read on demand in groups of consecutive keys (in `order`)."""

    def __init__(self, path: Path, order: list[str], sizes: dict[str, int], budget: int, prefix: str = ""):
        self.path, self.order, self.sizes, self.budget = path, order, sizes, budget
        self.prefix = prefix  # where the keys sit in the tree (a run's train state: under MODEL_KEY/)
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, key: str) -> np.ndarray:
        if key not in self.cache:
            from dsa_train.checkpoint import model_io

            start = self.order.index(key)
            group, total = [], 0
            for k in self.order[start:]:
                if group and total + self.sizes[k] > self.budget:
                    break
                group.append(k)
                total += self.sizes[k]
            self.cache = {}  # drop the previous group first
            read = model_io.read_arrays(self.path, [self.prefix + k for k in group])
            self.cache = {k: read[self.prefix + k] for k in group}
        return self.cache[key]


def _run_arrays(source: Path, budget: int) -> tuple[ModelConfig, dict[str, tuple], Callable[[str], np.ndarray]]:
    """A training run (its latest committed step) or one of its step directories: the model part of
    the train state, read in bounded groups like a model directory."""
    from dsa_train.checkpoint import manager
    from dsa_train.config import from_dict
    from dsa_train.model.layer_layout import PER_LAYER_LAYOUT, layout_of

    if not source.exists():
        raise ConversionError(f"{source} does not exist")
    step_dir = manager._find_run_step(run_path(source, absolute=True))
    if step_dir is None:
        raise ConversionError(f"{source} is not a model directory (needs model.yaml and params/) or a training "
                              "run with a committed checkpoint")
    run_config = manager._read_json_item(step_dir / manager.CONFIG)
    if not run_config or not isinstance(run_config.get("model"), dict):
        raise ConversionError(f"{step_dir}: no saved config with a 'model' section")
    config = from_dict({"model": run_config["model"], "train": {"stage": "dense"}}, origin=str(step_dir)).model
    prefix = manager.MODEL_KEY + "/"
    import orbax.checkpoint as ocp

    with manager.quiet_orbax(), ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(step_dir / manager.TRAIN_STATE)
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
    meta = {}

    def walk(node, key):  # the model part only (the optimizer state also holds lists)
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{key}/{k}" if key else str(k))
        else:
            meta[key] = (tuple(node.shape), np.dtype(node.dtype))

    walk(tree[manager.MODEL_KEY], "")
    if layout_of(meta) not in (None, PER_LAYER_LAYOUT):
        raise ConversionError(f"{step_dir}: a run trained with model.scan_layers=true; start a stage from it with "
                              "model.scan_layers=false (checkpoint.init_from converts the layout) and export that")
    order = list(meta)
    get = _DirArrays(step_dir / manager.TRAIN_STATE, order,
                     {k: int(np.prod(s)) * d.itemsize for k, (s, d) in meta.items()}, budget, prefix)
    return config, meta, get


def _model_arrays(model) -> tuple[ModelConfig, dict[str, tuple], Callable[[str], np.ndarray]]:
    from flax import nnx

    from dsa_train.model.layer_layout import layer_stacks, to_per_layer

    # (array, layer or None): stacked layers (model.scan_layers) are sliced one layer at a time,
    # only when that layer's tensor is written.
    flat = {"/".join(str(p) for p in path): (var.get_value(), None)
            for path, var in nnx.to_flat_state(nnx.state(model))}
    flat = to_per_layer(flat, layer_stacks(model.config), take=lambda entry, j: (entry[0], j))
    meta = {k: (tuple(a.shape[1:] if j is not None else a.shape), np.dtype(a.dtype)) for k, (a, j) in flat.items()}

    def get(key: str) -> np.ndarray:
        array, layer = flat[key]
        return np.asarray(array if layer is None else array[layer])

    return model.config, meta, get


# ----------------------------------------------------------------------------------------------
# Planning: our variables -> HF tensors
# ----------------------------------------------------------------------------------------------


def _rows(get: Callable[[], np.ndarray], dtype: np.dtype) -> Callable[[], Iterable[np.ndarray]]:
    def chunks():
        arr = get()
        if arr.ndim < 2:
            yield np.asarray(arr).astype(dtype)
            return
        step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(arr.shape[1:]))))
        for r in range(0, arr.shape[0], step):
            yield np.asarray(arr[r:r + step]).astype(dtype)

    return chunks


def _hf_tensors(key: str, shape: tuple, get: Callable[[str], np.ndarray], dtype: np.dtype,
                num_hidden_layers: int = 0) -> list[PlannedTensor]:
    """The HF tensor(s) of one of our variables (MTP depth k becomes layer num_hidden_layers + k)."""
    name = hf_name(key, num_hidden_layers)
    m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)", name)
    if m:
        return [PlannedTensor(f"model.layers.{m[1]}.mlp.experts.{e}.{m[2]}.weight", dtype, tuple(shape[1:]),
                              _rows(lambda e=e: get(key)[e], dtype)) for e in range(shape[0])]
    out_dtype = np.dtype(np.float32) if name.endswith(FP32_TENSORS) else dtype
    return [PlannedTensor(name, out_dtype, tuple(shape), _rows(lambda: get(key), out_dtype))]


def _shards(tensors: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def export_hf_checkpoint(source: Any, out_dir: str | Path, *, dtype: str = "bfloat16",
                         max_shard_size: Union[int, str] = "5GB", include_mtp: bool = True,
                         read_budget: Union[int, str] = "2GB", overwrite: bool = False) -> ExportReport:
    """Write ``source`` (a model directory, a run directory (its latest committed step), a step
    directory ``<run>/checkpoints/<step>`` or a live CausalLM) as a HF checkpoint ``out_dir``.

    ``dtype``: of the weight tensors ("bfloat16", "float32" or "float16"). ``include_mtp``: write
    back the MTP layer kept by the importer, if any. Raises ConfigError / ConversionError (one
    line); ``out_dir`` is then left untouched.
    """
    from dsa_train.checkpoint import model_io

    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    out_dtype = EXPORT_DTYPES[dtype]
    max_bytes = parse_size(max_shard_size)
    mtp_meta: dict[str, tuple] = {}
    assets: Optional[Path] = None
    if isinstance(source, (str, os.PathLike)) and not model_io.is_model_dir(source):
        config, meta, get = _run_arrays(run_path(source), parse_size(read_budget))
    elif isinstance(source, (str, os.PathLike)):
        source = run_path(source)
        config = model_io.load_model_config(source)
        meta = model_io.tree_metadata(source / model_io.PARAMS_DIR)
        order = list(meta)
        get = _DirArrays(source / model_io.PARAMS_DIR, order,
                         {k: int(np.prod(s)) * d.itemsize for k, (s, d) in meta.items()}, parse_size(read_budget))
        if include_mtp and (source / MTP_DIR).is_dir():
            mtp_meta = model_io.tree_metadata(source / MTP_DIR)
            get_mtp = _DirArrays(source / MTP_DIR, list(mtp_meta),
                                 {k: int(np.prod(s)) * d.itemsize for k, (s, d) in mtp_meta.items()},
                                 parse_size(read_budget))
        assets = source / ASSETS_DIR if (source / ASSETS_DIR).is_dir() else None
    else:
        config, meta, get = _model_arrays(source)

    extra = {}
    if assets is not None and (assets / SOURCE_CONFIG_FILE).is_file():
        src_config = json.loads((assets / SOURCE_CONFIG_FILE).read_text())
        extra = {k: src_config[k] for k in PASSTHROUGH_KEYS if k in src_config}
    mtp_layers = sorted({int(k.split("/")[2]) for k in mtp_meta})
    if mtp_layers or config.num_nextn_predict_layers:
        extra["num_nextn_predict_layers"] = len(mtp_layers) or config.num_nextn_predict_layers
    hf_config = hf_config_from_model_config(config, dtype=dtype, extra=extra)

    tensors: list[PlannedTensor] = []
    for key, (shape, _) in meta.items():
        tensors += _hf_tensors(key, shape, get, out_dtype, config.num_hidden_layers)
    for depth in range(config.num_nextn_predict_layers):
        # The released layout: every MTP layer carries its own copy of the shared embedding and head.
        layer = config.num_hidden_layers + depth
        for copy, main in MTP_SHARED_COPIES.items():
            key = main.removesuffix(".weight").replace(".", "/") + "/weight"
            tensors.append(PlannedTensor(f"model.layers.{layer}.{copy}", out_dtype, tuple(meta[key][0]),
                                         _rows(lambda key=key: get(key), out_dtype)))
    for key, (shape, src_dtype) in mtp_meta.items():
        name = key.replace("/", ".")
        t_dtype = src_dtype if name.endswith(FP32_TENSORS) or src_dtype.kind in "iub" else out_dtype
        tensors.append(PlannedTensor(name, t_dtype, tuple(shape), _rows(lambda key=key: get_mtp(key), t_dtype)))
    shards = _shards(tensors, max_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        weight_map = {}
        for shard, file in zip(shards, names):
            write_safetensors(tmp / file, shard, {"format": "pt"})
            weight_map.update({t.name: file for t in shard})
        total = sum(t.nbytes for t in tensors)
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        if assets is not None:
            for name in ASSET_FILES:
                if (assets / name).is_file():
                    copy_file(assets / name, tmp / name)
    return ExportReport(out_dir=str(run_path(out_dir, absolute=True)), model_type=hf_config["model_type"],
                        tensors=len(tensors), shards=len(shards), total_bytes=total)
