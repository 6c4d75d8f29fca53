"""Lightning-indexer scoring and top-k selection, pure JAX.

I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s] * head_dim^-0.5), with w already scaled by
n_heads^-0.5 (the model does that). Candidates for query t are the keys s <= t of its document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsa_train.ops.masks import causal_document_mask

MASKED = -jnp.inf
# Name of the selected indices for remat policies (jax.ad_checkpoint.checkpoint_name): the backward
# pass keeps them instead of re-running the selection.
TOPK_INDICES = "indexer_topk_indices"


def indexer_scores(q: jnp.ndarray, k: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """q [B, S, Hi, Di], k [B, T, Di], weights [B, S, Hi] -> raw scores [B, S, T] (fp32, unmasked)."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bshd,btd->bsht", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    return jnp.einsum("bsh,bsht->bst", weights.astype(jnp.float32), jax.nn.relu(logits))


def masked_indexer_scores(q, k, weights, segment_ids, q_positions=None, k_segment_ids=None) -> jnp.ndarray:
    """Scores with non-candidates set to -inf: [B, S, T]. ``q_positions`` [S] / [B, S]: the queries'
    positions among the keys (default arange); ``k_segment_ids`` [B, T] (default ``segment_ids``)."""
    k_segment_ids = segment_ids if k_segment_ids is None else k_segment_ids
    if q_positions is None:
        mask = causal_document_mask(segment_ids, k_segment_ids)
    else:
        q_pos = jnp.broadcast_to(jnp.asarray(q_positions, jnp.int32), segment_ids.shape)
        k_pos = jnp.arange(k_segment_ids.shape[1], dtype=jnp.int32)
        same_doc = segment_ids[:, :, None] == k_segment_ids[:, None, :]
        mask = same_doc & (k_pos[None, None, :] <= q_pos[:, :, None])
    scores = indexer_scores(q, k, weights)
    # -0.0 (negative weight x ReLU zero) -> +0.0: top_k's total order would rank -0 below +0.
    return jnp.where(mask, jnp.where(scores == 0, 0.0, scores), MASKED)


def indexer_topk_reference(q, k, weights, topk: int, segment_ids, q_positions=None, k_segment_ids=None) -> jnp.ndarray:
    """Top-k candidate keys per query -> indices [B, S, min(topk, T)] int32, -1 for unused slots
    (sorted by score; ties: the lower key index first)."""
    scores = masked_indexer_scores(q, k, weights, segment_ids, q_positions, k_segment_ids)
    values, idx = jax.lax.top_k(scores, min(topk, scores.shape[-1]))
    return jnp.where(values > MASKED, idx, -1).astype(jnp.int32)
