"""Logical axis names -> mesh axes.

Every parameter names its dimensions with logical axes (``("vocab", "embed")``,
``("expert", "mlp", "embed")``, ...; see ``dsa_train/model``); activations and batches use
``batch`` and ``sequence``. A rule maps one logical name to a tuple of mesh axes (sharded over
their product, major to minor) or to ``None`` (replicated). The defaults below give FSDP over the
hidden dimension, Megatron-style tensor parallelism over heads / FFN columns / vocabulary, expert
parallelism over routed experts, data parallelism over the batch and context parallelism over the
sequence. ``mesh.rules`` in a recipe overrides single entries.

Two guards keep every rule usable on every mesh: a mesh axis is used at most once per array (the
first dimension that claims it wins), and a dimension whose size the mesh axes do not divide drops
its trailing mesh axes until they do (replicating it in the worst case). Both are reported by
:func:`explain_spec` so nothing is silent for a user who asks.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from jax.sharding import PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor", "context")

# Logical names the model and the trainer use. Rules for other names are refused (typo guard).
PARAM_AXES = ("vocab", "embed", "heads", "q_lora", "kv_lora", "index_heads", "index_dim", "expert", "mlp",
              "layers")
ACTIVATION_AXES = ("batch", "sequence")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

DEFAULT_RULES: dict[str, Optional[tuple[str, ...]]] = {
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "index_heads": ("tensor",),
    "mlp": ("tensor",),
    "expert": ("expert",),
    # Latent ranks and the indexer key dim are small and consumed whole by every head: replicated.
    "q_lora": None,
    "kv_lora": None,
    "index_dim": None,
    # The leading axis of stacked decoder layers (model.scan_layers): the scan walks it one layer
    # at a time, so every device keeps all of its layers' shards.
    "layers": None,
    "batch": ("data", "fsdp", "expert"),
    "sequence": ("context",),
}

Rules = Mapping[str, Optional[tuple[str, ...]]]


def validate_rules(overrides: Mapping) -> list[tuple[str, str]]:
    """Problems with a ``mesh.rules`` mapping, as (logical name, message) pairs."""
    errors = []
    for name, axes in overrides.items():
        if name not in LOGICAL_AXES:
            errors.append((name, f"unknown logical axis; known: {', '.join(LOGICAL_AXES)}"))
            continue
        for axis in axes or ():
            if axis not in MESH_AXES:
                errors.append((name, f"unknown mesh axis {axis!r}; mesh axes are {', '.join(MESH_AXES)}"))
        if axes and len(set(axes)) != len(axes):
            errors.append((name, "names a mesh axis twice"))
    return errors


def resolve_rules(overrides: Mapping | None = None) -> dict[str, Optional[tuple[str, ...]]]:
    """DEFAULT_RULES with ``overrides`` (``mesh.rules``) applied."""
    rules = dict(DEFAULT_RULES)
    for name, axes in (overrides or {}).items():
        rules[name] = tuple(axes) if axes else None
    return rules


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape)  # Mesh and AbstractMesh alike


def spec_for(logical: Sequence[Optional[str]], shape: Sequence[int] | None, mesh, rules: Rules) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions carry the logical names ``logical``.

    Mesh axes of size 1 are left out (they shard nothing); ``shape`` (when given) drops mesh axes
    that do not divide a dimension."""
    return explain_spec(logical, shape, mesh, rules)[0]


def explain_spec(logical, shape, mesh, rules: Rules) -> tuple[PartitionSpec, list[str]]:
    """(spec, notes): the notes say where a rule was not applied and why."""
    sizes = _axis_sizes(mesh)
    used: set[str] = set()
    entries, notes = [], []
    for dim, name in enumerate(logical):
        wanted = [a for a in (rules.get(name) or ()) if sizes.get(a, 1) > 1] if name else []
        axes = []
        for axis in wanted:
            if axis in used:
                notes.append(f"{name}: mesh axis {axis!r} already shards another dimension")
                continue
            axes.append(axis)
        if shape is not None:
            while axes and shape[dim] % _product(sizes[a] for a in axes):
                notes.append(f"{name}: size {shape[dim]} not divisible by {'x'.join(axes)}; dropping {axes[-1]!r}")
                axes.pop()
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries), notes


def mesh_axes_of(name: str, mesh, rules: Rules) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that logical axis ``name`` maps to."""
    sizes = _axis_sizes(mesh)
    return tuple(a for a in (rules.get(name) or ()) if sizes.get(a, 1) > 1)


def _product(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out
