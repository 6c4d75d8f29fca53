"""One AdamW per parameter group (main model, indexer), each with its own schedule and clipping."""

from __future__ import annotations

import jax
import optax

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


def make_optimizer(oc: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(oc, total_steps)
    # No weight decay on norms / 1-D parameters.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    tx = optax.chain(
        optax.clip_by_global_norm(oc.clip_norm),
        optax.adamw(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay, mask=decay_mask),
    )
    return tx, schedule
