"""Flash dense attention on GPU as Pallas Triton kernels (causal, packed documents, queries at any
row positions): a forward for both forms, a backward for the per-head form.

Same contract as ``dense_attention.flash_attention``: q [B, S, H, Dk] at row positions q_pos [S],
keys/values per head (k [B, T, H, Dk], v [B, T, H, Dv], the MHA form: 192 / 128 in the model) or
shared by the heads (k [B, T, Dk], v [B, T, Dv], the MQA / absorbed form the context-parallel path
uses: 576 / 512), segment ids q_seg [B, S] and k_seg [B, T] -> out [B, S, H, Dv] (q's dtype) and
lse [B, S, H] fp32.

Why Pallas and not cuDNN: ``jax.nn.dot_product_attention(implementation="cudnn")`` (JAX 0.10.2)
takes causal masking and per-row valid lengths only, so packed documents or the zig-zag shards'
non-contiguous query positions would need an explicit [S, T] mask (the buffer this kernel exists
to avoid), and it does not return the per-head log-sum-exp the dense indexer KL reuses. One kernel
covers both the single-device and the context-parallel layouts.

Forward, one kernel body for both forms; a program's rows walk the key blocks up to their last
position (``max(q_pos) // block_k + 1``: the causal skip, whatever the layout) with an fp32 online
softmax in the exp2 domain and a [rows, block_k] mask from the segment ids and positions. Dk and
the value columns are split into power-of-two pieces (192 = 128 + 64, 576 = 4 x 128 + 64), the
sizes Triton's dots accept; q's pieces are loaded once per program.
- Per-head form, grid (query blocks, H, B): the rows are block_q (128) queries of one head, 64 keys
  per step. Query blocks run last to first (the heaviest causal blocks start first) and vary
  fastest in the grid, so concurrent programs share one head's keys through L2.
- Shared-key form, grid (queries, H / block_h x v_splits, B): the rows are block_h (64) heads of one
  query (as in FlashMLA: one key tile serves them all and the causal bound is the query's own
  position), 16 keys per step, and the 512 value columns are split over two programs (64 x 256
  fp32 accumulators, as in ``sparse_attention_gpu``), which recompute the same QK^T. 64 queries of
  one head per program (the per-head layout) spill at every block size: the 64 x 576 query tile
  sits next to the accumulator.

Backward (the dense stage; the warm-up's frozen forward never builds one), per-head form: two
kernels recomputing p = exp(s - lse), dp = dO V^T, ds = p (dp - delta) with delta = <out, dO>:
- dQ, grid (query blocks, H, B): the forward's loop over the visible key blocks;
- dK/dV, grid (key blocks, H, B): keys as the rows of every dot, over the query blocks whose last
  position reaches the key block (a prefix of the query blocks sorted by last position, computed
  outside the kernel, so the loop has no branch: a `cond` in it spilled), each pair added once.
The shared-key form (context-parallel, MQA) runs ``dense_attention``'s blocked flash backward on the
kernel's out and lse: its dK/dV sum over all heads (a Triton form needs a loop over heads per key
block or atomics, not built yet). The lse cotangent is ignored (its consumers stop gradients).

Block sizes come from the sm_90a compiled code (wgmma, registers, spills, shared memory; figures
in bench/results/gpu_compiled.json), not from a GPU measurement; bench/gpu_suite.py times the
kernels against the JAX path.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsa_train.kernels import dense_attention, row_blocks
from dsa_train.kernels.padding import pad_to

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MIN_DOT = 16  # smallest dimension Triton's tl.dot accepts
MAX_PIECE = 128  # widest column piece of one dot
NEG_INF = dense_attention.NEG_INF
KEY_PAD_SEGMENT = row_blocks.KEY_PAD_SEGMENT


@dataclasses.dataclass(frozen=True)
class DenseGpuConfig:
    sm_scale: float
    # Per-head form (Dk 192, Dv 128): 128 queries x 64 keys per step at 8 warps; shared-key form
    # (Dk 576, Dv 512 split over 2 programs): 64 heads x 16 keys at 8 warps (``default_config``).
    # Chosen from the compiled code.
    block_q: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 2
    v_splits: int = 1
    block_h: int = 64  # MQA form: heads of one query per program
    # Backward kernels (per-head form): dQ of block_q_dq queries in steps of block_k_dq keys, dK/dV
    # of block_k_dkv keys in steps of block_q_dkv queries.
    block_q_dq: int = 64
    block_k_dq: int = 32
    block_k_dkv: int = 64
    block_q_dkv: int = 32
    num_warps_bwd: int = 8
    num_stages_bwd: int = 2
    interpret: bool = False


def default_config(sm_scale: float, shared: bool, interpret: bool = False, **overrides) -> DenseGpuConfig:
    base = dict(block_k=16, v_splits=2, num_stages=1) if shared else {}
    return DenseGpuConfig(sm_scale=float(sm_scale), interpret=bool(interpret), **(base | overrides))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pieces(width: int) -> list[tuple[int, int]]:
    """(start, size) power-of-two column pieces covering ``width`` (a multiple of MIN_DOT)."""
    pieces, start = [], 0
    while start < width:
        size = min(MAX_PIECE, 1 << ((width - start).bit_length() - 1))
        pieces.append((start, size))
        start += size
    return pieces


def _fit(n: int, block: int) -> int:
    return min(block, max(MIN_DOT, pl.next_power_of_2(max(n, 1))))


def _forward_kernel(q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref, k_seg_ref, out_ref, lse_ref, *, scale2: float,
                    k_pieces, v_pieces, block_k: int, n_k_blocks: int):
    q_pos = q_pos_ref[...]
    q_seg = q_seg_ref[...]
    q_tiles = [q_ref[:, pl.ds(start, size)] for start, size in k_pieces]
    # Causal skip: no key block past the block's last query position (padded queries have -1).
    n_visible = jnp.clip(jnp.max(q_pos) // block_k + 1, 0, n_k_blocks)

    def body(j, carry):
        accs, m_prev, l_prev = carry
        keys = pl.ds(j * block_k, block_k)
        s = None
        for q_t, (start, size) in zip(q_tiles, k_pieces):
            part = plgpu.dot(q_t, k_ref[keys, pl.ds(start, size)], trans_b=True)
            s = part if s is None else s + part
        k_pos = j * block_k + jnp.arange(block_k)
        vis = (q_seg[:, None] == k_seg_ref[keys][None, :]) & (k_pos[None, :] <= q_pos[:, None])
        s = jnp.where(vis, s * scale2, NEG_INF)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.where(vis, jnp.exp2(s - m_next[:, None]), 0.0)
        l_next = l_prev * alpha + jnp.sum(p, axis=1)
        p_lo = p.astype(v_ref.dtype)
        accs = tuple(a * alpha[:, None] + plgpu.dot(p_lo, v_ref[keys, pl.ds(start, size)])
                     for a, (start, size) in zip(accs, v_pieces))
        return accs, m_next, l_next

    block_q = q_ref.shape[0]
    accs = tuple(jnp.zeros((block_q, size), jnp.float32) for _, size in v_pieces)
    m = jnp.full((block_q,), NEG_INF, jnp.float32)
    l = jnp.zeros((block_q,), jnp.float32)
    accs, m, l = jax.lax.fori_loop(0, n_visible, body, (accs, m, l))
    has_keys = l > 0
    l_safe = jnp.where(has_keys, l, 1.0)
    for a, (start, size) in zip(accs, v_pieces):
        out_ref[:, pl.ds(start, size)] = (a / l_safe[:, None]).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(has_keys, (m + jnp.log2(l_safe)) * LN2, NEG_INF)


def _padded(q, k, v, q_pos, q_seg, k_seg, sp: int, tp: int, dkp: int, dvp: int):
    """Zero feature columns change no score; padded queries (segment -1, position -1) see no key
    and padded keys (segment KEY_PAD_SEGMENT) are seen by no query."""
    return (pad_to(pad_to(q, 3, dkp), 1, sp), pad_to(pad_to(k, k.ndim - 1, dkp), 1, tp),
            pad_to(pad_to(v, v.ndim - 1, dvp), 1, tp), pad_to(q_pos.astype(jnp.int32), 0, sp, -1),
            pad_to(q_seg.astype(jnp.int32), 1, sp, -1), pad_to(k_seg.astype(jnp.int32), 1, tp, KEY_PAD_SEGMENT))


def _forward(cfg: DenseGpuConfig, q, k, v, q_pos, q_seg, k_seg):
    b, s, h, dk = q.shape
    t, dv = k.shape[1], v.shape[-1]
    shared = k.ndim == 3
    bq = 1 if shared else _fit(s, cfg.block_q)
    bk = _fit(t, cfg.block_k)
    sp, tp = _round_up(s, bq), _round_up(t, bk)
    dkp, dvp = _round_up(dk, MIN_DOT), _round_up(dv, MIN_DOT)
    vs = cfg.v_splits if dvp % (MIN_DOT * cfg.v_splits) == 0 else 1
    dv_part = dvp // vs
    q, k, v, q_pos, q_seg, k_seg = _padded(q, k, v, q_pos, q_seg, k_seg, sp, tp, dkp, dvp)
    kernel = functools.partial(_forward_kernel, scale2=cfg.sm_scale * LOG2E, k_pieces=_pieces(dkp),
                               v_pieces=_pieces(dv_part), block_k=bk, n_k_blocks=tp // bk)
    params = dict(compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                  interpret=cfg.interpret, name="dense_attention_forward")
    call = _call_shared if shared else _call_per_head
    out, lse = call(kernel, params, cfg, bq, q, k, v, q_pos, q_seg, k_seg, vs, dv_part)
    return out[:, :s, :, :dv], lse[:, :s]


def _call_per_head(kernel, params, cfg, bq, q, k, v, q_pos, q_seg, k_seg, vs, dv_part):
    """Rows of a program: block_q queries of one head."""
    b, sp, h, dkp = q.shape
    tp = k.shape[1]
    n_q = sp // bq
    qb = lambda i: n_q - 1 - i  # noqa: E731  (heaviest causal blocks first)
    out, lse = pl.pallas_call(
        kernel,
        grid=(n_q, h * vs, b),
        in_specs=[
            pl.BlockSpec((None, bq, None, dkp), lambda i, hv, j: (j, qb(i), hv // vs, 0)),
            pl.BlockSpec((None, tp, None, dkp), lambda i, hv, j: (j, 0, hv // vs, 0)),
            pl.BlockSpec((None, tp, None, dv_part), lambda i, hv, j: (j, 0, hv // vs, hv % vs)),
            pl.BlockSpec((bq,), lambda i, hv, j: (qb(i),)),
            pl.BlockSpec((None, bq), lambda i, hv, j: (j, qb(i))),
            pl.BlockSpec((None, tp), lambda i, hv, j: (j, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, dv_part), lambda i, hv, j: (j, qb(i), hv // vs, hv % vs)),
            pl.BlockSpec((None, None, None, bq), lambda i, hv, j: (j, hv // vs, hv % vs, qb(i))),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, sp, h, dv_part * vs), q.dtype),
                   jax.ShapeDtypeStruct((b, h, vs, sp), jnp.float32)],
        **params,
    )(q, k, v, q_pos, q_seg, k_seg)
    return out, jnp.swapaxes(lse[:, :, 0], 1, 2)


def _call_shared(kernel, params, cfg, bq, q, k, v, q_pos, q_seg, k_seg, vs, dv_part):
    """Rows of a program: block_h heads of one query (keys shared by the heads, as in FlashMLA):
    one key tile serves all of them and the causal bound is the query's own position."""
    del bq  # one query per program
    b, sp, h, dkp = q.shape
    tp = k.shape[1]
    bh = min(cfg.block_h, max(MIN_DOT, pl.next_power_of_2(h)))
    hp = _round_up(h, bh)
    q = pad_to(q, 2, hp)
    qi = lambda i: sp - 1 - i  # noqa: E731  (latest queries first)
    out, lse = pl.pallas_call(
        kernel,
        grid=(sp, hp // bh * vs, b),
        in_specs=[
            pl.BlockSpec((None, None, bh, dkp), lambda i, hv, j: (j, qi(i), hv // vs, 0)),
            pl.BlockSpec((None, tp, dkp), lambda i, hv, j: (j, 0, 0)),
            pl.BlockSpec((None, tp, dv_part), lambda i, hv, j: (j, 0, hv % vs)),
            pl.BlockSpec((1,), lambda i, hv, j: (qi(i),)),
            pl.BlockSpec((None, 1), lambda i, hv, j: (j, qi(i))),
            pl.BlockSpec((None, tp), lambda i, hv, j: (j, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bh, dv_part), lambda i, hv, j: (j, qi(i), hv // vs, hv % vs)),
            pl.BlockSpec((None, None, None, bh), lambda i, hv, j: (j, qi(i), hv % vs, hv // vs)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, sp, hp, dv_part * vs), q.dtype),
                   jax.ShapeDtypeStruct((b, sp, vs, hp), jnp.float32)],
        **params,
    )(q, k, v, q_pos, q_seg, k_seg)
    return out[:, :, :h], lse[:, :, 0, :h]


def _dq_kernel(q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref, k_seg_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               sm_scale: float, k_pieces, v_pieces, block_k: int, n_k_blocks: int):
    """dQ of block_q queries of one head: the forward's loop, p recomputed from lse."""
    scale2 = sm_scale * LOG2E
    q_pos = q_pos_ref[...]
    q_seg = q_seg_ref[...]
    q_tiles = [q_ref[:, pl.ds(start, size)] for start, size in k_pieces]
    do_tiles = [do_ref[:, pl.ds(start, size)] for start, size in v_pieces]
    lse2 = lse_ref[...] * LOG2E
    delta = delta_ref[...]
    n_visible = jnp.clip(jnp.max(q_pos) // block_k + 1, 0, n_k_blocks)

    def body(j, dqs):
        keys = pl.ds(j * block_k, block_k)
        k_tiles = [k_ref[keys, pl.ds(start, size)] for start, size in k_pieces]
        s = sum(plgpu.dot(q_t, k_t, trans_b=True) for q_t, k_t in zip(q_tiles, k_tiles))
        dp = sum(plgpu.dot(do_t, v_ref[keys, pl.ds(start, size)], trans_b=True)
                 for do_t, (start, size) in zip(do_tiles, v_pieces))
        k_pos = j * block_k + jnp.arange(block_k)
        vis = (q_seg[:, None] == k_seg_ref[keys][None, :]) & (k_pos[None, :] <= q_pos[:, None])
        p = jnp.where(vis, jnp.exp2(s * scale2 - lse2[:, None]), 0.0)
        ds = (p * (dp - delta[:, None]) * sm_scale).astype(k_ref.dtype)
        return tuple(a + plgpu.dot(ds, k_t) for a, k_t in zip(dqs, k_tiles))

    block_q = q_ref.shape[0]
    dqs = jax.lax.fori_loop(0, n_visible, body, tuple(jnp.zeros((block_q, size), jnp.float32) for _, size in k_pieces))
    for a, (start, size) in zip(dqs, k_pieces):
        dq_ref[:, pl.ds(start, size)] = a.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref, k_seg_ref, do_ref, lse_ref, delta_ref, order_ref,
                n_visible_ref, dk_ref, dv_ref, *, sm_scale: float, k_pieces, v_pieces, block_q: int):
    """dK and dV of block_k keys of one head, keys as the rows of every dot (s^T = k q^T). It visits
    only the query blocks whose last position reaches the block's first key: the first
    ``n_visible[key block]`` of ``order`` (query blocks by descending last position), so any layout
    (the positions need not be sorted) skips the fully masked blocks without a branch in the loop."""
    scale2 = sm_scale * LOG2E
    block_k = k_ref.shape[0]
    k_tiles = [k_ref[:, pl.ds(start, size)] for start, size in k_pieces]
    v_tiles = [v_ref[:, pl.ds(start, size)] for start, size in v_pieces]
    k_seg = k_seg_ref[...]
    k_pos = pl.program_id(0) * block_k + jnp.arange(block_k)

    def body(j, carry):
        dks, dvs = carry
        queries = pl.ds(order_ref[j] * block_q, block_q)
        q_tiles = [q_ref[queries, pl.ds(start, size)] for start, size in k_pieces]
        do_tiles = [do_ref[queries, pl.ds(start, size)] for start, size in v_pieces]
        s_t = sum(plgpu.dot(k_t, q_t, trans_b=True) for k_t, q_t in zip(k_tiles, q_tiles))
        dp_t = sum(plgpu.dot(v_t, do_t, trans_b=True) for v_t, do_t in zip(v_tiles, do_tiles))
        vis = (k_seg[:, None] == q_seg_ref[queries][None, :]) & (k_pos[:, None] <= q_pos_ref[queries][None, :])
        p_t = jnp.where(vis, jnp.exp2(s_t * scale2 - (lse_ref[queries] * LOG2E)[None, :]), 0.0)
        ds_t = (p_t * (dp_t - delta_ref[queries][None, :]) * sm_scale).astype(q_ref.dtype)
        p_lo = p_t.astype(do_ref.dtype)
        return (tuple(a + plgpu.dot(ds_t, q_t) for a, q_t in zip(dks, q_tiles)),
                tuple(a + plgpu.dot(p_lo, do_t) for a, do_t in zip(dvs, do_tiles)))

    zeros = lambda pieces: tuple(jnp.zeros((block_k, size), jnp.float32) for _, size in pieces)  # noqa: E731
    n_visible = n_visible_ref[pl.program_id(0)]
    dks, dvs = jax.lax.fori_loop(0, n_visible, body, (zeros(k_pieces), zeros(v_pieces)))
    for a, (start, size) in zip(dks, k_pieces):
        dk_ref[:, pl.ds(start, size)] = a.astype(dk_ref.dtype)
    for a, (start, size) in zip(dvs, v_pieces):
        dv_ref[:, pl.ds(start, size)] = a.astype(dv_ref.dtype)


def _visible_query_blocks(q_pos, block_q: int, block_k: int, n_k_blocks: int):
    """(order, n_visible): query blocks by descending last position [n_q], and per key block how
    many of them (a prefix of ``order``) have a query at or after its first key [n_k]."""
    last = q_pos.reshape(-1, block_q).max(axis=1)
    order = jnp.argsort(-last, stable=True).astype(jnp.int32)
    first_keys = jnp.arange(n_k_blocks, dtype=jnp.int32) * block_k
    n_visible = jnp.searchsorted(-last[order], -first_keys, side="right").astype(jnp.int32)
    return order, n_visible


def _backward_per_head(cfg: DenseGpuConfig, q, k, v, out, lse, d_out, q_pos, q_seg, k_seg):
    """dq, dk, dv of the per-head form: two kernels (dQ over query blocks, dK/dV over key blocks)."""
    b, s, h, dk = q.shape
    t, dv = k.shape[1], v.shape[-1]
    bq, bk = _fit(s, cfg.block_q_dq), _fit(t, cfg.block_k_dq)
    bq_kv, bk_kv = _fit(s, cfg.block_q_dkv), _fit(t, cfg.block_k_dkv)
    sp, tp = _round_up(s, max(bq, bq_kv)), _round_up(t, max(bk, bk_kv))
    dkp, dvp = _round_up(dk, MIN_DOT), _round_up(dv, MIN_DOT)
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), d_out.astype(jnp.float32))
    # padded queries: lse = +big and delta = 0, so their probabilities and gradients are 0
    lse_t = pad_to(jnp.swapaxes(lse, 1, 2), 2, sp, -NEG_INF)
    delta = pad_to(delta, 2, sp)
    d_out = pad_to(pad_to(d_out, 3, dvp), 1, sp)
    q, k, v, q_pos, q_seg, k_seg = _padded(q, k, v, q_pos, q_seg, k_seg, sp, tp, dkp, dvp)
    k_pieces, v_pieces = _pieces(dkp), _pieces(dvp)
    params = dict(compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps_bwd, num_stages=cfg.num_stages_bwd),
                  interpret=cfg.interpret)
    heads = lambda n, w: pl.BlockSpec((None, n, None, w), lambda i, hh, j: (j, 0, hh, 0))  # noqa: E731  whole row
    rows = lambda n: pl.BlockSpec((None, None, n), lambda i, hh, j: (j, hh, 0))  # noqa: E731  whole row, one head
    n_q = sp // bq
    qb = lambda i: n_q - 1 - i  # noqa: E731
    block = lambda n, w: pl.BlockSpec((None, n, None, w), lambda i, hh, j: (j, qb(i), hh, 0))  # noqa: E731
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, sm_scale=cfg.sm_scale, k_pieces=k_pieces, v_pieces=v_pieces, block_k=bk,
                          n_k_blocks=tp // bk),
        grid=(n_q, h, b),
        in_specs=[block(bq, dkp), heads(tp, dkp), heads(tp, dvp), pl.BlockSpec((bq,), lambda i, hh, j: (qb(i),)),
                  pl.BlockSpec((None, bq), lambda i, hh, j: (j, qb(i))),
                  pl.BlockSpec((None, tp), lambda i, hh, j: (j, 0)),
                  block(bq, dvp), pl.BlockSpec((None, None, bq), lambda i, hh, j: (j, hh, qb(i))),
                  pl.BlockSpec((None, None, bq), lambda i, hh, j: (j, hh, qb(i)))],
        out_specs=block(bq, dkp),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="dense_attention_backward_dq",
        **params,
    )(q, k, v, q_pos, q_seg, k_seg, d_out, lse_t, delta)
    kblock = lambda w: pl.BlockSpec((None, bk_kv, None, w), lambda i, hh, j: (j, i, hh, 0))  # noqa: E731
    order, n_visible = _visible_query_blocks(q_pos, bq_kv, bk_kv, tp // bk_kv)
    whole = lambda n: pl.BlockSpec((n,), lambda i, hh, j: (0,))  # noqa: E731
    d_k, d_v = pl.pallas_call(
        functools.partial(_dkv_kernel, sm_scale=cfg.sm_scale, k_pieces=k_pieces, v_pieces=v_pieces, block_q=bq_kv),
        grid=(tp // bk_kv, h, b),
        in_specs=[heads(sp, dkp), kblock(dkp), kblock(dvp), pl.BlockSpec((sp,), lambda i, hh, j: (0,)),
                  pl.BlockSpec((None, sp), lambda i, hh, j: (j, 0)),
                  pl.BlockSpec((None, bk_kv), lambda i, hh, j: (j, i)),
                  heads(sp, dvp), rows(sp), rows(sp), whole(order.shape[0]), whole(n_visible.shape[0])],
        out_specs=[kblock(dkp), kblock(dvp)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="dense_attention_backward_dkv",
        **params,
    )(q, k, v, q_pos, q_seg, k_seg, d_out, lse_t, delta, order, n_visible)
    return dq[:, :s, :, :dk], d_k[:, :t, :, :dk], d_v[:, :t, :, :dv]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, q_pos, q_seg, k_seg):
    return _forward(cfg, q, k, v, q_pos, q_seg, k_seg)


def _attention_fwd(cfg, q, k, v, q_pos, q_seg, k_seg):
    out, lse = _forward(cfg, q, k, v, q_pos, q_seg, k_seg)
    return (out, lse), (q, k, v, out, lse, q_pos, q_seg, k_seg)


def _attention_bwd(cfg, res, cts):
    q, k, v, out, lse, q_pos, q_seg, k_seg = res
    d_out, _ = cts  # the lse output only feeds stop-gradient consumers (the indexer KL target)
    if k.ndim == 4:
        return (*_backward_per_head(cfg, q, k, v, out, lse, d_out, q_pos, q_seg, k_seg), None, None, None)
    blocks = dense_attention.Cfg(cfg.sm_scale, dense_attention.fit(q.shape[1], dense_attention.BLOCKS[0]),
                                 dense_attention.fit(k.shape[1], dense_attention.BLOCKS[1]))
    dq, dk, dv = dense_attention.backward(blocks, q, k, v, out, lse, d_out, q_pos, q_seg, k_seg)
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention_gpu(q, k, v, q_pos, q_seg, k_seg, sm_scale: float, *, interpret: bool = False, **blocks):
    """``dense_attention.flash_attention``'s contract through the Triton forward kernel (see the
    module docstring); ``blocks`` override :class:`DenseGpuConfig`'s block sizes."""
    if k.ndim != v.ndim or k.ndim not in (3, 4) or k.shape[1] != v.shape[1] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"flash_attention_gpu: q {q.shape}, k {k.shape}, v {v.shape} do not fit")
    cfg = default_config(sm_scale, shared=k.ndim == 3, interpret=interpret, **blocks)
    return _attention(cfg, q, k, v, jnp.asarray(q_pos, jnp.int32), q_seg, k_seg)


def dense_attention_gpu(q, k, v, segment_ids, sm_scale: float, *, interpret: bool = False, **blocks):
    """``ops.attention.dense_attention``'s contract (self-attention over one row)."""
    return flash_attention_gpu(q, k, v, jnp.arange(q.shape[1]), segment_ids, segment_ids, sm_scale,
                               interpret=interpret, **blocks)
