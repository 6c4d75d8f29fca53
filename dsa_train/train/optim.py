"""One AdamW per parameter group (main model, indexer), each with its own schedule and clipping."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from dsa_train.config import OptimizerConfig


def make_schedule(oc: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then constant or cosine decay to `lr * min_lr_ratio`."""
    warmup = max(oc.warmup_steps, 0)
    if oc.schedule == "constant":
        after = optax.constant_schedule(oc.lr)
    else:
        after = optax.cosine_decay_schedule(oc.lr, max(total_steps - warmup, 1), alpha=oc.min_lr_ratio)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, oc.lr, warmup), after], [warmup])


def _decayed(x) -> bool:
    """Weight decay for matrices, none for norms / 1-D parameters. The leading axis of stacked
    layers (model.scan_layers: logical axis `layers`) is not a dimension of the parameter."""
    if isinstance(x, nnx.Variable):
        stacked = (x.get_metadata().get("axes") or (None,))[0] == "layers"
        return x.get_value().ndim - stacked >= 2
    return x.ndim >= 2


def decay_mask(params):
    """``params``' structure (Variables kept) with one bool per array."""
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree.map(lambda x: jax.tree.map(lambda _: _decayed(x), x), params, is_leaf=is_variable)


def make_optimizer(oc: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(oc, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(oc.clip_norm),
        optax.adamw(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay, mask=decay_mask),
    )
    return tx, schedule
