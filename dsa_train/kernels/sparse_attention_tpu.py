"""Top-k sparse MLA attention (MQA/latent form) as Pallas kernels for TPU (Mosaic lowering).

Layout as in `sparse_attention_gpu`: q [B, S, H, D], kv [B, T, D] (value = kv[..., :v_dim]),
indices [B, S, K] (-1 = unused). Every kernel step owns a block of `block_q` queries with ALL their
heads (H = 128 gives [128, 576] x [576, block_k] matmuls, a good MXU shape, and each gathered key
row serves every head), so a key row is fetched from HBM once per (query, slot) and pass.

Gather: kv stays in HBM (memory_space ANY). For each block of block_k slots the kernel issues one
row DMA per slot (`pltpu.make_async_copy`, kv row -> VMEM) and double-buffers across the whole
query block: block g + 1 (possibly the next query's first) is in flight while block g is computed.
Invalid slots fetch row 0 and are masked to probability 0. The slot indices that address the DMAs
arrive per grid step as an SMEM block. A 16-bit VMEM buffer packs two rows per 32-bit sublane and
Mosaic DMAs into it only at tile-aligned rows, so a single bf16 row cannot land at an arbitrary
buffer row (32-bit buffers take any row). bf16 kv is therefore packed two values per 32-bit word
(word w = columns w and w + half, half = ceil(D / 2)) and unpacked in VMEM, exactly (a shift, a
mask and a lane concatenation per block). A gathered row is D x 2 bytes, as bf16 (1152 for
D = 576; HBM's 128-lane tiling may round a row's transfer up to 1536), not the 2304 of a widened
fp32 copy; packing costs one XLA pass over kv [T, D] per call. fp32 kv is gathered as is.

Forward, grid (S / block_q, B), both "parallel", the query axis first so that the two
TensorCores of a v5p chip split the queries at batch 1: online softmax over the slot blocks; out
[H, v_dim] and lse per query. lse is stored lane-dense as [B, S, H] (block [block_q, H]).

Backward, two kernels (TPU has no atomic adds, and a whole [T, D] fp32 dkv stops fitting VMEM at
T ~ 14K):
- dq, grid (S / block_q, B) "parallel": p recomputed from lse, ds = p (dp - delta), dq = ds k.
- dkv, grid (T / tile_t, B, S / block_q) = ("parallel", "parallel", "arbitrary"): each step of the
  first axis owns one [tile_t, D] fp32 dkv tile resident in VMEM and sweeps all query blocks in
  order (so read-modify-writes of its rows are race-free); at the last query block the tile is
  DMA'd to HBM. To touch only the keys selected inside the tile, each query's indices are sorted
  once outside the kernel (-1 -> T, so unused slots sort last); the kernel finds the query's slot
  range in the tile by binary search over the SMEM scalars, gathers only those rows, recomputes
  s, p, dp, ds for them (keys as rows: [block_k, H] scores, so lse and delta broadcast as
  lane-dense rows), forms dk = ds^T q, dv = p^T do and adds each row into the tile. Query blocks
  without a key in the tile (the causal upper triangle) are skipped: scalar-prefetched per-tile
  [first, last] query-block bounds clamp the q / do block index (no re-fetch) and gate the compute.
  There are at least two tiles (tile_t <= T / 2), run in the order 0, n-1, 1, n-2, ... so that
  an even split of the parallel axis gives both cores about the same causal work.

VMEM (H = 128, D = 576, v_dim = 512, bf16, block_q = 8, block_k = 128, K = 2048), independent of
L: forward ~5 MiB, dq ~8 MiB (double-buffered q / do / out blocks, two gather buffers, an fp32
accumulator), dkv ~25 MiB, of which the tile is tile_t x D x 4 bytes (8192 x 576 x 4 = 18 MiB);
only the number of tiles grows with T. tile_t = 16384 also compiles for v5p (dkv 45 MiB of the 48
MiB limit set here) and cuts the q / do re-reads in half (~10% of fwd+bwd bytes at 128K);
8192 is the default for the headroom. HBM bytes per (query, slot), D = 576 bf16: forward one
gathered row (1152), backward two (dq and dkv passes, 2304) plus the sorted index (4 bytes; the
sort itself is an XLA pass over [S, K]); the dkv row update stays in VMEM. Per (query, tile with
selected keys) the dkv pass re-reads q and do (H (D + v_dim) x 2 bytes). FLOPs per (query, slot):
forward 2 H (D + v_dim); backward 2 H (2 D + v_dim) (dq) + 2 H (2 D + 2 v_dim) (dkv), 1.4x a fused
backward: the price of not holding dkv whole. The last slot block of each (query, tile) range is
partly masked (fewer than block_k live slots). The lse cotangent is supported.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsa_train.kernels.padding import pad_to_multiple
from dsa_train.kernels.recompute_vjp import attention_with_recompute
from dsa_train.ops.attention import NEG_INF

SUBLANES = 8
LANES = 128
VMEM_LIMIT = 48 * 2**20  # every kernel stays well below a v5p core's 64 MiB of scoped VMEM


@dataclasses.dataclass(frozen=True)
class TpuKernelConfig:
    sm_scale: float
    v_dim: int
    block_k: int = 128
    block_q: int = 8
    tile_t: int = 8192
    interpret: bool = False


def sparse_mla_attention_tpu(q, kv, indices, sm_scale: float, v_dim: int = 512, *, interpret: bool = False,
                             block_k: int = 128, block_q: int = 8, tile_t: int = 8192):
    """q [B, S, H, D], kv [B, T, D], indices [B, S, K] -> out [B, S, H, v_dim] (q.dtype), lse [B, S, H] fp32."""
    if block_q % SUBLANES or tile_t % SUBLANES:
        raise ValueError(f"block_q and tile_t must be multiples of {SUBLANES}, got {block_q}, {tile_t}")
    cfg = TpuKernelConfig(sm_scale=float(sm_scale), v_dim=int(v_dim), block_k=int(block_k), block_q=int(block_q),
                          tile_t=int(tile_t), interpret=bool(interpret))
    return _attention(q, kv, indices.astype(jnp.int32), cfg)


def _slot_block(k: int, block_k: int) -> int:
    """Slots per DMA block: a lane-aligned block_k, or all of a short index list (rounded to 8)."""
    return block_k if k > block_k else -(-k // SUBLANES) * SUBLANES


def _interpret_arg(interpret: bool):
    # The Mosaic TPU interpreter models DMAs, semaphores and SMEM; plain interpret=True does not.
    return pltpu.InterpretParams() if interpret else False


def _compiler_params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT)


# ----------------------------------------------------------------------------------------------
# Row gather: one DMA per slot, double-buffered across the blocks of a query block.


def _row_copy(kv_hbm, buf, sem, b, row, slot, j):
    return pltpu.make_async_copy(kv_hbm.at[b, pl.ds(row, 1)], buf.at[slot, pl.ds(j, 1)], sem.at[slot])


def _gather_pipeline(kv_hbm, buf, sem, b, num_blocks, rows_of, body, d, key_dtype):
    """For g in [0, num_blocks): body(g, rows [block_k, d] in key_dtype), rows[j] = kv[b, rows_of(g)(j)]
    (rows_of(g) does the per-block scalar work once, its result maps a slot to a row); block g + 1
    is fetched while block g is computed. num_blocks may be traced."""
    block_k = buf.shape[1]

    def start(g, slot):
        row_of = rows_of(g)

        def issue(j, carry):
            _row_copy(kv_hbm, buf, sem, b, row_of(j), slot, j).start()
            return carry

        jax.lax.fori_loop(0, block_k, issue, 0)

    def wait(slot):
        def one(j, carry):
            _row_copy(kv_hbm, buf, sem, b, 0, slot, j).wait()  # same byte count as every row copy
            return carry

        jax.lax.fori_loop(0, block_k, one, 0)

    @pl.when(num_blocks > 0)
    def _first():
        start(0, 0)

    def step(g, carry):
        slot = _rem(g, 2)
        wait(slot)

        @pl.when(g + 1 < num_blocks)
        def _prefetch():
            start(g + 1, 1 - slot)

        body(g, _unpacked(buf[slot], d, key_dtype))
        return carry

    jax.lax.fori_loop(0, num_blocks, step, 0)


def _div(a, n):
    """Integer division of non-negative values (lax.div truncates; `//` lowers through sign())."""
    return jax.lax.div(a, jnp.asarray(n, jnp.int32))


def _rem(a, n):
    return jax.lax.rem(a, jnp.asarray(n, jnp.int32))


def _packed_half(d: int) -> int:
    """Words per packed 16-bit row."""
    return -(-d // 2)


def _gather_source(kv: jnp.ndarray) -> jnp.ndarray:
    """kv as the row DMAs read it. 32-bit kv as is. bf16 kv packed two values per 32-bit word,
    word w of a row = (column w, column w + half), half = ceil(D / 2): Mosaic DMAs a single row
    into a 32-bit VMEM buffer at any row, into a 16-bit one only at tile-aligned rows."""
    if kv.dtype.itemsize == 4:
        return kv
    if kv.dtype != jnp.bfloat16:
        raise ValueError(f"sparse attention on TPU takes bfloat16 or 32-bit kv, got {kv.dtype}")
    half = _packed_half(kv.shape[-1])
    bits = jax.lax.bitcast_convert_type(pad_to_multiple(kv, 2, 2 * half, 0), jnp.uint16).astype(jnp.uint32)
    return bits[..., :half] | (bits[..., half:] << 16)


def _unpacked(rows, d: int, dtype):
    """Gathered rows [block_k, W] -> [block_k, D] in kv's dtype (inverse of _gather_source)."""
    if rows.dtype != jnp.uint32:
        return rows.astype(dtype)
    low = jax.lax.bitcast_convert_type(rows << 16, jnp.float32)  # a bf16 / fp16 value's bits, exact in fp32
    high = jax.lax.bitcast_convert_type(rows & jnp.uint32(0xFFFF0000), jnp.float32)
    return jnp.concatenate([low, high], axis=1)[:, :d].astype(dtype)


