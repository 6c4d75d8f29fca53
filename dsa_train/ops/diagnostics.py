"""How good is the indexer? Captured mass and k90 on a few sampled query rows.

captured mass of query t: the share of the dense head-summed attention probability that falls on
the indexer's top-k keys. k90: how many keys (best first by dense probability) are needed to reach
90% of the mass. Measured on `rows` query rows so the cost stays O(rows x T), not O(S x T).

Only rows where selection matters are sampled: those with more than k candidates (causal keys of
their own document). Under packing that excludes the first k tokens of every document, whose
captured mass is trivially 1, exactly as `dsa-train eval` counts them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsa_train.ops.indexer import indexer_scores
from dsa_train.ops.losses import head_summed_target, kl_from_target
from dsa_train.ops.masks import document_positions


def sample_rows(segment_ids: jnp.ndarray, topk: int, rows: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Up to ``rows`` evenly spaced row positions per batch row among those with more than ``topk``
    same-document candidates. segment_ids [B, S] in row order -> (positions [B, R] int32, valid [B, R]
    bool); R = min(rows, S); with fewer eligible rows than R the extra slots are invalid."""
    b, s = segment_ids.shape
    r = min(rows, s)
    eligible = (segment_ids != 0) & (document_positions(segment_ids) >= topk)  # candidates = position + 1
    n = eligible.sum(-1, keepdims=True)  # [B, 1]
    # Eligible positions first, in row order (a stable sort of the ineligible flag).
    ordered = jnp.argsort(~eligible, axis=-1, stable=True).astype(jnp.int32)
    j = jnp.arange(r)[None, :]
    spread = jnp.round(j * (n - 1) / max(r - 1, 1)).astype(jnp.int32)  # distinct when n >= r
    pick = jnp.where(n >= r, spread, j)
    valid = j < n
    return jnp.take_along_axis(ordered, jnp.minimum(pick, s - 1), axis=-1), valid


def indexer_quality(q, kv, sm_scale, q_idx, k_idx, w_idx, segment_ids, topk: int, rows: int,
                    key_positions: np.ndarray | None = None) -> dict:
    """Per-layer scalars: captured mass (mean, p10), k90 (mean) and KL on the sampled rows.

    ``key_positions`` [S]: the row position of each array slot (default arange); under a zig-zag
    context layout (the train step's) slot j holds the token at row position key_positions[j]."""
    s = q.shape[1]
    key_pos = np.arange(s, dtype=np.int32) if key_positions is None else np.asarray(key_positions)
    slot_of = np.argsort(key_pos)  # slot_of[p]: the array slot of row position p
    in_row_order = np.array_equal(slot_of, np.arange(s))
    row_segments = segment_ids if in_row_order else segment_ids[:, slot_of]
    r, valid_rows = sample_rows(row_segments, topk, rows)  # [B, R] row positions
    slots = jnp.asarray(slot_of)[r]

    def rows_of(x):  # x [B, S, ...] -> [B, R, ...] at the sampled slots
        return jnp.take_along_axis(x, slots.reshape(slots.shape + (1,) * (x.ndim - 2)), axis=1)

    seg_rows = rows_of(segment_ids)
    mask = (seg_rows[:, :, None] == segment_ids[:, None, :]) & (key_pos[None, None, :] <= r[:, :, None])
    target = head_summed_target(rows_of(q), kv, sm_scale, mask)  # [B, R, T]
    scores = jnp.where(mask, indexer_scores(rows_of(q_idx), k_idx, rows_of(w_idx)), -jnp.inf)
    if not in_row_order:
        # Keys back in row order, so that top-k breaks ties between equal scores as it does there.
        target, scores = (jnp.take(x, jnp.asarray(slot_of), axis=-1) for x in (target, scores))
    kk = min(topk, s)
    top_vals, top_idx = jax.lax.top_k(scores, kk)
    picked = jnp.take_along_axis(target, top_idx, -1)
    captured = jnp.where(jnp.isfinite(top_vals), picked, 0.0).sum(-1)  # [B, R]
    sorted_target = -jnp.sort(-target, axis=-1)
    k90 = (jnp.cumsum(sorted_target, -1) < 0.9).sum(-1) + 1
    kl = kl_from_target(target, scores)
    valid = valid_rows.astype(jnp.float32)
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
