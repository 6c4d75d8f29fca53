"""Pallas form of the one-pass dense indexer KL (``dense_indexer_kl``): Triton on GPU, Mosaic on TPU.

Same contract and math as :func:`dsa_train.kernels.dense_indexer_kl.dense_kl_sum` (the pure-JAX
form, the CPU path): sum_t weights_t KL_t over the given queries at row positions ``q_pos``
against the whole row's keys, differentiable in the indexer inputs only. Per query t:
  p(t, s) = mean_h exp(a_h(t, s) - lse_h(t))     (target from the main attention's lse, no grad)
  I(t, s) = sum_j w_j(t) relu(z_j(t, s)),        z_j = Di^-0.5 q_idx_j(t) . k_idx(s)
  KL_t = sum_s p log p - sum_s p I + lse_I(t) psum_t,   dKL_t / dI_ts = psum_t softmax(I_t)_s - p_ts.

Two kernels over the visible (query block, key block) tiles, laid out keys-major [block_k, block_q]
(``indexer_tiles``: per-query data are lane rows, per-key data columns), one tile body for both
backends; only the loop over key blocks and the dk accumulation differ:
- pass A, query-major: the target tile (once per pair), the indexer tile, an online lse_I and the
  three sums; when differentiated also the target part of the gradient, -weights_t p_ts dI_ts, in
  the same head loop as the indexer logits: dq, dw accumulate in the query block's output, dk in
  the [B, T, Di] fp32 output.
- pass B (backward), query-major: the indexer tile only, its softmax with the saved lse_I, and the
  softmax part weights_t psum_t softmax_ts dI_ts into dq, dw, dk the same way.
Key blocks a query block cannot see are never visited: the visible range [lo, hi) per (row, query
block) runs from the first key of the block's earliest document to its last query position, so
packed documents and the zig-zag context-parallel layout (queries at any row positions) skip
both the causal future and earlier documents.
- Triton: grid (B, query blocks), a loop over [lo, hi); dk by atomic adds of [block_k, Di] tiles
  (distinct rows per add; the summation order is not deterministic).
- Mosaic TPU: grid (B, query blocks, key blocks), the key axis "arbitrary", [lo, hi) from scalar
  prefetch (the index maps clamp into it, so skipped steps issue no DMA); the statistics live in
  VMEM scratch, dq/dw in the resident output block; dk has no atomics: a grid step reads its
  [block_k, Di] fp32 rows from HBM, adds and writes them back (synchronous DMAs, steps of one row
  run in order on one core; rows are "parallel" across cores). The batch row's dk is zeroed at its
  first step.

Main keys per head ([B, T, H, D], D = qk_head_dim = 192, the single-device form) or shared ([B, T, D],
D = 576, the MQA/latent form context parallelism gathers). Triton splits D into power-of-two pieces
(192 -> 128 + 64, 576 -> 512 + 64); Mosaic takes it whole. Triton's 8 warps and 1 stage come from
the compiled code only (the `triton` wheel's ptxas for sm_90a, H 128, Hi 64 x 128, bf16; no GPU has
run it): the forward with gradients spills 156 bytes per-head / 448 MQA at 255 registers, the
backward none (at 4 warps and 2 stages: 844 and 112 bytes per-head).

Cost per visible (query, key) pair (:func:`pair_flops`; a multiply-add counts 2, elementwise work
not counted), H main heads of dim D, Hi indexer heads of dim Di:
  FLOPs: pass A: target 2 H D, indexer logits 2 Hi Di and score 2 Hi, with gradients the target
         part's dq, dk (2 x 2 Hi Di) and dw (2 Hi) from the same logits; pass B: logits and score
         (2 Hi Di + 2 Hi), the logits again in the gradient's head loop (the whole [Hi, bk, bq]
         logit tile is not kept), dq, dk, dw (4 Hi Di + 2 Hi). In all 2 H D + 14 Hi Di + 8 Hi.
  DeepSeek-V3.2 (H 128, D 192 per head, Hi 64, Di 128): 164,352 per pair (49,152 the target);
  in the MQA form (D 576): 262,656. The former three-kernel scheme formed the 576-dim target in
  each kernel: 3 x 147,456 + 5 x 16,512 = 524,928.
  HBM bytes: a key block is read once per query block (per pass), the query block stays resident
  (TPU) or is re-read from L2 (Triton), so per pair ~ (bytes per key) / block_q: pass A
  H D x 2 (per-head bf16 keys; 2 D shared) + Di x 2 (indexer key) + 8 (position, segment), plus the
  dk read-modify-write Di x 4 x 2 when differentiated; pass B Di x 2 + 8 + Di x 4 x 2. Per-head
  V3.2 at block_q = 128 (TPU): (49,152 + 256 + 8 + 1,024 + 256 + 8 + 1,024) / 128 = 404 bytes per
  pair; MQA (1,152 + 2,576) / 128 = 29. Triton (block_q 32): 4 x that.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from dsa_train.kernels import indexer_tiles as tiles
from dsa_train.kernels import row_blocks as rb
from dsa_train.ops.losses import PASS_A_RESIDUALS

F32 = jnp.float32
NEG = -jnp.inf

TRITON_BLOCKS = (32, 64)  # (block_q, block_k); first guesses, untuned
# From the compiled code (sm_90a ptxas, V3.2 shapes, see the module docstring): 8 warps, 1 stage.
TRITON_WARPS, TRITON_STAGES = 8, 1
TPU_BLOCKS = (128, 128)
INTERPRET_BLOCKS = (16, 16)
TPU_VMEM_LIMIT = 64 * 2 ** 20  # a v5p TensorCore has 64 MiB

STATS, STATS_GRADS, SOFTMAX_GRADS = "stats", "stats_grads", "softmax_grads"


def pair_flops(n_heads: int, head_dim: int, n_idx_heads: int, idx_head_dim: int, grads: bool = True) -> int:
    """FLOPs per visible (query, key) pair as these kernels run them (see the module docstring)."""
    forward = 2 * n_heads * head_dim + 2 * n_idx_heads * idx_head_dim + 2 * n_idx_heads
    if not grads:
        return forward
    target_part = 2 * 2 * n_idx_heads * idx_head_dim + 2 * n_idx_heads
    softmax_part = 4 * n_idx_heads * idx_head_dim + 2 * n_idx_heads + 4 * n_idx_heads * idx_head_dim \
        + 2 * n_idx_heads
    return forward + target_part + softmax_part


class _Dims(NamedTuple):
    n_pieces: int
    per_head: bool
    n_heads: int
    n_idx_heads: int
    sm_scale: float
    idx_scale: float
    block_q: int
    block_k: int
    n_k: int


# ---- loads: a block ref (BlockSpec) or a window of a full array ref (Triton loops) --------------

class _QuerySide:
    def __init__(self, refs: dict, d: _Dims):
        self.refs, self.d = refs, d

    def row(self, name):  # [1, bq]
        return self.refs[name][...]

    def head_row(self, name, h):  # [1, bq]
        return self.refs[name][pl.ds(h, 1), :]

    def q_head(self, h):  # pieces of [bq, D]
        return [self.refs[f"q{i}"][h] for i in range(self.d.n_pieces)]

    def qi(self, j):  # [bq, Di]
        return self.refs["qi"][j]


class _KeySide:
    """Key-side loads: BlockSpec blocks (TPU) or windows [start, start + size) of whole arrays
    (Triton cannot compose ref views, so windows are explicit indexers)."""

    def __init__(self, refs: dict, d: _Dims, batch=None, start=None):
        self.refs, self.d = refs, d
        self.window = None if start is None else (batch, pl.ds(start, d.block_k))

    def tile(self, name):  # [bk, dim]
        r = self.refs[name]
        return r[...] if self.window is None else r[self.window[0], self.window[1], :]

    def shared_kv(self):
        return [self.tile(f"k{i}") for i in range(self.d.n_pieces)]

    def k_head(self, h):
        def one(r):
            return r[h] if self.window is None else r[self.window[0], h, self.window[1], :]
        return [one(self.refs[f"k{i}"]) for i in range(self.d.n_pieces)]


# ---- tile math (keys-major [bk, bq]) ----------------------------------------------------------------

def _visible(qs: _QuerySide, ks: _KeySide):
    return (ks.tile("kseg") == qs.row("qseg")) & (ks.tile("kpos") <= qs.row("qpos"))


def _target_tile(qs: _QuerySide, ks: _KeySide, vis, d: _Dims):
    """Head-mean main attention probabilities [bk, bq], 0 where invisible."""
    shared = None if d.per_head else ks.shared_kv()
    bk, bq = vis.shape

    def head(h, acc):
        k_pieces = ks.k_head(h) if d.per_head else shared
        a = sum(tiles.dot_nt(k_p, q_p) for k_p, q_p in zip(k_pieces, qs.q_head(h))) * d.sm_scale
        return acc + jnp.exp(a - qs.head_row("lse", h))

    probs = jax.lax.fori_loop(0, d.n_heads, head, jnp.zeros((bk, bq), F32))
    return jnp.where(vis, probs * (1.0 / d.n_heads), 0.0)


def _sum0(x):
    return x.sum(axis=0, keepdims=True)


def _head_grads(j, ds, z, qs: _QuerySide, ki, d: _Dims, dq_ref, dw_ref):
    """Head j's share of d(sum ds * I): dq_ref[j] += ..., dw_ref[j] += ...; returns dk [bk, Di] fp32."""
    dz = (ds * qs.head_row("w", j).astype(F32) * (z > 0)).astype(ki.dtype)
    dq_ref[j] = dq_ref[j] + jnp.dot(dz.T, ki, preferred_element_type=F32) * d.idx_scale
    dw_ref[pl.ds(j, 1), :] = dw_ref[pl.ds(j, 1), :] + _sum0(ds * jnp.maximum(z, 0.0))
    return jnp.dot(dz, qs.qi(j).astype(dz.dtype), preferred_element_type=F32) * d.idx_scale