def _dot_nt(a, b):
    """a [M, D] . b [N, D]^T -> [M, N] in fp32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a [M, N]^T . b [M, D] -> [N, D] in fp32."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _column_to_row(col):
    """[H, 1] -> [1, H] without a relayout Mosaic may reject: a masked reduction over sublanes."""
    n = col.shape[0]
    eye = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def _row_to_column(row):
    n = row.shape[1]
    eye = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Forward and dq kernels: a query block, every query's slots in order.


def _query_block_rows(idx_smem, block_k, num_blocks):
    def rows_of(g):
        qi, slot0 = _div(g, num_blocks), _rem(g, num_blocks) * block_k
        return lambda j: jnp.maximum(idx_smem[qi, slot0 + j], 0)

    return rows_of


def _slot_scores(q, keys, idx_vmem, qi, blk, sm_scale: float):
    """Scaled scores [H, block_k] of one query's slot block, -inf on its -1 slots; and the slot mask."""
    valid = idx_vmem[qi, pl.ds(blk, 1), :] >= 0  # [1, block_k]
    return jnp.where(valid, _dot_nt(q, keys) * sm_scale, NEG_INF), valid


def _forward_kernel(idx_smem, idx_vmem, q_ref, kv_hbm, out_ref, lse_ref, buf, sem, acc_ref, m_ref, l_ref, *,
                    sm_scale: float, v_dim: int, num_blocks: int, key_dtype):
    b = pl.program_id(1)
    block_q, block_k = q_ref.shape[0], buf.shape[1]

    def body(g, keys):
        qi, blk = _div(g, num_blocks), _rem(g, num_blocks)

        @pl.when(blk == 0)
        def _reset():
            acc_ref[...] = jnp.zeros_like(acc_ref)
            m_ref[...] = jnp.full_like(m_ref, NEG_INF)
            l_ref[...] = jnp.zeros_like(l_ref)

        s, valid = _slot_scores(q_ref[qi], keys, idx_vmem, qi, blk, sm_scale)
        m_prev, l_prev = m_ref[...], l_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.where(valid, jnp.exp(s - m_next), 0.0)
        l_ref[...] = l_prev * alpha + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_next
        acc_ref[...] = acc_ref[...] * alpha + _dot(p.astype(key_dtype), keys[:, :v_dim])

        @pl.when(blk == num_blocks - 1)
        def _finish():
            l = l_ref[...]
            has_keys = l > 0
            l_safe = jnp.where(has_keys, l, 1.0)
            out_ref[qi] = (acc_ref[...] / l_safe).astype(out_ref.dtype)
            lse = jnp.where(has_keys, m_ref[...] + jnp.log(l_safe), NEG_INF)
            lse_ref[pl.ds(qi, 1), :] = _column_to_row(lse)

    _gather_pipeline(kv_hbm, buf, sem, b, block_q * num_blocks, _query_block_rows(idx_smem, block_k, num_blocks),
                     body, q_ref.shape[-1], key_dtype)


