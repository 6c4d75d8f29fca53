"""Training checkpoints: save, keep, restore (onto any mesh) and hand a model to the next stage.

Layout of a run directory::

    run_dir/checkpoints/<step>/train_state/   the trainer's pytree of arrays (Orbax, sharded writes)
    run_dir/checkpoints/<step>/data_state/    every process's data iterator state (JSON)
    run_dir/checkpoints/<step>/config/        the resolved config of the run (JSON)

Orbax writes each step into a temporary directory and renames it into place only once every item
is complete, so a save that was interrupted (preemption, SIGKILL, full disk) is never listed as a
step: :meth:`RunCheckpointer.latest_step` only sees committed checkpoints, and the next
:class:`RunCheckpointer` removes the leftovers. A step directory that is listed but unusable (no
commit marker, or files that cannot be read back) is moved to ``run_dir/damaged_checkpoints/``
by the trainer (:func:`set_aside_uncommitted`, :meth:`RunCheckpointer.restore_latest_usable`),
which resumes from the newest usable step before it and writes the moved step again.

The train state is opaque to this module: any pytree of ``jax.Array`` leaves (dicts, lists,
tuples, named tuples; ``nnx.State`` is converted with :func:`to_pure_tree`). The one convention is
for the stage handoff: the complete model state (every parameter incl. the indexers, and the MoE
router biases) lives under ``train_state[MODEL_KEY]``, so :func:`load_model_for_init` can take the
model and leave optimizer state, step and RNG behind.

Where a stage starts from (``Config.checkpoint`` + ``train.run_dir``), in order of precedence:

1. ``run_dir`` already holds a committed checkpoint: resume it exactly (train state, data iterator
   position, step + 1). ``checkpoint.init_from`` is ignored — this is "resume my own run", e.g.
   after a preemption, and it must not be reset to the initial weights.
2. otherwise ``checkpoint.init_from`` is set: initialize the model from it (another run directory:
   its latest checkpoint, or ``<run>/checkpoints/<step>`` for a specific one; or a model directory
   written by ``dsa-train convert``), with fresh optimizer state, step 0 and a fresh data stream.
3. otherwise: random initialization.

See :func:`resolve_start`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsa_train.checkpoint import model_io
from dsa_train.config import CheckpointConfig, ConfigError
from dsa_train.paths import move, run_path

CHECKPOINTS_DIR = "checkpoints"
# Where unusable step directories (uncommitted, damaged) are moved: out of Orbax's sight, so the
# step can be written again, and kept for the operator rather than deleted.
SET_ASIDE_DIR = "damaged_checkpoints"
TRAIN_STATE = "train_state"
DATA_STATE = "data_state"
CONFIG = "config"
COMMIT_MARKER = "commit_success.txt"
# The subtree of the train state that holds the whole model (what a new stage inherits).
MODEL_KEY = "model"

# Model fields that change the shape (or the set) of parameters, plus their dtype: resuming with
# a different value cannot restore the saved state exactly. Everything else (learning rates,
# steps, loss weights, mesh, top-k, kernels, ...) may change between a run and its resumption.
# A new stage (init_from) may change param_dtype: arrays are cast.
SHAPE_FIELDS = model_io.SHAPE_FIELDS + ("param_dtype",)
# Train fields that change the structure of the train state (which parameters have optimizer
# state): a different stage is a new run initialized from this one, not a resumption.
STRUCTURE_TRAIN_FIELDS = ("stage",)

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A user-facing checkpoint problem (missing, incompatible, unreadable): one clear line."""


class DamagedCheckpointError(CheckpointError):
    """A committed checkpoint whose files are incomplete or unreadable (not merely incompatible)."""


# ----------------------------------------------------------------------------------------------
# Pytree helpers
# ----------------------------------------------------------------------------------------------


def to_pure_tree(tree: Any) -> Any:
    """Replace every ``nnx.State`` in ``tree`` (at any depth, e.g. inside optax states) by its
    plain nested-dict form: Orbax stores plain containers. :func:`from_pure_tree` undoes it."""
    from flax import nnx

    def convert(x):
        return nnx.to_pure_dict(x) if isinstance(x, nnx.State) else x

    return jax.tree.map(convert, tree, is_leaf=lambda x: isinstance(x, nnx.State))


