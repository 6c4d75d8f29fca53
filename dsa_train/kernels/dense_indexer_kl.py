"""Dense warm-up indexer KL with the target computed once per (query, key) pair, pure JAX.

Semantics = ``dsa_train.ops.losses.indexer_kl_loss``: KL(p_t || softmax(I_t)) over the causal,
same-document keys of each query t, p_t the head-mean of the main attention probabilities (a
stop-gradient target). Here the function returns the *sum* over valid queries (``weights`` > 0,
times the weight); the caller divides by the (global) count, so a context shard can run it on its
own queries and the shards' sums add up.

Per query t (p sums to one over the candidates; kept as psum for robustness):
  KL_t = sum_s p log p - sum_s p I_s + lse_I(t) psum_t,   dKL_t / dI_ts = psum_t softmax(I_t)_s - p_ts.

Two passes over the causal (query block, key block) tiles, neither stores anything of size S x T:
- pass A (forward): the target tile p from the main queries/keys and the given main-attention
  ``lse`` (taken from the attention pass), the indexer tile I, an online log-sum-exp of I and the
  three sums; when differentiated it also accumulates the target's part of the gradient,
  -sum_s p_ts dI_ts / d(q_idx, w_idx, k_idx) (dq, dw per query block, dk in a [B, T, Di] fp32
  carry), saved as O(S + T) residuals.
- pass B (backward): the indexer tile only (no target), its softmax with the saved lse_I, and the
  softmax's part psum_t sum_s softmax_ts dI_ts / d(...).
So the 128-head target is formed exactly once per pair; the indexer twice (pass B is its backward).

Main keys in either form: per head ([B, T, H, D], the MHA form: D = qk_head_dim = 192) or shared
([B, T, D], the MQA/absorbed form: D = kv_lora_rank + rope = 576, what context parallelism gathers).
Queries carry their row positions (``q_pos``), keys are the whole row in order (positions 0..T-1), so
a context shard's zig-zag queries run the same code. Key blocks past a query block's last position
are never visited (causal skipping).

Cost per visible (query, key) pair, H main heads of dim D, Hi indexer heads of dim Di
(:func:`pair_flops`; a multiply-add counts 2, elementwise work not counted):
  FLOPs: pass A: target 2 H D (+ H exp), indexer logits 2 Hi Di and score 2 Hi; with gradients
         also the target part's dq, dk (2 x 2 Hi Di) and dw (2 Hi); pass B: logits, score, dq, dk,
         dw again (6 Hi Di + 4 Hi). In all 2 H D + 12 Hi Di + 8 Hi.
  DeepSeek-V3.2 (H 128, D 192 per head, Hi 64, Di 128): 147,968 FLOPs per pair with gradients
  (49,152 of them the target); in the MQA form under context parallelism (D 576): 246,272. The
  Pallas form (``dense_indexer_kl_pallas``, the accelerators' path) has the same two passes.
  HBM bytes: each key block is read once per query block, each query block once per key block,
  so per pair (bytes per key) / block_q + (bytes per query) / block_k, with per key H D x 2 (bf16
  per-head main keys; 2 D shared) + Di x 2 (indexer key) in pass A and Di x 2 in pass B, and per
  query H D x 2 + H x 4 (lse) + Hi (Di x 2 + 4) in pass A, Hi (Di x 2 + 4) in pass B. At
  block_q = 64, per-head V3.2 keys cost 49,408 / 64 = 772 bytes per pair in pass A (the Pallas
  form's TPU tiles are larger).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsa_train.kernels import row_blocks as rb
from dsa_train.ops.losses import PASS_A_RESIDUALS

F32 = jnp.float32
NEG = -jnp.inf

BLOCKS = (64, 256)  # (block_q, block_k)


def pair_flops(n_heads: int, head_dim: int, n_idx_heads: int, idx_head_dim: int, grads: bool = True) -> int:
    """FLOPs per visible (query, key) pair of :func:`dense_kl_sum` (see the module docstring)."""
    forward = 2 * n_heads * head_dim + 2 * n_idx_heads * idx_head_dim + 2 * n_idx_heads
    if not grads:
        return forward
    return forward + 2 * 2 * n_idx_heads * idx_head_dim + 2 * n_idx_heads + 3 * 2 * n_idx_heads * idx_head_dim \
        + 4 * n_idx_heads


class _Blocks(NamedTuple):
    sm_scale: float
    block_q: int
    block_k: int


def _xlogy(p):
    return jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)


def _target_tile(q_b, k_b, lse_b, vis, sm_scale):
    """Head-mean main attention probabilities [B, bq, bk] (0 where invisible)."""
    spec = "bshd,bthd->bsht" if k_b.ndim == 4 else "bshd,btd->bsht"
    a = jnp.einsum(spec, q_b, k_b, preferred_element_type=F32) * sm_scale
    return jnp.exp(jnp.where(vis[:, :, None, :], a - lse_b[..., None], NEG)).mean(axis=2)


def _indexer_tile(qi_b, ki_b, w_b, vis):
    """Indexer logits z [B, bq, Hi, bk] and the masked score I [B, bq, bk] (-inf where invisible)."""
    z = jnp.einsum("bshd,btd->bsht", qi_b.astype(F32), ki_b.astype(F32)) * qi_b.shape[-1] ** -0.5
    score = jnp.einsum("bsh,bsht->bst", w_b.astype(F32), jax.nn.relu(z))
    return z, jnp.where(vis, score, NEG)


def _indexer_grads(coef, z, qi_b, ki_b, w_b):
    """Given c_ts = d(objective)/dI_ts [B, bq, bk]: dq [B, bq, Hi, Di], dw [B, bq, Hi], dk [B, bk, Di]."""
    scale = qi_b.shape[-1] ** -0.5
    dz = coef[:, :, None, :] * w_b.astype(F32)[..., None] * (z > 0)
    dq = jnp.einsum("bsht,btd->bshd", dz, ki_b.astype(F32)) * scale
    dk = jnp.einsum("bsht,bshd->btd", dz, qi_b.astype(F32)) * scale
    dw = jnp.einsum("bst,bsht->bsh", coef, jax.nn.relu(z))
    return dq, dw, dk


def _pass_a(cfg: _Blocks, grads: bool, q, k, lse, q_idx, k_idx, w_idx, weights, q_pos, q_seg, k_seg):
    """-> (KL_t, lse_I(t), psum_t) [B, S] each, and with ``grads`` the target part of the gradient of
    sum_t weights_t KL_t: (dq [B, S, Hi, Di], dw [B, S, Hi], dk [B, T, Di]), all fp32."""
    b, s = q_seg.shape
    t = k_seg.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    lay = rb.layout(cfg.block_q, cfg.block_k, q_pos, q_seg, k_seg)
    lq, lk = lay.n_q * bq, lay.n_k * bk
    q_p, lse_p, qi_p, w_p, wt_p = (rb.pad_rows(x, lq) for x in (q, lse, q_idx, w_idx, weights))
    k_p, ki_p = rb.pad_rows(k, lk), rb.pad_rows(k_idx, lk)
    hi, di = q_idx.shape[2], q_idx.shape[3]

    def per_query_block(dk, qb):
        q_b, lse_b, qi_b, w_b, wt_b, seg_b = (rb.block(x, qb * bq, bq)
                                              for x in (q_p, lse_p, qi_p, w_p, wt_p, lay.q_seg))
        pos_b = jax.lax.dynamic_slice_in_dim(lay.q_pos, qb * bq, bq)

        def body(kj, carry):
            (m, l, plogp, p_dot_i, psum), (dq, dw, dk) = carry
            ks = kj * bk
            vis = rb.visible(lay, pos_b, seg_b, ks, bk)
            ki_b = rb.block(ki_p, ks, bk)
            p = _target_tile(q_b, rb.block(k_p, ks, bk), lse_b, vis, cfg.sm_scale)
            z, score = _indexer_tile(qi_b, ki_b, w_b, vis)
            m_new = jnp.maximum(m, score.max(-1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            l = l * jnp.exp(m - m_safe) + jnp.exp(score - m_safe[..., None]).sum(-1)
            stats = (m_new, l, plogp + _xlogy(p).sum(-1), p_dot_i + jnp.where(p > 0, p * score, 0.0).sum(-1),
                     psum + p.sum(-1))
            if grads:
                gq, gw, gk = _indexer_grads(-p * wt_b[..., None], z, qi_b, ki_b, w_b)
                dk = jax.lax.dynamic_update_slice_in_dim(dk, rb.block(dk, ks, bk) + gk, ks, 1)
                return stats, (dq + gq, dw + gw, dk)
            return stats, (dq, dw, dk)

        zeros = jnp.zeros((b, bq), F32)
        init = ((jnp.full((b, bq), NEG, F32), zeros, zeros, zeros, zeros),
                (jnp.zeros((b, bq, hi, di) if grads else (), F32), jnp.zeros((b, bq, hi) if grads else (), F32), dk))
        (m, l, plogp, p_dot_i, psum), (dq, dw, dk) = jax.lax.fori_loop(
            0, rb.visible_key_blocks(lay, pos_b, bk), body, init)
        lse_i = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)
        return dk, ((plogp - p_dot_i + lse_i * psum, lse_i, psum), (dq, dw))

    dk0 = jnp.zeros((b, lk, di) if grads else (), F32)
    dk, (stats, (dq, dw)) = jax.lax.scan(per_query_block, dk0, jnp.arange(lay.n_q))
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, lq, *x.shape[3:])[:, :s]  # noqa: E731
    stats = tuple(unblock(x) for x in stats)
    if not grads:
        return stats, None
    return stats, (unblock(dq), unblock(dw), dk[:, :t])


def _pass_b(cfg: _Blocks, q_idx, k_idx, w_idx, coef_q, lse_i, q_pos, q_seg, k_seg):
    """The softmax part of the gradient: sum_t coef_t sum_s softmax(I_t)_s dI_ts / d(q_idx, w_idx, k_idx),
    recomputing only the indexer tiles (coef_t = weights_t psum_t)."""
    b, s = q_seg.shape
    t = k_seg.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    lay = rb.layout(cfg.block_q, cfg.block_k, q_pos, q_seg, k_seg)
    lq, lk = lay.n_q * bq, lay.n_k * bk
    qi_p, w_p, c_p, lse_p = (rb.pad_rows(x, lq) for x in (q_idx, w_idx, coef_q, lse_i))
    ki_p = rb.pad_rows(k_idx, lk)
    hi, di = q_idx.shape[2], q_idx.shape[3]

    def per_query_block(dk, qb):
        qi_b, w_b, c_b, lse_b, seg_b = (rb.block(x, qb * bq, bq) for x in (qi_p, w_p, c_p, lse_p, lay.q_seg))
        pos_b = jax.lax.dynamic_slice_in_dim(lay.q_pos, qb * bq, bq)

        def body(kj, carry):
            dq, dw, dk = carry
            ks = kj * bk
            vis = rb.visible(lay, pos_b, seg_b, ks, bk)
            ki_b = rb.block(ki_p, ks, bk)
            z, score = _indexer_tile(qi_b, ki_b, w_b, vis)
            soft = jnp.where(vis, jnp.exp(score - lse_b[..., None]), 0.0)
            gq, gw, gk = _indexer_grads(soft * c_b[..., None], z, qi_b, ki_b, w_b)
            return dq + gq, dw + gw, jax.lax.dynamic_update_slice_in_dim(dk, rb.block(dk, ks, bk) + gk, ks, 1)

        init = (jnp.zeros((b, bq, hi, di), F32), jnp.zeros((b, bq, hi), F32), dk)
        dq, dw, dk = jax.lax.fori_loop(0, rb.visible_key_blocks(lay, pos_b, bk), body, init)
        return dk, (dq, dw)

    dk, (dq, dw) = jax.lax.scan(per_query_block, jnp.zeros((b, lk, di), F32), jnp.arange(lay.n_q))
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, lq, *x.shape[3:])[:, :s]  # noqa: E731
    return unblock(dq), unblock(dw), dk[:, :t]


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kl_sum(cfg, q_idx, k_idx, w_idx, q, k, lse, weights, q_pos, q_seg, k_seg):
    (kl, _, _), _ = _pass_a(cfg, False, q, k, lse, q_idx, k_idx, w_idx, weights, q_pos, q_seg, k_seg)
    return (kl * weights).sum()


def _kl_sum_fwd(cfg, q_idx, k_idx, w_idx, q, k, lse, weights, q_pos, q_seg, k_seg):
    (kl, lse_i, psum), target_part = _pass_a(cfg, True, q, k, lse, q_idx, k_idx, w_idx, weights, q_pos, q_seg,
                                             k_seg)
    lse_i, psum, target_part = checkpoint_name((lse_i, psum, target_part), PASS_A_RESIDUALS)
    res = (q_idx, k_idx, w_idx, weights, q_pos, q_seg, k_seg, lse_i, psum, target_part)
    return (kl * weights).sum(), res


def _kl_sum_bwd(cfg, res, ct):
    q_idx, k_idx, w_idx, weights, q_pos, q_seg, k_seg, lse_i, psum, (dq_a, dw_a, dk_a) = res
    dq_b, dw_b, dk_b = _pass_b(cfg, q_idx, k_idx, w_idx, weights * psum, lse_i, q_pos, q_seg, k_seg)
    dq, dw, dk = ((a + b_) * ct for a, b_ in ((dq_a, dq_b), (dw_a, dw_b), (dk_a, dk_b)))
    return (dq.astype(q_idx.dtype), dk.astype(k_idx.dtype), dw.astype(w_idx.dtype),
            None, None, None, None, None, None, None)


_kl_sum.defvjp(_kl_sum_fwd, _kl_sum_bwd)


def _fit_blocks(s: int, t: int, block_q: int, block_k: int) -> tuple[int, int]:
    """Shrink blocks for short sequences (keeps tests and tiny models cheap)."""
    cap = lambda n: max(8, 1 << (max(n, 1) - 1).bit_length())  # noqa: E731
    return min(block_q, cap(s)), min(block_k, cap(t))


def dense_kl_sum(q, k, lse, q_idx, k_idx, w_idx, weights, q_pos, q_seg, k_seg, *, sm_scale: float,
                 block_q: int = BLOCKS[0], block_k: int = BLOCKS[1]):
    """sum_t weights_t KL_t over the queries given, differentiable in (q_idx, k_idx, w_idx) only.

    q [B, S, H, D]; k [B, T, H, D] (per head) or [B, T, D] (shared); lse [B, S, H] the main
    attention's log-sum-exp in the same form; q_idx [B, S, Hi, Di], k_idx [B, T, Di], w_idx [B, S, Hi];
    weights [B, S] (e.g. valid queries); q_pos [S] the queries' row positions; q_seg [B, S] and
    k_seg [B, T] segment ids (keys sit at positions 0..T-1)."""
    if k.ndim not in (3, 4) or k.shape[1] != k_idx.shape[1] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"dense KL: keys must be [B, T, (H,) D] matching q {q.shape} and k_idx {k_idx.shape}; "
                         f"got {k.shape}")
    block_q, block_k = _fit_blocks(q.shape[1], k.shape[1], block_q, block_k)
    sg = jax.lax.stop_gradient
    cfg = _Blocks(float(sm_scale), block_q, block_k)
    return _kl_sum(cfg, q_idx, k_idx, w_idx, sg(q), sg(k), sg(lse).astype(F32), sg(weights).astype(F32),
                   jnp.asarray(q_pos, jnp.int32), q_seg, k_seg)
