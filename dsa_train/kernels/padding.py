"""Padding of kernel operands to block sizes (every kernel tiles its axes in fixed blocks)."""

from __future__ import annotations

import jax.numpy as jnp


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def pad_to(x: jnp.ndarray, axis: int, length: int, value=0) -> jnp.ndarray:
    """``x`` padded with ``value`` at the end of ``axis`` to ``length``."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def pad_to_multiple(x: jnp.ndarray, axis: int, multiple: int, value=0) -> jnp.ndarray:
    """``x`` padded with ``value`` at the end of ``axis`` to the next multiple of ``multiple``."""
    return pad_to(x, axis, round_up(x.shape[axis], multiple), value)
