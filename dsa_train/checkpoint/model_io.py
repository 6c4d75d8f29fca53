"""Our model checkpoint format: a *model directory* holding one model's complete state.

Layout::

    model_dir/model.yaml   the resolved ModelConfig (a bare model YAML, loadable as `model:`)
    model_dir/params/      Orbax PyTree checkpoint of the whole model state: every nnx.Param
                           (indexers included) and the MoE router biases (RouterBias)

The tree is the model's pure-dict state with string keys, so its paths are the HF names split at
the dots: ``params['model']['layers']['3']['self_attn']['q_a_proj']['weight']``. Routed experts
are stacked ([E, F, D] / [E, D, F]). Decoder layers are always stored per layer: a model with
``scan_layers`` is renamed on save and on load (:mod:`dsa_train.model.layer_layout`), so model
directories and the HF converter know one layout. `dsa-train convert import` writes model
directories; the training CheckpointManager reads them for ``checkpoint.init_from`` (:func:`is_model_dir`,
:func:`load_model_state`).

Writing never deep-copies host arrays and stores them uncompressed: leaves may be ``np.memmap``
views of scratch files (the importer's staging), and tensorstore then streams them to disk
without copying them into anonymous memory. (Orbax's default NumPy handler deep-copies every
host array before writing and compression buffers the encoded chunks: both would hold the whole
model in memory.) Restoring places each array directly with the requested dtype and sharding,
streaming through a bounded host staging area (:func:`bounded_restore`): Orbax's default lets
every array's read be in flight at once, which holds the whole model on the host a second time
while it is placed on the devices. A whole train state (resume) is read a bounded group of arrays
at a time (:func:`restore_in_groups`). A new stage may start from a source that lacks whole
lightning indexers or MTP layers: :func:`restore_or_initialize` generates exactly those
(:func:`initializable_group` states the rule) and refuses any other difference.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import inspect
import logging
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from dsa_train.config import ConfigError, ModelConfig, from_dict, to_dict
from dsa_train.model import layer_layout
from dsa_train.paths import run_path

CONFIG_FILE = "model.yaml"
PARAMS_DIR = "params"

# ModelConfig fields that change the shapes or the set of parameters.
SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank",
    "first_k_dense_replace", "n_routed_experts", "n_shared_experts", "moe_intermediate_size",
    "use_indexer", "index_n_heads", "index_head_dim",
)


class ModelDirError(ValueError):
    """A model directory that is missing, unreadable or does not match the requested model."""


def is_model_dir(path: str | Path) -> bool:
    path = run_path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def save_model_config(path: str | Path, config: ModelConfig) -> None:
    path = run_path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def load_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig saved in a model directory (validated; errors name the file and key)."""
    f = run_path(path) / CONFIG_FILE
    try:
        raw = yaml.safe_load(f.read_text())
    except FileNotFoundError:
        raise ModelDirError(f"{path} is not a model directory (no {CONFIG_FILE})") from None
    except (OSError, yaml.YAMLError) as e:
        raise ModelDirError(f"{f}: unreadable: {e}") from None
    # A dense-stage Config only for validation: the model section alone is what we want, and the
    # default 'warmup' stage would refuse a model saved without indexers.
    return from_dict({"model": raw, "train": {"stage": "dense"}}, origin=str(f)).model


# ----------------------------------------------------------------------------------------------
# Orbax tree I/O
# ----------------------------------------------------------------------------------------------

# Host bytes a restore may have read but not yet placed on the devices (raised to twice the
# largest array shard when that is larger): peak host memory of a restore is what it restores
# into (on a CPU host, the arrays themselves) plus this, whatever the model size.
RESTORE_STAGING_BYTES = 256 * 2**20
_OVER_BUDGET = re.compile(r"Requested more bytes than we reserved space for: (\d+)")
T = TypeVar("T")
log = logging.getLogger(__name__)


def _shard_bytes(x) -> int:
    """Bytes of one device's shard of the abstract array ``x``, counted at >= 4 bytes an element
    (a checkpoint may store a wider dtype than the one restored)."""
    shape = tuple(x.shape)
    sharding = getattr(x, "sharding", None)
    if sharding is not None and shape:
        shape = sharding.shard_shape(shape)
    return int(np.prod(shape, dtype=np.int64)) * max(np.dtype(x.dtype).itemsize, 4)


