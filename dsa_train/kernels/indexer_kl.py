"""Indexer KL losses without an L x L buffer (dense warm-up) or more than O(S K) (sparse stage).

Semantics = `dsa_train.ops.losses.indexer_kl_loss` / `sparse_indexer_kl_loss`: mean over valid
queries (segment id != 0) of KL(p_t || softmax(I_t)), p_t the head-mean of the main attention
probabilities (a stop-gradient target), over the causal same-document keys (dense) or over the
selected keys (sparse). Gradients reach only the indexer inputs q_idx, k_idx, w_idx; q, kv, lse get
zero cotangents.

Dense warm-up: the target formed once per (query, key) pair from the main attention's lse, fused
with the indexer softmax; its gradient's target part accumulated in the same pass, the softmax part
in an indexer-only backward pass (FLOPs and bytes per pair in those modules). "streaming" (also
"blocked") runs the pure-JAX form (`dense_indexer_kl`); "pallas" its Pallas form
(`dense_indexer_kl_pallas`), Triton on GPU and Mosaic on TPU, chosen per lowering platform;
"pallas_gpu" / "pallas_tpu" force a variant; "..._interpret" run them in the Pallas interpreter
(CPU tests). Keys per head or in the MQA form, for either. `attention_lse_streaming` streams the
main attention's per-head log-sum-exp when the caller has none.

Sparse stage: "streaming" / "blocked": per query block, gather the selected main keys and indexer
keys (O(bq K D)), form the target from the sparse attention's own lse, and save dKL/dI [B, S, K]
(O(S K)) for the backward, which recomputes the indexer logits at the selected keys and
scatter-adds dk. The Pallas names run the Pallas kernels, Triton on GPU
(`sparse_indexer_kl_gpu`, the target from `sparse_attention_gpu.sparse_mla_head_summed_probs_gpu`)
and Mosaic on TPU (`sparse_indexer_kl_tpu`), chosen per lowering platform for "pallas": the target
p [B, S, K] once (the only pass over the 576-dim main keys), the forward statistics (KL_t, lse_I,
psum), and a backward that recomputes the indexer logits and reads p, lse_I and psum (saved:
O(S K)); FLOPs, bytes and the dk scheme in those modules.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsa_train.kernels import dense_indexer_kl, dense_indexer_kl_pallas, sparse_attention_gpu
from dsa_train.kernels import indexer_tiles as tiles
from dsa_train.kernels import sparse_indexer_kl_gpu as sparse_kl_gpu
from dsa_train.kernels import sparse_indexer_kl_tpu as sparse_kl_tpu

F32 = jnp.float32
NEG = -jnp.inf

STREAMING_BLOCKS = (64, 256)  # (block_q, block_k) of the pure-JAX loops
SPARSE_BLOCK_Q = 16


# ---- small numerics ---------------------------------------------------------------------------------

def _xlogy(p):
    return jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)


def _online_lse(m, l, x, axis: int):
    """One step of a streaming log-sum-exp over `axis` of x (-inf = excluded)."""
    m_new = jnp.maximum(m, x.max(axis))
    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    l_new = l * jnp.exp(m - m_safe) + jnp.exp(x - jnp.expand_dims(m_safe, axis)).sum(axis)
    return m_new, l_new


def _padded_length(s: int, block_q: int, block_k: int) -> int:
    big, small = max(block_q, block_k), min(block_q, block_k)
    if big % small:
        raise ValueError(f"block sizes must divide each other, got {block_q} and {block_k}")
    return tiles.round_up(s, big)


def _blocks_for(s: int, block_q: int, block_k: int) -> tuple[int, int]:
    """Shrink blocks for short sequences (keeps tests and tiny models cheap)."""
    cap = max(16, 1 << (max(s, 1) - 1).bit_length())
    return min(block_q, cap), min(block_k, cap)


def _weighted_mean(kl, segment_ids):
    valid = (segment_ids != 0).astype(F32)
    return (kl * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def _query_weights(ct, segment_ids):
    """d loss / d KL_t = valid_t / n_valid, times the incoming cotangent."""
    valid = (segment_ids != 0).astype(F32)
    return ct * valid / jnp.maximum(valid.sum(), 1.0)


class _Padded(NamedTuple):
    length: int
    pos: jnp.ndarray  # [B, L]
    seg: jnp.ndarray  # [B, L]


def _pad_all(length, segment_ids, *arrays):
    pos, seg = tiles.padded_positions_segments(segment_ids, length)
    return _Padded(length, pos, seg), [tiles.pad_to(x, 1, length) for x in arrays]


def _sl(x, start, size):
    return jax.lax.dynamic_slice_in_dim(x, start, size, 1)


# ---- pass 1: streaming log-sum-exp of the main attention --------------------------------------------

def _target_logits(q_b, kv_b, sm_scale):
    spec = "bshd,bthd->bsht" if kv_b.ndim == 4 else "bshd,btd->bsht"
    return jnp.einsum(spec, q_b, kv_b, preferred_element_type=F32) * sm_scale


def attention_lse_streaming(q, kv, sm_scale: float, segment_ids, block_q: int = STREAMING_BLOCKS[0],
                            block_k: int = STREAMING_BLOCKS[1]) -> jnp.ndarray:
    """Per-head log-sum-exp of the causal, document-masked attention: [B, S, H] fp32; kv [B, T, D]
    (MQA form) or [B, T, H, D] (per-head form)."""
    b, s, h, _ = q.shape
    block_q, block_k = _blocks_for(s, block_q, block_k)
    length = _padded_length(s, block_q, block_k)
    pad, (q_p, kv_p) = _pad_all(length, segment_ids, q, kv)
    n_k = length // block_k

    def per_query_block(qi):
        q_b, qpos, qseg = (_sl(x, qi * block_q, block_q) for x in (q_p, pad.pos, pad.seg))

        def body(kj, carry):
            ks = kj * block_k
            vis = tiles.visible(qpos, qseg, _sl(pad.pos, ks, block_k), _sl(pad.seg, ks, block_k))
            a = jnp.where(vis[:, :, None, :], _target_logits(q_b, _sl(kv_p, ks, block_k), sm_scale), NEG)
            return _online_lse(*carry, a, axis=3)

        init = (jnp.full((b, block_q, h), NEG, F32), jnp.zeros((b, block_q, h), F32))
        m, l = jax.lax.fori_loop(0, tiles.causal_key_blocks(qi, block_q, block_k, n_k), body, init)
        return m + jnp.log(l)

    lse = jax.lax.map(per_query_block, jnp.arange(length // block_q))  # [nq, B, bq, H]
    return jnp.moveaxis(lse, 0, 1).reshape(b, length, h)[:, :s]


# ---- the dense loss ---------------------------------------------------------------------------------

def dense_indexer_kl_loss(q, kv, sm_scale, q_idx, k_idx, w_idx, segment_ids, lse=None, *,
                          impl: str = "streaming", block_q: int = STREAMING_BLOCKS[0],
                          block_k: int = STREAMING_BLOCKS[1]):
    """Dense warm-up KL without an S x T buffer. kv [B, T, D] (MQA form) or [B, T, H, D] (per-head
    form, q the matching per-head queries). `lse` [B, S, H]: the main attention's per-head
    log-sum-exp if already known (else streamed first). `impl` (see `indexer_tiles.IMPLS`):
    "streaming" runs the pure-JAX one-pass kernel (`dense_indexer_kl`, tiles block_q x block_k), a
    Pallas impl its Pallas form (`dense_indexer_kl_pallas`, tiles per variant)."""
    chosen = tiles.resolve(impl)
    tiles.check_self_attention(q.shape[1], kv.shape[1])
    block_q, block_k = _blocks_for(q.shape[1], block_q, block_k)
    sg = jax.lax.stop_gradient
    q, kv = sg(q), sg(kv)
    if lse is None:
        lse = attention_lse_streaming(q, kv, sm_scale, segment_ids, block_q, block_k)
    valid = (segment_ids != 0).astype(F32)
    args = (q, kv, sg(lse).astype(F32), q_idx, k_idx, w_idx, valid, jnp.arange(q.shape[1]), segment_ids, segment_ids)
    if chosen.kind == "pallas":
        total = dense_indexer_kl_pallas.dense_kl_sum_pallas(*args, sm_scale=sm_scale, variant=chosen.variant,
                                                            interpret=chosen.interpret)
    else:
        total = dense_indexer_kl.dense_kl_sum(*args, sm_scale=sm_scale, block_q=block_q, block_k=block_k)
    return total / jnp.maximum(valid.sum(), 1.0)


# ---- sparse stage -----------------------------------------------------------------------------------

def _gather(x, idx):
    """x [B, T, D], idx [B, bq, K] (-1 allowed) -> [B, bq, K, D]."""
    return jax.vmap(lambda xb, ib: xb[jnp.maximum(ib, 0)])(x, idx)


def _sparse_indexer_logits(qi_b, ki_sel, w_b, sel):
    z = jnp.einsum("bshd,bskd->bshk", qi_b.astype(F32), ki_sel.astype(F32)) * qi_b.shape[-1] ** -0.5
    score = jnp.einsum("bsh,bshk->bsk", w_b.astype(F32), jax.nn.relu(z))
    return z, jnp.where(sel, score, NEG)


class _SparseConfig(NamedTuple):
    sm_scale: float
    block_q: int


def _sparse_forward(cfg, q_idx, k_idx, w_idx, q, kv, indices, lse):
    """-> KL_t [B, S] and dKL_t/dI [B, S, K] (zero at unused slots)."""
    b, s = indices.shape[:2]
    bq = cfg.block_q
    length = tiles.round_up(s, bq)
    q_p, qi_p, w_p, lse_p = (tiles.pad_to(x, 1, length) for x in (q, q_idx, w_idx, lse))
    idx_p = tiles.pad_to(indices, 1, length, -1)

    def per_query_block(qb):
        q_b, qi_b, w_b, lse_b, idx_b = (_sl(x, qb * bq, bq) for x in (q_p, qi_p, w_p, lse_p, idx_p))
        sel = idx_b >= 0
        a = jnp.einsum("bshd,bskd->bshk", q_b, _gather(kv, idx_b), preferred_element_type=F32) * cfg.sm_scale
        p = jnp.where(sel, jnp.exp(a - lse_b[..., None]).mean(axis=2), 0.0)
        _, score = _sparse_indexer_logits(qi_b, _gather(k_idx, idx_b), w_b, sel)
        m = score.max(-1, keepdims=True)
        e = jnp.exp(score - jnp.where(jnp.isneginf(m), 0.0, m))
        l = e.sum(-1, keepdims=True)
        lse_i = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)
        psum = p.sum(-1)
        kl = _xlogy(p).sum(-1) - jnp.where(p > 0, p * score, 0.0).sum(-1) + lse_i[..., 0] * psum
        soft = jnp.where(l > 0, e / jnp.where(l > 0, l, 1.0), 0.0)
        return kl, psum[..., None] * soft - p

    kl, d_score = jax.lax.map(per_query_block, jnp.arange(length // bq))
    kl = jnp.moveaxis(kl, 0, 1).reshape(b, length)[:, :s]
    d_score = jnp.moveaxis(d_score, 0, 1).reshape(b, length, -1)[:, :s]
    return kl, d_score


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_kl(cfg, q_idx, k_idx, w_idx, q, kv, indices, lse, segment_ids):
    kl, _ = _sparse_forward(cfg, q_idx, k_idx, w_idx, q, kv, indices, lse)
    return _weighted_mean(kl, segment_ids)


def _sparse_kl_fwd(cfg, q_idx, k_idx, w_idx, q, kv, indices, lse, segment_ids):
    kl, d_score = _sparse_forward(cfg, q_idx, k_idx, w_idx, q, kv, indices, lse)
    return _weighted_mean(kl, segment_ids), (q_idx, k_idx, w_idx, q, kv, indices, lse, segment_ids, d_score)


def _sparse_kl_bwd(cfg, res, ct):
    q_idx, k_idx, w_idx, q, kv, indices, lse, segment_ids, d_score = res
    b, s = indices.shape[:2]
    bq = cfg.block_q
    length = tiles.round_up(s, bq)
    scale = q_idx.shape[-1] ** -0.5
    g = _query_weights(ct, segment_ids)
    qi_p, w_p, g_p = (tiles.pad_to(x, 1, length) for x in (q_idx, w_idx, g))
    idx_p, ds_p = tiles.pad_to(indices, 1, length, -1), tiles.pad_to(d_score, 1, length)
    batch = jnp.arange(b)[:, None, None]

    def per_query_block(dk, qb):
        qi_b, w_b, g_b, idx_b, ds_b = (_sl(x, qb * bq, bq) for x in (qi_p, w_p, g_p, idx_p, ds_p))
        sel = idx_b >= 0
        ki_sel = _gather(k_idx, idx_b).astype(F32)
        z, _ = _sparse_indexer_logits(qi_b, ki_sel, w_b, sel)
        d_s = jnp.where(sel, g_b[..., None] * ds_b, 0.0)  # [B, bq, K]
        dz = d_s[:, :, None, :] * w_b.astype(F32)[..., None] * (z > 0)  # [B, bq, Hi, K]
        dq = jnp.einsum("bshk,bskd->bshd", dz, ki_sel) * scale
        dw = jnp.einsum("bsk,bshk->bsh", d_s, jax.nn.relu(z))
        dk_sel = jnp.einsum("bshk,bshd->bskd", dz, qi_b.astype(F32)) * scale
        dk = dk.at[batch, jnp.maximum(idx_b, 0)].add(dk_sel)  # unused slots add zeros to key 0
        return dk, (dq, dw)

    dk, (dq, dw) = jax.lax.scan(per_query_block, jnp.zeros(k_idx.shape, F32), jnp.arange(length // bq))
    dq = jnp.moveaxis(dq, 0, 1).reshape(b, length, *q_idx.shape[2:])[:, :s]
    dw = jnp.moveaxis(dw, 0, 1).reshape(b, length, w_idx.shape[-1])[:, :s]
    return dq.astype(q_idx.dtype), dk.astype(k_idx.dtype), dw.astype(w_idx.dtype), None, None, None, None, None


_sparse_kl.defvjp(_sparse_kl_fwd, _sparse_kl_bwd)


def sparse_indexer_kl_loss_streaming(q, kv, indices, lse, sm_scale, q_idx, k_idx, w_idx, segment_ids,
                                     block_q: int = SPARSE_BLOCK_Q):
    """KL over the selected keys with O(S K) memory; `lse` [B, S, H] is the sparse attention's own.

    Keys are only read at `indices`, so kv / k_idx may hold more keys than there are queries (a
    context shard's local queries against the gathered keys)."""
    if kv.shape[1] != k_idx.shape[1]:
        raise ValueError(f"kv and k_idx need the same keys, got {kv.shape[1]} and {k_idx.shape[1]}")
    sg = jax.lax.stop_gradient
    cfg = _SparseConfig(float(sm_scale), min(block_q, max(1, q.shape[1])))
    return _sparse_kl(cfg, q_idx, k_idx, w_idx, sg(q), sg(kv), indices, sg(lse).astype(F32), segment_ids)


# ---- sparse stage, Pallas -----------------------------------------------------------------------------

class _SparsePallasConfig(NamedTuple):
    sm_scale: float
    impl: tiles.Impl


def _sparse_by_variant(impl: tiles.Impl, gpu_fn, tpu_fn, *args):
    """Run a kernel as the resolved variant, or per lowering platform (Triton on CUDA/ROCm, Mosaic
    on TPU, the Triton kernels interpreted elsewhere) when none is forced."""
    if impl.variant == "tpu":
        return tpu_fn(*args, interpret=impl.interpret)
    if impl.variant == "triton" or impl.interpret:
        return gpu_fn(*args, interpret=impl.interpret)
    return tiles.pallas_platform_dispatch(partial(gpu_fn, interpret=False), partial(tpu_fn, interpret=False),
                                          partial(gpu_fn, interpret=True), *args)


def _head_mean_probs_gpu(q, kv, indices, lse, *, sm_scale: float, interpret: bool):
    d = q.shape[-1]
    # The Triton kernel splits D into two power-of-two parts (576 = 512 + 64); any split is exact.
    split = 1 << (d.bit_length() - 1)
    probs = sparse_attention_gpu.sparse_mla_head_summed_probs_gpu(q, kv, indices, lse, sm_scale, split,
                                                                  interpret=interpret)
    return probs * (1.0 / q.shape[2])


def _sparse_pallas_forward(cfg: _SparsePallasConfig, q_idx, k_idx, w_idx, q, kv, indices, lse, segment_ids):
    p = _sparse_by_variant(cfg.impl, partial(_head_mean_probs_gpu, sm_scale=cfg.sm_scale),
                           partial(sparse_kl_tpu.head_mean_probs_tpu, sm_scale=cfg.sm_scale), q, kv, indices, lse)
    kl, lse_i, psum = _sparse_by_variant(cfg.impl, sparse_kl_gpu.sparse_kl_stats_gpu, sparse_kl_tpu.sparse_kl_stats_tpu,
                                         q_idx, k_idx, w_idx, indices, p)
    return _weighted_mean(kl, segment_ids), (q_idx, k_idx, w_idx, indices, p, lse_i, psum, segment_ids)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_kl_pallas(cfg, q_idx, k_idx, w_idx, q, kv, indices, lse, segment_ids):
    return _sparse_pallas_forward(cfg, q_idx, k_idx, w_idx, q, kv, indices, lse, segment_ids)[0]


def _sparse_kl_pallas_bwd(cfg, res, ct):
    q_idx, k_idx, w_idx, indices, p, lse_i, psum, segment_ids = res
    dq, dk, dw = _sparse_by_variant(cfg.impl, sparse_kl_gpu.sparse_kl_grads_gpu, sparse_kl_tpu.sparse_kl_grads_tpu,
                                    q_idx, k_idx, w_idx, indices, p, lse_i, psum, _query_weights(ct, segment_ids))
    return dq, dk, dw, None, None, None, None, None  # None: zero cotangents for the main model's inputs


_sparse_kl_pallas.defvjp(_sparse_pallas_forward, _sparse_kl_pallas_bwd)


def sparse_indexer_kl_loss_pallas(q, kv, indices, lse, sm_scale, q_idx, k_idx, w_idx, segment_ids, *,
                                  impl: str = "pallas"):
    """The sparse-stage KL through the Pallas kernels (`sparse_indexer_kl_gpu` / `_tpu`); `impl` a
    Pallas name of `indexer_tiles.IMPLS`. Keys are only read at `indices` (T may exceed S)."""
    chosen = tiles.resolve(impl)
    if chosen.kind != "pallas":
        raise ValueError(f"sparse_indexer_kl_loss_pallas needs a Pallas impl, got {impl!r}")
    if kv.shape[1] != k_idx.shape[1]:
        raise ValueError(f"kv and k_idx need the same keys, got {kv.shape[1]} and {k_idx.shape[1]}")
    sg = jax.lax.stop_gradient
    cfg = _SparsePallasConfig(float(sm_scale), chosen)
    return _sparse_kl_pallas(cfg, q_idx, k_idx, w_idx, sg(q), sg(kv), indices.astype(jnp.int32),
                             sg(lse).astype(F32), segment_ids)


# ---- entry points used by dsa_train.ops.losses ------------------------------------------------------

def indexer_kl_loss_kernel(q, kv, sm_scale, q_idx, k_idx, w_idx, segment_ids, impl: str, lse=None):
    """Dense warm-up KL; impl: any name in `indexer_tiles.IMPLS` (as resolved by kernels/backend.py)."""
    return dense_indexer_kl_loss(q, kv, sm_scale, q_idx, k_idx, w_idx, segment_ids, lse, impl=impl)


def sparse_indexer_kl_loss_kernel(q, kv, indices, lse, sm_scale, q_idx, k_idx, w_idx, segment_ids, impl: str):
    """Sparse-stage KL; impl: any name in `indexer_tiles.IMPLS`: "streaming" / "blocked" run the
    streaming JAX version, the Pallas names the Pallas kernels (see the module docstring)."""
    chosen = tiles.resolve(impl)
    if chosen.kind != "pallas":
        return sparse_indexer_kl_loss_streaming(q, kv, indices, lse, sm_scale, q_idx, k_idx, w_idx, segment_ids)
    return sparse_indexer_kl_loss_pallas(q, kv, indices, lse, sm_scale, q_idx, k_idx, w_idx, segment_ids, impl=impl)
