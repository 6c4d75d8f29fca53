"""The parallel scope: which mesh and rules the code being traced runs under.

The model knows no mesh. The trainer enters ``activate(mesh, rules, ...)`` around tracing, and a
few hooks consult it: :func:`constrain` (activation sharding constraints by logical axis names),
the expert-parallel MoE dispatch, the context-parallel attention ops and the per-layer remat
policy. Outside a scope (unit tests, conversion, a bare ``model(tokens)``) every hook is a no-op,
so the model behaves exactly as on one device.

Bodies of ``shard_map`` are traced with the scope suspended: inside them every array is local
and the ordinary single-device ops run.

``sequence_order`` says how the [B, S] arrays being traced are laid out over the context shards
(sequence_order.py). It is ``contiguous`` unless the train step enters :func:`laid_out` around the
model on a batch it has reordered; anything else traced in the same scope (held-out evaluation)
keeps the original order.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import jax
from jax.sharding import Mesh, NamedSharding

from dsa_train.parallel.rules import mesh_axes_of, resolve_rules, spec_for

REMAT_POLICIES = ("none", "full", "dots")


@dataclass(frozen=True)
class ParallelScope:
    mesh: Mesh
    rules: dict = field(default_factory=resolve_rules)
    remat: str = "none"
    expert_capacity: float = 0.0  # see MeshConfig.expert_capacity
    sequence_order: str = "contiguous"  # layout of the sequence axis of the arrays being traced

    def axis_size(self, logical: str) -> int:
        """Devices a logical axis is sharded over (1 when its mesh axes are all of size 1)."""
        sizes = dict(self.mesh.shape)
        out = 1
        for axis in mesh_axes_of(logical, self.mesh, self.rules):
            out *= sizes[axis]
        return out

    def mesh_axes(self, logical: str) -> tuple[str, ...]:
        return mesh_axes_of(logical, self.mesh, self.rules)

    def sharding(self, logical, shape=None) -> NamedSharding:
        return NamedSharding(self.mesh, spec_for(logical, shape, self.mesh, self.rules))


_CURRENT: contextvars.ContextVar[Optional[ParallelScope]] = contextvars.ContextVar("dsa_parallel_scope",
                                                                                    default=None)


def current() -> Optional[ParallelScope]:
    return _CURRENT.get()


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Optional[dict] = None, *, remat: str = "none", expert_capacity: float = 0.0):
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; expected one of {', '.join(REMAT_POLICIES)}")
    scope = ParallelScope(mesh, resolve_rules() if rules is None else dict(rules), remat, expert_capacity)
    token = _CURRENT.set(scope)
    try:
        yield scope
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def laid_out(sequence_order: str):
    """The current scope, with the arrays traced inside laid out in ``sequence_order``."""
    token = _CURRENT.set(dataclasses.replace(current(), sequence_order=sequence_order))
    try:
        yield
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def suspended():
    """No scope while tracing a shard_map body (arrays there are per-device blocks)."""
    token = _CURRENT.set(None)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def constrain(x: jax.Array, logical: tuple) -> jax.Array:
    """``with_sharding_constraint`` by logical axis names; identity outside a scope."""
    scope = current()
    if scope is None or scope.mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, scope.sharding(logical, x.shape))


def remat_policy() -> str:
    scope = current()
    return "none" if scope is None else scope.remat
