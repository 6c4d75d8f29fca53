"""How good is the indexer? Captured mass and k90 on a few sampled query rows.

captured mass of query t: the share of the dense head-summed attention probability that falls on
the indexer's top-k keys. k90: how many keys (best first by dense probability) are needed to reach
90% of the mass. Measured on `rows` query positions so the cost stays O(rows x T), not O(S x T).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsa_train.ops.attention import NEG_INF
from dsa_train.ops.indexer import indexer_scores


def sample_rows(seq_len: int, topk: int, rows: int) -> np.ndarray:
    """Evenly spaced query positions, from where selection starts to matter (t >= k) to the end."""
    start = min(topk, seq_len - 1)
    return np.unique(np.linspace(start, seq_len - 1, num=min(rows, seq_len - start)).round().astype(np.int32))


def dense_target_rows(q_rows, kv, sm_scale, mask_rows) -> jnp.ndarray:
    """Head-summed dense probabilities for selected query rows: q_rows [B, R, H, D] -> [B, R, T]."""
    scores = jnp.einsum("brhd,btd->brht", q_rows, kv, preferred_element_type=jnp.float32) * sm_scale
    probs = jax.nn.softmax(jnp.where(mask_rows[:, :, None, :], scores, NEG_INF), axis=-1)
    return jnp.where(mask_rows[:, :, None, :], probs, 0.0).mean(2)


def indexer_quality(q, kv, sm_scale, q_idx, k_idx, w_idx, segment_ids, topk: int, rows: int) -> dict:
    """Per-layer scalars: captured mass (mean, p10), k90 (mean) and KL on the sampled rows."""
    from dsa_train.parallel import context_parallel

    s = q.shape[1]
    # Rows and causality by original row position: under a zig-zag context layout (the train
    # step's) array slot j holds the token at position key_pos[j].
    key_pos = context_parallel.slot_positions(s)
    slot_of = np.argsort(key_pos)  # slot_of[p]: the array slot of row position p
    r = sample_rows(s, topk, rows)
    slots = jnp.asarray(slot_of[r])
    seg_rows = segment_ids[:, slots]
    mask = (seg_rows[:, :, None] == segment_ids[:, None, :]) & (key_pos[None, None, :] <= r[None, :, None])
    target = dense_target_rows(q[:, slots], kv, sm_scale, mask)  # [B, R, T]
    scores = jnp.where(mask, indexer_scores(q_idx[:, slots], k_idx, w_idx[:, slots]), -jnp.inf)
    if not np.array_equal(slot_of, np.arange(s)):
        # Keys back in row order, so that top-k breaks ties between equal scores as it does there.
        target, scores = (jnp.take(x, jnp.asarray(slot_of), axis=-1) for x in (target, scores))
    kk = min(topk, s)
    top_vals, top_idx = jax.lax.top_k(scores, kk)
    picked = jnp.take_along_axis(target, top_idx, -1)
    captured = jnp.where(jnp.isfinite(top_vals), picked, 0.0).sum(-1)  # [B, R]
    sorted_target = -jnp.sort(-target, axis=-1)
    k90 = (jnp.cumsum(sorted_target, -1) < 0.9).sum(-1) + 1
    log_q = jax.nn.log_softmax(scores, -1)
    kl = jnp.where(target > 0, target * (jnp.log(jnp.where(target > 0, target, 1.0))
                                          - jnp.where(jnp.isfinite(log_q), log_q, 0.0)), 0.0).sum(-1)
    valid = (seg_rows != 0).astype(jnp.float32)
    n = jnp.maximum(valid.sum(), 1.0)
    flat_captured = jnp.where(valid > 0, captured, jnp.inf).reshape(-1)
    p10_index = jnp.maximum(jnp.ceil(0.1 * valid.sum()).astype(jnp.int32) - 1, 0)
    p10 = jnp.sort(flat_captured)[p10_index]
    return {
        "captured_mass": (captured * valid).sum() / n,
        "captured_mass_p10": p10,
        "k90": (k90 * valid).sum() / n,
        "kl_rows": (kl * valid).sum() / n,
    }
