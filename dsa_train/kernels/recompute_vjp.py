"""The differentiation rule the Pallas sparse-attention kernels share.

Forward kernels return (out, lse); the backward kernels recompute the probabilities from q, kv,
indices and lse, so those (and out, for the softmax delta) are the only residuals kept."""

from __future__ import annotations

import functools
from typing import Callable

import jax


def attention_with_recompute(forward: Callable, backward: Callable) -> Callable:
    """(q, kv, indices, cfg) -> (out, lse), differentiable in q and kv.

    forward(q, kv, indices, cfg) -> (out, lse);
    backward(q, kv, indices, out, lse, d_out, d_lse, cfg) -> (dq, dkv)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def attention(q, kv, indices, cfg):
        return forward(q, kv, indices, cfg)

    def attention_fwd(q, kv, indices, cfg):
        out, lse = forward(q, kv, indices, cfg)
        return (out, lse), (q, kv, indices, out, lse)

    def attention_bwd(cfg, residuals, cotangents):
        q, kv, indices, out, lse = residuals
        d_out, d_lse = cotangents
        dq, dkv = backward(q, kv, indices, out, lse, d_out, d_lse, cfg)
        return dq, dkv, None

    attention.defvjp(attention_fwd, attention_bwd)
    return attention
