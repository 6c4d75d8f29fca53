"""Top-k indices from positions alone: the first few tokens of the document (attention sinks) and
the most recent keys. An evaluation control: sparse attention with this selection shows what
locality alone retrieves, against the indexer's content-based top-k."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsa_train.ops.masks import causal_document_mask, document_positions


def local_window_indices(segment_ids: jnp.ndarray, topk: int, sink_tokens: int) -> jnp.ndarray:
    """segment_ids [B, S] -> indices [B, S, min(topk, S)] int32 (-1: unused slot), the layout of
    ops.indexer.indexer_topk: for query t, the first `sink_tokens` keys of its document and the
    most recent ones up to `topk` keys in all (every candidate when it has at most topk)."""
    s = segment_ids.shape[-1]
    key = jnp.arange(s)
    in_doc = document_positions(segment_ids)  # position of each key inside its document
    # Rank candidates: sinks first (any value above every position), then by recency.
    order = jnp.where(in_doc < sink_tokens, s + key, key).astype(jnp.float32)
    mask = causal_document_mask(segment_ids, segment_ids)
    scores = jnp.where(mask, order[:, None, :], -jnp.inf)
    values, idx = jax.lax.top_k(scores, min(topk, s))
    return jnp.where(values > -jnp.inf, idx, -1).astype(jnp.int32)
