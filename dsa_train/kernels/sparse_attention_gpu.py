"""Top-k sparse MLA attention (MQA/latent form) as Pallas kernels for GPU (Triton lowering).

Layout (FlashMLA's): q [B, S, H, D], one shared key/value row per token kv [B, T, D], value =
kv[..., :v_dim], indices [B, S, K] (-1 = unused slot). D splits into a "value" part (v_dim, 512)
and a "rope" part (D - v_dim, 64); both are loaded separately so every Triton tile is a power of 2.

Forward, grid (H / block_h, S, B): one program owns one query and block_h (64) of its heads, so
each QK^T and PV is a 64-row wgmma on sm_90. It walks the query's K slots in blocks of block_k,
gathers those key rows once (pointer gather, one row per slot; the value part in chunk_v-column
pieces so the per-element addresses do not crowd out the accumulator) and uses them for all
block_h heads (where the MQA form wins: the gathered rows are shared), with an online softmax in
fp32 in the exp2 domain; it writes out [block_h, v_dim] and lse [block_h].

Backward, grid (S, B, H / block_h): recompute p = exp(s - lse) per block, dp = dO . v,
ds = p (dp - delta) with delta = <out, dO> - d_lse (so the lse cotangent IS supported), dq
accumulated in registers, and dkv scattered with fp32 atomic adds into a [B, T + 1, D] buffer (row T swallows the invalid slots).
Why atomics: the alternative two-step scheme (write per-slot contributions, then segment-sum)
needs an S x K x D buffer, i.e. the memory this kernel exists to avoid; the atomics cost
H / block_h adds per (query, key) pair and a non-deterministic summation order. Valid indices of
one query are assumed distinct (top-k output): on a GPU repeated ones would still be summed, but in
interpret mode an atomic add of a tile with a repeated row keeps only one of the updates.

Head-summed probabilities (sparse_mla_head_summed_probs_gpu, the sparse indexer KL's target):
grid (K / block_k, S, B); p = exp(s - lse) recomputed from the forward's lse, summed over all heads
of the query in one program, so the gathered rows are read once per (query, slot block).

The wrapper pads H to a multiple of block_h, K to a multiple of block_k and both parts of D to
powers of two (>= 16, Triton's minimum dot size); with the real 128 heads and 576 = 512 + 64 dims
nothing is padded apart from K when it is not a multiple of block_k. Block sizes come from the
compiled code only (registers, shared memory, spills, wgmma count), not yet from a GPU measurement;
bench/gpu_suite.py measures them. Known gaps at the real shapes: the forward spills ~150 bytes per
thread, and the backward uses mma.sync (64-head backward blocks need more than the 227 KB of shared
memory) with acq_rel atomics (Pallas' Triton atomic_add in JAX 0.10 has no relaxed form).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsa_train.kernels.recompute_vjp import attention_with_recompute
from dsa_train.ops.attention import NEG_INF

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MIN_DOT = 16  # smallest dimension Triton's tl.dot accepts


@dataclasses.dataclass(frozen=True)
class GpuKernelConfig:
    sm_scale: float
    v_dim: int
    # Forward defaults chosen from the sm_90a compiled code (tests/test_gpu_compiled.py, figures in
    # bench/results/gpu_compiled.json): 64 heads make every dot a 64-row wgmma; block_k = 16, one
    # stage and 128-column value chunks give the fewest spilled bytes of the configurations tried.
    block_h: int = 64
    block_k: int = 16
    chunk_v: int = 128
    num_stages_fwd: int = 1
    # Backward: 32 heads, 16 keys, one stage is the largest head block with 0 spills and shared
    # memory that fits (64 heads need 311 KB at one stage); it halves the re-gathers and atomic adds
    # per (query, key) pair compared with 16-head blocks.
    block_h_bwd: int = 32
    block_k_bwd: int = 16
    num_warps: int = 8
    num_stages: int = 1  # pipeline depth of the backward (the forward has num_stages_fwd)
    interpret: bool = False


def sparse_mla_attention_gpu(q, kv, indices, sm_scale: float, v_dim: int = 512, *, interpret: bool = False,
                             **block_sizes):
    """q [B, S, H, D], kv [B, T, D], indices [B, S, K] -> out [B, S, H, v_dim] (q.dtype), lse [B, S, H] fp32."""
    cfg = GpuKernelConfig(sm_scale=float(sm_scale), v_dim=int(v_dim), interpret=bool(interpret), **block_sizes)
    return _attention(q, kv, indices.astype(jnp.int32), cfg)


# ----------------------------------------------------------------------------------------------
# Padding to Triton-friendly shapes.


def _pow2(n: int) -> int:
    return max(MIN_DOT, pl.next_power_of_2(n))


def _split_dims(d: int, v_dim: int) -> tuple[int, int]:
    """(value part, rope part) padded widths."""
    return _pow2(v_dim), _pow2(max(d - v_dim, 1))


def _pad_features(x: jnp.ndarray, v_dim: int) -> jnp.ndarray:
    """Pad the value and rope parts of the last axis separately to their padded widths."""
    dv, dr = _split_dims(x.shape[-1], v_dim)
    if (dv, dr) == (v_dim, x.shape[-1] - v_dim):
        return x
    widths = [(0, 0)] * (x.ndim - 1)
    return jnp.concatenate([jnp.pad(x[..., :v_dim], widths + [(0, dv - v_dim)]),
                            jnp.pad(x[..., v_dim:], widths + [(0, dr - (x.shape[-1] - v_dim))])], axis=-1)


def _unpad_features(x: jnp.ndarray, d: int, v_dim: int) -> jnp.ndarray:
    dv, dr = _split_dims(d, v_dim)
    if (dv, dr) == (v_dim, d - v_dim):
        return x
    return jnp.concatenate([x[..., :v_dim], x[..., dv:dv + d - v_dim]], axis=-1)


def _pad_axis(x: jnp.ndarray, axis: int, multiple: int, fill) -> jnp.ndarray:
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=fill)


def _head_block(h: int, block_h: int) -> int:
    return min(block_h, _pow2(h))


# ----------------------------------------------------------------------------------------------
# Kernels.


def _gather_rows(kv_ref, rows, start: int, width: int):
    """kv_ref[rows, start:start + width] as a [len(rows), width] tile (one pointer per element)."""
    return kv_ref[rows[:, None], start + jnp.arange(width)[None, :]]


def _forward_kernel(q_ref, kv_ref, idx_ref, out_ref, lse_ref, *, scale2: float, dv: int, dr: int,
                    block_k: int, num_k_blocks: int, chunk: int):
    block_h = q_ref.shape[0]
    # The value part is gathered and multiplied in column chunks: a pointer gather materializes one
    # 64-bit address per element, and a whole [block_k, 512] tile of them does not fit in registers
    # next to the [block_h, 512] fp32 accumulator (ptxas spills).
    n_chunks = dv // chunk
    q_r = q_ref[:, pl.ds(dv, dr)]

    def body(j, carry):
        accs, m_prev, l_prev = carry
        idx = idx_ref[pl.ds(j * block_k, block_k)]
        valid = (idx >= 0)[None, :]
        rows = jnp.maximum(idx, 0)
        k_r = _gather_rows(kv_ref, rows, dv, dr)
        s = plgpu.dot(q_r, k_r, trans_b=True)
        k_chunks = []
        for c in range(n_chunks):
            k_c = _gather_rows(kv_ref, rows, c * chunk, chunk)
            s = s + plgpu.dot(q_ref[:, pl.ds(c * chunk, chunk)], k_c, trans_b=True)
            k_chunks.append(k_c)
        s = jnp.where(valid, s * scale2, NEG_INF)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.where(valid, jnp.exp2(s - m_next[:, None]), 0.0)
        l_next = l_prev * alpha + jnp.sum(p, axis=1)
        p_lo = p.astype(kv_ref.dtype)
        accs = tuple(a * alpha[:, None] + plgpu.dot(p_lo, k_c) for a, k_c in zip(accs, k_chunks))
        return accs, m_next, l_next

    accs = tuple(jnp.zeros((block_h, chunk), jnp.float32) for _ in range(n_chunks))
    m = jnp.full((block_h,), NEG_INF, jnp.float32)
    l = jnp.zeros((block_h,), jnp.float32)
    accs, m, l = jax.lax.fori_loop(0, num_k_blocks, body, (accs, m, l))
    has_keys = l > 0
    l_safe = jnp.where(has_keys, l, 1.0)
    for c, a in enumerate(accs):
        out_ref[:, pl.ds(c * chunk, chunk)] = (a / l_safe[:, None]).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(has_keys, (m + jnp.log2(l_safe)) * LN2, NEG_INF)


def _backward_kernel(q_ref, kv_ref, idx_ref, do_ref, lse_ref, delta_ref, _dkv_in_ref, dq_ref, dkv_ref, *,
                     sm_scale: float, dv: int, dr: int, block_k: int, num_k_blocks: int, trash_row: int):
    del _dkv_in_ref  # aliased with dkv_ref: the zero-initialized accumulator
    scale2 = sm_scale * LOG2E
    q_v = q_ref[:, pl.ds(0, dv)]
    q_r = q_ref[:, pl.ds(dv, dr)]
    do = do_ref[...]
    lse2 = lse_ref[...] * LOG2E
    delta = delta_ref[...]

    def body(j, carry):
        dq_v, dq_r = carry
        idx = idx_ref[pl.ds(j * block_k, block_k)]
        valid = (idx >= 0)[None, :]
        rows = jnp.maximum(idx, 0)
        k_v = _gather_rows(kv_ref, rows, 0, dv)
        k_r = _gather_rows(kv_ref, rows, dv, dr)
        s = plgpu.dot(q_v, k_v, trans_b=True) + plgpu.dot(q_r, k_r, trans_b=True)
        p = jnp.where(valid, jnp.exp2(s * scale2 - lse2[:, None]), 0.0)  # [block_h, block_k]
        dp = plgpu.dot(do, k_v, trans_b=True)
        ds = p * (dp - delta[:, None]) * sm_scale
        ds_lo = ds.astype(k_v.dtype)
        dq_v = dq_v + plgpu.dot(ds_lo, k_v)
        dq_r = dq_r + plgpu.dot(ds_lo, k_r)
        dk_v = plgpu.dot(ds.astype(q_v.dtype), q_v, trans_a=True) + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
        dk_r = plgpu.dot(ds.astype(q_r.dtype), q_r, trans_a=True)
        # Invalid slots go to the trash row, so valid rows (distinct within a query) never collide.
        target = jnp.where(idx >= 0, idx, trash_row)[:, None]
        plgpu.atomic_add(dkv_ref, (target, jnp.arange(dv)[None, :]), dk_v)
        plgpu.atomic_add(dkv_ref, (target, dv + jnp.arange(dr)[None, :]), dk_r)
        return dq_v, dq_r

    block_h = q_ref.shape[0]
    dq_v = jnp.zeros((block_h, dv), jnp.float32)
    dq_r = jnp.zeros((block_h, dr), jnp.float32)
    dq_v, dq_r = jax.lax.fori_loop(0, num_k_blocks, body, (dq_v, dq_r))
    dq_ref[:, pl.ds(0, dv)] = dq_v.astype(dq_ref.dtype)
    dq_ref[:, pl.ds(dv, dr)] = dq_r.astype(dq_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers and the custom VJP.


def _prepare(q, kv, indices, cfg: GpuKernelConfig, block_h: int, block_k: int):
    qp = _pad_axis(_pad_features(q, cfg.v_dim), 2, block_h, 0)
    kvp = _pad_features(kv, cfg.v_dim)
    idxp = _pad_axis(indices, 2, block_k, -1)
    return qp, kvp, idxp


def _forward(q, kv, indices, cfg: GpuKernelConfig):
    b, s, h, d = q.shape
    t = kv.shape[1]
    block_h = _head_block(h, cfg.block_h)
    qp, kvp, idxp = _prepare(q, kv, indices, cfg, block_h, cfg.block_k)
    dv, dr = _split_dims(d, cfg.v_dim)
    hp, dp, kp = qp.shape[2], qp.shape[3], idxp.shape[2]
    kernel = functools.partial(_forward_kernel, scale2=cfg.sm_scale * LOG2E, dv=dv, dr=dr,
                               block_k=cfg.block_k, num_k_blocks=kp // cfg.block_k,
                               chunk=min(cfg.chunk_v, dv))
    out, lse = pl.pallas_call(
        kernel,
        # Head blocks fastest: the programs of one query run side by side and share its gathered
        # key rows through L2.
        grid=(hp // block_h, s, b),
        in_specs=[
            pl.BlockSpec((None, None, block_h, dp), lambda h, i, j: (j, i, h, 0)),
            pl.BlockSpec((None, t, dp), lambda h, i, j: (j, 0, 0)),
            pl.BlockSpec((None, None, kp), lambda h, i, j: (j, i, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, block_h, dv), lambda h, i, j: (j, i, h, 0)),
            pl.BlockSpec((None, None, block_h), lambda h, i, j: (j, i, h)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, s, hp, dv), q.dtype),
                   jax.ShapeDtypeStruct((b, s, hp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages_fwd),
        interpret=cfg.interpret,
        name="sparse_mla_forward",
    )(qp, kvp, idxp)
    return out[:, :, :h, :cfg.v_dim], lse[:, :, :h]


def _backward(q, kv, indices, out, lse, d_out, d_lse, cfg: GpuKernelConfig):
    b, s, h, d = q.shape
    t = kv.shape[1]
    block_h = _head_block(h, cfg.block_h_bwd)
    block_k = cfg.block_k_bwd
    qp, kvp, idxp = _prepare(q, kv, indices, cfg, block_h, block_k)
    dv, dr = _split_dims(d, cfg.v_dim)
    hp, dp, kp = qp.shape[2], qp.shape[3], idxp.shape[2]
    delta = jnp.einsum("bshd,bshd->bsh", out.astype(jnp.float32), d_out.astype(jnp.float32))
    delta = _pad_axis(delta - d_lse.astype(jnp.float32), 2, block_h, 0.0)
    # Padded heads get lse = +big so their probabilities are exactly 0.
    lse_p = _pad_axis(lse, 2, block_h, -NEG_INF)
    do_p = _pad_axis(jnp.pad(d_out, [(0, 0)] * 3 + [(0, dv - cfg.v_dim)]), 2, block_h, 0)
    dkv0 = jnp.zeros((b, t + 1, dp), jnp.float32)
    kernel = functools.partial(_backward_kernel, sm_scale=cfg.sm_scale, dv=dv, dr=dr, block_k=block_k,
                               num_k_blocks=kp // block_k, trash_row=t)
    row_spec = lambda width: pl.BlockSpec((None, None, block_h, width), lambda i, j, k: (j, i, k, 0))
    head_spec = pl.BlockSpec((None, None, block_h), lambda i, j, k: (j, i, k))
    dq, dkv = pl.pallas_call(
        kernel,
        # Queries fastest: concurrent programs are mostly different queries, which spreads the
        # atomic adds over different rows (one query's head blocks all hit the same K rows).
        grid=(s, b, hp // block_h),
        in_specs=[
            row_spec(dp),
            pl.BlockSpec((None, t, dp), lambda i, j, k: (j, 0, 0)),
            pl.BlockSpec((None, None, kp), lambda i, j, k: (j, i, 0)),
            row_spec(dv),
            head_spec,
            head_spec,
            pl.BlockSpec((None, t + 1, dp), lambda i, j, k: (j, 0, 0)),
        ],
        out_specs=[row_spec(dp), pl.BlockSpec((None, t + 1, dp), lambda i, j, k: (j, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype), jax.ShapeDtypeStruct(dkv0.shape, jnp.float32)],
        input_output_aliases={6: 1},
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="sparse_mla_backward",
    )(qp, kvp, idxp, do_p, lse_p, delta, dkv0)
    dq = _unpad_features(dq[:, :, :h], d, cfg.v_dim)
    dkv = _unpad_features(dkv[:, :t], d, cfg.v_dim).astype(kv.dtype)
    return dq, dkv


_attention = attention_with_recompute(_forward, _backward)


# ----------------------------------------------------------------------------------------------
# Head-summed probabilities over the selected keys (the sparse indexer KL's target).


def sparse_mla_head_summed_probs_gpu(q, kv, indices, lse, sm_scale: float, v_dim: int = 512, *,
                                     interpret: bool = False, block_h: int = 64, block_k: int = 16,
                                     num_warps: int = 8, num_stages: int = 1):
    """sum_h softmax_h(q . k / sqrt)[slot] -> [B, S, K] fp32 (0 at -1 slots), recomputed from the
    forward's lse [B, S, H]. Not differentiable (the KL target is a stop-gradient). One program owns
    one query and block_k of its slots: the key rows are gathered once and reused by every head block."""
    b, s, h, d = q.shape
    t = kv.shape[1]
    k = indices.shape[-1]
    cfg = GpuKernelConfig(sm_scale=float(sm_scale), v_dim=int(v_dim), interpret=bool(interpret))
    block_h = _head_block(h, block_h)
    qp, kvp, idxp = _prepare(q, kv, indices.astype(jnp.int32), cfg, block_h, block_k)
    dv, dr = _split_dims(d, cfg.v_dim)
    hp, dp, kp = qp.shape[2], qp.shape[3], idxp.shape[2]
    lse_p = _pad_axis(jax.lax.stop_gradient(lse).astype(jnp.float32), 2, block_h, -NEG_INF)  # padded heads: p = 0
    kernel = functools.partial(_head_summed_probs_kernel, scale2=cfg.sm_scale * LOG2E, dv=dv, dr=dr,
                               block_h=block_h, num_h_blocks=hp // block_h)
    psum = pl.pallas_call(
        kernel,
        grid=(kp // block_k, s, b),
        in_specs=[
            pl.BlockSpec((None, None, hp, dp), lambda kb, i, j: (j, i, 0, 0)),
            pl.BlockSpec((None, t, dp), lambda kb, i, j: (j, 0, 0)),
            pl.BlockSpec((None, None, block_k), lambda kb, i, j: (j, i, kb)),
            pl.BlockSpec((None, None, hp), lambda kb, i, j: (j, i, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, block_k), lambda kb, i, j: (j, i, kb)),
        out_shape=jax.ShapeDtypeStruct((b, s, kp), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=cfg.interpret,
        name="sparse_mla_head_summed_probs",
    )(jax.lax.stop_gradient(qp), jax.lax.stop_gradient(kvp), idxp, lse_p)
    return psum[:, :, :k]


def _head_summed_probs_kernel(q_ref, kv_ref, idx_ref, lse_ref, out_ref, *, scale2: float, dv: int, dr: int,
                              block_h: int, num_h_blocks: int):
    idx = idx_ref[...]
    valid = idx >= 0
    rows = jnp.maximum(idx, 0)
    k_v = _gather_rows(kv_ref, rows, 0, dv)
    k_r = _gather_rows(kv_ref, rows, dv, dr)

    def body(i, acc):
        heads = pl.ds(i * block_h, block_h)
        s = plgpu.dot(q_ref[heads, pl.ds(0, dv)], k_v, trans_b=True) + plgpu.dot(q_ref[heads, pl.ds(dv, dr)], k_r,
                                                                                  trans_b=True)
        p = jnp.exp2(s * scale2 - (lse_ref[heads] * LOG2E)[:, None])
        return acc + jnp.sum(jnp.where(valid[None, :], p, 0.0), axis=0)

    acc = jax.lax.fori_loop(0, num_h_blocks, body, jnp.zeros(idx.shape, jnp.float32))
    out_ref[...] = jnp.where(valid, acc, 0.0)