def fill_states(pure: Mapping, *templates: Any) -> tuple:
    """Copies of the ``nnx.State`` templates holding the values of the matching paths of ``pure``.

    ``pure`` may cover several templates (e.g. the whole model's pure dict, and the trainer's
    disjoint parameter groups as templates); every path of every template must be in it.
    """
    from flax import nnx
    from flax.nnx import traversals

    flat = {tuple(str(k) for k in path): v for path, v in traversals.flatten_mapping(dict(pure)).items()}
    filled = []
    for template in templates:
        sub, missing = {}, []
        for path, _ in nnx.to_flat_state(template):
            key = tuple(str(k) for k in path)
            if key not in flat:
                missing.append("/".join(key))
            else:
                sub[path] = flat[key]
        if missing:
            raise CheckpointError(f"restored tree lacks {_first(missing)}")
        state = nnx.merge_state(template)  # a copy: the template is left untouched
        nnx.replace_by_pure_dict(state, traversals.unflatten_mapping(sub))
        filled.append(state)
    return tuple(filled)


def from_pure_tree(template: Any, pure: Any) -> Any:
    """Inverse of :func:`to_pure_tree`: ``template``'s structure (its ``nnx.State`` nodes
    included) with the values of ``pure``."""
    from flax import nnx

    def convert(t, p):
        return fill_states(p, t)[0] if isinstance(t, nnx.State) else p

    return jax.tree.map(convert, template, pure, is_leaf=lambda x: isinstance(x, nnx.State))


