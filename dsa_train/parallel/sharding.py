"""Shardings of the train state and the batch, from the logical axis rules.

- parameters: by their ``axes`` metadata (``nnx.Param(..., axes=("vocab", "embed"))``);
- optimizer moments: optax keeps the ``nnx.Param`` wrappers (metadata included) of the parameters
  they follow, so they get exactly their parameter's sharding;
- everything without logical axes (step counters, Adam's count, the MoE router biases whose axes
  are ``(None,)``): replicated;
- a batch ``[B, S]``: ``("batch", "sequence")``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsa_train.parallel.rules import Rules, explain_spec, spec_for

BATCH_AXES = ("batch", "sequence")


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _logical_axes(var: nnx.Variable):
    return var.get_metadata().get("axes")


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """A tree of ``NamedSharding`` with ``tree``'s exact structure (``nnx.Variable`` nodes kept)."""

    def one(x):
        if _is_variable(x):
            axes = _logical_axes(x)
            value = x.get_value()
            spec = spec_for(axes, np.shape(value), mesh, rules) if axes else PartitionSpec()
            sharding = NamedSharding(mesh, spec)
            return jax.tree.map(lambda _: sharding, x)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, tree, is_leaf=_is_variable)


def sharding_report(tree: Any, mesh: Mesh, rules: Rules) -> list[tuple[str, tuple, PartitionSpec, list[str]]]:
    """(path, logical axes, spec, notes) of every variable with logical axes, for display/tests."""
    rows = []
    for path, var in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]:
        if _is_variable(var) and _logical_axes(var):
            spec, notes = explain_spec(_logical_axes(var), np.shape(var.get_value()), mesh, rules)
            rows.append((jax.tree_util.keystr(path), _logical_axes(var), spec, notes))
    return rows


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying their target sharding (restore / AOT targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules, batch_size: int, seq_len: int) -> NamedSharding:
    """The sharding of every ``[B, S]`` batch array (global shape ``(batch_size, seq_len)``)."""
    return NamedSharding(mesh, spec_for(BATCH_AXES, (batch_size, seq_len), mesh, rules))


def put_batch(batch: dict, sharding: NamedSharding, global_batch_size: int) -> dict:
    """Assemble global arrays from this process's rows (every process calls it with its own rows).

    The rows are the process's data shard (``mesh.data_shard``), whole sequences: where the
    sequence (or tensor) axis spans processes, processes of one shard pass the same rows and JAX
    places each addressable device's slice of them (a dimension given at its global size is
    sliced, not assembled), so no process places another's part."""
    out = {}
    for key, local in batch.items():
        local = np.asarray(local)
        global_shape = (global_batch_size, *local.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out
