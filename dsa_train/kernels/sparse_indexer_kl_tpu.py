"""The sparse indexer KL as Pallas kernels for TPU (Mosaic lowering).

Math as in `sparse_indexer_kl_gpu` (per query t, slot k: indexer score I, target p, online lse_I;
backward dI = g_t (psum_t exp(I - lse_I) - p)). Four kernels, all built on the sparse attention's
row gather (`sparse_attention_tpu._gather_pipeline`: one DMA per selected row, double-buffered
across a query block's slot blocks, bf16 rows packed two per 32-bit word):
- target, grid (S / block_q, B): the head-mean main-attention probabilities p [B, S, K] over the
  selected keys, from the sparse attention's own lse; all H heads of a query in one [H, D] x
  [D, block_k] matmul, so each gathered 576-dim row serves every head.
- forward statistics, same grid: the query's Hi indexer heads against its gathered indexer-key
  rows ([Hi, Di] x [Di, block_k]); online lse_I, sum p log p, sum p I, sum p -> KL_t, lse_I, psum.
- dq / dw, same grid: the slots again, dq [Hi, Di] and dw [Hi] accumulated in VMEM scratch.
- dk, grid (T / tile_t, B, S / block_q) = ("parallel", "parallel", "arbitrary"): the sparse
  attention's dKV scheme. TPU has no atomic adds and the whole [T, Di] fp32 dk is 64 MiB at
  T = 128K (a v5p core has 64 MiB of VMEM), so each step of the first axis owns one
  [tile_t, Di] fp32 tile resident in VMEM and sweeps the query blocks in order (race-free
  read-modify-writes of its rows), then DMAs it to HBM: VMEM does not grow with T, only the number
  of tiles does. Each query's indices are sorted once outside (unused slots last), together with p
  (so p needs no in-kernel permutation); the kernel binary-searches each query's slot range inside
  the tile, walks the lane-aligned slot blocks that cover it (live slots masked), gathers those
  indexer-key rows and adds dk = dz^T q_idx per row. Query blocks with no key in the tile are
  skipped (scalar-prefetched [first, last] bounds clamp their block index: no q fetch).

VMEM (Hi = 64, Di = 128, H = 128, D = 576, bf16, block_q = 8, block_k = 128, K = 2048, tile_t =
32768), independent of L: target ~3 MiB (q block, gather buffers, p block), statistics and dq/dw
< 2 MiB, dk ~17 MiB (the 16 MiB tile). HBM bytes per (query, slot): target one gathered 576-dim
row (1152) + the index (4) + p written (4); forward statistics one indexer-key row (256) + index
and p (8); backward two indexer-key rows (dq/dw and dk passes, 512) + the sorted index and p
(8, plus the XLA sort over [S, K]); dk row updates stay in VMEM, and per (query, tile with selected
keys) the dk pass re-reads q_idx (Hi Di x 2 bytes). FLOPs per (query, slot): target 2 H D (147K);
statistics 2 Hi Di (16K); backward 4 Hi Di (dq/dw: z, dq) + 4 Hi Di (dk: z, dk) (66K); the dk
pass may run up to two partly masked slot blocks per (query, tile).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsa_train.kernels.padding import pad_to_multiple
from dsa_train.kernels.sparse_attention_tpu import (
    SUBLANES,
    _column_to_row,
    _compiler_params,
    _count_below,
    _div,
    _dot,
    _dot_nt,
    _gather_pipeline,
    _gather_source,
    _interpret_arg,
    _per_query,
    _query_block_rows,
    _query_specs,
    _rem,
    _row_to_column,
    _slot_block,
    _tile_order,
)

F32 = jnp.float32
NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class TpuKlConfig:
    block_q: int = 8
    block_k: int = 128
    tile_t: int = 32768
    interpret: bool = False


def _padded(indices, cfg: TpuKlConfig, *per_query):
    """Slots padded to the slot block (-1), queries to block_q (-1 slots, zeros elsewhere)."""
    block_k = _slot_block(indices.shape[-1], cfg.block_k)
    idxp = pad_to_multiple(pad_to_multiple(indices.astype(jnp.int32), 2, block_k, -1), 1, cfg.block_q, -1)
    return block_k, idxp, [pad_to_multiple(x, 1, cfg.block_q, 0) for x in per_query]


def _slot_blocks(x, block_k: int):
    """[B, S, Kp] -> [B, S, Kp / block_k, block_k]: a slot block is then a sublane row."""
    return x.reshape(*x.shape[:2], x.shape[2] // block_k, block_k)


def _scratch(block_k: int, src):
    return [pltpu.VMEM((2, block_k, src.shape[-1]), src.dtype), pltpu.SemaphoreType.DMA((2,))]


def _column(ref, qi):
    """Row qi of a [block_q, N] per-query block as a column [N, 1] (fp32)."""
    return _row_to_column(ref[pl.ds(qi, 1), :].astype(F32))


def _indexer_scores(q, w_col, keys, valid, scale: float):
    """Heads as rows: z [Hi, bk] and scores [1, bk] (-inf where not valid)."""
    z = _dot_nt(q, keys) * scale
    score = jnp.sum(w_col * jnp.maximum(z, 0.0), axis=0, keepdims=True)
    return z, jnp.where(valid, score, NEG)


def _nbytes(*arrays) -> int:
    return sum(x.size * x.dtype.itemsize for x in arrays)


def _cost(pairs: int, flops_per_pair: int, row_bytes: int, extra_bytes: int, transcendentals_per_pair: int = 1):
    """What XLA's cost analysis should count for one kernel (it cannot look inside Mosaic): per
    (query, slot) as executed, the matmul FLOPs, one gathered row and its index (SMEM and VMEM
    copies) and one fp32 p value; plus the per-query blocks and outputs in extra_bytes."""
    return pl.CostEstimate(flops=pairs * flops_per_pair, transcendentals=pairs * transcendentals_per_pair,
                           bytes_accessed=pairs * (row_bytes + 12) + extra_bytes)


def _row_bytes(src) -> int:
    return src.shape[-1] * src.dtype.itemsize


# ---- target ----------------------------------------------------------------------------------------

def _target_kernel(idx_smem, idx_vmem, q_ref, lse_ref, kv_hbm, p_ref, buf, sem, *, sm_scale: float,
                   num_blocks: int, key_dtype):
    b = pl.program_id(1)
    block_q, block_k = q_ref.shape[0], buf.shape[1]
    n_heads = q_ref.shape[1]

    def body(g, keys):
        qi, blk = _div(g, num_blocks), _rem(g, num_blocks)
        probs = jnp.exp(_dot_nt(q_ref[qi], keys) * sm_scale - _column(lse_ref, qi))  # [H, bk]
        valid = idx_vmem[qi, pl.ds(blk, 1), :] >= 0
        p_ref[qi, pl.ds(blk, 1), :] = jnp.where(valid, jnp.sum(probs, axis=0, keepdims=True) * (1.0 / n_heads), 0.0)

    _gather_pipeline(kv_hbm, buf, sem, b, block_q * num_blocks, _query_block_rows(idx_smem, block_k, num_blocks),
                     body, q_ref.shape[-1], key_dtype)


def head_mean_probs_tpu(q, kv, indices, lse, *, sm_scale: float, interpret: bool = False, **blocks):
    """mean_h exp(sm_scale q_h . kv[idx] - lse_h) -> [B, S, K] fp32, 0 at -1 slots; q [B, S, H, D],
    kv [B, T, D], lse [B, S, H] (the sparse attention's). Not differentiable (a stop-gradient target)."""
    cfg = TpuKlConfig(interpret=interpret, **blocks)
    b, s, h, d = q.shape
    k = indices.shape[-1]
    block_k, idxp, (qp, lsep) = _padded(indices, cfg, q, lse.astype(F32))
    sp, kp = idxp.shape[1], idxp.shape[2]
    num_blocks = kp // block_k
    src = _gather_source(kv)
    p = pl.pallas_call(
        functools.partial(_target_kernel, sm_scale=float(sm_scale), num_blocks=num_blocks, key_dtype=kv.dtype),
        grid=(sp // cfg.block_q, b),
        in_specs=_query_specs(cfg.block_q, kp, block_k) + [_per_query(cfg.block_q, h, d), _per_query(cfg.block_q, h),
                                                           pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=_per_query(cfg.block_q, num_blocks, block_k),
        out_shape=jax.ShapeDtypeStruct((b, sp, num_blocks, block_k), F32),
        scratch_shapes=_scratch(block_k, src),
        compiler_params=_compiler_params(("parallel", "parallel")),
        cost_estimate=_cost(b * sp * kp, 2 * h * d, _row_bytes(src), _nbytes(qp, lsep), transcendentals_per_pair=h),
        interpret=_interpret_arg(cfg.interpret),
        name="sparse_indexer_kl_target",
    )(idxp, _slot_blocks(idxp, block_k), qp, lsep, src)
    return p.reshape(b, sp, kp)[:, :s, :k]


# ---- forward statistics ----------------------------------------------------------------------------

def _stats_kernel(idx_smem, idx_vmem, p_ref, qi_ref, w_ref, ki_hbm, kl_ref, lse_ref, psum_ref, buf, sem, m_ref,
                  l_ref, plogp_ref, p_dot_i_ref, p_sum_ref, *, scale: float, num_blocks: int, key_dtype):
    b = pl.program_id(1)
    block_q, block_k = qi_ref.shape[0], buf.shape[1]

    def body(g, keys):
        qi, blk = _div(g, num_blocks), _rem(g, num_blocks)

        @pl.when(blk == 0)
        def _reset():
            m_ref[...] = jnp.full_like(m_ref, NEG)
            for r in (l_ref, plogp_ref, p_dot_i_ref, p_sum_ref):
                r[...] = jnp.zeros_like(r)

        valid = idx_vmem[qi, pl.ds(blk, 1), :] >= 0
        _, score = _indexer_scores(qi_ref[qi], _column(w_ref, qi), keys, valid, scale)
        p = p_ref[qi, pl.ds(blk, 1), :]
        m = m_ref[...]
        m_new = jnp.maximum(m, jnp.max(score, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == NEG, 0.0, m_new)
        l_ref[...] = l_ref[...] * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(score - m_safe), axis=1, keepdims=True)
        m_ref[...] = m_new
        positive = p > 0
        plogp_ref[...] += jnp.sum(jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0), axis=1,
                                  keepdims=True)
        p_dot_i_ref[...] += jnp.sum(jnp.where(positive, p * score, 0.0), axis=1, keepdims=True)
        p_sum_ref[...] += jnp.sum(p, axis=1, keepdims=True)

        @pl.when(blk == num_blocks - 1)
        def _finish():
            l = l_ref[...]
            has_keys = l > 0
            lse_i = jnp.where(has_keys, m_ref[...] + jnp.log(jnp.where(has_keys, l, 1.0)), 0.0)
            kl_ref[pl.ds(qi, 1), :] = plogp_ref[...] - p_dot_i_ref[...] + lse_i * p_sum_ref[...]
            lse_ref[pl.ds(qi, 1), :] = lse_i
            psum_ref[pl.ds(qi, 1), :] = p_sum_ref[...]

    _gather_pipeline(ki_hbm, buf, sem, b, block_q * num_blocks, _query_block_rows(idx_smem, block_k, num_blocks),
                     body, qi_ref.shape[-1], key_dtype)


def sparse_kl_stats_tpu(q_idx, k_idx, w_idx, indices, p, *, interpret: bool = False, **blocks):
    """-> KL_t, lse_I(t), psum(t), each [B, S] fp32."""
    cfg = TpuKlConfig(interpret=interpret, **blocks)
    b, s, hi, di = q_idx.shape
    block_k, idxp, (qp, wp, pp) = _padded(indices, cfg, q_idx, w_idx.astype(F32), p.astype(F32))
    sp, kp = idxp.shape[1], idxp.shape[2]
    num_blocks = kp // block_k
    pp = pad_to_multiple(pp, 2, block_k, 0.0)
    src = _gather_source(k_idx)
    column = jax.ShapeDtypeStruct((b, sp, 1), F32)
    outs = pl.pallas_call(
        functools.partial(_stats_kernel, scale=di ** -0.5, num_blocks=num_blocks, key_dtype=k_idx.dtype),
        grid=(sp // cfg.block_q, b),
        in_specs=_query_specs(cfg.block_q, kp, block_k) + [
            _per_query(cfg.block_q, num_blocks, block_k), _per_query(cfg.block_q, hi, di), _per_query(cfg.block_q, hi),
            pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[_per_query(cfg.block_q, 1)] * 3,
        out_shape=[column] * 3,
        scratch_shapes=_scratch(block_k, src) + [pltpu.VMEM((1, 1), F32) for _ in range(5)],
        compiler_params=_compiler_params(("parallel", "parallel")),
        cost_estimate=_cost(b * sp * kp, 2 * hi * di, _row_bytes(src), _nbytes(qp, wp) + 3 * b * sp * 4),
        interpret=_interpret_arg(cfg.interpret),
        name="sparse_indexer_kl_forward",
    )(idxp, _slot_blocks(idxp, block_k), _slot_blocks(pp, block_k), qp, wp, src)
    return tuple(x[:, :s, 0] for x in outs)


# ---- backward: dq / dw -----------------------------------------------------------------------------

def _d_score(score, valid, p, lse_i, psum, g):
    soft = jnp.where(valid, jnp.exp(score - lse_i), 0.0)
    return jnp.where(valid, g * (psum * soft - p), 0.0)


def _dq_dw_kernel(idx_smem, idx_vmem, p_ref, qi_ref, w_ref, lse_ref, psum_ref, g_ref, ki_hbm, dq_ref, dw_ref, buf,
                  sem, dq_acc, dw_acc, *, scale: float, num_blocks: int, key_dtype):
    b = pl.program_id(1)
    block_q, block_k = qi_ref.shape[0], buf.shape[1]

    def body(g, keys):
        qi, blk = _div(g, num_blocks), _rem(g, num_blocks)
        valid = idx_vmem[qi, pl.ds(blk, 1), :] >= 0
        w = _column(w_ref, qi)
        z, score = _indexer_scores(qi_ref[qi], w, keys, valid, scale)
        row = pl.ds(qi, 1)
        ds = _d_score(score, valid, p_ref[qi, pl.ds(blk, 1), :], lse_ref[row, :], psum_ref[row, :], g_ref[row, :])
        dz = jnp.where(z > 0, ds * w, 0.0)  # [Hi, bk]
        dq_part = _dot(dz.astype(keys.dtype), keys)
        dw_part = jnp.sum(ds * jnp.maximum(z, 0.0), axis=1, keepdims=True)

        @pl.when(blk == 0)
        def _first():
            dq_acc[...] = dq_part
            dw_acc[...] = dw_part

        @pl.when(blk > 0)
        def _more():
            dq_acc[...] += dq_part
            dw_acc[...] += dw_part

        @pl.when(blk == num_blocks - 1)
        def _finish():
            dq_ref[qi] = (dq_acc[...] * scale).astype(dq_ref.dtype)
            dw_ref[row, :] = _column_to_row(dw_acc[...])

    _gather_pipeline(ki_hbm, buf, sem, b, block_q * num_blocks, _query_block_rows(idx_smem, block_k, num_blocks),
                     body, qi_ref.shape[-1], key_dtype)


# ---- backward: dk, one resident [tile_t, Di] tile ---------------------------------------------------

def _dk_kernel(first_ref, last_ref, sorted_smem, p_ref, qi_ref, w_ref, lse_ref, psum_ref, g_ref, ki_hbm, dk_hbm,
               buf, sem, acc_ref, dk_buf, range_smem, out_sem, *, scale: float, num_tiles: int, tile_t: int,
               n_keys: int, key_dtype):
    tile = _tile_order(pl.program_id(0), num_tiles)
    b, qb = pl.program_id(1), pl.program_id(2)
    block_q, block_k = qi_ref.shape[0], buf.shape[1]
    kp = sorted_smem.shape[1]
    lo_row = tile * tile_t

    @pl.when(qb == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((qb >= first_ref[b, tile]) & (qb <= last_ref[b, tile]))
    def _compute():
        # range_smem[0, qi] = first slot in the tile, [1, qi] = end, [2, qi] = first global block,
        # [3, qi] = the query's first (lane-aligned) slot block covering the range.
        def ranges(qi, total):
            start = _count_below(sorted_smem, qi, lo_row, kp)
            end = _count_below(sorted_smem, qi, lo_row + tile_t, kp)
            first_block = _div(start, block_k)
            range_smem[0, qi] = start
            range_smem[1, qi] = end
            range_smem[2, qi] = total
            range_smem[3, qi] = first_block
            return total + jnp.where(end > start, _div(end + block_k - 1, block_k) - first_block, 0)

        total = jax.lax.fori_loop(0, block_q, ranges, jnp.int32(0))

        def locate(g):
            """Global block g -> (query in the block, its slot block)."""
            qi = jax.lax.fori_loop(0, block_q, lambda i, qi: jnp.where(range_smem[2, i] <= g, i, qi), 0)
            return qi, range_smem[3, qi] + g - range_smem[2, qi]

        def rows_of(g):
            qi, blk = locate(g)
            return lambda j: jnp.clip(sorted_smem[qi, blk * block_k + j], 0, n_keys - 1)

        def body(g, keys):
            qi, blk = locate(g)
            start, end = range_smem[0, qi], range_smem[1, qi]
            slot = blk * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
            live = (slot >= start) & (slot < end)  # [bk, 1]
            q = qi_ref[qi]
            row = pl.ds(qi, 1)
            w = w_ref[row, :].astype(F32)  # [1, Hi]
            # Keys as rows: z^T [bk, Hi], so the per-slot quantities are columns.
            z = _dot_nt(keys, q) * scale
            score = jnp.where(live, jnp.sum(w * jnp.maximum(z, 0.0), axis=1, keepdims=True), NEG)
            p = _row_to_column(p_ref[qi, pl.ds(blk, 1), :])
            ds = _d_score(score, live, p, lse_ref[row, :], psum_ref[row, :], g_ref[row, :])
            dz = jnp.where(z > 0, ds * w, 0.0)
            dk_buf[...] = _dot(dz.astype(q.dtype), q) * scale  # [bk, Di]

            # Rows are added one after another and grid steps along the query axis run in order
            # on one core, so a plain read-modify-write per row is safe.
            def scatter(j, carry):
                s = blk * block_k + j

                @pl.when((s >= start) & (s < end))
                def _add():
                    r = sorted_smem[qi, s] - lo_row
                    acc_ref[pl.ds(r, 1), :] += dk_buf[pl.ds(j, 1), :]

                return carry

            jax.lax.fori_loop(0, block_k, scatter, 0)

        _gather_pipeline(ki_hbm, buf, sem, b, total, rows_of, body, qi_ref.shape[-1], key_dtype)

    @pl.when(qb == pl.num_programs(2) - 1)
    def _write():
        copy = pltpu.make_async_copy(acc_ref, dk_hbm.at[b, pl.ds(pl.multiple_of(lo_row, SUBLANES), tile_t)],
                                     out_sem.at[0])
        copy.start()
        copy.wait()


def _tile_bounds(sorted_idx, n_keys: int, tile_t: int, num_tiles: int, block_q: int):
    """Per (batch, tile): the first and last query block with a selected key in the tile (a
    superset from each block's lowest to highest key; the kernel finds the exact ranges)."""
    b, sp, _ = sorted_idx.shape
    num_qblocks = sp // block_q
    low = jnp.minimum(sorted_idx[..., 0], n_keys).reshape(b, num_qblocks, block_q).min(axis=2) // tile_t
    high = jnp.max(jnp.where(sorted_idx < n_keys, sorted_idx, -1), axis=-1)
    high = jnp.where(high >= 0, high // tile_t, -1).reshape(b, num_qblocks, block_q).max(axis=2)
    tiles = jnp.arange(num_tiles)
    hits = (low[..., None] <= tiles) & (tiles <= high[..., None])  # [B, n_qblocks, n_tiles]
    qblock = jnp.arange(num_qblocks)[None, :, None]
    first = jnp.min(jnp.where(hits, qblock, num_qblocks), axis=1).astype(jnp.int32)
    last = jnp.max(jnp.where(hits, qblock, -1), axis=1).astype(jnp.int32)
    return first, last


def sparse_kl_grads_tpu(q_idx, k_idx, w_idx, indices, p, lse_i, psum, g, *, interpret: bool = False, **blocks):
    """Gradients of sum_t g_t KL_t w.r.t. (q_idx, k_idx, w_idx), in their dtypes."""
    cfg = TpuKlConfig(interpret=interpret, **blocks)
    b, s, hi, di = q_idx.shape
    t = k_idx.shape[1]
    scalars = [x.astype(F32)[..., None] for x in (lse_i, psum, g)]
    block_k, idxp, (qp, wp, pp, *scalars) = _padded(indices, cfg, q_idx, w_idx.astype(F32), p.astype(F32), *scalars)
    sp, kp = idxp.shape[1], idxp.shape[2]
    num_blocks = kp // block_k
    pp = pad_to_multiple(pp, 2, block_k, 0.0)
    src = _gather_source(k_idx)
    scale = di ** -0.5
    per_q = functools.partial(_per_query, cfg.block_q)

    dq, dw = pl.pallas_call(
        functools.partial(_dq_dw_kernel, scale=scale, num_blocks=num_blocks, key_dtype=k_idx.dtype),
        grid=(sp // cfg.block_q, b),
        in_specs=_query_specs(cfg.block_q, kp, block_k) + [
            per_q(num_blocks, block_k), per_q(hi, di), per_q(hi), per_q(1), per_q(1), per_q(1),
            pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[per_q(hi, di), per_q(hi)],
        out_shape=[jax.ShapeDtypeStruct((b, sp, hi, di), q_idx.dtype), jax.ShapeDtypeStruct((b, sp, hi), F32)],
        scratch_shapes=_scratch(block_k, src) + [pltpu.VMEM((hi, di), F32), pltpu.VMEM((hi, 1), F32)],
        compiler_params=_compiler_params(("parallel", "parallel")),
        cost_estimate=_cost(b * sp * kp, 4 * hi * di, _row_bytes(src), 2 * _nbytes(qp) + 2 * _nbytes(wp, *scalars)),
        interpret=_interpret_arg(cfg.interpret),
        name="sparse_indexer_kl_backward_dq_dw",
    )(idxp, _slot_blocks(idxp, block_k), _slot_blocks(pp, block_k), qp, wp, *scalars, src)

    # At least two tiles (when T > 8), so both TensorCores get a share of the parallel tile axis.
    tile_t = min(cfg.tile_t, -(-t // (2 * SUBLANES)) * SUBLANES)
    num_tiles = -(-t // tile_t)
    num_qblocks = sp // cfg.block_q
    # Unused slots sort last, past every tile; p travels with its index.
    sentinel = num_tiles * tile_t
    sorted_idx, sorted_p = jax.lax.sort((jnp.where(idxp >= 0, idxp, sentinel), pp), dimension=2, num_keys=1)
    first, last = _tile_bounds(sorted_idx, t, tile_t, num_tiles, cfg.block_q)

    def query_block(i, b, qb, first_ref, last_ref):
        tile = _tile_order(i, num_tiles)
        # Outside [first, last] the block index stays put: no fetch for skipped steps.
        return jnp.clip(qb, jnp.minimum(first_ref[b, tile], last_ref[b, tile]), jnp.maximum(last_ref[b, tile], 0))

    def tiled(*tail, memory_space=None):
        zeros = (0,) * len(tail)
        kw = {} if memory_space is None else dict(memory_space=memory_space)
        return pl.BlockSpec((None, cfg.block_q, *tail), lambda i, b, qb, f, l: (b, query_block(i, b, qb, f, l), *zeros),
                            **kw)

    dk = pl.pallas_call(
        functools.partial(_dk_kernel, scale=scale, num_tiles=num_tiles, tile_t=tile_t, n_keys=t,
                          key_dtype=k_idx.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(num_tiles, b, num_qblocks),
            in_specs=[tiled(kp, memory_space=pltpu.SMEM), tiled(num_blocks, block_k), tiled(hi, di), tiled(hi),
                      tiled(1), tiled(1), tiled(1), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec(memory_space=pl.ANY),
            scratch_shapes=_scratch(block_k, src) + [
                pltpu.VMEM((tile_t, di), F32), pltpu.VMEM((block_k, di), F32),
                pltpu.SMEM((4, cfg.block_q + 1), jnp.int32), pltpu.SemaphoreType.DMA((1,))],
        ),
        out_shape=jax.ShapeDtypeStruct((b, num_tiles * tile_t, di), F32),
        compiler_params=_compiler_params(("parallel", "parallel", "arbitrary")),
        # q_idx is re-read per tile that holds a query's keys: counted for half the tiles (causal
        # indices), an assumption.
        cost_estimate=_cost(b * sp * kp, 4 * hi * di, _row_bytes(src),
                            max(1, (num_tiles + 1) // 2) * _nbytes(qp, wp) + b * num_tiles * tile_t * di * 4),
        interpret=_interpret_arg(cfg.interpret),
        name="sparse_indexer_kl_backward_dk",
    )(first, last, sorted_idx, _slot_blocks(sorted_p, block_k), qp, wp, *scalars, src)
    return dq[:, :s], dk[:, :t].astype(k_idx.dtype), dw[:, :s].astype(w_idx.dtype)
