"""Main (MLA) attention ops, pure JAX. These are the references every kernel is tested against.

Two forms of the same attention:
- dense, MHA form: per-head q/k of qk_head_dim (192) and v of v_head_dim (128); cheapest for dense.
- sparse, MQA ("absorbed") form as in FlashMLA: each head's query is [q_nope W_UK | q_pe] (576),
  every key is the shared [c_kv | k_pe] (576) and the value is c_kv (512). Each query attends only
  to the keys listed in `indices` (-1 marks an unused slot); nothing of size S x T is built.

Both return the output and the per-head log-sum-exp of the scaled scores (the softmax normalizer),
which the indexer losses reuse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsa_train.ops.masks import causal_document_mask

NEG_INF = -1e30  # finite so fully masked rows give zeros, not NaNs


def dense_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray,
                    sm_scale: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Causal, document-masked attention.

    q [B, S, H, Dk], k [B, S, H, Dk], v [B, S, H, Dv], segment_ids [B, S]
    -> out [B, S, H, Dv] (q.dtype), lse [B, S, H] (fp32)
    """
    scores = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32) * sm_scale
    mask = causal_document_mask(segment_ids, segment_ids)[:, None]
    scores = jnp.where(mask, scores, NEG_INF)
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.exp(scores - lse[..., None])
    out = jnp.einsum("bhst,bthd->bshd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype), jnp.transpose(lse, (0, 2, 1))


def gather_keys(kv: jnp.ndarray, indices: jnp.ndarray) -> jnp.ndarray:
    """kv [B, T, D], indices [B, S, K] (-1 allowed) -> [B, S, K, D]; invalid slots read key 0."""
    safe = jnp.maximum(indices, 0)
    return jax.vmap(lambda kv_b, idx_b: kv_b[idx_b])(kv, safe)


def sparse_mla_attention_reference(q: jnp.ndarray, kv: jnp.ndarray, indices: jnp.ndarray,
                                   sm_scale: float, v_dim: int = 512) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Top-k attention in the MQA/latent form.

    q [B, S, H, Dqk], kv [B, T, Dqk] (value = kv[..., :v_dim]), indices [B, S, K] int32 with -1 for
    unused slots -> out [B, S, H, v_dim] (q.dtype), lse [B, S, H] (fp32; -inf-like if no valid key).
    """
    keys = gather_keys(kv, indices)  # [B, S, K, D]
    scores = jnp.einsum("bshd,bskd->bshk", q, keys, preferred_element_type=jnp.float32) * sm_scale
    valid = (indices >= 0)[:, :, None, :]
    scores = jnp.where(valid, scores, NEG_INF)
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.where(valid, jnp.exp(scores - lse[..., None]), 0.0)
    out = jnp.einsum("bshk,bskd->bshd", probs.astype(kv.dtype), keys[..., :v_dim],
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype), lse
