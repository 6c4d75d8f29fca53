"""Query blocks against the keys of a whole row: padding, block slices and the causal document mask
shared by the pure-JAX dense kernels (``dense_attention``, ``dense_indexer_kl``).

Queries carry their row positions (a context shard's zig-zag queries included); keys are the whole
row in order (positions 0..T-1). Padded queries get position -1 and segment -1, padded keys
``KEY_PAD_SEGMENT``, so neither is ever visible to a real token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsa_train.kernels.padding import pad_to, round_up  # noqa: F401  (rb.round_up for the kernels)

KEY_PAD_SEGMENT = -2  # never equal to a query's segment id (padded queries get -1)


def pad_rows(x, length, value=0):
    """Pad axis 1 (the sequence) to ``length``."""
    return pad_to(x, 1, length, value)


def block(x, start, size):
    """``size`` rows of axis 1 from ``start`` (dynamic)."""
    return jax.lax.dynamic_slice_in_dim(x, start, size, 1)


class Layout(NamedTuple):
    n_q: int
    n_k: int
    q_pos: jnp.ndarray  # [Lq] (padded queries: -1, they see nothing)
    q_seg: jnp.ndarray  # [B, Lq]
    k_seg: jnp.ndarray  # [B, Lk]


def layout(block_q: int, block_k: int, q_pos, q_seg, k_seg) -> Layout:
    lq, lk = round_up(q_seg.shape[1], block_q), round_up(k_seg.shape[1], block_k)
    return Layout(lq // block_q, lk // block_k, pad_rows(q_pos[None].astype(jnp.int32), lq, -1)[0],
                  pad_rows(q_seg.astype(jnp.int32), lq, -1), pad_rows(k_seg.astype(jnp.int32), lk, KEY_PAD_SEGMENT))


def visible_key_blocks(lay: Layout, q_pos_b, block_k: int):
    """Key blocks 0 .. n-1 hold every key a query block can see (keys sit at their row positions)."""
    return jnp.clip(q_pos_b.max() // block_k + 1, 0, lay.n_k)


def visible(lay: Layout, q_pos_b, q_seg_b, ks, block_k: int):
    """[B, bq, bk] bool: same document and causal, for the key block starting at ``ks``."""
    k_pos = ks + jnp.arange(block_k)
    return (q_seg_b[:, :, None] == block(lay.k_seg, ks, block_k)[:, None, :]) & \
        (k_pos[None, None, :] <= q_pos_b[None, :, None])
