"""Resolve `model.kernels` to a concrete implementation name for the current backend."""

from __future__ import annotations

import jax


def resolve_kernels(choice: str) -> str:
    """`auto`: Pallas on GPU/TPU, the memory-bounded JAX path on CPU; `reference`/`pallas` as given."""
    try:
        from dsa_train.kernels.dispatch import resolve_impl
    except ImportError:  # kernels not built in this checkout: the reference is always there
        return "reference"
    return resolve_impl(choice)