def bounded_restore(restore: Callable[[dict], T], abstract: Any) -> T:
    """``restore(handler_options)`` with Orbax's in-flight read bytes bounded: ``handler_options``
    are the keyword arguments for a Pytree/StandardCheckpointHandler. A shard whose chunked read
    exceeds the budget (Orbax refuses it) is retried once with a budget that fits it."""
    _map_large_host_buffers()
    leaves = [x for x in jax.tree.leaves(abstract) if hasattr(x, "shape")]
    budget = max([RESTORE_STAGING_BYTES] + [2 * _shard_bytes(x) + 1 for x in leaves])
    for _ in range(3):
        try:
            restored = restore(_staging_options(budget))
            release_freed_host_memory()
            return restored
        except ValueError as e:
            m = _OVER_BUDGET.search(str(e))
            if not m:
                raise
            budget = 2 * int(m[1]) + 1
    return restore({})


def _local_bytes(x) -> int:
    """Bytes of the abstract array ``x`` that one process reads (its devices' shards), the same
    figure on every process: they must all cut the restore into the same groups."""
    sharding = getattr(x, "sharding", None)
    devices = len(getattr(sharding, "device_set", ())) or 1
    return _shard_bytes(x) * max(1, devices // jax.process_count())


def restore_in_groups(path: str | Path, abstract: Any) -> Any:
    """Restore the PyTree checkpoint at ``path`` into ``abstract`` (a pytree of ShapeDtypeStruct
    with shardings, any containers, the saved structure) a group of leaves at a time, each group
    at most RESTORE_STAGING_BYTES of this process's shards (or one leaf), the others skipped
    (Orbax's PLACEHOLDER): a group is placed on the devices and the freed read buffers handed back
    to the OS (:func:`release_freed_host_memory`) before the next is read. One Orbax call for the
    whole tree keeps every freed read buffer in glibc's arenas until it returns: a second copy of
    what was restored (the resume of a run measured ~1.9x its state so)."""
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    groups: list[list[int]] = [[]]
    size = 0
    for i, x in enumerate(leaves):
        nbytes = _local_bytes(x)
        if groups[-1] and size + nbytes > RESTORE_STAGING_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    out = list(leaves)
    path = run_path(path, absolute=True)
    for group in groups:
        chosen = set(group)
        part = [x if i in chosen else ocp.PLACEHOLDER for i, x in enumerate(leaves)]
        item = jax.tree_util.tree_unflatten(treedef, part)
        args = jax.tree_util.tree_unflatten(treedef, [
            ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=tuple(x.shape), dtype=x.dtype)
            if i in chosen else ocp.PLACEHOLDER for i, x in enumerate(leaves)])

        def read(options, item=item, args=args):
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**options)) as checkpointer:
                return checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=args))

        restored = jax.tree_util.tree_leaves(bounded_restore(read, [leaves[i] for i in group]),
                                             is_leaf=lambda v: v is ocp.PLACEHOLDER)
        for i in group:
            out[i] = restored[i]
        del restored
        release_freed_host_memory()
    return jax.tree_util.tree_unflatten(treedef, out)


def release_freed_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; a no-op elsewhere). The
    host buffers a restore reads through are freed in many threads' arenas, and glibc keeps those
    pages for allocations of the same arena: without this the next group's arrays of other sizes
    land in new pages and the freed ones still count, as a second copy of what was restored."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _map_large_host_buffers() -> None:
    """Large host buffers (>= 1 MiB) get their own mappings, returned to the OS when freed. glibc
    starts so but raises the threshold after each such free (up to 32 MiB), after which the freed
    restore buffers stay in the heap as a second copy of the model."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; also turns the dynamic threshold off


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    return _LIBC or None


_LIBC = None


def _staging_options(budget: int) -> dict:
    if "restore_concurrent_gb" not in inspect.signature(ocp.PyTreeCheckpointHandler).parameters:
        return {}  # an Orbax without the option: its default (everything in flight)
    return {"restore_concurrent_gb": budget / 1e9}


def _registry() -> ocp.type_handlers.TypeHandlerRegistry:
    return ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
        (int, ocp.type_handlers.get_type_handler(int)),
        (float, ocp.type_handlers.get_type_handler(float)),
    )


def _pure(tree: Any) -> Any:
    """nnx.State -> nested dicts; every key a string (layer indices too), leaves unchanged."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    if isinstance(tree, Mapping):
        return {str(k): _pure(v) for k, v in tree.items()}
    return tree