def _dq_kernel(idx_smem, idx_vmem, q_ref, kv_hbm, do_ref, lse_ref, delta_ref, dq_ref, buf, sem, dq_acc, *,
               sm_scale: float, v_dim: int, num_blocks: int, key_dtype):
    b = pl.program_id(1)
    block_q, block_k = q_ref.shape[0], buf.shape[1]

    def body(g, keys):
        qi, blk = _div(g, num_blocks), _rem(g, num_blocks)
        q, do = q_ref[qi], do_ref[qi]
        lse = _row_to_column(lse_ref[pl.ds(qi, 1), :])  # [H, 1]
        delta = _row_to_column(delta_ref[pl.ds(qi, 1), :])
        s, valid = _slot_scores(q, keys, idx_vmem, qi, blk, sm_scale)
        p = jnp.where(valid, jnp.exp(s - lse), 0.0)  # [H, block_k]
        ds = p * (_dot_nt(do, keys[:, :v_dim]) - delta) * sm_scale
        part = _dot(ds.astype(key_dtype), keys)

        @pl.when(blk == 0)
        def _first():
            dq_acc[...] = part

        @pl.when(blk > 0)
        def _more():
            dq_acc[...] += part

        @pl.when(blk == num_blocks - 1)
        def _finish():
            dq_ref[qi] = dq_acc[...].astype(dq_ref.dtype)

    _gather_pipeline(kv_hbm, buf, sem, b, block_q * num_blocks, _query_block_rows(idx_smem, block_k, num_blocks),
                     body, q_ref.shape[-1], key_dtype)


