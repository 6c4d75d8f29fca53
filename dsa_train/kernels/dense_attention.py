"""Flash dense attention (causal, packed documents, queries at any row positions), pure JAX.

Same contract as ``dsa_train.ops.attention.dense_attention`` (the reference): out [B, S, H, Dv] in
q's dtype and the per-head log-sum-exp [B, S, H] fp32, which the dense indexer KL reuses. Here:
- queries carry their row positions (``q_pos`` [S]) and keys are the whole row in order, so a
  context shard's local (contiguous or zig-zag) queries run the same code as one device;
- per query block, an online softmax over the key blocks [B, bq, H, bk] (fp32 tiles), never the
  [S, T] scores; key blocks past the query block's last position are not visited (causal skip);
- keys/values per head ([B, T, H, D], the MHA form) or shared by all heads ([B, T, D], the MQA /
  absorbed form of MLA, with ``v`` then [B, T, Dv] too);
- a flash backward (custom_vjp, residuals q, k, v, out, lse): per query block it recomputes the
  probabilities of its visible key blocks and accumulates dq, dk, dv; dk/dv are [B, T, ...] fp32
  carries. It is built only where something differentiates the attention (the dense stage); the
  warm-up's frozen forward never does.

Rows with no visible key (padded queries) give zeros and lse = -inf-like (NEG_INF).

FLOPs per visible (query, key) pair: 2 H (Dk + Dv) forward; backward 2 H (2 Dk + 2 Dv) + 2 H Dk
recomputation. HBM bytes per pair: keys/values read once per query block, (H (Dk + Dv) x 2) / bq
(bf16, per-head) or (Dk + Dv) x 2 / bq (shared).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsa_train.kernels import row_blocks as rb

F32 = jnp.float32
NEG_INF = -1e30
BLOCKS = (128, 256)  # (block_q, block_k)


class Cfg(NamedTuple):
    sm_scale: float
    block_q: int
    block_k: int


def _specs(shared: bool):
    """einsum specs for (scores, p @ v, ds @ k, ds^T @ q, p^T @ do)."""
    k = "btd" if shared else "bthd"
    return (f"bshd,{k}->bsht", f"bsht,{k}->bshd", f"bsht,{k}->bshd", f"bsht,bshd->{k}", f"bsht,bshd->{k}")


def _forward(cfg: Cfg, q, k, v, q_pos, q_seg, k_seg):
    b, s, h, _ = q.shape
    shared = k.ndim == 3
    s_qk, s_pv = _specs(shared)[:2]
    bq, bk = cfg.block_q, cfg.block_k
    pad = rb.layout(cfg.block_q, cfg.block_k, q_pos, q_seg, k_seg)
    q_p, k_p, v_p = rb.pad_rows(q, pad.n_q * bq), rb.pad_rows(k, pad.n_k * bk), rb.pad_rows(v, pad.n_k * bk)
    dv = v.shape[-1]

    def per_query_block(qb):
        q_b, seg_b = rb.block(q_p, qb * bq, bq), rb.block(pad.q_seg, qb * bq, bq)
        pos_b = jax.lax.dynamic_slice_in_dim(pad.q_pos, qb * bq, bq)

        def body(kj, carry):
            m, l, acc = carry
            ks = kj * bk
            vis = rb.visible(pad, pos_b, seg_b, ks, bk)[:, :, None, :]
            scores = jnp.einsum(s_qk, q_b, rb.block(k_p, ks, bk), preferred_element_type=F32) * cfg.sm_scale
            scores = jnp.where(vis, scores, NEG_INF)
            m_new = jnp.maximum(m, scores.max(-1))
            p = jnp.where(vis, jnp.exp(scores - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            acc = acc * alpha[..., None] + jnp.einsum(s_pv, p.astype(v.dtype), rb.block(v_p, ks, bk),
                                                      preferred_element_type=F32)
            return m_new, l * alpha + p.sum(-1), acc

        init = (jnp.full((b, bq, h), NEG_INF, F32), jnp.zeros((b, bq, h), F32), jnp.zeros((b, bq, h, dv), F32))
        m, l, acc = jax.lax.fori_loop(0, rb.visible_key_blocks(pad, pos_b, bk), body, init)
        safe = jnp.where(l > 0, l, 1.0)
        return (acc / safe[..., None]).astype(q.dtype), jnp.where(l > 0, m + jnp.log(safe), NEG_INF)

    out, lse = jax.lax.map(per_query_block, jnp.arange(pad.n_q))
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, pad.n_q * bq, *x.shape[3:])[:, :s]  # noqa: E731
    return unblock(out), unblock(lse)


def backward(cfg: Cfg, q, k, v, out, lse, d_out, q_pos, q_seg, k_seg):
    b, s, h, _ = q.shape
    t = k.shape[1]
    shared = k.ndim == 3
    s_qk, _, s_dq, s_dk, s_dv = _specs(shared)
    bq, bk = cfg.block_q, cfg.block_k
    pad = rb.layout(cfg.block_q, cfg.block_k, q_pos, q_seg, k_seg)
    lq, lk = pad.n_q * bq, pad.n_k * bk
    delta = (d_out.astype(F32) * out.astype(F32)).sum(-1)  # [B, S, H]
    q_p, lse_p, do_p, delta_p = (rb.pad_rows(x, lq) for x in (q, lse, d_out, delta))
    k_p, v_p = rb.pad_rows(k, lk), rb.pad_rows(v, lk)
    v_spec = "bshd,btd->bsht" if shared else "bshd,bthd->bsht"

    def per_query_block(carry, qb):
        dk, dv = carry
        q_b, lse_b, do_b, delta_b, seg_b = (rb.block(x, qb * bq, bq) for x in (q_p, lse_p, do_p, delta_p, pad.q_seg))
        pos_b = jax.lax.dynamic_slice_in_dim(pad.q_pos, qb * bq, bq)

        def body(kj, carry):
            dq, dk, dv = carry
            ks = kj * bk
            k_b, v_b = rb.block(k_p, ks, bk), rb.block(v_p, ks, bk)
            vis = rb.visible(pad, pos_b, seg_b, ks, bk)[:, :, None, :]
            scores = jnp.einsum(s_qk, q_b, k_b, preferred_element_type=F32) * cfg.sm_scale
            p = jnp.where(vis, jnp.exp(scores - lse_b[..., None]), 0.0)
            dp = jnp.einsum(v_spec, do_b, v_b, preferred_element_type=F32)
            ds = p * (dp - delta_b[..., None]) * cfg.sm_scale
            dq = dq + jnp.einsum(s_dq, ds, k_b.astype(F32))
            dk_t = jnp.einsum(s_dk, ds, q_b.astype(F32))
            dv_t = jnp.einsum(s_dv, p, do_b.astype(F32))
            dk = jax.lax.dynamic_update_slice_in_dim(dk, rb.block(dk, ks, bk) + dk_t, ks, 1)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, rb.block(dv, ks, bk) + dv_t, ks, 1)
            return dq, dk, dv

        dq, dk, dv = jax.lax.fori_loop(0, rb.visible_key_blocks(pad, pos_b, bk), body,
                                       (jnp.zeros(q_b.shape, F32), dk, dv))
        return (dk, dv), dq

    (dk, dv), dq = jax.lax.scan(per_query_block, (jnp.zeros(k_p.shape, F32), jnp.zeros(v_p.shape, F32)),
                                jnp.arange(pad.n_q))
    dq = jnp.moveaxis(dq, 0, 1).reshape(b, lq, *q.shape[2:])[:, :s]
    return dq.astype(q.dtype), dk[:, :t].astype(k.dtype), dv[:, :t].astype(v.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, q_pos, q_seg, k_seg):
    return _forward(cfg, q, k, v, q_pos, q_seg, k_seg)


def _attention_fwd(cfg, q, k, v, q_pos, q_seg, k_seg):
    out, lse = _forward(cfg, q, k, v, q_pos, q_seg, k_seg)
    return (out, lse), (q, k, v, out, lse, q_pos, q_seg, k_seg)


def _attention_bwd(cfg, res, cts):
    q, k, v, out, lse, q_pos, q_seg, k_seg = res
    d_out, _ = cts  # the lse output only feeds stop-gradient consumers (the indexer KL target)
    dq, dk, dv = backward(cfg, q, k, v, out, lse, d_out, q_pos, q_seg, k_seg)
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def fit(n: int, block: int) -> int:
    return min(block, max(8, 1 << (max(n, 1) - 1).bit_length()))


def flash_attention(q, k, v, q_pos, q_seg, k_seg, sm_scale: float, *, block_q: int = BLOCKS[0],
                    block_k: int = BLOCKS[1]):
    """q [B, S, H, Dk] at row positions q_pos [S]; k [B, T, H, Dk] / v [B, T, H, Dv] (per head) or
    k [B, T, Dk] / v [B, T, Dv] (shared) at positions 0..T-1; q_seg [B, S], k_seg [B, T] segment ids
    -> out [B, S, H, Dv], lse [B, S, H] fp32. The gradient of lse is not propagated (its consumers
    stop gradients)."""
    if k.ndim != v.ndim or k.ndim not in (3, 4) or k.shape[1] != v.shape[1] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"flash_attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit")
    cfg = Cfg(float(sm_scale), fit(q.shape[1], block_q), fit(k.shape[1], block_k))
    return _attention(cfg, q, k, v, jnp.asarray(q_pos, jnp.int32), q_seg, k_seg)


def dense_attention_flash(q, k, v, segment_ids, sm_scale: float, **blocks):
    """``ops.attention.dense_attention``'s contract (self-attention over one row)."""
    return flash_attention(q, k, v, jnp.arange(q.shape[1]), segment_ids, segment_ids, sm_scale, **blocks)