def _scores_and_grads(ds, qs: _QuerySide, ki, d: _Dims, dq_ref, dw_ref):
    """Indexer score tile [bk, bq] and, from the same logits, the gradient of sum ds * I."""
    bk, bq = ds.shape

    def head(j, carry):
        score, dk = carry
        z = tiles.dot_nt(ki, qs.qi(j)) * d.idx_scale
        score = score + jnp.maximum(z, 0.0) * qs.head_row("w", j).astype(F32)
        return score, dk + _head_grads(j, ds, z, qs, ki, d, dq_ref, dw_ref)

    init = (jnp.zeros((bk, bq), F32), jnp.zeros((bk, ki.shape[1]), F32))
    return jax.lax.fori_loop(0, d.n_idx_heads, head, init)


def _grads(ds, qs: _QuerySide, ki, d: _Dims, dq_ref, dw_ref):
    def head(j, dk):
        return dk + _head_grads(j, ds, tiles.dot_nt(ki, qs.qi(j)) * d.idx_scale, qs, ki, d, dq_ref, dw_ref)

    return jax.lax.fori_loop(0, d.n_idx_heads, head, jnp.zeros((ki.shape[0], ki.shape[1]), F32))


def _stats_init(bq):
    return (jnp.full((1, bq), NEG, F32),) + tuple(jnp.zeros((1, bq), F32) for _ in range(4))