# ----------------------------------------------------------------------------------------------
# dkv kernel: one resident [tile_t, D] tile, the selected keys of each query that fall in it.


def _count_below(sorted_smem, qi, bound, kp):
    """Number of entries < bound in the sorted row sorted_smem[qi, :kp] (binary search on scalars)."""
    def halve(_, lo_hi):
        lo, hi = lo_hi
        mid = _div(lo + hi, 2)
        below = (mid < hi) & (sorted_smem[qi, jnp.minimum(mid, kp - 1)] < bound)
        return jnp.where(below, mid + 1, lo), jnp.where(below, hi, mid)

    lo, _ = jax.lax.fori_loop(0, max(kp, 1).bit_length(), halve, (jnp.int32(0), jnp.int32(kp)))
    return lo


def _tile_order(i, num_tiles):
    """Grid index -> tile: 0, n-1, 1, n-2, ... (pairs a causally heavy tile with a light one)."""
    return jnp.where(_rem(i, 2) == 0, _div(i, 2), num_tiles - 1 - _div(i, 2))


def _dkv_kernel(first_ref, last_ref, sorted_smem, q_ref, kv_hbm, do_ref, lse_ref, delta_ref, dkv_hbm,
                buf, sem, acc_ref, dk_buf, range_smem, out_sem, *, sm_scale: float, v_dim: int, num_tiles: int,
                tile_t: int, key_dtype):
    tile = _tile_order(pl.program_id(0), num_tiles)
    b, qb = pl.program_id(1), pl.program_id(2)
    block_q, block_k = q_ref.shape[0], buf.shape[1]
    kp = sorted_smem.shape[1]
    lo_row = tile * tile_t

    @pl.when(qb == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((qb >= first_ref[b, tile]) & (qb <= last_ref[b, tile]))
    def _compute():
        # range_smem[0, qi] = first slot in the tile, [1, qi] = end, [2, qi] = first global block.
        def ranges(qi, total):
            start = _count_below(sorted_smem, qi, lo_row, kp)
            end = _count_below(sorted_smem, qi, lo_row + tile_t, kp)
            range_smem[0, qi] = start
            range_smem[1, qi] = end
            range_smem[2, qi] = total
            return total + _div(end - start + block_k - 1, block_k)

        total = jax.lax.fori_loop(0, block_q, ranges, jnp.int32(0))
        range_smem[2, block_q] = total

        def locate(g):
            """Global block g -> (query in the block, its first slot)."""
            qi = jax.lax.fori_loop(0, block_q, lambda i, qi: jnp.where(range_smem[2, i] <= g, i, qi), 0)
            return qi, range_smem[0, qi] + (g - range_smem[2, qi]) * block_k

        def rows_of(g):
            qi, slot0 = locate(g)
            return lambda j: jnp.clip(sorted_smem[qi, jnp.minimum(slot0 + j, kp - 1)], 0, kv_hbm.shape[1] - 1)

        def body(g, keys):
            qi, slot0 = locate(g)
            end = range_smem[1, qi]
            q, do = q_ref[qi], do_ref[qi]
            in_range = slot0 + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0) < end  # [block_k, 1]
            s = _dot_nt(keys, q) * sm_scale  # [block_k, H]
            p = jnp.where(in_range, jnp.exp(s - lse_ref[pl.ds(qi, 1), :]), 0.0)
            ds = p * (_dot_nt(keys[:, :v_dim], do) - delta_ref[pl.ds(qi, 1), :]) * sm_scale
            dk_buf[...] = _dot(ds.astype(q.dtype), q)
            dk_buf[:, :v_dim] += _dot(p.astype(do.dtype), do)

            # Rows are added one after another and grid steps along the query axis run in order
            # on one core, so a plain read-modify-write per row is safe (repeated rows too).
            def scatter(j, carry):
                @pl.when(slot0 + j < end)
                def _add():
                    row = sorted_smem[qi, slot0 + j] - lo_row
                    acc_ref[pl.ds(row, 1), :] += dk_buf[pl.ds(j, 1), :]

                return carry

            jax.lax.fori_loop(0, block_k, scatter, 0)

        _gather_pipeline(kv_hbm, buf, sem, b, total, rows_of, body, q_ref.shape[-1], key_dtype)

    @pl.when(qb == pl.num_programs(2) - 1)
    def _write():
        copy = pltpu.make_async_copy(acc_ref, dkv_hbm.at[b, pl.ds(pl.multiple_of(lo_row, SUBLANES), tile_t)],
                                     out_sem.at[0])
        copy.start()
        copy.wait()


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers and the custom VJP.


