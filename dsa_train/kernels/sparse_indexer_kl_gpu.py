"""The sparse indexer KL's indexer side as Pallas kernels for GPU (Triton lowering).

Math per query t and selected slot k (key s = indices[t, k], -1 = unused; the loss: `indexer_kl`):
  z_j = Di^-0.5 q_idx_j(t) . k_idx(s),  I(t, k) = sum_j w_j(t) relu(z_j)
  forward:  online lse_I(t), sum p log p, sum p I, sum p over the slots -> KL_t, lse_I(t), psum(t)
  backward: dI = g_t (psum_t exp(I - lse_I) - p);  dz_j = dI w_j [z_j > 0]
            dq_idx_j(t) = Di^-0.5 sum_k dz_j k_idx(s);  dw_j(t) = sum_k dI relu(z_j)
            dk_idx(s) += Di^-0.5 sum_j dz_j q_idx_j(t)
The target p [B, S, K] is an input (the head-mean main-attention probabilities,
`sparse_attention_gpu.sparse_mla_head_summed_probs_gpu` on GPU).

Both kernels: grid (S, B), one program per query owning all its (padded) indexer heads, so every
dot is [Hi, Di] x [Di, block_k] (a 64-row wgmma at Hi = 64) and each gathered indexer-key row
(pointer gather as in sparse_attention_gpu) serves every head. The backward is one kernel: dq and
dw accumulate in registers over the query's slot blocks, dk is added per (query, slot) with an
atomic add into a [B, T + 1, Di] fp32 buffer (row T swallows the -1 slots), as the sparse
attention's dKV kernel does and for the same reason (the alternative is an S x K x Di buffer).
Selected keys of one query are assumed distinct (top-k output); see that module for what
interpret mode does with repeats.

Per (query, slot), Hi = 64, Di = 128, bf16: forward 2 Hi Di FLOPs (16K) and one gathered row
(256 bytes) + the index and p (8 bytes); backward 6 Hi Di FLOPs (49K: z, dq, dk) and the same
reads, plus an fp32 atomic add of a Di row (512 bytes of read-modify-write in L2/HBM). The target
(H = 128, D = 576) costs 2 H D FLOPs (147K) per pair and one gathered 576-dim row (1152 bytes) +
4 bytes of p, once per step: it is the largest part, and the backward does not recompute it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsa_train.kernels import indexer_tiles as tiles
from dsa_train.kernels.padding import pad_to_multiple
from dsa_train.kernels.sparse_attention_gpu import _gather_rows, _pow2

F32 = jnp.float32
NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class GpuKlConfig:
    # From the sm_90a compiled code (bench/results/gpu_compiled.json): with 64 slots per step both
    # kernels' dots are wgmma and nothing spills; the backward holds dq [Hi, Di] and dk [block_k, Di]
    # fp32 tiles, 252 registers a thread at 4 warps, 206 at 8.
    block_k: int = 64  # slots per step
    num_warps: int = 4  # forward
    num_warps_bwd: int = 8
    num_stages: int = 2
    interpret: bool = False


def _prepared(q_idx, k_idx, w_idx, indices, block_k: int):
    """Heads and head dim padded to powers of two (>= 16, zero: no score, no gradient), slots to
    block_k (-1)."""
    _, _, hi, di = q_idx.shape
    hp, dp = _pow2(hi), _pow2(di)
    qp = tiles.pad_to(tiles.pad_to(q_idx, 2, hp), 3, dp)
    kp = tiles.pad_to(k_idx, 2, dp)
    wp = tiles.pad_to(w_idx.astype(F32), 2, hp)
    idxp = pad_to_multiple(indices.astype(jnp.int32), 2, block_k, -1)
    return qp, kp, wp, idxp


def _scores(q, ki_ref, w, idx, scale: float):
    """Gathered keys [bk, Dp], logits z [Hp, bk] and indexer scores [bk] (-inf at unused slots)."""
    valid = idx >= 0
    keys = _gather_rows(ki_ref, jnp.maximum(idx, 0), 0, q.shape[1])
    z = plgpu.dot(q, keys, trans_b=True) * scale
    score = jnp.sum(w[:, None] * jnp.maximum(z, 0.0), axis=0)
    return keys, z, valid, jnp.where(valid, score, NEG)


def _one(x):
    """A reduction result as a [1] tensor (per-query scalars travel as [1] blocks)."""
    return jnp.broadcast_to(x, (1,))


def _stats_kernel(qi_ref, ki_ref, w_ref, idx_ref, p_ref, kl_ref, lse_ref, psum_ref, *, scale: float,
                  block_k: int, num_k_blocks: int):
    q, w = qi_ref[...], w_ref[...]

    def body(j, carry):
        m, l, plogp, p_dot_i, psum = carry
        slots = pl.ds(j * block_k, block_k)
        _, _, _, score = _scores(q, ki_ref, w, idx_ref[slots], scale)
        p = p_ref[slots]
        m_new = jnp.maximum(m, _one(jnp.max(score)))
        m_safe = jnp.where(m_new == NEG, 0.0, m_new)
        l = l * jnp.exp(m - m_safe) + _one(jnp.sum(jnp.exp(score - m_safe)))
        positive = p > 0
        plogp = plogp + _one(jnp.sum(jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0)))
        p_dot_i = p_dot_i + _one(jnp.sum(jnp.where(positive, p * score, 0.0)))
        return m_new, l, plogp, p_dot_i, psum + _one(jnp.sum(p))

    zero = jnp.zeros((1,), F32)
    m, l, plogp, p_dot_i, psum = jax.lax.fori_loop(0, num_k_blocks, body,
                                                   (jnp.full((1,), NEG, F32), zero, zero, zero, zero))
    has_keys = l > 0
    lse_i = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), 0.0)
    kl_ref[...] = plogp - p_dot_i + lse_i * psum
    lse_ref[...] = lse_i
    psum_ref[...] = psum


def _backward_kernel(qi_ref, ki_ref, w_ref, idx_ref, p_ref, lse_ref, psum_ref, g_ref, _dk_in_ref, dq_ref, dw_ref,
                     dk_ref, *, scale: float, block_k: int, num_k_blocks: int, trash_row: int):
    del _dk_in_ref  # aliased with dk_ref: the zero-initialized accumulator
    q, w = qi_ref[...], w_ref[...]
    lse_i, psum, g = lse_ref[...], psum_ref[...], g_ref[...]
    dp = q.shape[1]

    def body(j, carry):
        dq, dw = carry
        slots = pl.ds(j * block_k, block_k)
        idx = idx_ref[slots]
        keys, z, valid, score = _scores(q, ki_ref, w, idx, scale)
        soft = jnp.where(valid, jnp.exp(score - lse_i), 0.0)
        ds = g * (psum * soft - p_ref[slots])  # [bk]; p is 0 at unused slots
        relu_z = jnp.maximum(z, 0.0)
        dz = jnp.where(z > 0, ds[None, :] * w[:, None], 0.0).astype(q.dtype)  # [Hp, bk]
        dk_sel = plgpu.dot(dz, q, trans_a=True) * scale  # [bk, Dp]
        target = jnp.where(valid, idx, trash_row)[:, None]
        plgpu.atomic_add(dk_ref, (target, jnp.arange(dp)[None, :]), dk_sel)
        return dq + plgpu.dot(dz.astype(keys.dtype), keys), dw + jnp.sum(ds[None, :] * relu_z, axis=1)

    dq, dw = jax.lax.fori_loop(0, num_k_blocks, body, (jnp.zeros(q.shape, F32), jnp.zeros(w.shape, F32)))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
    dw_ref[...] = dw


def _specs(t: int, dp: int):
    """BlockSpecs of grid (S, B): per-query blocks, per-query scalars, the whole key row."""
    query = lambda *shape: pl.BlockSpec((None, None, *shape), lambda i, b: (b, i) + (0,) * len(shape))  # noqa: E731
    scalar = pl.BlockSpec((None, 1), lambda i, b: (b, i))
    keys = pl.BlockSpec((None, t, dp), lambda i, b: (b, 0, 0))
    return query, scalar, keys


def sparse_kl_stats_gpu(q_idx, k_idx, w_idx, indices, p, *, interpret: bool = False, **blocks):
    """-> KL_t, lse_I(t), psum(t), each [B, S] fp32 (see the module docstring)."""
    cfg = GpuKlConfig(interpret=interpret, **blocks)
    b, s, hi, di = q_idx.shape
    t, k = k_idx.shape[1], indices.shape[-1]
    qp, kp, wp, idxp = _prepared(q_idx, k_idx, w_idx, indices, cfg.block_k)
    hp, dp, kpad = qp.shape[2], qp.shape[3], idxp.shape[2]
    query, scalar, keys = _specs(t, dp)
    row = jax.ShapeDtypeStruct((b, s), F32)
    return tuple(pl.pallas_call(
        functools.partial(_stats_kernel, scale=di ** -0.5, block_k=cfg.block_k, num_k_blocks=kpad // cfg.block_k),
        grid=(s, b),
        in_specs=[query(hp, dp), keys, query(hp), query(kpad), query(kpad)],
        out_specs=[scalar] * 3,
        out_shape=[row] * 3,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="sparse_indexer_kl_forward",
    )(qp, kp, wp, idxp, tiles.pad_to(p.astype(F32), 2, kpad)))


def sparse_kl_grads_gpu(q_idx, k_idx, w_idx, indices, p, lse_i, psum, g, *, interpret: bool = False, **blocks):
    """Gradients of sum_t g_t KL_t w.r.t. (q_idx, k_idx, w_idx), in their dtypes."""
    cfg = GpuKlConfig(interpret=interpret, **blocks)
    b, s, hi, di = q_idx.shape
    t = k_idx.shape[1]
    qp, kp, wp, idxp = _prepared(q_idx, k_idx, w_idx, indices, cfg.block_k)
    hp, dp, kpad = qp.shape[2], qp.shape[3], idxp.shape[2]
    query, scalar, keys = _specs(t, dp)
    dk0 = jnp.zeros((b, t + 1, dp), F32)
    whole_dk = pl.BlockSpec((None, t + 1, dp), lambda i, b: (b, 0, 0))
    dq, dw, dk = pl.pallas_call(
        functools.partial(_backward_kernel, scale=di ** -0.5, block_k=cfg.block_k, num_k_blocks=kpad // cfg.block_k,
                          trash_row=t),
        grid=(s, b),
        in_specs=[query(hp, dp), keys, query(hp), query(kpad), query(kpad), scalar, scalar, scalar, whole_dk],
        out_specs=[query(hp, dp), query(hp), whole_dk],
        out_shape=[jax.ShapeDtypeStruct((b, s, hp, dp), q_idx.dtype), jax.ShapeDtypeStruct((b, s, hp), F32),
                   jax.ShapeDtypeStruct(dk0.shape, F32)],
        input_output_aliases={8: 2},
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps_bwd, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="sparse_indexer_kl_backward",
    )(qp, kp, wp, idxp, tiles.pad_to(p.astype(F32), 2, kpad), lse_i, psum, g.astype(F32), dk0)
    return dq[:, :, :hi, :di], dk[:, :t, :di].astype(k_idx.dtype), dw[:, :, :hi].astype(w_idx.dtype)