def _stats_update(carry, p, score):
    """Fold one tile into the per-query rows: online lse_I, sum p log p, sum p I, sum p."""
    m, l, plogp, p_dot_i, psum = carry
    m_new = jnp.maximum(m, score.max(axis=0, keepdims=True))
    m_safe = jnp.where(m_new == NEG, 0.0, m_new)
    l = l * jnp.exp(m - m_safe) + _sum0(jnp.exp(score - m_safe))
    positive = p > 0
    plogp = plogp + _sum0(jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0))
    p_dot_i = p_dot_i + _sum0(jnp.where(positive, p * score, 0.0))
    return m_new, l, plogp, p_dot_i, psum + _sum0(p)


def _stats_finish(carry, kl_ref, lse_i_ref, psum_ref):
    m, l, plogp, p_dot_i, psum = carry
    lse_i = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)
    kl_ref[...] = plogp - p_dot_i + lse_i * psum
    lse_i_ref[...] = lse_i
    psum_ref[...] = psum


def _step(mode: str, carry, qs: _QuerySide, ks: _KeySide, d: _Dims, dq_ref=None, dw_ref=None):
    """One visible tile -> (new statistics, this tile's dk [bk, Di] fp32 or None)."""
    vis = _visible(qs, ks)
    ki = ks.tile("ki")
    if mode == SOFTMAX_GRADS:
        score = jnp.where(vis, tiles.tile_indexer_scores(ki, qs.qi, lambda j: qs.head_row("w", j), d.n_idx_heads,
                                                         d.idx_scale), NEG)
        ds = qs.row("coef") * jnp.where(vis, jnp.exp(score - qs.row("lse_i")), 0.0)
        return carry, _grads(ds, qs, ki, d, dq_ref, dw_ref)
    p = _target_tile(qs, ks, vis, d)
    if mode == STATS:
        raw, dk = tiles.tile_indexer_scores(ki, qs.qi, lambda j: qs.head_row("w", j), d.n_idx_heads,
                                            d.idx_scale), None
    else:
        raw, dk = _scores_and_grads(-p * qs.row("wt"), qs, ki, d, dq_ref, dw_ref)
    return _stats_update(carry, p, jnp.where(vis, raw, NEG)), dk


