"""Indexer KL losses without an L x L buffer (dense warm-up) or more than O(S K) (sparse stage).

Semantics = `dsa_train.ops.losses.indexer_kl_loss` / `sparse_indexer_kl_loss`: mean over valid
queries (segment id != 0) of KL(p_t || softmax(I_t)), p_t the head-mean of the main attention
probabilities (a stop-gradient target), over the causal same-document keys (dense) or over the
selected keys (sparse). Gradients reach only the indexer inputs q_idx, k_idx, w_idx; q, kv, lse get
zero cotangents.

Dense warm-up, per query t (p sums to one over the candidates, kept as psum for robustness):
  KL_t = sum_s p log p - sum_s p I_s + lse_I(t) * psum,   lse_I(t) = logsumexp_s I_s.
- pass 1: per-head log-sum-exp of the main attention, streamed over key blocks (or the caller's
  `lse` [B, S, H], e.g. from the dense attention that ran anyway);
- pass 2: walk key blocks, form the head-mean target tile and the indexer tile, keep an online
  log-sum-exp of I plus the three sums. Memory O(S H + tiles).
- backward (custom_vjp): dKL_t/dI_s = psum softmax(I)_s - p_s; it recomputes both tiles per
  (query block, key block) with the saved lse_I and psum, and backpropagates through the indexer
  score by hand (dw, dq per query block, dk accumulated in one [B, T, Di] fp32 buffer).

Implementations: "streaming" = pure JAX (lax.map over query blocks, fori_loop over the causal key
blocks of each). "pallas" = a Pallas kernel for the pass-2 tile loop (Triton: one program per query
block loops over its key blocks; Mosaic TPU: the key blocks are the innermost "arbitrary" grid axis
with VMEM accumulators), the streaming JAX pass 1 when no lse is given, and the streaming JAX
backward. "pallas_interpret" = the same kernel in the Pallas interpreter (CPU tests).

Sparse stage: per query block, gather the selected main keys and indexer keys (O(bq K D)), form the
target from the sparse attention's own lse, and save dKL/dI [B, S, K] (O(S K)) for the backward,
which recomputes the indexer logits at the selected keys and scatter-adds dk. All impls use this
streaming JAX version (the gather dominates; no Pallas kernel yet).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dsa_train.kernels import indexer_tiles as tiles

F32 = jnp.float32
NEG = -jnp.inf

STREAMING_BLOCKS = (64, 256)  # (block_q, block_k) of the pure-JAX loops
TRITON_BLOCKS = (16, 64)
TPU_BLOCKS = (128, 256)
INTERPRET_BLOCKS = (16, 16)
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
    return jnp.einsum("bshd,btd->bsht", q_b, kv_b, preferred_element_type=F32) * sm_scale


def attention_lse_streaming(q, kv, sm_scale: float, segment_ids, block_q: int = STREAMING_BLOCKS[0],
                            block_k: int = STREAMING_BLOCKS[1]) -> jnp.ndarray:
    """Per-head log-sum-exp of the causal, document-masked MQA-form attention: [B, S, H] fp32."""
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


# ---- pass 2 (forward statistics) and backward, pure JAX ---------------------------------------------

def _dense_tiles(q_b, kv_b, lse_b, qi_b, ki_b, w_b, vis, sm_scale):
    """Target tile p [B, bq, bk] (0 where invisible), indexer logits z [B, bq, Hi, bk] and the masked
    indexer score tile I [B, bq, bk] (-inf where invisible)."""
    a = _target_logits(q_b, kv_b, sm_scale)
    p = jnp.exp(jnp.where(vis[:, :, None, :], a - lse_b[..., None], NEG)).mean(axis=2)
    z = jnp.einsum("bshd,btd->bsht", qi_b.astype(F32), ki_b.astype(F32)) * qi_b.shape[-1] ** -0.5
    score = jnp.einsum("bsh,bsht->bst", w_b.astype(F32), jax.nn.relu(z))
    return p, z, jnp.where(vis, score, NEG)


def _dense_stats_streaming(q, kv, lse, q_idx, k_idx, w_idx, segment_ids, *, sm_scale, block_q, block_k):
    """-> KL_t, lse_I(t), psum(t), each [B, S] fp32."""
    b, s = segment_ids.shape
    length = _padded_length(s, block_q, block_k)
    pad, (q_p, kv_p, lse_p, qi_p, ki_p, w_p) = _pad_all(length, segment_ids, q, kv, lse, q_idx, k_idx, w_idx)
    n_k = length // block_k

    def per_query_block(qi):
        q_b, lse_b, qi_b, w_b, qpos, qseg = (_sl(x, qi * block_q, block_q)
                                             for x in (q_p, lse_p, qi_p, w_p, pad.pos, pad.seg))

        def body(kj, carry):
            m, l, plogp, p_dot_i, psum = carry
            ks = kj * block_k
            vis = tiles.visible(qpos, qseg, _sl(pad.pos, ks, block_k), _sl(pad.seg, ks, block_k))
            p, _, score = _dense_tiles(q_b, _sl(kv_p, ks, block_k), lse_b, qi_b, _sl(ki_p, ks, block_k),
                                       w_b, vis, sm_scale)
            m, l = _online_lse(m, l, score, axis=2)
            return (m, l, plogp + _xlogy(p).sum(-1), p_dot_i + jnp.where(p > 0, p * score, 0.0).sum(-1),
                    psum + p.sum(-1))

        init = (jnp.full((b, block_q), NEG, F32),) + tuple(jnp.zeros((b, block_q), F32) for _ in range(4))
        m, l, plogp, p_dot_i, psum = jax.lax.fori_loop(
            0, tiles.causal_key_blocks(qi, block_q, block_k, n_k), body, init)
        lse_i = m + jnp.log(l)
        return plogp - p_dot_i + lse_i * psum, lse_i, psum

    stats = jax.lax.map(per_query_block, jnp.arange(length // block_q))
    return tuple(jnp.moveaxis(x, 0, 1).reshape(b, length)[:, :s] for x in stats)


def _dense_grads_streaming(q, kv, lse, q_idx, k_idx, w_idx, segment_ids, lse_i, psum, g, *,
                           sm_scale, block_q, block_k):
    """Gradients of sum_t g_t KL_t w.r.t. (q_idx, k_idx, w_idx), recomputing tiles block by block."""
    b, s = segment_ids.shape
    di = q_idx.shape[-1]
    scale = di ** -0.5
    length = _padded_length(s, block_q, block_k)
    pad, (q_p, kv_p, lse_p, qi_p, ki_p, w_p, lse_i_p, psum_p, g_p) = _pad_all(
        length, segment_ids, q, kv, lse, q_idx, k_idx, w_idx, lse_i, psum, g)
    n_k = length // block_k

    def per_query_block(dk, qi):
        q_b, lse_b, qi_b, w_b, lse_i_b, psum_b, g_b, qpos, qseg = (
            _sl(x, qi * block_q, block_q) for x in (q_p, lse_p, qi_p, w_p, lse_i_p, psum_p, g_p, pad.pos, pad.seg))
        qi_f, w_f = qi_b.astype(F32), w_b.astype(F32)

        def body(kj, carry):
            dq_b, dw_b, dk = carry
            ks = kj * block_k
            ki_b = _sl(ki_p, ks, block_k).astype(F32)
            vis = tiles.visible(qpos, qseg, _sl(pad.pos, ks, block_k), _sl(pad.seg, ks, block_k))
            p, z, score = _dense_tiles(q_b, _sl(kv_p, ks, block_k), lse_b, qi_b, ki_b, w_b, vis, sm_scale)
            soft = jnp.where(vis, jnp.exp(score - lse_i_b[..., None]), 0.0)
            d_score = g_b[..., None] * (psum_b[..., None] * soft - p)  # [B, bq, bk]
            dz = d_score[:, :, None, :] * w_f[..., None] * (z > 0)  # [B, bq, Hi, bk]
            dk_tile = jnp.einsum("bsht,bshd->btd", dz, qi_f) * scale
            dk = jax.lax.dynamic_update_slice_in_dim(dk, _sl(dk, ks, block_k) + dk_tile, ks, 1)
            return (dq_b + jnp.einsum("bsht,btd->bshd", dz, ki_b) * scale,
                    dw_b + jnp.einsum("bst,bsht->bsh", d_score, jax.nn.relu(z)), dk)

        init = (jnp.zeros(qi_b.shape, F32), jnp.zeros(w_b.shape, F32), dk)
        dq_b, dw_b, dk = jax.lax.fori_loop(0, tiles.causal_key_blocks(qi, block_q, block_k, n_k), body, init)
        return dk, (dq_b, dw_b)

    dk, (dq, dw) = jax.lax.scan(per_query_block, jnp.zeros((b, length, di), F32), jnp.arange(length // block_q))
    dq = jnp.moveaxis(dq, 0, 1).reshape(b, length, *q_idx.shape[2:])[:, :s]
    dw = jnp.moveaxis(dw, 0, 1).reshape(b, length, w_idx.shape[-1])[:, :s]
    return dq.astype(q_idx.dtype), dk[:, :s].astype(k_idx.dtype), dw.astype(w_idx.dtype)


# ---- pass 2 as a Pallas kernel ----------------------------------------------------------------------

def _pow2_pieces(d: int, minimum: int = 16) -> list[int]:
    """Split a head dim into power-of-two pieces for Triton (576 -> [512, 64]); the last piece is
    zero-padded up to `minimum` (the smallest tl.dot size)."""
    pieces, rest = [], d
    while rest > 0:
        piece = max(1 << (rest.bit_length() - 1), minimum)
        pieces.append(piece)
        rest -= piece
    return pieces


def _split_dim(x, pieces: list[int]):
    x = tiles.pad_to(x, x.ndim - 1, sum(pieces))
    starts = [sum(pieces[:i]) for i in range(len(pieces))]
    return [x[..., a:a + n] for a, n in zip(starts, pieces)]


def _kl_tile_update(carry, kv_tiles, q_refs, lse_ref, ki_tile, qi_ref, w_ref, vis, *, n_heads, n_idx_heads,
                    sm_scale, idx_scale):
    """Fold one keys-major tile [bk, bq] into the per-query running statistics (rows [1, bq])."""
    bk, bq = vis.shape

    def head(h, acc):
        a = sum(tiles.dot_nt(kv_t, q_ref[h]) for kv_t, q_ref in zip(kv_tiles, q_refs)) * sm_scale
        return acc + jnp.exp(a - lse_ref[pl.ds(h, 1), :])

    probs = jax.lax.fori_loop(0, n_heads, head, jnp.zeros((bk, bq), F32))
    p = jnp.where(vis, probs * (1.0 / n_heads), 0.0)
    score = jnp.where(vis, tiles.tile_indexer_scores(ki_tile, qi_ref, w_ref, n_idx_heads, idx_scale), NEG)
    m, l, plogp, p_dot_i, psum = carry
    m_new = jnp.maximum(m, score.max(axis=0, keepdims=True))
    m_safe = jnp.where(m_new == NEG, 0.0, m_new)
    l = l * jnp.exp(m - m_safe) + jnp.exp(score - m_safe).sum(axis=0, keepdims=True)
    positive = p > 0
    plogp = plogp + jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0).sum(axis=0, keepdims=True)
    p_dot_i = p_dot_i + jnp.where(positive, p * score, 0.0).sum(axis=0, keepdims=True)
    return m_new, l, plogp, p_dot_i, psum + p.sum(axis=0, keepdims=True)


def _kl_finalize(carry, kl_ref, lse_i_ref, psum_ref):
    m, l, plogp, p_dot_i, psum = carry
    lse_i = m + jnp.log(l)
    kl_ref[...] = plogp - p_dot_i + lse_i * psum
    lse_i_ref[...] = lse_i
    psum_ref[...] = psum


def _kl_init(bq):
    return (jnp.full((1, bq), NEG, F32),) + tuple(jnp.zeros((1, bq), F32) for _ in range(4))


def _kl_triton_kernel(*refs, n_pieces, n_heads, n_idx_heads, sm_scale, idx_scale, block_q, block_k, n_k):
    """Grid (B, query blocks); this program loops over the causal key blocks of its query block,
    reading key tiles straight from the full HBM arrays."""
    q_refs, kv_refs = refs[:n_pieces], refs[n_pieces:2 * n_pieces]
    lse_ref, qi_ref, ki_ref, w_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref = refs[2 * n_pieces:2 * n_pieces + 8]
    kl_ref, lse_i_ref, psum_ref = refs[2 * n_pieces + 8:]
    bi, qb = pl.program_id(0), pl.program_id(1)
    qpos, qseg = qpos_ref[...], qseg_ref[...]

    def body(kj, carry):
        keys = pl.ds(pl.multiple_of(kj * block_k, block_k), block_k)
        vis = (kseg_ref[bi, keys, :] == qseg) & (kpos_ref[bi, keys, :] <= qpos)
        kv_tiles = [r[bi, keys, :] for r in kv_refs]
        return _kl_tile_update(carry, kv_tiles, q_refs, lse_ref, ki_ref[bi, keys, :], qi_ref, w_ref, vis,
                               n_heads=n_heads, n_idx_heads=n_idx_heads, sm_scale=sm_scale, idx_scale=idx_scale)

    n_visible = jnp.minimum(tiles.last_visible_key_block(qb, block_q, block_k) + 1, n_k)
    _kl_finalize(jax.lax.fori_loop(0, n_visible, body, _kl_init(block_q)), kl_ref, lse_i_ref, psum_ref)


def _kl_tpu_kernel(*refs, n_pieces, n_heads, n_idx_heads, sm_scale, idx_scale, block_q, block_k, n_k):
    """Grid (B, query blocks, key blocks); key tiles arrive by BlockSpec pipelining, the running
    statistics live in VMEM scratch across the innermost ("arbitrary") key axis."""
    q_refs, kv_refs = refs[:n_pieces], refs[n_pieces:2 * n_pieces]
    lse_ref, qi_ref, ki_ref, w_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref = refs[2 * n_pieces:2 * n_pieces + 8]
    kl_ref, lse_i_ref, psum_ref = refs[2 * n_pieces + 8:2 * n_pieces + 11]
    acc_refs = refs[2 * n_pieces + 11:]
    qb, kj = pl.program_id(1), pl.program_id(2)
    n_visible = jnp.minimum(tiles.last_visible_key_block(qb, block_q, block_k) + 1, n_k)

    @pl.when(kj == 0)
    def _init():
        for r, v in zip(acc_refs, _kl_init(block_q)):
            r[...] = v

    @pl.when(kj < n_visible)
    def _update():
        vis = (kseg_ref[...] == qseg_ref[...]) & (kpos_ref[...] <= qpos_ref[...])
        carry = tuple(r[...] for r in acc_refs)
        carry = _kl_tile_update(carry, [r[...] for r in kv_refs], q_refs, lse_ref, ki_ref[...], qi_ref, w_ref, vis,
                                n_heads=n_heads, n_idx_heads=n_idx_heads, sm_scale=sm_scale, idx_scale=idx_scale)
        for r, v in zip(acc_refs, carry):
            r[...] = v

    @pl.when(kj == n_k - 1)
    def _finish():
        _kl_finalize(tuple(r[...] for r in acc_refs), kl_ref, lse_i_ref, psum_ref)


def _dense_stats_pallas(q, kv, lse, q_idx, k_idx, w_idx, segment_ids, *, sm_scale, block_q, block_k,
                        backend: str, interpret: bool):
    """Pallas pass 2 -> KL_t, lse_I(t), psum(t), each [B, S]. backend: "triton" | "tpu" (layout and
    loop structure; both run under the interpreter when interpret=True)."""
    b, s, h, d = q.shape
    n_idx_heads, di = q_idx.shape[2], q_idx.shape[3]
    length = _padded_length(s, block_q, block_k)
    pad, (q_p, kv_p, lse_p, qi_p, ki_p, w_p) = _pad_all(length, segment_ids, q, kv, lse, q_idx, k_idx, w_idx)
    pieces = _pow2_pieces(d) if backend == "triton" else [d]
    q_t = jnp.swapaxes(q_p, 1, 2)  # [B, H, L, D]: one head = one [L, D] slab
    q_pieces, kv_pieces = _split_dim(q_t, pieces), _split_dim(kv_p, pieces)
    lse_t, qi_t, w_t = jnp.swapaxes(lse_p, 1, 2), jnp.swapaxes(qi_p, 1, 2), jnp.swapaxes(w_p, 1, 2)
    n_q, n_k = length // block_q, length // block_k
    kw = dict(n_pieces=len(pieces), n_heads=h, n_idx_heads=n_idx_heads, sm_scale=sm_scale, idx_scale=di ** -0.5,
              block_q=block_q, block_k=block_k, n_k=n_k)
    sq = pl.squeezed
    row_shape = jax.ShapeDtypeStruct((b, 1, length), F32)
    operands = (*q_pieces, *kv_pieces, lse_t, qi_t, ki_p, w_t, tiles.rows(pad.pos), tiles.rows(pad.seg),
                tiles.cols(pad.pos), tiles.cols(pad.seg))

    if backend == "triton":
        qmap2, qmap3 = (lambda i, qb: (i, 0, qb)), (lambda i, qb: (i, 0, qb, 0))
        full = pl.BlockSpec(memory_space=pl.ANY)  # key-side arrays: sliced in the kernel loop
        in_specs = ([pl.BlockSpec((sq, h, block_q, n), qmap3) for n in pieces] + [full] * len(pieces)
                    + [pl.BlockSpec((sq, h, block_q), qmap2), pl.BlockSpec((sq, n_idx_heads, block_q, di), qmap3),
                       full, pl.BlockSpec((sq, n_idx_heads, block_q), qmap2),
                       pl.BlockSpec((sq, 1, block_q), qmap2), pl.BlockSpec((sq, 1, block_q), qmap2), full, full])
        out_spec = pl.BlockSpec((sq, 1, block_q), qmap2)
        kernel, grid, scratch = _kl_triton_kernel, (b, n_q), ()
        params = None if interpret else tiles.triton_params()
    else:
        from jax.experimental.pallas import tpu as pltpu

        def kmap(i, qb, kj):  # clamp: invisible key blocks re-use the last block (no extra DMA)
            return (i, jnp.minimum(kj, tiles.last_visible_key_block(qb, block_q, block_k)), 0)

        qmap2, qmap3 = (lambda i, qb, kj: (i, 0, qb)), (lambda i, qb, kj: (i, 0, qb, 0))
        in_specs = ([pl.BlockSpec((sq, h, block_q, n), qmap3) for n in pieces]
                    + [pl.BlockSpec((sq, block_k, n), kmap) for n in pieces]
                    + [pl.BlockSpec((sq, h, block_q), qmap2), pl.BlockSpec((sq, n_idx_heads, block_q, di), qmap3),
                       pl.BlockSpec((sq, block_k, di), kmap), pl.BlockSpec((sq, n_idx_heads, block_q), qmap2),
                       pl.BlockSpec((sq, 1, block_q), qmap2), pl.BlockSpec((sq, 1, block_q), qmap2),
                       pl.BlockSpec((sq, block_k, 1), kmap), pl.BlockSpec((sq, block_k, 1), kmap)])
        out_spec = pl.BlockSpec((sq, 1, block_q), qmap2)
        kernel, grid = _kl_tpu_kernel, (b, n_q, n_k)
        scratch = [pltpu.VMEM((1, block_q), F32) for _ in range(5)]
        params = None if interpret else tiles.tpu_params(("parallel", "parallel", "arbitrary"),
                                                        vmem_limit_bytes=96 * 2 ** 20)
    kl, lse_i, psum = pl.pallas_call(
        partial(kernel, **kw), out_shape=(row_shape,) * 3, grid=grid, in_specs=in_specs,
        out_specs=(out_spec,) * 3, scratch_shapes=scratch, compiler_params=params, interpret=interpret,
        name="indexer_dense_kl_tiles")(*operands)
    return tuple(x[:, 0, :s] for x in (kl, lse_i, psum))


def _dense_stats_pallas_dispatch(q, kv, lse, q_idx, k_idx, w_idx, segment_ids, *, sm_scale, interpret,
                                 variant):
    """Pick the pass-2 kernel variant: explicit (`variant` "triton"/"tpu"), or per lowering platform."""
    s = q.shape[1]
    block_sizes = {"triton": _blocks_for(s, *TRITON_BLOCKS), "tpu": TPU_BLOCKS,
                   None: _blocks_for(s, *INTERPRET_BLOCKS)}

    def run(which, interp, *args):
        bq, bk = block_sizes[which]
        return _dense_stats_pallas(*args, sm_scale=sm_scale, block_q=bq, block_k=bk,
                                   backend=which or "triton", interpret=interp)

    args = (q, kv, lse, q_idx, k_idx, w_idx, segment_ids)
    if interpret or variant is not None:
        return run(variant, interpret, *args)
    return tiles.pallas_platform_dispatch(partial(run, "triton", False), partial(run, "tpu", False),
                                          partial(run, None, True), *args)


# ---- the differentiable dense loss -----------------------------------------------------------------

class _DenseConfig(NamedTuple):
    sm_scale: float
    impl: tiles.Impl
    block_q: int  # blocks of the pure-JAX passes (pass 1, streaming pass 2, backward)
    block_k: int


def _dense_stats(cfg: _DenseConfig, q, kv, lse, q_idx, k_idx, w_idx, segment_ids):
    if cfg.impl.kind == "streaming":
        return _dense_stats_streaming(q, kv, lse, q_idx, k_idx, w_idx, segment_ids, sm_scale=cfg.sm_scale,
                                      block_q=cfg.block_q, block_k=cfg.block_k)
    return _dense_stats_pallas_dispatch(q, kv, lse, q_idx, k_idx, w_idx, segment_ids, sm_scale=cfg.sm_scale,
                                        interpret=cfg.impl.interpret, variant=cfg.impl.variant)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense_kl(cfg, q_idx, k_idx, w_idx, q, kv, lse, segment_ids):
    kl, _, _ = _dense_stats(cfg, q, kv, lse, q_idx, k_idx, w_idx, segment_ids)
    return _weighted_mean(kl, segment_ids)


def _dense_kl_fwd(cfg, q_idx, k_idx, w_idx, q, kv, lse, segment_ids):
    kl, lse_i, psum = _dense_stats(cfg, q, kv, lse, q_idx, k_idx, w_idx, segment_ids)
    return _weighted_mean(kl, segment_ids), (q_idx, k_idx, w_idx, q, kv, lse, segment_ids, lse_i, psum)


def _dense_kl_bwd(cfg, res, ct):
    q_idx, k_idx, w_idx, q, kv, lse, segment_ids, lse_i, psum = res
    dq, dk, dw = _dense_grads_streaming(q, kv, lse, q_idx, k_idx, w_idx, segment_ids, lse_i, psum,
                                        _query_weights(ct, segment_ids), sm_scale=cfg.sm_scale,
                                        block_q=cfg.block_q, block_k=cfg.block_k)
    return dq, dk, dw, jnp.zeros_like(q), jnp.zeros_like(kv), jnp.zeros_like(lse), None


_dense_kl.defvjp(_dense_kl_fwd, _dense_kl_bwd)


def indexer_kl_loss_streaming(q, kv, sm_scale, q_idx, k_idx, w_idx, segment_ids, lse=None, *,
                              impl: str = "streaming", block_q: int = STREAMING_BLOCKS[0],
                              block_k: int = STREAMING_BLOCKS[1]):
    """Dense warm-up KL without an S x T buffer. `lse` [B, S, H]: the main attention's per-head
    log-sum-exp if already known (pass 1 is skipped). `impl` (see `indexer_tiles.IMPLS`) picks the
    pass-2 forward; block_q/block_k size the pure-JAX passes."""
    chosen = tiles.resolve(impl)
    tiles.check_self_attention(q.shape[1], kv.shape[1])
    block_q, block_k = _blocks_for(q.shape[1], block_q, block_k)
    sg = jax.lax.stop_gradient
    q, kv = sg(q), sg(kv)
    if lse is None:
        lse = attention_lse_streaming(q, kv, sm_scale, segment_ids, block_q, block_k)
    cfg = _DenseConfig(float(sm_scale), chosen, block_q, block_k)
    return _dense_kl(cfg, q_idx, k_idx, w_idx, q, kv, sg(lse).astype(F32), segment_ids)


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
    return (dq.astype(q_idx.dtype), dk.astype(k_idx.dtype), dw.astype(w_idx.dtype), jnp.zeros_like(q),
            jnp.zeros_like(kv), None, jnp.zeros_like(lse), None)


_sparse_kl.defvjp(_sparse_kl_fwd, _sparse_kl_bwd)


def sparse_indexer_kl_loss_streaming(q, kv, indices, lse, sm_scale, q_idx, k_idx, w_idx, segment_ids,
                                     block_q: int = SPARSE_BLOCK_Q):
    """KL over the selected keys with O(S K) memory; `lse` [B, S, H] is the sparse attention's own."""
    tiles.check_self_attention(q.shape[1], kv.shape[1])
    sg = jax.lax.stop_gradient
    cfg = _SparseConfig(float(sm_scale), min(block_q, max(1, q.shape[1])))
    return _sparse_kl(cfg, q_idx, k_idx, w_idx, sg(q), sg(kv), indices, sg(lse).astype(F32), segment_ids)


# ---- entry points used by dsa_train.ops.losses ------------------------------------------------------

def indexer_kl_loss_kernel(q, kv, sm_scale, q_idx, k_idx, w_idx, segment_ids, impl: str, lse=None):
    """Dense warm-up KL; impl: any name in `indexer_tiles.IMPLS` (as resolved by dispatch)."""
    return indexer_kl_loss_streaming(q, kv, sm_scale, q_idx, k_idx, w_idx, segment_ids, lse, impl=impl)


def sparse_indexer_kl_loss_kernel(q, kv, indices, lse, sm_scale, q_idx, k_idx, w_idx, segment_ids, impl: str):
    """Sparse-stage KL; every impl runs the streaming JAX version (see the module docstring)."""
    tiles.resolve(impl)
    return sparse_indexer_kl_loss_streaming(q, kv, indices, lse, sm_scale, q_idx, k_idx, w_idx, segment_ids)
