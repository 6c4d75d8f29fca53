"""Top-k sparse MLA attention (MQA/latent form) as Pallas kernels for GPU (Triton lowering).

Layout (FlashMLA's): q [B, S, H, D], one shared key/value row per token kv [B, T, D], value =
kv[..., :v_dim], indices [B, S, K] (-1 = unused slot). D splits into a "value" part (v_dim, 512)
and a "rope" part (D - v_dim, 64); both are loaded separately so every Triton tile is a power of 2.

Forward, grid (v_splits * H / block_h, S, B): one program owns one query, block_h (64) of its
heads and one of v_splits (2) parts of the value columns, so each QK^T and PV is a 64-row wgmma on
sm_90 and the fp32 accumulator is 64 x 256 (a 64 x 512 one spills: Triton does not fold
`acc * alpha + dot` into the wgmma accumulator, so the PV result tile is live next to it). It walks
the query's K slots in blocks of block_k, gathers those key rows once (pointer gather, one row per
slot, in chunk_v-column pieces, its own part's chunks first so they are reused for PV) and uses
them for all block_h heads (where the MQA form wins: the gathered rows are shared), with an online
softmax in fp32 in the exp2 domain. The parts of one query recompute the same QK^T (576 columns):
the price of no spills, 1.5x the forward's tensor-core work at v_splits = 2.

Backward, two kernels, both recomputing p = exp(s - lse), dp = dO . v, ds = p (dp - delta) with
delta = <out, dO> - d_lse (so the lse cotangent IS supported):
- dQ, grid (v_splits_dq * H / block_h, S, B): the forward's layout, heads as the rows of every dot.
- dKV, grid (v_splits_dkv * K / block_k_bwd, S, B): block_k_bwd (64) slots of one query over all
  its heads (in steps of block_h_bwd), keys as the rows of every dot (s^T = k q^T), so a gathered
  row is read once per query and each (query, slot) pair is added once per column into a
  [B, T + 1, D] fp32 buffer (row T swallows the invalid slots), not once per head block.
Both split the value columns over several programs (4) to keep the accumulators in registers;
in the dQ kernel (3 stages) Triton's pipeliner keeps the q and dO chunks in registers and copies
them to shared memory at every step (loading them into shared memory once, before the loop,
spills 36 bytes at 2-4 stages and 308 at 1), in the dKV kernel the gathered key rows are copied to
shared memory once and q / dO are streamed in with asynchronous copies;
each part recomputes s and dp, so the dQ kernel does ~3.1x and the dKV kernel ~2.6x their minimal
tensor-core work (~3.9x the fused minimum in all): the compiled code has wgmma everywhere and
0 spills, the measured speed is open.
Why atomics: the alternative two-step scheme (write per-slot contributions, then segment-sum)
needs an S x K x D buffer, i.e. the memory this kernel exists to avoid; the cost is a
non-deterministic summation order. They are acq_rel: Pallas' Triton atomic_add (JAX 0.10.2)
fixes the memory semantic to ACQUIRE_RELEASE and has no relaxed form. Valid indices of one
query are assumed distinct (top-k output): on a GPU repeated ones would still be summed, but in
interpret mode an atomic add of a tile with a repeated row keeps only one of the updates.

Head-summed probabilities (sparse_mla_head_summed_probs_gpu, the sparse indexer KL's target):
grid (K / block_k, S, B); p = exp(s - lse) recomputed from the forward's lse, summed over all heads
of the query in one program, so the gathered rows are read once per (query, slot block).

The wrapper pads H to a multiple of the head blocks, K to a multiple of the slot blocks and both
parts of D to powers of two (>= 16, Triton's minimum dot size); with the real 128 heads and
576 = 512 + 64 dims nothing is padded apart from K when it is not a multiple of a slot block. Block
sizes come from the compiled code only (registers, shared memory, spills, wgmma count; figures in
bench/results/gpu_compiled.json), not yet from a GPU measurement; bench/gpu_suite.py measures them.
Which GPU kernels run where: these Pallas Triton kernels, on every CUDA GPU under both the CI JAX
(0.10.2) and JAX 0.11.x (where Pallas' Triton backend is deprecated in favour of Mosaic GPU). A
Mosaic GPU (jax.experimental.pallas.mosaic_gpu) version does not exist yet: its pallas_call lowers
for "cuda" on a CPU machine under JAX 0.10.2, but the row gather this kernel is built on needs a
per-row asynchronous copy scheme there (TMA gathers are sm_100 only), and neither its compiled code
nor its interpret mode is checked by this repository's tests yet.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsa_train.kernels.padding import pad_to_multiple
from dsa_train.kernels.recompute_vjp import attention_with_recompute
from dsa_train.ops.attention import NEG_INF

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MIN_DOT = 16  # smallest dimension Triton's tl.dot accepts


@dataclasses.dataclass(frozen=True)
class GpuKernelConfig:
    sm_scale: float
    v_dim: int
    # Defaults chosen from the sm_90a compiled code (tests/test_gpu_compiled.py, figures in
    # bench/results/gpu_compiled.json). Forward and dQ kernel: 64 heads make every dot a 64-row
    # wgmma; the value columns are split over v_splits programs (64 x 256 fp32 accumulators), in
    # chunk_v-column gathered pieces, block_k slots per step.
    block_h: int = 64
    block_k: int = 16
    chunk_v: int = 128
    v_splits: int = 2
    num_stages_fwd: int = 1
    # dKV kernel: block_k_bwd slots of one query per program (64: the rows of a wgmma), all heads
    # in steps of block_h_bwd, the value columns split over v_splits_dkv programs.
    block_k_bwd: int = 64
    block_h_bwd: int = 16
    v_splits_dkv: int = 4
    num_warps_dkv: int = 8
    num_stages_dkv: int = 2
    num_warps: int = 8  # forward and dQ kernel
    # dQ kernel: the forward's layout (block_h heads, block_k slots per step), its value columns
    # split over v_splits_dq programs; num_stages is its pipeline depth.
    v_splits_dq: int = 4
    num_stages: int = 3
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


def _head_block(h: int, block_h: int) -> int:
    return min(block_h, _pow2(h))


# ----------------------------------------------------------------------------------------------
# Kernels.


def _gather_rows(kv_ref, rows, start, width: int):
    """kv_ref[rows, start:start + width] as a [len(rows), width] tile (one pointer per element)."""
    return kv_ref[rows[:, None], start + jnp.arange(width)[None, :]]


def _value_chunk_starts(part, n_chunks: int, n_parts: int, chunk: int):
    """Column starts of the value chunks in the order a program visits them: its own part's
    chunks first (they are the ones it multiplies again, for PV or dK), then the others."""
    per_part = n_chunks // n_parts
    return [((part * per_part + c) % n_chunks) * chunk for c in range(n_chunks)], per_part


def _forward_kernel(q_ref, kv_ref, idx_ref, out_ref, lse_ref, *, scale2: float, dv: int, dr: int,
                    block_k: int, num_k_blocks: int, chunk: int, v_splits: int):
    block_h = q_ref.shape[0]
    # The program accumulates one of v_splits parts of the value columns: a [64, 512] fp32
    # accumulator is 128 registers a thread at 8 warps, and with the PV dot's own result tile (Triton
    # does not fold `acc * alpha + dot` into the wgmma accumulator) and the gather addresses it
    # spills. The QK^T of the part's programs is the same (each recomputes it over all 576 columns).
    part = pl.program_id(0) % v_splits
    starts, per_part = _value_chunk_starts(part, dv // chunk, v_splits, chunk)
    q_r = q_ref[:, pl.ds(dv, dr)]

    def body(j, carry):
        accs, m_prev, l_prev = carry
        idx = idx_ref[pl.ds(j * block_k, block_k)]
        valid = (idx >= 0)[None, :]
        rows = jnp.maximum(idx, 0)
        s = plgpu.dot(q_r, _gather_rows(kv_ref, rows, dv, dr), trans_b=True)
        own_chunks = []
        for c, start in enumerate(starts):
            k_c = _gather_rows(kv_ref, rows, start, chunk)
            s = s + plgpu.dot(q_ref[:, pl.ds(start, chunk)], k_c, trans_b=True)
            if c < per_part:
                own_chunks.append(k_c)
        s = jnp.where(valid, s * scale2, NEG_INF)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.where(valid, jnp.exp2(s - m_next[:, None]), 0.0)
        l_next = l_prev * alpha + jnp.sum(p, axis=1)
        p_lo = p.astype(kv_ref.dtype)
        accs = tuple(a * alpha[:, None] + plgpu.dot(p_lo, k_c) for a, k_c in zip(accs, own_chunks))
        return accs, m_next, l_next

    accs = tuple(jnp.zeros((block_h, chunk), jnp.float32) for _ in range(per_part))
    m = jnp.full((block_h,), NEG_INF, jnp.float32)
    l = jnp.zeros((block_h,), jnp.float32)
    accs, m, l = jax.lax.fori_loop(0, num_k_blocks, body, (accs, m, l))
    has_keys = l > 0
    l_safe = jnp.where(has_keys, l, 1.0)
    for c, a in enumerate(accs):
        out_ref[:, pl.ds(c * chunk, chunk)] = (a / l_safe[:, None]).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(has_keys, (m + jnp.log2(l_safe)) * LN2, NEG_INF)


def _dq_kernel(q_ref, kv_ref, idx_ref, do_ref, lse_ref, delta_ref, dq_v_ref, dq_r_ref, *, sm_scale: float,
               dv: int, dr: int, block_k: int, num_k_blocks: int, chunk: int, v_splits: int):
    """dQ of block_h heads of one query, one of v_splits parts of its value columns (and the rope
    columns, which every part computes and the wrapper takes from part 0): the forward's layout, so
    every dot is a 64-row wgmma and the accumulator is as small as the forward's."""
    block_h = q_ref.shape[0]
    scale2 = sm_scale * LOG2E
    part = pl.program_id(0) % v_splits
    starts, per_part = _value_chunk_starts(part, dv // chunk, v_splits, chunk)
    q_r = q_ref[:, pl.ds(dv, dr)]
    lse2 = lse_ref[...] * LOG2E
    delta = delta_ref[...]

    def body(j, carry):
        dq_vs, dq_r = carry
        idx = idx_ref[pl.ds(j * block_k, block_k)]
        valid = (idx >= 0)[None, :]
        rows = jnp.maximum(idx, 0)
        k_r = _gather_rows(kv_ref, rows, dv, dr)
        s = plgpu.dot(q_r, k_r, trans_b=True)
        dp = None
        own_chunks = []
        for c, start in enumerate(starts):
            k_c = _gather_rows(kv_ref, rows, start, chunk)
            s = s + plgpu.dot(q_ref[:, pl.ds(start, chunk)], k_c, trans_b=True)
            dp_c = plgpu.dot(do_ref[:, pl.ds(start, chunk)], k_c, trans_b=True)
            dp = dp_c if dp is None else dp + dp_c
            if c < per_part:
                own_chunks.append(k_c)
        p = jnp.where(valid, jnp.exp2(s * scale2 - lse2[:, None]), 0.0)
        ds = (p * (dp - delta[:, None]) * sm_scale).astype(kv_ref.dtype)
        dq_vs = tuple(a + plgpu.dot(ds, k_c) for a, k_c in zip(dq_vs, own_chunks))
        return dq_vs, dq_r + plgpu.dot(ds, k_r)

    dq_vs = tuple(jnp.zeros((block_h, chunk), jnp.float32) for _ in range(per_part))
    dq_vs, dq_r = jax.lax.fori_loop(0, num_k_blocks, body, (dq_vs, jnp.zeros((block_h, dr), jnp.float32)))
    for c, a in enumerate(dq_vs):
        dq_v_ref[:, pl.ds(c * chunk, chunk)] = a.astype(dq_v_ref.dtype)
    dq_r_ref[...] = dq_r.astype(dq_r_ref.dtype)


def _dkv_kernel(q_ref, kv_ref, idx_ref, do_ref, lse_ref, delta_ref, _dkv_in_ref, dkv_ref, *, sm_scale: float,
                dv: int, dr: int, block_h: int, num_h_blocks: int, chunk: int, v_splits: int, trash_row: int):
    """dKV of block_k slots of one query over all its heads, one of v_splits parts of the value
    columns (part 0 also adds the rope columns). Keys are the rows of every dot (transposed scores
    s^T = k q^T), so with 64 slots each dot is a 64-row wgmma, a gathered row is read once per query
    and each (query, slot) pair is added to dkv once per column (not once per head block)."""
    del _dkv_in_ref  # aliased with dkv_ref: the zero-initialized accumulator
    scale2 = sm_scale * LOG2E
    part = pl.program_id(0) % v_splits
    starts, per_part = _value_chunk_starts(part, dv // chunk, v_splits, chunk)
    idx = idx_ref[...]
    valid = (idx >= 0)[:, None]
    rows = jnp.maximum(idx, 0)
    k_r = _gather_rows(kv_ref, rows, dv, dr)
    k_chunks = [_gather_rows(kv_ref, rows, start, chunk) for start in starts]

    def body(i, carry):
        dk_vs, dk_r = carry
        heads = pl.ds(i * block_h, block_h)
        q_r = q_ref[heads, pl.ds(dv, dr)]
        s_t = plgpu.dot(k_r, q_r, trans_b=True)  # [block_k, block_h]
        dp_t = None
        for k_c, start in zip(k_chunks, starts):
            s_t = s_t + plgpu.dot(k_c, q_ref[heads, pl.ds(start, chunk)], trans_b=True)
            dp_c = plgpu.dot(k_c, do_ref[heads, pl.ds(start, chunk)], trans_b=True)
            dp_t = dp_c if dp_t is None else dp_t + dp_c
        p_t = jnp.where(valid, jnp.exp2(s_t * scale2 - (lse_ref[heads] * LOG2E)[None, :]), 0.0)
        ds_t = (p_t * (dp_t - delta_ref[heads][None, :]) * sm_scale).astype(q_ref.dtype)
        p_t = p_t.astype(do_ref.dtype)
        dk_vs = tuple(a + plgpu.dot(ds_t, q_ref[heads, pl.ds(start, chunk)])
                      + plgpu.dot(p_t, do_ref[heads, pl.ds(start, chunk)])
                      for a, start in zip(dk_vs, starts[:per_part]))
        return dk_vs, dk_r + plgpu.dot(ds_t, q_r)

    block_k = idx.shape[0]
    dk_vs = tuple(jnp.zeros((block_k, chunk), jnp.float32) for _ in range(per_part))
    dk_vs, dk_r = jax.lax.fori_loop(0, num_h_blocks, body, (dk_vs, jnp.zeros((block_k, dr), jnp.float32)))
    # Invalid slots go to the trash row, so valid rows (distinct within a query) never collide.
    target = jnp.where(idx >= 0, idx, trash_row)[:, None]
    for a, start in zip(dk_vs, starts[:per_part]):
        plgpu.atomic_add(dkv_ref, (target, start + jnp.arange(chunk)[None, :]), a)

    @pl.when(part == 0)
    def _():
        plgpu.atomic_add(dkv_ref, (target, dv + jnp.arange(dr)[None, :]), dk_r)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers and the custom VJP.


def _prepare(q, kv, indices, cfg: GpuKernelConfig, block_h: int, block_k: int):
    qp = pad_to_multiple(_pad_features(q, cfg.v_dim), 2, block_h, 0)
    kvp = _pad_features(kv, cfg.v_dim)
    idxp = pad_to_multiple(indices, 2, block_k, -1)
    return qp, kvp, idxp


def _value_parts(dv: int, chunk: int, v_splits: int) -> int:
    """How many programs share the value columns: v_splits when it divides the chunk count."""
    return v_splits if (dv // chunk) % v_splits == 0 else 1


def _forward(q, kv, indices, cfg: GpuKernelConfig):
    b, s, h, d = q.shape
    t = kv.shape[1]
    block_h = _head_block(h, cfg.block_h)
    qp, kvp, idxp = _prepare(q, kv, indices, cfg, block_h, cfg.block_k)
    dv, dr = _split_dims(d, cfg.v_dim)
    hp, dp, kp = qp.shape[2], qp.shape[3], idxp.shape[2]
    chunk = min(cfg.chunk_v, dv)
    vs = _value_parts(dv, chunk, cfg.v_splits)
    kernel = functools.partial(_forward_kernel, scale2=cfg.sm_scale * LOG2E, dv=dv, dr=dr,
                               block_k=cfg.block_k, num_k_blocks=kp // cfg.block_k, chunk=chunk, v_splits=vs)
    out, lse = pl.pallas_call(
        kernel,
        # Value parts, then head blocks fastest: the programs of one query run side by side and
        # share its gathered key rows through L2.
        grid=(vs * hp // block_h, s, b),
        in_specs=[
            pl.BlockSpec((None, None, block_h, dp), lambda h, i, j: (j, i, h // vs, 0)),
            pl.BlockSpec((None, t, dp), lambda h, i, j: (j, 0, 0)),
            pl.BlockSpec((None, None, kp), lambda h, i, j: (j, i, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, block_h, dv // vs), lambda h, i, j: (j, i, h // vs, h % vs)),
            pl.BlockSpec((None, None, None, block_h), lambda h, i, j: (j, i, h % vs, h // vs)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, s, hp, dv), q.dtype),
                   jax.ShapeDtypeStruct((b, s, vs, hp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages_fwd),
        interpret=cfg.interpret,
        name="sparse_mla_forward",
    )(qp, kvp, idxp)
    return out[:, :, :h, :cfg.v_dim], lse[:, :, 0, :h]


def _backward(q, kv, indices, out, lse, d_out, d_lse, cfg: GpuKernelConfig):
    b, s, h, d = q.shape
    t = kv.shape[1]
    block_h = _head_block(h, cfg.block_h)  # dQ kernel: the forward's head blocks
    step_h = _head_block(h, cfg.block_h_bwd)  # dKV kernel: heads per step of its loop
    dv, dr = _split_dims(d, cfg.v_dim)
    chunk = min(cfg.chunk_v, dv)
    qp, kvp, idx_q = _prepare(q, kv, indices, cfg, max(block_h, step_h), cfg.block_k)
    idx_kv = pad_to_multiple(indices, 2, cfg.block_k_bwd, -1)
    hp, dp = qp.shape[2], qp.shape[3]
    delta = jnp.einsum("bshd,bshd->bsh", out.astype(jnp.float32), d_out.astype(jnp.float32))
    delta = pad_to_multiple(delta - d_lse.astype(jnp.float32), 2, hp, 0.0)
    # Padded heads get lse = +big so their probabilities are exactly 0.
    lse_p = pad_to_multiple(lse, 2, hp, -NEG_INF)
    do_p = pad_to_multiple(jnp.pad(d_out, [(0, 0)] * 3 + [(0, dv - cfg.v_dim)]), 2, hp, 0)
    params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    vs = _value_parts(dv, chunk, cfg.v_splits_dq)
    rows = lambda width: pl.BlockSpec((None, None, block_h, width), lambda h, i, j: (j, i, h // vs, 0))
    heads = pl.BlockSpec((None, None, block_h), lambda h, i, j: (j, i, h // vs))
    dq_v, dq_r = pl.pallas_call(
        functools.partial(_dq_kernel, sm_scale=cfg.sm_scale, dv=dv, dr=dr, block_k=cfg.block_k,
                          num_k_blocks=idx_q.shape[2] // cfg.block_k, chunk=chunk, v_splits=vs),
        grid=(vs * hp // block_h, s, b),
        in_specs=[rows(dp), pl.BlockSpec((None, t, dp), lambda h, i, j: (j, 0, 0)),
                  pl.BlockSpec((None, None, idx_q.shape[2]), lambda h, i, j: (j, i, 0)), rows(dv), heads, heads],
        out_specs=[pl.BlockSpec((None, None, block_h, dv // vs), lambda h, i, j: (j, i, h // vs, h % vs)),
                   pl.BlockSpec((None, None, None, block_h, dr), lambda h, i, j: (j, i, h % vs, h // vs, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, s, hp, dv), q.dtype), jax.ShapeDtypeStruct((b, s, vs, hp, dr), q.dtype)],
        compiler_params=params,
        interpret=cfg.interpret,
        name="sparse_mla_backward_dq",
    )(qp, kvp, idx_q, do_p, lse_p, delta)
    dq = _unpad_features(jnp.concatenate([dq_v, dq_r[:, :, 0]], axis=-1)[:, :, :h], d, cfg.v_dim)

    block_k = cfg.block_k_bwd
    vs = _value_parts(dv, chunk, cfg.v_splits_dkv)
    whole = lambda *shape: pl.BlockSpec((None, *shape), lambda kb, i, j: (j,) + (0,) * len(shape))
    query = lambda *shape: pl.BlockSpec((None, None, *shape), lambda kb, i, j: (j, i) + (0,) * len(shape))
    dkv0 = jnp.zeros((b, t + 1, dp), jnp.float32)
    dkv = pl.pallas_call(
        functools.partial(_dkv_kernel, sm_scale=cfg.sm_scale, dv=dv, dr=dr, block_h=step_h,
                          num_h_blocks=hp // step_h, chunk=chunk, v_splits=vs, trash_row=t),
        # Queries fastest: concurrent programs are mostly different queries, which spreads the
        # atomic adds over different rows.
        grid=(vs * idx_kv.shape[2] // block_k, s, b),
        in_specs=[query(hp, dp), whole(t, dp),
                  pl.BlockSpec((None, None, block_k), lambda kb, i, j: (j, i, kb // vs)),
                  query(hp, dv), query(hp), query(hp), whole(t + 1, dp)],
        out_specs=whole(t + 1, dp),
        out_shape=jax.ShapeDtypeStruct(dkv0.shape, jnp.float32),
        input_output_aliases={6: 0},
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps_dkv, num_stages=cfg.num_stages_dkv),
        interpret=cfg.interpret,
        name="sparse_mla_backward_dkv",
    )(qp, kvp, idx_kv, do_p, lse_p, delta, dkv0)
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
    lse_p = pad_to_multiple(jax.lax.stop_gradient(lse).astype(jnp.float32), 2, block_h, -NEG_INF)  # padded heads: p = 0
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