# ---- kernels ----------------------------------------------------------------------------------------

def _split(refs, q_names, k_names):
    nq, nk = len(q_names), len(k_names)
    return dict(zip(q_names, refs[:nq])), dict(zip(k_names, refs[nq:nq + nk])), refs[nq + nk:]


def _outputs(mode, outs):
    """(stats refs or None, dq_ref, dw_ref, dk_ref) from the kernel's output refs."""
    stats = outs[:3] if mode != SOFTMAX_GRADS else None
    grads = outs[3:6] if mode == STATS_GRADS else outs[:3] if mode == SOFTMAX_GRADS else (None, None, None)
    return (stats, *grads)


def _zero_grads(dq_ref, dw_ref):
    if dq_ref is not None:
        dq_ref[...] = jnp.zeros(dq_ref.shape, F32)
        dw_ref[...] = jnp.zeros(dw_ref.shape, F32)


def _kernel_triton(*refs, q_names, k_names, mode, d: _Dims):
    q_refs, k_refs, outs = _split(refs, q_names, k_names)
    if mode != STATS:
        outs = outs[1:]  # the zeros input aliased to dk: the dk output ref is the same buffer
    stats, dq_ref, dw_ref, dk_ref = _outputs(mode, outs)
    bi = pl.program_id(0)
    qs = _QuerySide(q_refs, d)
    lo = jax.lax.div(jnp.min(qs.row("klo")), d.block_k)
    hi = jnp.minimum(jax.lax.div(jnp.max(qs.row("qpos")) + d.block_k, d.block_k), d.n_k)
    _zero_grads(dq_ref, dw_ref)

    def body(kb, carry):
        start = pl.multiple_of(kb * d.block_k, d.block_k)
        carry, dk = _step(mode, carry, qs, _KeySide(k_refs, d, bi, start), d, dq_ref, dw_ref)
        if dk is not None:
            from jax.experimental.pallas import triton as plgpu

            plgpu.atomic_add(dk_ref, (bi, pl.ds(start, d.block_k), pl.ds(0, dk.shape[1])), dk)
        return carry

    carry = jax.lax.fori_loop(lo, hi, body, _stats_init(d.block_q))
    if stats is not None:
        _stats_finish(carry, *stats)


def _kernel_tpu(lo_ref, hi_ref, *refs, q_names, k_names, mode, d: _Dims):
    from jax.experimental.pallas import tpu as pltpu

    q_refs, k_refs, rest = _split(refs, q_names, k_names)
    n_out = 3 if mode != STATS_GRADS else 6
    outs, scratch = rest[:n_out], rest[n_out:]
    stats, dq_ref, dw_ref, dk_hbm = _outputs(mode, outs)
    acc_refs, scratch = (scratch[:5], scratch[5:]) if stats is not None else ((), scratch)
    b, qb, kj = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kb = lo_ref[b, qb] + kj

    def copy(src, dst, sem):
        c = pltpu.make_async_copy(src, dst, sem)
        c.start()
        c.wait()

    @pl.when(kj == 0)
    def _init():
        for r, v in zip(acc_refs, _stats_init(d.block_q)):
            r[...] = v
        _zero_grads(dq_ref, dw_ref)

    if dk_hbm is not None:
        dk_buf, sem = scratch

        @pl.when((qb == 0) & (kj == 0))
        def _zero_dk():
            dk_buf[...] = jnp.zeros(dk_buf.shape, F32)

            def zero(i, carry):
                copy(dk_buf, dk_hbm.at[b, pl.ds(pl.multiple_of(i * d.block_k, d.block_k), d.block_k)], sem.at[0])
                return carry

            jax.lax.fori_loop(0, d.n_k, zero, 0)

    @pl.when(kb < hi_ref[b, qb])
    def _update():
        carry = tuple(r[...] for r in acc_refs) if acc_refs else None
        carry, dk = _step(mode, carry, _QuerySide(q_refs, d), _KeySide(k_refs, d), d, dq_ref, dw_ref)
        for r, v in zip(acc_refs, carry or ()):
            r[...] = v
        if dk is not None:
            rows = dk_hbm.at[b, pl.ds(pl.multiple_of(kb * d.block_k, d.block_k), d.block_k)]
            copy(rows, dk_buf, sem.at[0])
            dk_buf[...] = dk_buf[...] + dk
            copy(dk_buf, rows, sem.at[0])

    if stats is not None:
        @pl.when(kj == pl.num_programs(2) - 1)
        def _finish():
            _stats_finish(tuple(r[...] for r in acc_refs), *stats)


