"""Expert parallelism: routed experts sharded over the ``expert`` mesh axis, tokens exchanged with
two all-to-alls around grouped (ragged) matmuls. Without an expert axis, but with tokens sharded
(data / fsdp / context), each device runs the sorted dispatch on its own tokens only.

Per device, inside ``shard_map`` (tokens are local, each device holds E / n experts):

1. sort this device's (token, slot) assignments by expert; the destination of an assignment is the
   device holding its expert (experts are sharded in contiguous blocks);
2. pack them into a send buffer ``[n, C, D]`` (one block of C rows per destination) and
   ``all_to_all`` it, together with each row's local expert id;
3. sort the received rows by local expert and run the SwiGLU experts as three ``ragged_dot``s
   (the FFN columns may additionally be sharded over ``tensor``: partial sums are ``psum``-ed);
4. ``all_to_all`` the results back into the same slots and combine them, weighted by the gates,
   into the tokens they came from.

Each assignment costs one expert's FLOPs on exactly one device: nothing computes every expert.
C is the worst case (N x min(k, E / n) rows, exact) unless ``mesh.expert_capacity`` sets a
capacity factor, in which case rows beyond it are dropped (their tokens get no contribution from
that expert, as in capacity-limited MoE training).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsa_train.ops import moe as moe_ops
from dsa_train.parallel import scope as scope_lib


def _divisible_axes(axes: tuple[str, ...], size: int, sizes: dict) -> tuple[str, ...]:
    axes = list(axes)
    while axes and size % math.prod(sizes[a] for a in axes):
        axes.pop()
    return tuple(axes)


def plan(n_experts: int, d_ff: int) -> dict | None:
    """The expert-parallel layout under the current scope, or None when it does not apply."""
    scope = scope_lib.current()
    if scope is None:
        return None
    sizes = dict(scope.mesh.shape)
    expert_axes = _divisible_axes(scope.mesh_axes("expert"), n_experts, sizes)
    token_axes = tuple(a for name in ("batch", "sequence") for a in scope.mesh_axes(name))
    if math.prod(sizes[a] for a in expert_axes) <= 1 and math.prod(sizes[a] for a in token_axes) <= 1:
        return None
    mlp_axes = tuple(a for a in scope.mesh_axes("mlp") if a not in expert_axes and a not in token_axes)
    mlp_axes = _divisible_axes(mlp_axes, d_ff, sizes)
    return {"scope": scope, "sizes": sizes, "expert_axes": expert_axes, "mlp_axes": mlp_axes,
            "n": math.prod(sizes[a] for a in expert_axes)}


def active(n_experts: int, d_ff: int) -> bool:
    """Whether the MoE should dispatch through :func:`routed_swiglu`: under a scope whose tokens or
    experts are sharded. (The sort-based dispatch of ``ops.moe.grouped_swiglu`` cannot be split
    along the token axis by XLA: left to it, every device would gather and process every token.)"""
    return plan(n_experts, d_ff) is not None


def _axis(axes: tuple[str, ...]):
    return axes[0] if len(axes) == 1 else axes


def _spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def routed_swiglu(x: jnp.ndarray, gates: jnp.ndarray, expert_idx: jnp.ndarray, w_gate: jnp.ndarray,
                  w_up: jnp.ndarray, w_down: jnp.ndarray) -> jnp.ndarray:
    """Expert-parallel ``grouped_swiglu``: x [B, S, D], gates/expert_idx [B, S, k], weights in the
    HF layout (w_gate/w_up [E, F, D], w_down [E, D, F]) -> [B, S, D]."""
    e, f, _ = w_gate.shape
    layout = plan(e, f)
    if layout is None:
        raise RuntimeError("routed_swiglu needs an active scope that shards tokens or experts")
    scope, sizes = layout["scope"], layout["sizes"]
    n, ex_axes, mlp_axes = layout["n"], layout["expert_axes"], layout["mlp_axes"]
    x_spec = scope.sharding(("batch", "sequence", None), x.shape).spec
    t_spec = scope.sharding(("batch", "sequence", None), expert_idx.shape).spec
    wi_spec = P(_spec_entry(ex_axes), _spec_entry(mlp_axes), None)
    wo_spec = P(_spec_entry(ex_axes), None, _spec_entry(mlp_axes))
    k = expert_idx.shape[-1]
    e_local = e // n
    tokens_local = (x.shape[0] * x.shape[1]) // math.prod(
        sizes[a] for entry in x_spec[:2] if entry for a in ((entry,) if isinstance(entry, str) else entry))
    exact = tokens_local * min(k, e_local)
    capacity = exact
    if scope.expert_capacity > 0:
        capacity = min(exact, max(1, math.ceil(scope.expert_capacity * tokens_local * k / n)))

    def local(x, gates, idx, wg, wu, wd):
        with scope_lib.suspended():
            if n == 1:  # experts not sharded: the ordinary sorted dispatch on this device's tokens
                b, s, d = x.shape
                y = moe_ops.grouped_swiglu(x.reshape(b * s, d), gates.reshape(b * s, -1), idx.reshape(b * s, -1),
                                           wg, wu, wd)
                y = jax.lax.psum(y, _axis(mlp_axes)) if mlp_axes else y
                return y.reshape(b, s, d)
            return _local_dispatch(x, gates, idx, wg, wu, wd, n=n, e_local=e_local, capacity=capacity,
                                   expert_axis=_axis(ex_axes), mlp_axis=_axis(mlp_axes) if mlp_axes else None)

    return jax.shard_map(local, mesh=scope.mesh, in_specs=(x_spec, t_spec, t_spec, wi_spec, wi_spec, wo_spec),
                         out_specs=x_spec)(x, gates, expert_idx, w_gate, w_up, w_down)


def _local_dispatch(x, gates, idx, wg, wu, wd, *, n: int, e_local: int, capacity: int, expert_axis, mlp_axis):
    b, s, d = x.shape
    k = idx.shape[-1]
    tokens = x.reshape(b * s, d)
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    expert_sorted = flat[order]
    token_of = order // k
    gate_sorted = gates.reshape(-1)[order]
    dest = expert_sorted // e_local
    per_dest = jnp.zeros((n,), jnp.int32).at[dest].add(1)
    starts = jnp.cumsum(per_dest) - per_dest
    slot = jnp.arange(flat.shape[0], dtype=jnp.int32) - starts[dest]
    kept = slot < capacity
    slot = jnp.where(kept, slot, capacity)  # out of bounds: dropped by mode="drop"

    send_x = jnp.zeros((n, capacity, d), x.dtype).at[dest, slot].set(tokens[token_of], mode="drop")
    send_e = jnp.full((n, capacity), e_local, jnp.int32).at[dest, slot].set(expert_sorted % e_local, mode="drop")
    recv_x = jax.lax.all_to_all(send_x, expert_axis, 0, 0)
    recv_e = jax.lax.all_to_all(send_e, expert_axis, 0, 0)

    rows_x, rows_e = recv_x.reshape(n * capacity, d), recv_e.reshape(-1)
    local_order = jnp.argsort(rows_e, stable=True)
    group_sizes = jnp.zeros((e_local,), jnp.int32).at[rows_e].add(1, mode="drop")  # padding rows excluded
    xs = rows_x[local_order]
    h_gate = jax.lax.ragged_dot(xs, jnp.swapaxes(wg, 1, 2), group_sizes, preferred_element_type=jnp.float32)
    h_up = jax.lax.ragged_dot(xs, jnp.swapaxes(wu, 1, 2), group_sizes, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(h_gate) * h_up).astype(x.dtype)
    y = jax.lax.ragged_dot(h, jnp.swapaxes(wd, 1, 2), group_sizes, preferred_element_type=jnp.float32)
    if mlp_axis is not None:
        y = jax.lax.psum(y, mlp_axis)
    # Padding rows (past the last group) are zeroed so nothing undefined travels back.
    real = (jnp.arange(n * capacity) < group_sizes.sum())[:, None]
    y = jnp.where(real, y, 0.0).astype(x.dtype)
    y_rows = jnp.zeros_like(y).at[local_order].set(y)
    back = jax.lax.all_to_all(y_rows.reshape(n, capacity, d), expert_axis, 0, 0)

    y_assign = back.at[dest, slot].get(mode="fill", fill_value=0).astype(jnp.float32)
    y_assign = y_assign * jnp.where(kept, gate_sorted, 0.0).astype(jnp.float32)[:, None]
    out = jnp.zeros((b * s, d), jnp.float32).at[token_of].add(y_assign)
    return out.astype(x.dtype).reshape(b, s, d)
