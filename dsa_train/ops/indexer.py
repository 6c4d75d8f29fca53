"""Lightning-indexer scoring and top-k selection, pure JAX.

I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s] * head_dim^-0.5), with w already scaled by
n_heads^-0.5 (the model does that). Candidates for query t are the keys s <= t of its document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsa_train.ops.masks import causal_document_mask

MASKED = -jnp.inf


def indexer_scores(q: jnp.ndarray, k: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """q [B, S, Hi, Di], k [B, T, Di], weights [B, S, Hi] -> raw scores [B, S, T] (fp32, unmasked)."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bshd,btd->bsht", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    return jnp.einsum("bsh,bsht->bst", weights.astype(jnp.float32), jax.nn.relu(logits))


def masked_indexer_scores(q, k, weights, segment_ids) -> jnp.ndarray:
    """Scores with non-candidates set to -inf: [B, S, T]."""
    mask = causal_document_mask(segment_ids, segment_ids)
    return jnp.where(mask, indexer_scores(q, k, weights), MASKED)


def indexer_topk_reference(q, k, weights, topk: int, segment_ids) -> jnp.ndarray:
    """Top-k candidate keys per query -> indices [B, S, min(topk, T)] int32, -1 for unused slots."""
    scores = masked_indexer_scores(q, k, weights, segment_ids)
    values, idx = jax.lax.top_k(scores, min(topk, scores.shape[-1]))
    return jnp.where(values > MASKED, idx, -1).astype(jnp.int32)