# ---- operands and pallas_call plumbing --------------------------------------------------------------

def _pow2_pieces(dim: int, minimum: int = 16) -> list[int]:
    """Split a head dim into power-of-two pieces for Triton (192 -> [128, 64], 576 -> [512, 64]); the
    last piece is zero-padded up to ``minimum`` (the smallest tl.dot size)."""
    pieces, rest = [], dim
    while rest > 0:
        piece = max(1 << (rest.bit_length() - 1), minimum)
        pieces.append(piece)
        rest -= piece
    return pieces


def _split_last(x, pieces: list[int]):
    x = tiles.pad_to(x, x.ndim - 1, sum(pieces))
    starts = [sum(pieces[:i]) for i in range(len(pieces))]
    return [x[..., a:a + n] for a, n in zip(starts, pieces)]


def _first_same_document_key(q_seg, k_seg):
    """Per query [B, S]: the first key position with the query's segment id (T if none)."""
    t = k_seg.shape[1]

    def one(qs, ks):
        order = jnp.argsort(ks, stable=True)
        at = jnp.clip(jnp.searchsorted(ks[order], qs, side="left"), 0, t - 1)
        return jnp.where(ks[order][at] == qs, order[at], t).astype(jnp.int32)

    return jax.vmap(one)(q_seg.astype(jnp.int32), k_seg.astype(jnp.int32))


class _Operands(NamedTuple):
    q_side: dict  # query axis 2: [B, X, Lq(, dim)]
    k_side: dict  # key axis 1 ([B, Lk, dim]) or 2 (per-head main keys [B, H, Lk, D])
    lo: jnp.ndarray  # [B, n_q] first visible key block
    hi: jnp.ndarray  # [B, n_q] one past the last