def abstract_tree(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` (with sharding) for every array in ``tree``: the restore target
    that places each restored array exactly like the corresponding live one."""

    def abstract(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(abstract, tree)


def with_sharding(tree: Any, shardings: Any) -> Any:
    """Attach shardings (a matching tree, or one sharding for all leaves) to an abstract tree,
    e.g. ``with_sharding(jax.eval_shape(init), NamedSharding(mesh, P()))``."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _check_no_typed_keys(tree: Any) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise CheckpointError(f"train state leaf '{model_io.path_key(path)}' is a typed PRNG key: store "
                                  "jax.random.key_data(key) and rebuild it with jax.random.wrap_key_data")


def _json_roundtrip(value: Any, what: str) -> Any:
    """A deep, JSON-only copy: the background writer must not see later mutations."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} is not JSON-serializable: {e}") from None


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    return {model_io.path_key(p): tuple(getattr(x, "shape", ())) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _metadata_shapes(metadata_tree: Any) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(
        metadata_tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, (dict, list, tuple)))[0]
    return {model_io.path_key(p): tuple(x.shape) if getattr(x, "shape", None) is not None else () for p, x in leaves}


def _compare_structure(saved: dict[str, tuple], wanted: dict[str, tuple], where: str) -> None:
    """One clear line naming the first few paths that differ between a checkpoint and a target."""
    problems = model_io.structure_mismatch(saved, wanted)
    if problems:
        raise CheckpointError(f"{where} does not match the state being restored; " + "; ".join(problems))


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _nested_get(tree: Mapping, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def incompatible_fields(saved_config: Mapping, new_config: Mapping,
                        keys: Optional[tuple[str, ...]] = None) -> list[str]:
    """``['model.hidden_size: 128 -> 256', ...]`` for every field whose change makes a saved train
    state unrestorable (parameter shapes and dtype, the stage); empty when resuming is possible.
    ``keys``: the dotted fields to compare instead."""
    if keys is None:
        keys = tuple(f"model.{f}" for f in SHAPE_FIELDS) + tuple(f"train.{f}" for f in STRUCTURE_TRAIN_FIELDS)
    diffs = []
    for key in keys:
        old, new = _nested_get(saved_config, key), _nested_get(new_config, key)
        if old is _MISSING or new is _MISSING:
            continue
        if old != new:
            diffs.append(f"{key}: {old} -> {new}")
    return diffs


def _allgather_json(value: Any) -> list:
    """Every process's ``value`` (JSON-serializable), in process order, on every process."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([encoded.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:encoded.size] = encoded
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(row[:n].tobytes().decode()) for row, n in zip(gathered, lengths)]


def _this_process_data_state(saved: Any, where: Path) -> Optional[dict]:
    if not saved:
        return None
    count = saved.get("process_count", 1)
    if count != jax.process_count():
        raise CheckpointError(f"{where}: the data iterator state was saved by {count} process(es) and this job "
                              f"has {jax.process_count()}; resume with the same number of processes")
    return saved["processes"][jax.process_index()]


# ----------------------------------------------------------------------------------------------
# The run checkpointer
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    train_state: Any
    data_state: Optional[dict]
    config: dict


class RunCheckpointer:
    """Periodic, asynchronous checkpoints of one run, kept by a last-N + every-K policy.

    ``save`` returns as soon as the arrays are copied off the accelerator; the write happens in the
    background while training continues (``async_save``). Call ``wait()`` before reading a
    checkpoint back and ``close()`` (or use it as a context manager) before exiting, so the last
    save is complete. All processes of a multi-host job must call the same methods in the same order.

    Host memory: the train state is written uncompressed (compression buffered the encoded chunks,
    a second copy for the whole save) and restored a bounded group at a time
    (:func:`model_io.restore_in_groups`). An asynchronous save holds a snapshot of the state until
    it is written: on an accelerator, host memory for this process's shards; on a host whose
    devices are its CPUs the snapshot aliases the state's buffers instead, so the step that runs
    while it is written cannot donate them and holds the state twice until the write ends
    (``checkpoint.async_save: false`` writes before the next step).
    """

    def __init__(self, run_dir: str | Path, ckpt_config: CheckpointConfig, config_dict: Mapping):
        self.run_dir = run_path(run_dir, absolute=True)  # Orbax wants absolute paths; URIs stay URIs
        self.ckpt_config = ckpt_config
        self.config_dict = _json_roundtrip(dict(config_dict), "config")
        policies: list = [ocp.checkpoint_managers.LatestN(n=ckpt_config.keep)]
        if ckpt_config.keep_every:
            policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=ckpt_config.keep_every))
        options = ocp.CheckpointManagerOptions(
            create=True,
            # Interrupted saves leave a `<step>.orbax-checkpoint-tmp-*` directory behind; remove it.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=ckpt_config.async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # Saving is decided here (`save`), not by Orbax: its policy only sees explicit calls.
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(1),
        )
        # Registering the handlers up front lets a fresh manager read metadata before any save.
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        # Uncompressed: compressing buffers every encoded chunk until it is written, a second
        # copy of the state on the host for the whole save (weights and moments barely compress).
        state_handler = ocp.PyTreeCheckpointHandler(use_compression=False)
        registry.add(TRAIN_STATE, ocp.args.PyTreeSave, state_handler)
        registry.add(TRAIN_STATE, ocp.args.PyTreeRestore, state_handler)
        for item in (DATA_STATE, CONFIG):
            json_handler = ocp.handlers.JsonCheckpointHandler()
            registry.add(item, ocp.args.JsonSave, json_handler)
            registry.add(item, ocp.args.JsonRestore, json_handler)
        self._manager = ocp.CheckpointManager(
            self.run_dir / CHECKPOINTS_DIR, options=options, handler_registry=registry)

    # -- queries -------------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return run_path(str(self._manager.directory))

    def all_steps(self) -> list[int]:
        """Committed checkpoint steps, ascending. A save still in flight is not listed (Orbax's own
        list already holds it), so this is what a restarted process would find."""
        return _committed_steps(self.directory)

    def latest_step(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return step % self.ckpt_config.save_every == 0

    # -- save ----------------------------------------------------------------------------------

    def save(self, step: int, train_state: Any, data_state: Optional[Mapping] = None, *,
             force: bool = False) -> bool:
        """Save at ``step`` if it is a multiple of ``save_every`` (or ``force``, e.g. the last step
        or a preemption). Returns whether a save was started. Saving a step twice is a no-op."""
        if not force and not self.should_save(step):
            return False
        if step in self._manager.all_steps():
            return False
        _check_no_typed_keys(train_state)
        local = _json_roundtrip(dict(data_state), "data iterator state") if data_state is not None else None
        # Each process reads its own shard of the data: keep every process's iterator state.
        data = {"process_count": jax.process_count(), "processes": _allgather_json(local)}
        self._manager.save(
            step,
            args=ocp.args.Composite(**{
                TRAIN_STATE: ocp.args.PyTreeSave(train_state),
                DATA_STATE: ocp.args.JsonSave(data),
                CONFIG: ocp.args.JsonSave(self.config_dict),
            }),
            force=True,
        )
        return True

    def wait(self) -> None:
        """Block until every started save is committed (raises if a background write failed)."""
        self._manager.wait_until_finished()

    def check_for_errors(self) -> None:
        """Raise the error of a background save that failed (e.g. a full disk), if any."""
        self._manager.check_for_errors()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "RunCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restore -------------------------------------------------------------------------------

    def _require_step(self, step: Optional[int]) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no checkpoint in {self.directory}")
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                  f"(available: {steps or 'none'})")
        return step

    def saved_config(self, step: Optional[int] = None) -> dict:
        step = self._require_step(step)
        return self._manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def check_compatible(self, new_config_dict: Mapping, step: Optional[int] = None) -> None:
        """Raise ``ConfigError`` if the run cannot resume under ``new_config_dict`` (a changed
        parameter shape or stage), naming every differing field."""
        diffs = incompatible_fields(self.saved_config(step), new_config_dict)
        if diffs:
            raise ConfigError(f"cannot resume {self.run_dir}: the config changes the saved state ("
                              + "; ".join(diffs) + "); start a new run_dir with checkpoint.init_from "
                              f"= {self.run_dir} to initialize from it instead")

    def restore(self, step: Optional[int] = None, abstract_train_state: Any = None) -> Restored:
        """Restore a step (default: the latest committed one).

        ``abstract_train_state``: the tree of ``jax.ShapeDtypeStruct`` (with ``.sharding``) that the
        trainer would create now; every array is read directly into its sharding, whatever mesh
        and device count the checkpoint was written from. ``None`` restores the saved structure
        onto the first local device (for inspection).
        """
        step = self._require_step(step)
        saved_tree = self._manager.item_metadata(step)[TRAIN_STATE]
        saved_tree = getattr(saved_tree, "tree", saved_tree)
        if not saved_tree:  # Orbax reads a missing or empty _METADATA as an empty tree
            raise DamagedCheckpointError(f"{self.directory / str(step) / TRAIN_STATE} has no readable _METADATA")
        # Without a sharding Orbax would return numpy arrays: place those on the first device.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        if abstract_train_state is None:
            abstract_train_state = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
                saved_tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        else:
            _check_no_typed_keys(abstract_train_state)
            abstract_train_state = jax.tree.map(
                lambda x: x if getattr(x, "sharding", None) is not None
                else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_train_state)
            _compare_structure(_metadata_shapes(saved_tree), _flat_shapes(abstract_train_state),
                               f"checkpoint {self.directory / str(step)}")
        # The train state a bounded group of arrays at a time, each read straight into its
        # sharding (model_io.restore_in_groups: never a second copy on the host), then the rest.
        train_state = model_io.restore_in_groups(self.directory / str(step) / TRAIN_STATE, abstract_train_state)
        out = self._manager.restore(step, args=ocp.args.Composite(**{
            DATA_STATE: ocp.args.JsonRestore(),
            CONFIG: ocp.args.JsonRestore(),
        }))
        data_state = _this_process_data_state(out[DATA_STATE], self.directory / str(step))
        return Restored(step=step, train_state=train_state, data_state=data_state, config=out[CONFIG])

    def restore_latest_usable(self, new_config_dict: Mapping, abstract_train_state: Any
                              ) -> tuple[Optional[Restored], list[str]]:
        """Restore the newest committed checkpoint that can be read, for a resumption under
        ``new_config_dict``. Unreadable ones (a truncated or garbage data file, missing metadata,
        a garbage JSON item) are moved to ``<run_dir>/damaged_checkpoints/`` so that their step is
        written again, and described in the returned list (``'step 4: ...'``). ``None`` when there
        is no committed checkpoint at all; ``CheckpointError`` when there are some and none is
        usable. An incompatible config (``ConfigError``) or a different state structure is not
        damage: it is raised at once, nothing moved."""
        skipped: list[str] = []
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                saved = self.saved_config(step)
            except Exception as e:  # noqa: BLE001 - any failure to read it means it is unusable
                skipped.append(self._set_aside(step, f"its config cannot be read ({one_line(e)})"))
                continue
            diffs = incompatible_fields(saved, new_config_dict)
            if diffs:
                raise ConfigError(f"cannot resume {self.run_dir} from step {step}: the config changes the saved "
                                  "state (" + "; ".join(diffs) + "); start a new run_dir with "
                                  f"checkpoint.init_from = {self.run_dir} to initialize from it instead")
            try:
                with _stray_reader_tracebacks_dropped():
                    restored = self.restore(step, abstract_train_state)
            except CheckpointError as e:
                if not isinstance(e, DamagedCheckpointError):
                    raise  # a different structure or process count: not damage, nothing moved
                skipped.append(self._set_aside(step, f"it cannot be read ({one_line(e)})"))
                continue
            except Exception as e:  # noqa: BLE001
                skipped.append(self._set_aside(step, f"it cannot be read ({one_line(e)})"))
                continue
            if skipped:
                self._manager.reload()  # Orbax must forget the moved steps, or it refuses to save them again
            return restored, skipped
        if skipped:
            self._manager.reload()
            raise CheckpointError(f"no usable checkpoint in {self.directory}: " + "; ".join(skipped))
        return None, skipped

    def set_aside_from(self, first_step: int, why: str) -> list[str]:
        """Move every committed checkpoint from ``first_step`` on out of the run (after waiting for
        saves in flight), e.g. the ones whose weights led to non-finite losses; one line each."""
        self.wait()
        moved = [self._set_aside(step, why) for step in self.all_steps() if step >= first_step]
        if moved:
            self._manager.reload()
        return moved

    def _set_aside(self, step: int, why: str) -> str:
        # Every process finds the same damage; one of them moves the directory (shared storage).
        if jax.process_index() == 0:
            moved = set_aside_step(self.directory / str(step))
        else:
            moved = self.run_dir / SET_ASIDE_DIR / str(step)
        sync_processes(f"dsa_train: checkpoint {step} set aside")
        return f"checkpoint of step {step} skipped: {why}; moved to {moved}"


def one_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def _stray_reader_tracebacks_dropped():
    """A failed TensorStore read leaves its sibling reads to complete on an event loop Orbax has
    already closed; each reports an 'Event loop is closed' traceback (through
    ``sys.unraisablehook`` / ``sys.stderr``). They say nothing beyond the one error that is
    reported, so on failure they are dropped; on success whatever came is passed through."""
    real_stderr, real_hook = sys.stderr, sys.unraisablehook
    captured, unraisable = io.StringIO(), []
    sys.stderr, sys.unraisablehook = captured, unraisable.append
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        time.sleep(0.2)  # let the stray callbacks finish while they are still captured
        raise
    finally:
        sys.stderr, sys.unraisablehook = real_stderr, real_hook
        if not failed:
            real_stderr.write(captured.getvalue())
            for args in unraisable:
                real_hook(args)


class _OrbaxErrorRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _drop_closed_loop_callbacks(hook):
    def unraisable(args):
        if not (isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed"):
            hook(args)
    return unraisable


@contextlib.contextmanager
def checkpoint_failures_reported_once():
    """While a run trains, a failed background save (full disk, read-only storage) is raised by
    :meth:`RunCheckpointer.check_for_errors` and reported by the trainer as one line. Without this,
    the same failure is also logged by each Orbax thread it passed through, with tracebacks
    (hundreds of lines), and every TensorStore write still pending reports a closed event loop."""
    logger, log_filter = logging.getLogger("absl"), _OrbaxErrorRecords()
    hook = sys.unraisablehook
    logger.addFilter(log_filter)
    sys.unraisablehook = _drop_closed_loop_callbacks(hook)
    try:
        yield
    finally:
        logger.removeFilter(log_filter)
        sys.unraisablehook = hook


def sync_processes(name: str) -> None:
    """Barrier across the job's processes (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def set_aside_step(step_dir: Path) -> Path:
    """Move one step directory to ``<run_dir>/damaged_checkpoints/<step>[.n]``; returns where."""
    target_dir = step_dir.parent.parent / SET_ASIDE_DIR
    target_dir.mkdir(exist_ok=True)
    target, n = target_dir / step_dir.name, 1
    while target.exists():
        target, n = target_dir / f"{step_dir.name}.{n}", n + 1
    move(step_dir, target)
    return target


def set_aside_uncommitted(run_dir: str | Path) -> list[str]:
    """Move every step directory without its commit marker out of ``checkpoints/``: Orbax would
    still list the step and the saver would never write it again. Only for the one job that owns
    the run directory (under its lock): on an object store a save in flight has no marker yet.
    Returns one description per step moved."""
    checkpoints_dir = run_path(run_dir) / CHECKPOINTS_DIR
    if not checkpoints_dir.is_dir():
        return []
    moved = []
    for path in sorted(checkpoints_dir.iterdir(), key=lambda p: p.name):
        if path.is_dir() and path.name.isdigit() and not _is_step_dir(path):
            moved.append(f"checkpoint of step {path.name} skipped: it was never committed (no {COMMIT_MARKER}); "
                         f"moved to {set_aside_step(path)}")
    return moved


# ----------------------------------------------------------------------------------------------
# Stage handoff
# ----------------------------------------------------------------------------------------------


def _is_step_dir(path: Path) -> bool:
    """A committed step: Orbax writes the commit marker just before it renames the temporary
    directory into place (or, on object stores, instead of renaming)."""
    return path.name.isdigit() and (path / TRAIN_STATE).is_dir() and (path / COMMIT_MARKER).is_file()


def _committed_steps(checkpoints_dir: Path) -> list[int]:
    if not checkpoints_dir.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints_dir.iterdir() if _is_step_dir(p))


def _find_run_step(path: Path) -> Optional[Path]:
    """The step directory ``path`` designates: a run dir (latest step), its ``checkpoints`` dir
    (latest step) or one step directory. None when ``path`` is not a training checkpoint."""
    if _is_step_dir(path):
        return path
    for checkpoints_dir in (path / CHECKPOINTS_DIR, path):
        steps = _committed_steps(checkpoints_dir)
        if steps:
            return checkpoints_dir / str(steps[-1])
    return None


@contextlib.contextmanager
def quiet_orbax():
    """Orbax warns (through absl) about a per-item metadata file that run checkpoints don't write
    (they keep one per step): harmless, and it would be the loudest line of every init_from."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@quiet_orbax()
def load_model_for_init(path: str | Path, abstract_model_state: Any, *,
                        model_config_dict: Optional[Mapping] = None,
                        init_missing: Optional[Callable[[dict], dict]] = None) -> Any:
    """The model state a new stage starts from (fresh optimizer, step 0): only the model is read.

    ``path``: another run directory (its latest committed checkpoint), one of its step directories
    (``<run>/checkpoints/<step>``), or a model directory written by ``dsa-train convert``.
    ``abstract_model_state``: the pure-dict tree of ``jax.ShapeDtypeStruct`` (with shardings) of
    the new stage's model (``train_state[MODEL_KEY]``); arrays are placed directly into it. The
    source may hold the decoder layers in the other layout (``model.scan_layers``): detected from
    its tree and converted.
    ``model_config_dict``: the new stage's ``model`` config; if given, a source whose parameter
    shapes differ is refused with the differing fields named.
    ``init_missing``: ``{key: ShapeDtypeStruct} -> {key: array}``, the new stage's initializers.
    Given, the lightning indexers and MTP depths that the source lacks entirely are generated with
    it (one log line names them; a source without indexers may then differ in the indexer's
    config fields); any other missing parameter, or a group present in part, is refused
    (:func:`dsa_train.checkpoint.model_io.initializable_group`). Not given (eval, export), every
    parameter must be in the source.
    """
    path = run_path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint.init_from: {path} does not exist")
    path = run_path(path, absolute=True)  # Orbax reads metadata only through absolute paths
    step_dir = _find_run_step(path)
    if step_dir is None:
        return _load_converted_model(path, abstract_model_state, model_config_dict, init_missing)
    if model_config_dict is not None:
        saved = _read_json_item(step_dir / CONFIG)
        if saved is not None:
            # A new stage may change the parameter dtype (arrays are cast), not the shapes.
            fields = model_io.shape_fields_to_compare(saved.get("model", {}), SHAPE_FIELDS, init_missing is not None)
            keys = tuple(f"model.{f}" for f in fields if f != "param_dtype")
            diffs = incompatible_fields({"model": saved.get("model", {})}, {"model": dict(model_config_dict)}, keys)
            if diffs:
                raise ConfigError(f"checkpoint.init_from: {step_dir} has a different model ("
                                  + "; ".join(diffs) + ")")
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(step_dir / TRAIN_STATE)
    saved_tree = getattr(metadata, "item_metadata", metadata)
    saved_tree = getattr(saved_tree, "tree", saved_tree)
    if not isinstance(saved_tree, Mapping) or MODEL_KEY not in saved_tree:
        raise CheckpointError(f"checkpoint.init_from: {step_dir} has no '{MODEL_KEY}' entry in its train state")
    saved = _metadata_shapes(saved_tree[MODEL_KEY])

    def check(target):
        _compare_structure(saved, _flat_shapes(target), f"checkpoint.init_from: {step_dir} model")

    def restore(target):
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), target)

        def read(options):
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**options)) as checkpointer:
                return checkpointer.restore(step_dir / TRAIN_STATE, args=ocp.args.PyTreeRestore(
                    item={MODEL_KEY: target}, restore_args={MODEL_KEY: restore_args},
                    partial_restore=True))[MODEL_KEY]

        return model_io.bounded_restore(read, target)

    # A run written with the other model.scan_layers is renamed while it is read.
    restored = model_io.restore_or_initialize(abstract_model_state, saved, restore, check, init_missing,
                                              CheckpointError, f"checkpoint.init_from: {step_dir} model")
    log.info("initialized the model from %s", step_dir)
    return restored


def _read_json_item(item_dir: Path) -> Optional[dict]:
    """Read a JsonSave item (Orbax writes it as `<item>/metadata`)."""
    for name in ("metadata", "data.json"):
        f = item_dir / name
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except (OSError, ValueError):
                return None
    return None


def _load_converted_model(path: Path, abstract_model_state: Any, model_config_dict: Optional[Mapping],
                          init_missing: Optional[Callable[[dict], dict]] = None) -> Any:
    """A model directory written by ``dsa-train convert`` (``dsa_train.checkpoint.model_io``)."""
    if not model_io.is_model_dir(path):
        raise CheckpointError(f"checkpoint.init_from: {path} is neither a run directory with a committed "
                              "checkpoint nor a model directory written by `dsa-train convert`")
    restored = model_io.load_model_state(path, abstract_model_state, model_config_dict=model_config_dict,
                                         init_missing=init_missing)
    log.info("initialized the model from %s", path)
    return restored


# ----------------------------------------------------------------------------------------------
# Where a stage starts
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StartPoint:
    kind: Literal["resume", "init_from", "random"]
    path: Optional[Path] = None
    step: Optional[int] = None

    def describe(self) -> str:
        if self.kind == "resume":
            return f"resuming {self.path} from step {self.step}"
        if self.kind == "init_from":
            return f"initializing the model from {self.path}"
        return "random initialization"


def resolve_start(run_dir: str | Path, ckpt_config: CheckpointConfig) -> StartPoint:
    """Apply the precedence rules (module docstring): resume > init_from > random."""
    run_dir = run_path(run_dir)
    steps = _committed_steps(run_dir / CHECKPOINTS_DIR)
    if steps:
        if ckpt_config.init_from:
            log.info("run_dir %s already has checkpoints: resuming it, ignoring checkpoint.init_from=%s",
                     run_dir, ckpt_config.init_from)
        return StartPoint("resume", run_dir, steps[-1])
    if ckpt_config.init_from:
        return StartPoint("init_from", run_path(ckpt_config.init_from))
    return StartPoint("random")