def _query_specs(block_q: int, kp: int, block_k: int):
    """The block's indices twice: [block_q, Kp] scalars in SMEM (DMA addresses) and
    [block_q, Kp / block_k, block_k] vectors in VMEM (validity masks)."""
    return [
        pl.BlockSpec((None, block_q, kp), lambda i, b: (b, i, 0), memory_space=pltpu.SMEM),
        pl.BlockSpec((None, block_q, kp // block_k, block_k), lambda i, b: (b, i, 0, 0)),
    ]


def _per_query(block_q: int, *tail: int):
    zeros = (0,) * len(tail)
    return pl.BlockSpec((None, block_q, *tail), lambda i, b: (b, i, *zeros))


def _prepared(q, indices, cfg: TpuKernelConfig, *per_query):
    """Pad queries to block_q and slots to block_k (padding slots and queries: -1, no keys)."""
    block_k = _slot_block(indices.shape[-1], cfg.block_k)
    idxp = pad_to_multiple(pad_to_multiple(indices, 2, block_k, -1), 1, cfg.block_q, -1)
    padded = [pad_to_multiple(x, 1, cfg.block_q, 0) for x in (q, *per_query)]
    return block_k, idxp, padded


def _nbytes(*arrays) -> int:
    return sum(x.size * x.dtype.itemsize for x in arrays)


def _cost(kind: str, qp, src, idxp, v_dim: int, extra_bytes: int, reread: int = 1) -> pl.CostEstimate:
    """What XLA's cost analysis should count for one kernel (it cannot look inside Mosaic).

    Per (query, slot), slots as executed (padded to block_k): the matmul FLOPs, one exp per head,
    one gathered row (and its int32 index, read once per SMEM / VMEM copy); plus the per-query
    blocks (q and the cotangents, `reread` times) and the outputs in extra_bytes."""
    b, sp, h, d = qp.shape
    pairs = b * sp * idxp.shape[-1]
    widths = {"forward": d + v_dim, "dq": 2 * d + v_dim, "dkv": 2 * d + 2 * v_dim}[kind]
    row_bytes = src.shape[-1] * src.dtype.itemsize
    index_reads = 1 if kind == "dkv" else 2
    return pl.CostEstimate(flops=pairs * 2 * h * widths, transcendentals=pairs * h,
                           bytes_accessed=pairs * (row_bytes + 4 * index_reads) + reread * _nbytes(qp) + extra_bytes)


def _forward(q, kv, indices, cfg: TpuKernelConfig):
    b, s, h, d = q.shape
    block_k, idxp, (qp,) = _prepared(q, indices, cfg)
    sp, kp = idxp.shape[1], idxp.shape[2]
    num_blocks = kp // block_k
    src = _gather_source(kv)
    kernel = functools.partial(_forward_kernel, sm_scale=cfg.sm_scale, v_dim=cfg.v_dim, num_blocks=num_blocks,
                               key_dtype=kv.dtype)
    out, lse = pl.pallas_call(
        kernel,
        grid=(sp // cfg.block_q, b),
        in_specs=_query_specs(cfg.block_q, kp, block_k) + [_per_query(cfg.block_q, h, d),
                                                           pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[_per_query(cfg.block_q, h, cfg.v_dim), _per_query(cfg.block_q, h)],
        out_shape=[jax.ShapeDtypeStruct((b, sp, h, cfg.v_dim), q.dtype), jax.ShapeDtypeStruct((b, sp, h), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((2, block_k, src.shape[-1]), src.dtype), pltpu.SemaphoreType.DMA((2,)),
                        pltpu.VMEM((h, cfg.v_dim), jnp.float32), pltpu.VMEM((h, 1), jnp.float32),
                        pltpu.VMEM((h, 1), jnp.float32)],
        compiler_params=_compiler_params(("parallel", "parallel")),
        cost_estimate=_cost("forward", qp, src, idxp, cfg.v_dim,
                            extra_bytes=b * sp * h * (cfg.v_dim * qp.dtype.itemsize + 4)),
        interpret=_interpret_arg(cfg.interpret),
        name="sparse_mla_forward",
    )(idxp, idxp.reshape(b, sp, num_blocks, block_k), qp, src)
    return out[:, :s], lse[:, :s]


def _backward_dq(qp, kv, src, idxp, dop, lsep, deltap, block_k, cfg: TpuKernelConfig):
    b, sp, h, d = qp.shape
    kp = idxp.shape[2]
    num_blocks = kp // block_k
    kernel = functools.partial(_dq_kernel, sm_scale=cfg.sm_scale, v_dim=cfg.v_dim, num_blocks=num_blocks,
                               key_dtype=kv.dtype)
    return pl.pallas_call(
        kernel,
        grid=(sp // cfg.block_q, b),
        in_specs=_query_specs(cfg.block_q, kp, block_k) + [
            _per_query(cfg.block_q, h, d), pl.BlockSpec(memory_space=pl.ANY), _per_query(cfg.block_q, h, cfg.v_dim),
            _per_query(cfg.block_q, h), _per_query(cfg.block_q, h)],
        out_specs=_per_query(cfg.block_q, h, d),
        out_shape=jax.ShapeDtypeStruct(qp.shape, qp.dtype),
        scratch_shapes=[pltpu.VMEM((2, block_k, src.shape[-1]), src.dtype), pltpu.SemaphoreType.DMA((2,)),
                        pltpu.VMEM((h, d), jnp.float32)],
        compiler_params=_compiler_params(("parallel", "parallel")),
        cost_estimate=_cost("dq", qp, src, idxp, cfg.v_dim,
                            extra_bytes=_nbytes(qp) + _nbytes(dop, lsep, deltap)),
        interpret=_interpret_arg(cfg.interpret),
        name="sparse_mla_backward_dq",
    )(idxp, idxp.reshape(b, sp, num_blocks, block_k), qp, src, dop, lsep, deltap)


def _backward_dkv(qp, kv, src, idxp, dop, lsep, deltap, block_k, cfg: TpuKernelConfig):
    b, sp, h, d = qp.shape
    t = kv.shape[1]
    kp = idxp.shape[2]
    # At least two tiles (when T > 8), so both TensorCores get a share of the parallel tile axis.
    tile_t = min(cfg.tile_t, -(-t // (2 * SUBLANES)) * SUBLANES)
    num_tiles = -(-t // tile_t)
    num_qblocks = sp // cfg.block_q
    # Sorted rows, unused slots last; per (batch, tile) the first and last query block with a key in it.
    sorted_idx = jnp.sort(jnp.where(idxp >= 0, idxp, t), axis=-1)
    # A query block "hits" the tiles from its lowest selected key's to its highest's (a superset
    # of the tiles it really touches: the kernel finds the exact, maybe empty, ranges).
    low = sorted_idx[..., 0].reshape(b, num_qblocks, cfg.block_q).min(axis=2) // tile_t  # n_tiles: no keys
    high = jnp.max(jnp.where(sorted_idx < t, sorted_idx, -1), axis=-1)
    high = jnp.where(high >= 0, high // tile_t, -1).reshape(b, num_qblocks, cfg.block_q).max(axis=2)
    tiles = jnp.arange(num_tiles)
    hits = (low[..., None] <= tiles) & (tiles <= high[..., None])  # [B, n_qblocks, n_tiles]
    qblock = jnp.arange(num_qblocks)[None, :, None]
    first = jnp.min(jnp.where(hits, qblock, num_qblocks), axis=1).astype(jnp.int32)  # [B, n_tiles]
    last = jnp.max(jnp.where(hits, qblock, -1), axis=1).astype(jnp.int32)

    def query_block(i, b, qb, first_ref, last_ref):
        tile = _tile_order(i, num_tiles)
        # Outside [first, last] the block index stays put: no q / do fetch for skipped steps.
        return jnp.clip(qb, jnp.minimum(first_ref[b, tile], last_ref[b, tile]), jnp.maximum(last_ref[b, tile], 0))

    def per_query(*tail):
        zeros = (0,) * len(tail)
        return pl.BlockSpec((None, cfg.block_q, *tail),
                            lambda i, b, qb, f, l: (b, query_block(i, b, qb, f, l), *zeros))

    kernel = functools.partial(_dkv_kernel, sm_scale=cfg.sm_scale, v_dim=cfg.v_dim, num_tiles=num_tiles,
                               tile_t=tile_t, key_dtype=kv.dtype)
    dkv = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(num_tiles, b, num_qblocks),
            in_specs=[
                pl.BlockSpec((None, cfg.block_q, kp), lambda i, b, qb, f, l: (b, query_block(i, b, qb, f, l), 0),
                             memory_space=pltpu.SMEM),
                per_query(h, d), pl.BlockSpec(memory_space=pl.ANY), per_query(h, cfg.v_dim), per_query(h),
                per_query(h)],
            out_specs=pl.BlockSpec(memory_space=pl.ANY),
            scratch_shapes=[pltpu.VMEM((2, block_k, src.shape[-1]), src.dtype), pltpu.SemaphoreType.DMA((2,)),
                            pltpu.VMEM((tile_t, d), jnp.float32), pltpu.VMEM((block_k, d), jnp.float32),
                            pltpu.SMEM((3, cfg.block_q + 1), jnp.int32), pltpu.SemaphoreType.DMA((1,))],
        ),
        out_shape=jax.ShapeDtypeStruct((b, num_tiles * tile_t, d), jnp.float32),
        compiler_params=_compiler_params(("parallel", "parallel", "arbitrary")),
        # q and do are re-read per tile that holds a query's keys: counted for half the tiles
        # (causal indices), an assumption.
        cost_estimate=_cost("dkv", qp, src, idxp, cfg.v_dim, reread=max(1, (num_tiles + 1) // 2),
                            extra_bytes=max(1, (num_tiles + 1) // 2) * _nbytes(dop) + _nbytes(lsep, deltap)
                            + b * num_tiles * tile_t * d * 4),
        interpret=_interpret_arg(cfg.interpret),
        name="sparse_mla_backward_dkv",
    )(first, last, sorted_idx, qp, src, dop, lsep, deltap)
    return dkv[:, :t]


def _backward(q, kv, indices, out, lse, d_out, d_lse, cfg: TpuKernelConfig):
    s = q.shape[1]
    delta = jnp.einsum("bshd,bshd->bsh", out.astype(jnp.float32), d_out.astype(jnp.float32))
    delta = delta - d_lse.astype(jnp.float32)
    block_k, idxp, (qp, dop, lsep, deltap) = _prepared(q, indices, cfg, d_out.astype(q.dtype), lse, delta)
    src = _gather_source(kv)
    dq = _backward_dq(qp, kv, src, idxp, dop, lsep, deltap, block_k, cfg)
    dkv = _backward_dkv(qp, kv, src, idxp, dop, lsep, deltap, block_k, cfg)
    return dq[:, :s], dkv.astype(kv.dtype)


_attention = attention_with_recompute(_forward, _backward)