def _operands(q, k, lse, q_idx, k_idx, w_idx, q_pos, q_seg, k_seg, rows: dict, d: _Dims, pieces, lq, lk):
    b = q_seg.shape[0]
    bq, bk = d.block_q, d.block_k
    pad_q = lambda x, v=0: rb.pad_rows(x, lq, v)  # noqa: E731
    pos = pad_q(jnp.broadcast_to(q_pos[None].astype(jnp.int32), q_seg.shape), -1)
    seg = pad_q(q_seg.astype(jnp.int32), -1)
    klo = pad_q(_first_same_document_key(q_seg, k_seg), k_seg.shape[1])
    q_side = {}
    if q is not None:
        q_side.update({f"q{i}": x for i, x in enumerate(_split_last(jnp.swapaxes(pad_q(q), 1, 2), pieces))})
        q_side["lse"] = jnp.swapaxes(pad_q(lse), 1, 2)
    # w in fp32: per-head rows are dynamic sublane slices, unaligned in a packed bf16 layout.
    q_side.update(qi=jnp.swapaxes(pad_q(q_idx), 1, 2), w=jnp.swapaxes(pad_q(w_idx.astype(F32)), 1, 2),
                  qpos=tiles.rows(pos), qseg=tiles.rows(seg), klo=tiles.rows(klo))
    q_side.update({name: tiles.rows(pad_q(x.astype(F32))) for name, x in rows.items()})
    pad_k = lambda x, v=0: rb.pad_rows(x, lk, v)  # noqa: E731
    k_side = {}
    if k is not None:
        k_main = jnp.swapaxes(pad_k(k), 1, 2) if d.per_head else pad_k(k)
        k_side.update({f"k{i}": x for i, x in enumerate(_split_last(k_main, pieces))})
    k_side.update(ki=pad_k(k_idx), kpos=tiles.cols(jnp.broadcast_to(jnp.arange(lk, dtype=jnp.int32), (b, lk))),
                  kseg=tiles.cols(pad_k(k_seg.astype(jnp.int32), rb.KEY_PAD_SEGMENT)))
    n_q = lq // bq
    pos_blocks, klo_blocks = pos.reshape(b, n_q, bq), klo.reshape(b, n_q, bq)
    hi = jnp.clip(pos_blocks.max(-1) // bk + 1, 0, lk // bk).astype(jnp.int32)
    lo = jnp.minimum(klo_blocks.min(-1) // bk, hi).astype(jnp.int32)
    return _Operands(q_side, k_side, lo, hi)


def _q_spec(x, block_q: int):
    shape = (pl.squeezed, x.shape[1], block_q) + x.shape[3:]
    return pl.BlockSpec(shape, lambda i, qb, *_: (i, 0, qb) + (0,) * (x.ndim - 3))


def _k_spec_tpu(name: str, x, d: _Dims):
    def block(i, qb, kj, lo_ref, hi_ref):
        return jnp.clip(jnp.minimum(lo_ref[i, qb] + kj, hi_ref[i, qb] - 1), 0, d.n_k - 1)

    if name.startswith("k") and name[1:].isdigit() and d.per_head:
        return pl.BlockSpec((pl.squeezed, x.shape[1], d.block_k, x.shape[3]),
                            lambda i, qb, kj, lo, hi: (i, 0, block(i, qb, kj, lo, hi), 0))
    return pl.BlockSpec((pl.squeezed, d.block_k, x.shape[2]),
                        lambda i, qb, kj, lo, hi: (i, block(i, qb, kj, lo, hi), 0))


def _out_shapes(mode, b, lq, lk, hi_, di):
    row = jax.ShapeDtypeStruct((b, 1, lq), F32)
    grads = [jax.ShapeDtypeStruct((b, hi_, lq, di), F32), jax.ShapeDtypeStruct((b, hi_, lq), F32),
             jax.ShapeDtypeStruct((b, lk, di), F32)]
    return {STATS: [row] * 3, STATS_GRADS: [row] * 3 + grads, SOFTMAX_GRADS: grads}[mode]


def _mode_pair_flops(mode: str, d: _Dims, head_dim: int, di: int) -> int:
    stats = pair_flops(d.n_heads, head_dim, d.n_idx_heads, di, grads=False)
    with_target_part = stats + 2 * 2 * d.n_idx_heads * di + 2 * d.n_idx_heads
    full = pair_flops(d.n_heads, head_dim, d.n_idx_heads, di)
    return {STATS: stats, STATS_GRADS: with_target_part, SOFTMAX_GRADS: full - with_target_part}[mode]


def _cost(mode: str, ops: _Operands, d: _Dims, shapes, s: int, t: int, di: int):
    """XLA's view of the kernel: the causal pairs (S x T / 2, the zig-zag shard's average too) at
    :func:`pair_flops`, the operands once plus the key side once per query block."""
    nbytes = lambda xs: sum(x.size * x.dtype.itemsize for x in xs)  # noqa: E731
    head_dim = sum(x.shape[-1] for name, x in ops.q_side.items() if name[0] == "q" and name[1:].isdigit())
    pairs = s * t // 2
    n_q = next(iter(ops.q_side.values())).shape[2] // d.block_q
    b = next(iter(ops.q_side.values())).shape[0]
    return pl.CostEstimate(
        flops=int(pairs * b * _mode_pair_flops(mode, d, head_dim, di)),
        transcendentals=int(pairs * b * (d.n_heads + 2)),
        bytes_accessed=int(nbytes(ops.q_side.values()) + max(1, n_q // 2) * nbytes(ops.k_side.values())
                           + nbytes(shapes)))


def _call(mode: str, ops: _Operands, d: _Dims, b: int, s: int, t: int, di: int, *, backend: str, interpret: bool):
    q_names, k_names = tuple(ops.q_side), tuple(ops.k_side)
    lq, lk = next(iter(ops.q_side.values())).shape[2], d.n_k * d.block_k
    n_q = lq // d.block_q
    shapes = _out_shapes(mode, b, lq, lk, d.n_idx_heads, di)
    cost = _cost(mode, ops, d, shapes, s, t, di)
    kernel_name = f"dense_indexer_kl_{'forward' if mode != SOFTMAX_GRADS else 'backward'}"
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    if backend == "triton":
        kernel = partial(_kernel_triton, q_names=q_names, k_names=k_names, mode=mode, d=d)
        q_specs = [_q_spec(x, d.block_q) for x in ops.q_side.values()]
        out_specs = [_q_spec(s, d.block_q) for s in shapes]
        inputs = [*ops.q_side.values(), *ops.k_side.values()]
        aliases = {}
        if mode != STATS:
            out_specs[-1] = any_spec
            aliases = {len(inputs): len(shapes) - 1}
            inputs.append(jnp.zeros(shapes[-1].shape, F32))
        return pl.pallas_call(
            kernel, out_shape=shapes, grid=(b, n_q), out_specs=out_specs, input_output_aliases=aliases,
            in_specs=q_specs + [any_spec] * (len(ops.k_side) + (mode != STATS)),
            compiler_params=None if interpret else tiles.triton_params(TRITON_WARPS, TRITON_STAGES),
            interpret=interpret, name=kernel_name,
            cost_estimate=cost,
        )(*inputs)
    from jax.experimental.pallas import tpu as pltpu

    out_specs = [_q_spec(s, d.block_q) for s in shapes]
    scratch = [pltpu.VMEM((1, d.block_q), F32) for _ in range(5)] if mode != SOFTMAX_GRADS else []
    if mode != STATS:
        out_specs[-1] = any_spec
        scratch += [pltpu.VMEM((d.block_k, di), F32), pltpu.SemaphoreType.DMA((1,))]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, n_q, d.n_k),
        in_specs=[_q_spec(x, d.block_q) for x in ops.q_side.values()]
        + [_k_spec_tpu(name, x, d) for name, x in ops.k_side.items()],
        out_specs=out_specs, scratch_shapes=scratch)
    return pl.pallas_call(
        partial(_kernel_tpu, q_names=q_names, k_names=k_names, mode=mode, d=d), out_shape=shapes, grid_spec=grid_spec,
        compiler_params=tiles.tpu_params(("parallel", "arbitrary", "arbitrary"), vmem_limit_bytes=TPU_VMEM_LIMIT),
        interpret=pltpu.InterpretParams() if interpret else False, name=kernel_name, cost_estimate=cost,
    )(ops.lo, ops.hi, *ops.q_side.values(), *ops.k_side.values())


class _Config(NamedTuple):
    sm_scale: float
    variant: str | None  # "triton" / "tpu", None: per lowering platform (or the small interpreter tiles)
    interpret: bool
    blocks: tuple | None  # (block_q, block_k) override


def _blocks(cfg: _Config, variant: str | None, s: int, t: int) -> tuple[int, int]:
    if cfg.blocks is not None:
        return cfg.blocks
    if variant == "tpu":
        return TPU_BLOCKS
    bq, bk = TRITON_BLOCKS if variant == "triton" else INTERPRET_BLOCKS
    cap = lambda n: max(16, 1 << (max(n, 1) - 1).bit_length())  # noqa: E731
    return min(bq, cap(s)), min(bk, cap(t))


def _run(cfg: _Config, mode: str, q, k, lse, q_idx, k_idx, w_idx, q_pos, q_seg, k_seg, rows: dict):
    """One kernel (``mode``) as the configured variant, or per lowering platform. Returns the outputs
    unpadded: stats (kl, lse_i, psum [B, S]) and/or grads (dq [B, S, Hi, Di], dw [B, S, Hi],
    dk [B, T, Di]), fp32."""
    b, s = q_seg.shape
    t = k_seg.shape[1]
    hi_, di = q_idx.shape[2], q_idx.shape[3]

    def run(variant, interpret, q, k, lse, q_idx, k_idx, w_idx, q_pos, q_seg, k_seg, rows):
        bq, bk = _blocks(cfg, variant, s, t)
        lq, lk = rb.round_up(s, bq), rb.round_up(t, bk)
        pieces = [q_idx.shape[-1]] if q is None else _pow2_pieces(q.shape[-1]) if variant != "tpu" \
            else [q.shape[-1]]
        d = _Dims(len(pieces), k is not None and k.ndim == 4, 0 if q is None else q.shape[2], hi_, cfg.sm_scale,
                  di ** -0.5, bq, bk, lk // bk)
        ops = _operands(q, k, lse, q_idx, k_idx, w_idx, q_pos, q_seg, k_seg, rows, d, pieces, lq, lk)
        outs = _call(mode, ops, d, b, s, t, di, backend="tpu" if variant == "tpu" else "triton",
                     interpret=interpret)
        stats = tuple(x[:, 0, :s] for x in outs[:3]) if mode != SOFTMAX_GRADS else ()
        grads = outs[3:] if mode == STATS_GRADS else outs if mode == SOFTMAX_GRADS else ()
        if grads:
            dq, dw, dk = grads
            grads = (jnp.swapaxes(dq, 1, 2)[:, :s], jnp.swapaxes(dw, 1, 2)[:, :s], dk[:, :t])
        return stats + tuple(grads)

    args = (q, k, lse, q_idx, k_idx, w_idx, q_pos, q_seg, k_seg, rows)
    if cfg.interpret or cfg.variant is not None:
        return run(cfg.variant, cfg.interpret, *args)
    return tiles.pallas_platform_dispatch(partial(run, "triton", False), partial(run, "tpu", False),
                                          partial(run, None, True), *args)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kl_sum(cfg, q_idx, k_idx, w_idx, q, k, lse, weights, q_pos, q_seg, k_seg):
    kl, _, _ = _run(cfg, STATS, q, k, lse, q_idx, k_idx, w_idx, q_pos, q_seg, k_seg, {})
    return (kl * weights).sum()


def _kl_sum_fwd(cfg, q_idx, k_idx, w_idx, q, k, lse, weights, q_pos, q_seg, k_seg):
    kl, lse_i, psum, *target_part = _run(cfg, STATS_GRADS, q, k, lse, q_idx, k_idx, w_idx, q_pos, q_seg, k_seg,
                                         {"wt": weights})
    # Named so a remat policy can keep pass A's results: recomputing them would form the target again.
    # The barrier keeps XLA:TPU from fusing the writes that stack them per scanned layer into the
    # kernel's call (such a fusion is held to the default 16 MiB of scoped VMEM, not the kernel's).
    saved = jax.lax.optimization_barrier((lse_i, psum, tuple(target_part)))
    lse_i, psum, target_part = checkpoint_name(saved, PASS_A_RESIDUALS)
    res = (q_idx, k_idx, w_idx, weights, q_pos, q_seg, k_seg, lse_i, psum, target_part)
    return (kl * weights).sum(), res


def _kl_sum_bwd(cfg, res, ct):
    q_idx, k_idx, w_idx, weights, q_pos, q_seg, k_seg, lse_i, psum, (dq_a, dw_a, dk_a) = res
    dq_b, dw_b, dk_b = _run(cfg, SOFTMAX_GRADS, None, None, None, q_idx, k_idx, w_idx, q_pos, q_seg, k_seg,
                            {"coef": weights * psum, "lse_i": lse_i})
    dq, dw, dk = ((a + b_) * ct for a, b_ in ((dq_a, dq_b), (dw_a, dw_b), (dk_a, dk_b)))
    return (dq.astype(q_idx.dtype), dk.astype(k_idx.dtype), dw.astype(w_idx.dtype),
            None, None, None, None, None, None, None)


_kl_sum.defvjp(_kl_sum_fwd, _kl_sum_bwd)


def dense_kl_sum_pallas(q, k, lse, q_idx, k_idx, w_idx, weights, q_pos, q_seg, k_seg, *, sm_scale: float,
                        variant: str | None = None, interpret: bool = False, blocks: tuple | None = None):
    """``dense_indexer_kl.dense_kl_sum``'s contract, as Pallas kernels: variant "triton" / "tpu", or
    None for the lowering platform's (the interpreter with small tiles elsewhere); ``blocks``
    (block_q, block_k) overrides the variant's tiles."""
    if k.ndim not in (3, 4) or k.shape[1] != k_idx.shape[1] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"dense KL: keys must be [B, T, (H,) D] matching q {q.shape} and k_idx {k_idx.shape}; "
                         f"got {k.shape}")
    sg = jax.lax.stop_gradient
    cfg = _Config(float(sm_scale), variant, bool(interpret), None if blocks is None else tuple(blocks))
    return _kl_sum(cfg, q_idx, k_idx, w_idx, sg(q), sg(k), sg(lse).astype(F32), sg(weights).astype(F32),
                   jnp.asarray(q_pos, jnp.int32), q_seg, k_seg)