def save_tree(path: str | Path, tree: Any) -> None:
    """Write a nested dict of arrays (numpy, memmap or jax) as an Orbax PyTree checkpoint at
    ``path`` (which must not exist yet). Bounded memory for memmap leaves (module docstring)."""
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_registry(), use_compression=False)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(run_path(path, absolute=True), args=ocp.args.PyTreeSave(_pure(tree)))


def tree_metadata(path: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """'a/b/c' -> (shape, dtype) of every array saved at ``path`` (reads no array data)."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        try:
            meta = checkpointer.metadata(run_path(path, absolute=True))
        except (FileNotFoundError, ValueError) as e:
            raise ModelDirError(f"{path}: not an Orbax checkpoint ({e})") from None
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    out = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            out[prefix] = (tuple(node.shape), np.dtype(node.dtype))

    walk(tree, "")
    return out


def read_arrays(path: str | Path, keys: list[str]) -> dict[str, np.ndarray]:
    """Only the arrays ``keys`` ('a/b/c' paths) of the checkpoint at ``path``, as numpy arrays
    (the exporter reads a model one tensor at a time with this)."""
    item: dict = {}
    for key in keys:
        node = item
        parts = key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = ocp.type_handlers.RestoreArgs(restore_type=np.ndarray)
    _map_large_host_buffers()  # freed groups go back to the OS, not into a growing heap
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(run_path(path, absolute=True), args=ocp.args.PyTreeRestore(
            item=item, restore_args=item, partial_restore=True))
    out = {}
    for key in keys:
        node = restored
        for part in key.split("/"):
            node = node[part]
        out[key] = np.asarray(node)
    return out


# ----------------------------------------------------------------------------------------------
# Model directories
# ----------------------------------------------------------------------------------------------


def save_model_state(path: str | Path, state_tree: Any, config: Optional[ModelConfig] = None) -> None:
    """Write ``path/params`` (and ``path/model.yaml`` when ``config`` is given).

    ``state_tree``: ``nnx.state(model)`` or its pure-dict form (int or str keys), leaves numpy
    arrays, memmaps or jax arrays (sharded ones are written by every host, as Orbax does).
    """
    path = run_path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = _flat_abstract(_pure(state_tree))
    # Stacked layers (scan_layers) are written per layer, one slice per layer: one layout on disk.
    flat = layer_layout.to_per_layer(flat, layer_layout.stacks_of({k: np.shape(v) for k, v in flat.items()}),
                                     take=lambda value, j: value[j])
    save_tree(path / PARAMS_DIR, nest(flat))
    if config is not None:
        save_model_config(path, config)


def save_model(path: str | Path, model: nnx.Module) -> None:
    """A live CausalLM -> model directory."""
    save_model_state(path, nnx.state(model), model.config)


def _flat_abstract(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flat_abstract(v, key))
        else:
            out[key] = v
    return out


def nest(flat: Mapping[str, Any]) -> dict:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}: the tree Orbax saves and restores."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        parts = key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def structure_mismatch(saved: Mapping[str, tuple], wanted: Mapping[str, tuple]) -> list[str]:
    """What differs between the saved and the wanted {path: shape}: missing, extra, reshaped paths
    (the first few of each, for a one-line error); or, when the decoder layers are stored in the
    other layout, only that (every layer path differs, and the cause is model.scan_layers)."""
    saved_layout, wanted_layout = layer_layout.layout_of(saved), layer_layout.layout_of(wanted)
    if saved_layout and wanted_layout and saved_layout != wanted_layout:
        flag = {layer_layout.STACKED: "true", layer_layout.PER_LAYER_LAYOUT: "false"}
        return [f"the checkpoint holds the decoder layers {saved_layout} (written with model.scan_layers="
                f"{flag[saved_layout]}) and the state being restored holds them {wanted_layout} "
                f"(model.scan_layers={flag[wanted_layout]}): set model.scan_layers={flag[saved_layout]} to "
                "resume it, or start a new run_dir with checkpoint.init_from pointing at it (that converts)"]
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    shapes = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    problems = []
    if missing:
        problems.append(f"not in the checkpoint: {_first(missing)}")
    if extra:
        problems.append(f"only in the checkpoint: {_first(extra)}")
    if shapes:
        problems.append("different shapes: " + ", ".join(f"{k} {saved[k]} -> {wanted[k]}" for k in shapes[:3])
                        + (f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else ""))
    return problems


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


# Fields that only size the lightning indexer: a source without indexers (use_indexer false) may
# be initialized from into a model with them (the indexers are then generated).
INDEXER_FIELDS = ("use_indexer", "index_n_heads", "index_head_dim")


def shape_fields_to_compare(saved: Mapping, fields: tuple[str, ...], new_indexers_allowed: bool) -> tuple[str, ...]:
    """``fields`` less the indexer's when ``saved`` (a model config) has no indexers and new ones
    may be initialized."""
    if new_indexers_allowed and saved.get("use_indexer") is False:
        return tuple(f for f in fields if f not in INDEXER_FIELDS)
    return fields


def check_config_compatible(path: str | Path, model_config_dict: Mapping, new_indexers_allowed: bool = False) -> None:
    saved = to_dict(load_model_config(path))
    fields = shape_fields_to_compare(saved, SHAPE_FIELDS, new_indexers_allowed)
    diffs = [f"{k} {saved.get(k)!r} -> {model_config_dict.get(k)!r}" for k in fields
             if k in model_config_dict and saved.get(k) != model_config_dict.get(k)]
    if diffs:
        raise ConfigError(f"{path}: the model directory holds a different model ({'; '.join(diffs)})")


def load_model_state(path: str | Path, abstract_model_state: Any, *,
                     model_config_dict: Optional[Mapping] = None,
                     init_missing: Optional[Callable[[dict], dict]] = None) -> Any:
    """Restore a model directory into ``abstract_model_state``: the pure-dict tree (int or str
    keys) of ``jax.ShapeDtypeStruct``; each array gets that dtype and, where given, sharding
    (default: the first device). Returns the same structure with jax arrays.

    Every path must be in the checkpoint with the same shape (else one line naming the first
    differing paths); ``model_config_dict`` additionally names differing config fields. With
    ``init_missing`` the indexers and MTP depths the directory lacks are generated instead
    (:func:`restore_or_initialize`).
    """
    path = run_path(path)
    if not is_model_dir(path):
        raise ModelDirError(f"{path} is not a model directory (needs {CONFIG_FILE} and {PARAMS_DIR}/)")
    if model_config_dict is not None:
        check_config_compatible(path, model_config_dict, new_indexers_allowed=init_missing is not None)
    abstract = _pure(abstract_model_state) if isinstance(abstract_model_state, nnx.State) else abstract_model_state
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None
                            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default), abstract)
    saved = {k: shape for k, (shape, _) in tree_metadata(path / PARAMS_DIR).items()}

    def check(target):
        wanted = {k: tuple(v.shape) for k, v in _flat_abstract(target).items()}
        problems = structure_mismatch(saved, wanted)
        if problems:
            raise ModelDirError(f"{path} does not match the model being restored; " + "; ".join(problems))

    def restore(target):
        args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=tuple(x.shape),
                                                           dtype=x.dtype), target)

        def read(options):
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**options)) as checkpointer:
                return checkpointer.restore(run_path(path / PARAMS_DIR, absolute=True), args=ocp.args.PyTreeRestore(
                    item=target, restore_args=args, partial_restore=True))

        return bounded_restore(read, target)

    return restore_or_initialize(abstract, saved, restore, check, init_missing, ModelDirError, str(path))


def restore_in_saved_layout(abstract: Any, saved: Mapping[str, tuple], restore: Callable[[dict], dict],
                            check: Callable[[dict], None] = lambda target: None) -> Any:
    """``restore(target)`` where ``target`` is ``abstract`` (a nested dict of ShapeDtypeStruct with
    shardings) renamed into the decoder-layer layout of the checkpoint (``saved``: its
    {'a/b/c': shape}); the restored arrays are renamed back into ``abstract``'s structure and
    placed with its shardings. ``check(target)`` sees the whole renamed target first (``restore``
    may then get parts of it). Same layout (or no layers): ``restore(abstract)``. Otherwise the
    layers are read one stacked parameter at a time (all its layers), converted and placed before
    the next is read, so the model is held twice only one parameter at a time.
    """
    flat = {path_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    saved_layout, wanted_layout = layer_layout.layout_of(saved), layer_layout.layout_of(flat)
    if not saved_layout or not wanted_layout or saved_layout == wanted_layout:
        check(abstract)
        return restore(abstract)
    stacks = layer_layout.stacks_of({k: tuple(x.shape) for k, x in flat.items()})
    if wanted_layout == layer_layout.STACKED:
        to_saved = lambda part: layer_layout.to_per_layer(part, stacks, take=_abstract_layer)  # noqa: E731
        to_wanted = lambda part: layer_layout.to_stacked(part, stacks, stack=lambda xs: jax.numpy.stack(xs))  # noqa: E731
    else:
        to_saved = lambda part: layer_layout.to_stacked(part, stacks, stack=_abstract_stack)  # noqa: E731
        to_wanted = lambda part: layer_layout.to_per_layer(part, stacks, take=lambda x, j: x[j])  # noqa: E731
    check(nest(to_saved(dict(flat))))
    groups: dict[str, list[str]] = {}  # one per stacked parameter (its layers), one for the rest
    for key in flat:
        groups.setdefault(_stacked_name(key, stacks), []).append(key)
    out = {}
    for keys in groups.values():
        part = _flat_abstract(restore(nest(to_saved({k: flat[k] for k in keys}))))
        out.update({k: jax.device_put(v, flat[k].sharding) for k, v in to_wanted(part).items()})
        del part
        release_freed_host_memory()
    leaves = [out.pop(k) for k in flat]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)


# ----------------------------------------------------------------------------------------------
# Parameters a checkpoint may lack (checkpoint.init_from)
# ----------------------------------------------------------------------------------------------

MTP_PREFIX = "mtp"


def initializable_group(key: str) -> Optional[str]:
    """The group a parameter that a checkpoint lacks is initialized with, or None when it must be
    in the checkpoint. Only parameters that a source model can legitimately not have may be
    missing: a lightning indexer (a V3 / V3.1 or dense-stage checkpoint has none; the group is one
    layer's indexer, ``.../self_attn/indexer``) and a multi-token-prediction depth (a checkpoint
    written without MTP; the group is ``mtp/<d>``, its indexer alone ``mtp/<d>/self_attn/indexer``).
    Anything else (an attention or expert weight, a norm, the embedding) missing means the wrong
    or a damaged checkpoint: training it from random would look like a run and be none."""
    parts = key.split("/")
    if "indexer" in parts:  # checked first: an MTP depth's indexer is a group of its own
        return "/".join(parts[:parts.index("indexer") + 1])
    if len(parts) > 2 and parts[0] == MTP_PREFIX and parts[1].isdigit():
        return "/".join(parts[:2])
    return None


def _saved_in_wanted_layout(saved: Mapping[str, tuple], wanted: Mapping[str, tuple]) -> dict[str, tuple]:
    """The checkpoint's {key: shape} under the decoder-layer names of ``wanted``. A per-layer
    parameter present in some layers only is left per layer (it then matches no wanted key)."""
    saved_layout, wanted_layout = layer_layout.layout_of(saved), layer_layout.layout_of(wanted)
    if not saved_layout or not wanted_layout or saved_layout == wanted_layout:
        return dict(saved)
    if wanted_layout == layer_layout.PER_LAYER_LAYOUT:
        return layer_layout.to_per_layer(dict(saved), layer_layout.stacks_of(saved), take=lambda s, j: s[1:])
    stacks = layer_layout.stacks_of(wanted)
    held = {layer for layers in stacks.values() for layer in layers}
    out, by_name = {}, {}
    for key, shape in saved.items():
        layer = layer_layout._layer_of(key)
        if layer is None or layer not in held:  # outside the layers, or a layer the model lacks
            out[key] = shape
        else:
            by_name.setdefault(_stacked_name(key, stacks), {})[key] = shape
    for part in by_name.values():
        try:
            out.update(layer_layout.to_stacked(dict(part), stacks, stack=lambda xs: (len(xs), *xs[0])))
        except KeyError:
            out.update(part)  # partial or out-of-range layers: reported as a mismatch
    return out


def missing_groups(saved: Mapping[str, tuple], wanted: Mapping[str, tuple]) -> tuple[dict[str, list[str]], list[str]]:
    """({group: its wanted keys} that the checkpoint lacks entirely and that may be initialized,
    problems): a missing key outside every initializable group, or a group the checkpoint holds
    in part (a typo'd or damaged checkpoint, not a model without that part), is a problem."""
    present = _saved_in_wanted_layout(saved, wanted)
    groups: dict[str, list[str]] = {}
    refused = []
    for key in wanted:
        if key in present:
            continue
        group = initializable_group(key)
        if group is None:
            refused.append(key)
        else:
            groups.setdefault(group, []).append(key)
    problems = []
    if refused:
        problems.append(f"not in the checkpoint: {_first(refused)} (only lightning indexers and MTP layers may be "
                        "missing; they are initialized)")
    partial = [g for g in groups if any(k.startswith(g + "/") for k in present)]
    if partial:
        problems.append("partly in the checkpoint: "
                        + ", ".join(f"{g} lacks {_first(groups[g], 2)}" for g in partial[:3]))
    return groups, problems


def describe_groups(groups: Mapping[str, list[str]]) -> str:
    """'5 arrays in 3 groups: model/layers/0/self_attn/indexer, ..., mtp/0'."""
    names = sorted(groups)
    arrays = sum(len(keys) for keys in groups.values())
    return f"{arrays} arrays in {len(names)} groups: {_first(names, 4)}"


def restore_or_initialize(abstract: Any, saved: Mapping[str, tuple], restore: Callable[[dict], dict],
                          check: Callable[[dict], None], init_missing: Optional[Callable[[dict], dict]],
                          fail: Callable[[str], Exception], where: str) -> Any:
    """:func:`restore_in_saved_layout` of what the checkpoint holds; with ``init_missing``, the
    initializable groups it lacks entirely (:func:`initializable_group`) are generated instead by
    ``init_missing({key: ShapeDtypeStruct})`` -> ``{key: array}`` (placed with their shardings)
    and named in one log line. Without ``init_missing`` (eval, export) every parameter must be in
    the checkpoint. Anything else that differs raises ``fail(line)``."""
    flat = {path_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    groups, problems = {}, []
    if init_missing is not None:
        groups, problems = missing_groups(saved, {k: tuple(x.shape) for k, x in flat.items()})
    if problems:
        raise fail(f"{where} does not match the model being restored; " + "; ".join(problems))
    if not groups:
        return restore_in_saved_layout(abstract, saved, restore, check)
    missing = {k for keys in groups.values() for k in keys}
    restored = restore_in_saved_layout(nest({k: x for k, x in flat.items() if k not in missing}), saved, restore, check)
    values = _flat_abstract(restored)
    del restored
    values.update(init_missing({k: flat[k] for k in flat if k in missing}))
    log.warning("%s lacks %s: initialized with the model's initializers", where, describe_groups(groups))
    leaves = [values.pop(k) for k in flat]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)


def _stacked_name(key: str, stacks: Mapping[str, tuple[int, ...]]) -> str:
    """The stacked parameter a per-layer or stacked key belongs to ('' outside the layers)."""
    parts = key.split("/")
    if len(parts) > 2 and parts[0] == layer_layout.PREFIX and parts[1] in layer_layout.STACKS:
        return key
    if len(parts) > 3 and parts[0] == layer_layout.PREFIX and parts[1] == layer_layout.PER_LAYER \
            and parts[2].isdigit():
        name = next(n for n, held in stacks.items() if int(parts[2]) in held)
        return "/".join([layer_layout.PREFIX, name, *parts[3:]])
    return ""


def path_key(path) -> str:
    """A jax tree path as the 'a/b/0/c' key of flat states and checkpoint metadata."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _abstract_layer(x, j: int) -> jax.ShapeDtypeStruct:
    """One layer of a stacked abstract array: the leading `layers` axis (never sharded by the
    default rules) leaves shape and spec."""
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype, sharding=sharding)


def _abstract_stack(xs: list) -> jax.ShapeDtypeStruct:
    sharding = xs[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype, sharding=sharding)


def load_model_params(path: str | Path, config: Optional[ModelConfig] = None) -> nnx.Module:
    """A CausalLM with the model directory's weights, never materializing a random init.

    ``config`` (default: the directory's model.yaml) may differ in anything that keeps the
    parameter shapes: compute_dtype, index_topk, kernels, param_dtype (arrays are cast).
    """
    from dsa_train.model import create_model

    path = run_path(path)
    if config is None:
        config = load_model_config(path)
    else:
        check_config_compatible(path, to_dict(config))
    abstract_model = nnx.eval_shape(lambda: create_model(config))
    graphdef, state = nnx.split(abstract_model)
    restored = load_model_state(path, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
