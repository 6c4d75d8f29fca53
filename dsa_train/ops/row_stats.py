"""Per-query indexer diagnostics of one layer, streamed over query blocks (pure JAX).

What `dsa-train eval` measures: the model computes them inside its own forward pass (MLA with
`ForwardMode(row_stats=...)`), from the layer's attention inputs in MQA form:
q [B, S, H, D], kv [B, T, D] (value = kv[..., :kv_lora]), and the indexer's q [B, S, Hi, Di],
k [B, T, Di], w [B, S, Hi]. For every query row t the dense target is the head-summed,
L1-normalized attention p_t (the warm-up's KL target, see losses.head_summed_attention_probs), and
the indexer's selection S_t is its top-k among the causal same-document candidates. Per row:

- captured_mass: sum of p_t over S_t (1 when every candidate is selected),
- k50 / k90 / k99: fewest keys (best first by p_t) holding 50 / 90 / 99 % of p_t,
- kl: KL(p_t || softmax(indexer scores over the candidates)); kl_uniform: KL(p_t || uniform),
  so that 1 - sum(kl) / sum(kl_uniform) is the "KL captured" figure,
- top_key / top_share: the candidate with the largest p_t (its index in the sequence) and its share,
  which says where a layer looks (a layer that retrieves puts most of p_t on the one far key),
- recent_share / sink_share: share of S_t within the last `recent_window` tokens (distance
  t - s < recent_window) / among the first `sink_tokens` tokens of the document,
- out_err2 / out_norm2 (when a sparse attention output is given): squared L2 norm of the layer's
  attention output (after W_UV and o_proj) sparse minus dense, and of the dense output.

Only [B, block_q, H, T] exists at a time: nothing of size S x T is built except block by block.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from dsa_train.ops.indexer import indexer_scores
from dsa_train.ops.losses import head_probs, kl_from_target
from dsa_train.ops.masks import causal_document_mask

ROW_METRICS = ("valid", "candidates", "captured_mass", "k50", "k90", "k99", "kl", "kl_uniform",
               "top_key", "top_share", "recent_share", "sink_share")
OUTPUT_METRICS = ("out_err2", "out_norm2")
MASS_LEVELS = {"k50": 0.5, "k90": 0.9, "k99": 0.99}


class RowStatsOptions(NamedTuple):
    """What the per-row statistics measure (static under jit)."""

    recent_window: int = 128
    sink_tokens: int = 16
    block_q: int = 64
    output_error: bool = True  # out_err2 / out_norm2: the sparse vs dense attention output


def project_attention_output(latent: jnp.ndarray, w_uv: jnp.ndarray, w_o: jnp.ndarray) -> jnp.ndarray:
    """MQA latent output [B, Q, H, kv_lora] -> the layer's attention output [B, Q, hidden] (fp32).

    w_uv [H, v_head_dim, kv_lora] (the value half of kv_b_proj), w_o [hidden, H * v_head_dim] (o_proj)."""
    out = jnp.einsum("bqhc,hvc->bqhv", latent.astype(jnp.float32), w_uv.astype(jnp.float32))
    b, q = out.shape[:2]
    return jnp.einsum("bqi,oi->bqo", out.reshape(b, q, -1), w_o.astype(jnp.float32))


def _block_stats(q_b, kv, sm_scale, qi_b, k_idx, wi_b, seg_q, segment_ids, key_positions, q_start,
                 topk, recent_window, sink_tokens, sparse_b, w_uv, w_o) -> dict:
    """Row statistics of the query rows q_start .. q_start + Q - 1 (shapes [B, Q])."""
    b, nq = q_b.shape[:2]
    t = kv.shape[1]
    mask = causal_document_mask(seg_q, segment_ids, q_offset=q_start)  # [B, Q, T]
    probs = head_probs(q_b, kv, sm_scale, mask)  # [B, Q, H, T]
    target = probs.mean(2)  # the head-summed target (losses.head_summed_target), sums to one
    candidates = mask.sum(-1)

    logits = jnp.where(mask, indexer_scores(qi_b, k_idx, wi_b), -jnp.inf)
    top_vals, top_idx = jax.lax.top_k(logits, min(topk, t))
    selected = jnp.isfinite(top_vals)  # fewer candidates than k: the rest of the slots are empty
    n_selected = jnp.maximum(selected.sum(-1), 1)
    stats = {"valid": (seg_q != 0).astype(jnp.float32), "candidates": candidates.astype(jnp.float32)}
    stats["captured_mass"] = jnp.where(selected, jnp.take_along_axis(target, top_idx, -1), 0.0).sum(-1)

    stats["top_key"] = jnp.argmax(target, -1).astype(jnp.float32)
    stats["top_share"] = target.max(-1)
    cumulative = jnp.cumsum(-jnp.sort(-target, axis=-1), axis=-1)
    for name, level in MASS_LEVELS.items():
        # Rounding can leave the total a hair under 1: never report more keys than candidates.
        stats[name] = jnp.minimum((cumulative < level).sum(-1) + 1, candidates).astype(jnp.float32)

    stats["kl"] = kl_from_target(target, logits)
    stats["kl_uniform"] = kl_from_target(target, jnp.where(mask, 0.0, -jnp.inf))  # uniform over the candidates

    query_index = q_start + jnp.arange(nq)[None, :, None]
    recent = selected & (query_index - top_idx < recent_window)
    key_pos = jnp.take_along_axis(jnp.broadcast_to(key_positions[:, None, :], (b, nq, t)), top_idx, -1)
    sink = selected & (key_pos < sink_tokens)
    stats["recent_share"] = recent.sum(-1) / n_selected
    stats["sink_share"] = sink.sum(-1) / n_selected

    if sparse_b is not None:
        v_dim = sparse_b.shape[-1]
        dense_latent = jnp.einsum("bqht,btc->bqhc", probs, kv[..., :v_dim].astype(jnp.float32))
        y_dense = project_attention_output(dense_latent, w_uv, w_o)
        y_sparse = project_attention_output(sparse_b, w_uv, w_o)
        stats["out_err2"] = jnp.square(y_sparse - y_dense).sum(-1)
        stats["out_norm2"] = jnp.square(y_dense).sum(-1)
    return stats


def layer_row_stats(q, kv, sm_scale: float, q_idx, k_idx, w_idx, segment_ids, positions, topk: int, *,
                    recent_window: int = 128, sink_tokens: int = 16, block_q: int = 64,
                    sparse_latent: Optional[jnp.ndarray] = None, w_uv: Optional[jnp.ndarray] = None,
                    w_o: Optional[jnp.ndarray] = None) -> dict[str, jnp.ndarray]:
    """Every row statistic of the module docstring, each [B, S] fp32 (`valid` is 0 on padding).

    q [B, S, H, D], kv [B, T, D], q_idx [B, S, Hi, Di], k_idx [B, T, Di], w_idx [B, S, Hi],
    segment_ids [B, S] (T = S), positions [B, S] (position inside the document). With
    `sparse_latent` [B, S, H, kv_lora] (the sparse attention's latent output), `w_uv` and `w_o`
    (see :func:`project_attention_output`) also out_err2 / out_norm2. Query blocks of `block_q`
    rows are processed one after another (lax.map), so memory is O(B block_q H T).
    """
    b, s = q.shape[:2]
    block_q = max(1, min(block_q, s))
    blocks = -(-s // block_q)
    pad = blocks * block_q - s

    def pad_rows(x):  # padded query rows get segment 0 (padding) and are dropped at the end
        return None if x is None else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

    q_p, qi_p, wi_p, seg_p, sparse_p = map(pad_rows, (q, q_idx, w_idx, segment_ids, sparse_latent))

    def one_block(start):
        take = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(x, start, block_q, axis=1)  # noqa
        return _block_stats(take(q_p), kv, sm_scale, take(qi_p), k_idx, take(wi_p), take(seg_p), segment_ids,
                            positions, start, topk, recent_window, sink_tokens, take(sparse_p), w_uv, w_o)

    out = jax.lax.map(one_block, jnp.arange(blocks) * block_q)  # name -> [blocks, B, block_q]
    return {k: jnp.moveaxis(v, 0, 1).reshape(b, blocks * block_q)[:, :s] for k, v in out.items()}
