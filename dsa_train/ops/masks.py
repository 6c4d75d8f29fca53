"""Which (query, key) pairs may interact: causal and within one packed document.

Segment ids are per token, 0 for padding. Documents are contiguous in a packed row, so "same
segment and key index <= query index" is exactly "earlier token of the same document". Padding
tokens form their own segment: they attend among themselves, never to or from real tokens, and
their outputs are excluded from every loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_document_mask(q_segment_ids: jnp.ndarray, k_segment_ids: jnp.ndarray,
                         q_offset: int | jnp.ndarray = 0, k_offset: int | jnp.ndarray = 0) -> jnp.ndarray:
    """Boolean [B, S, T]: key s is visible to query t. Offsets place a block inside the full row."""
    s, t = q_segment_ids.shape[1], k_segment_ids.shape[1]
    return causal_document_mask_at(q_segment_ids, k_segment_ids, jnp.arange(s) + q_offset, jnp.arange(t) + k_offset)


def causal_document_mask_at(q_segment_ids: jnp.ndarray, k_segment_ids: jnp.ndarray, q_positions: jnp.ndarray,
                            k_positions: jnp.ndarray) -> jnp.ndarray:
    """Boolean [B, S, T] from each query's and key's position in the row ([S], [T]): for arrays whose
    order is not the row's (a zig-zag context shard, dsa_train/parallel/sequence_order.py)."""
    same_doc = q_segment_ids[:, :, None] == k_segment_ids[:, None, :]
    return same_doc & (k_positions[None, :] <= q_positions[:, None])[None]


def default_segment_ids(tokens: jnp.ndarray) -> jnp.ndarray:
    return jnp.ones(tokens.shape, jnp.int32)


def document_positions(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Position of each token inside its document (restarts at 0 where the segment id changes)."""
    b, s = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(s), (b, s))
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_idx = jnp.where(starts, idx, 0)
    return (idx - jax.lax.cummax(start_idx, axis=1)).astype(jnp.int32)
