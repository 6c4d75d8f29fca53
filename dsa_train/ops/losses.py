"""Losses as pure functions (the references the kernel backend is tested against).

Shapes: B batch, S queries, T keys (= S), H main heads, D = 576 MQA key dim, Hi/Di indexer heads/dim,
K selected keys per query. `segment_ids` [B, S] (0 = padding) define causality and documents.

indexer target p_t: the main attention probabilities of query t summed over heads, L1-normalized
(each head's row sums to one, so that is a division by H). Never differentiated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsa_train.ops.attention import NEG_INF, gather_keys
from dsa_train.ops.indexer import masked_indexer_scores
from dsa_train.ops.masks import causal_document_mask

# Name of the dense indexer KL's pass A residuals for remat policies (jax.ad_checkpoint.checkpoint_name;
# kernels/dense_indexer_kl.py): lse_I, psum and the target part of the gradient, fp32, O(S + T) per
# row. A policy that keeps them spares the backward pass forming the target a second time.
PASS_A_RESIDUALS = "dense_indexer_kl_pass_a"


def _xlogy(p: jnp.ndarray) -> jnp.ndarray:
    return jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)


def valid_queries(segment_ids: jnp.ndarray) -> jnp.ndarray:
    return (segment_ids != 0).astype(jnp.float32)


def head_probs(q: jnp.ndarray, kv: jnp.ndarray, sm_scale: float, mask: jnp.ndarray) -> jnp.ndarray:
    """Per-head main attention probabilities [B, Q, H, T] of MQA-form q [B, Q, H, D] over kv [B, T, D],
    restricted to the visible keys ``mask`` [B, Q, T] (zero elsewhere)."""
    scores = jnp.einsum("bshd,btd->bsht", q, kv, preferred_element_type=jnp.float32) * sm_scale
    probs = jax.nn.softmax(jnp.where(mask[:, :, None, :], scores, NEG_INF), axis=-1)
    return jnp.where(mask[:, :, None, :], probs, 0.0)


def head_summed_target(q: jnp.ndarray, kv: jnp.ndarray, sm_scale: float, mask: jnp.ndarray) -> jnp.ndarray:
    """The indexer's dense target p_t [B, Q, T]: :func:`head_probs` summed over heads, L1-normalized
    (each head's row sums to one, so that is the mean over heads)."""
    return head_probs(q, kv, sm_scale, mask).mean(axis=2)


def head_summed_attention_probs(q: jnp.ndarray, kv: jnp.ndarray, sm_scale: float,
                                segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Dense target distribution [B, S, T] of every query (causal, same document); never differentiated."""
    mask = causal_document_mask(segment_ids, segment_ids)
    return jax.lax.stop_gradient(head_summed_target(q, kv, sm_scale, mask))


def kl_from_target(target: jnp.ndarray, logits: jnp.ndarray) -> jnp.ndarray:
    """Row-wise KL(target || softmax(logits)); -inf logits are excluded. [..., N] -> [...]."""
    log_q = jax.nn.log_softmax(logits, axis=-1)
    cross = jnp.where(target > 0, target * jnp.where(jnp.isfinite(log_q), log_q, 0.0), 0.0)
    return (_xlogy(target) - cross).sum(-1)


def indexer_kl_loss(q, kv, sm_scale, q_idx, k_idx, w_idx, segment_ids) -> jnp.ndarray:
    """Dense warm-up loss: mean over valid queries of KL(p_t || softmax(I_t)) over causal,
    same-document keys. Gradients reach only the indexer inputs (q_idx, k_idx, w_idx).

    The reference: builds [B, S, H, T] (the kernels in `dsa_train.kernels.indexer_kl` do not)."""
    target = head_summed_attention_probs(q, kv, sm_scale, segment_ids)
    logits = masked_indexer_scores(q_idx, k_idx, w_idx, segment_ids)
    kl = kl_from_target(target, logits)
    valid = valid_queries(segment_ids)
    return (kl * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def sparse_target(q, kv, indices, lse, sm_scale) -> jnp.ndarray:
    """Head-summed sparse attention probabilities over the selected keys: [B, S, K].

    `lse` [B, S, H] is the sparse attention's own log-sum-exp, so each head's row already sums to
    one over the selected set."""
    keys = gather_keys(kv, indices)
    scores = jnp.einsum("bshd,bskd->bshk", q, keys, preferred_element_type=jnp.float32) * sm_scale
    probs = jnp.exp(scores - lse[..., None])
    probs = jnp.where((indices >= 0)[:, :, None, :], probs, 0.0)
    return jax.lax.stop_gradient(probs.mean(axis=2))


def indexer_scores_at(q_idx, k_idx, w_idx, indices) -> jnp.ndarray:
    """Indexer logits of the selected keys only: [B, S, K], -inf at unused slots. O(S K Hi Di)."""
    keys = gather_keys(k_idx, indices).astype(jnp.float32)  # [B, S, K, Di]
    scale = q_idx.shape[-1] ** -0.5
    logits = jnp.einsum("bshd,bskd->bshk", q_idx.astype(jnp.float32), keys) * scale
    scores = jnp.einsum("bsh,bshk->bsk", w_idx.astype(jnp.float32), jax.nn.relu(logits))
    return jnp.where(indices >= 0, scores, -jnp.inf)


def sparse_indexer_kl_loss(q, kv, indices, lse, sm_scale, q_idx, k_idx, w_idx, segment_ids) -> jnp.ndarray:
    """Sparse-stage loss: KL(p_t,S_t || softmax(I_t,S_t)), both restricted to the selected set.

    The reference (the kernels in `dsa_train.kernels.indexer_kl` are query-blocked, O(S K) memory)."""
    target = sparse_target(q, kv, indices, lse, sm_scale)
    logits = indexer_scores_at(q_idx, k_idx, w_idx, indices)
    kl = kl_from_target(target, logits)
    valid = valid_queries(segment_ids)
    return (kl * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def lm_targets(tokens: jnp.ndarray, segment_ids: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Next-token targets and their weights: no target across a document boundary or into padding."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    next_seg = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    weights = ((segment_ids != 0) & (next_seg == segment_ids)).astype(jnp.float32)
    return targets, weights


def lm_cross_entropy(logits: jnp.ndarray, tokens: jnp.ndarray, segment_ids: jnp.ndarray,
                     loss_weights: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Shifted next-token cross-entropy. Returns (sum of losses, number of targets).

    `loss_weights` [B, S] optionally restricts the loss further (e.g. to answer tokens)."""
    targets, weights = weighted_lm_targets(tokens, segment_ids, loss_weights)
    return (token_nll(logits, targets) * weights).sum(), weights.sum()


def weighted_lm_targets(tokens: jnp.ndarray, segment_ids: jnp.ndarray,
                        loss_weights: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """:func:`lm_targets` with the batch's ``loss_weights`` [B, S] (if any) applied to the weights."""
    targets, weights = lm_targets(tokens, segment_ids)
    return targets, weights if loss_weights is None else weights * loss_weights


def token_nll(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """-log softmax(logits)[target] per token: logits [B, S, V], targets [B, S] -> [B, S] fp32."""
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]


def moe_sequence_balance_loss(scores: jnp.ndarray, expert_idx: jnp.ndarray, valid: jnp.ndarray,
                              alpha: float) -> jnp.ndarray:
    """Complementary sequence-wise balance loss, alpha * sum_i f_i P_i, averaged over sequences.

    scores [B, S, E] (sigmoid affinities), expert_idx [B, S, K] (chosen experts), valid [B, S]."""
    b, s, e = scores.shape
    k = expert_idx.shape[-1]
    n_tokens = jnp.maximum(valid.sum(-1), 1.0)  # [B]
    counts = (jax.nn.one_hot(expert_idx, e) * valid[..., None, None]).sum(axis=(1, 2))  # [B, E]
    f = counts * e / (k * n_tokens[:, None])
    normalized = scores / jnp.maximum(scores.sum(-1, keepdims=True), 1e-20)
    p = (normalized * valid[..., None]).sum(1) / n_tokens[:, None]
    return alpha * (f * p).sum(-1).mean()
