"""Pallas kernels of the dense warm-up indexer KL: the pass-2 forward statistics and the backward.

Math (per query t, keys s of its causal document prefix; see `indexer_kl` for the whole story):
  p(t, s) = mean_h exp(a_h(t, s) - lse_h(t)),  a_h = sm_scale q_h(t) . kv(s)      (target, no grad)
  I(t, s) = sum_j w_j(t) relu(z_j(t, s)),      z_j = Di^-0.5 q_idx_j(t) . k_idx(s)
  forward:  online lse_I, sum p log p, sum p I, sum p  ->  KL_t, lse_I(t), psum(t)
  backward: dI(t, s) = g_t (psum_t exp(I - lse_I) - p),  g_t = d loss / d KL_t
            dw_j(t) = sum_s dI relu(z_j);  dz_j = dI w_j [z_j > 0];
            dq_idx_j(t) = Di^-0.5 sum_s dz_j k_idx(s);  dk_idx(s) = Di^-0.5 sum_{t, j} dz_j q_idx_j(t)

Tiles are keys-major [block_k, block_q] (see `indexer_tiles`). Three kernels, each in two variants:
- stats and dq/dw: query-major. Triton: grid (B, query blocks), the program loops over its causal
  key blocks (dq/dw accumulate in the output block, an L2-resident read-modify-write). Mosaic TPU:
  grid (B, query blocks, key blocks) with the key axis "arbitrary"; accumulators stay in VMEM
  (scratch for the statistics, the resident output blocks for dq/dw); invisible key blocks are
  skipped and their index map is clamped so no DMA is issued for them.
- dk: key-major, the mirror image (loop / innermost grid axis over the query blocks that can see
  the key block), so no atomics are needed and results are deterministic.
The backward recomputes the target tile (the main attention) in both backward kernels; with the
forward that is three main-attention passes (four without a given lse), the price of never storing
anything of size S x T.

The main head dim D = 576 is split into power-of-two pieces for Triton ([512, 64]); Mosaic takes it
whole. Every kernel lowers for CUDA (Triton) and TPU (Mosaic) from a CPU host (tests use
jax.export); tile sizes are first guesses that no GPU/TPU has tuned yet.
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

TRITON_BLOCKS = (16, 64)  # (block_q, block_k)
TPU_BLOCKS = (128, 256)
INTERPRET_BLOCKS = (16, 16)


class _Dims(NamedTuple):
    n_pieces: int
    n_heads: int
    n_idx_heads: int
    sm_scale: float
    idx_scale: float
    block_q: int
    block_k: int
    n_q: int
    n_k: int


# ---- operands ---------------------------------------------------------------------------------------

def _pow2_pieces(d: int, minimum: int = 16) -> list[int]:
    """Split a head dim into power-of-two pieces for Triton (576 -> [512, 64]); the last piece is
    zero-padded up to `minimum` (the smallest tl.dot size)."""
    pieces, rest = [], d
    while rest > 0:
        piece = max(1 << (rest.bit_length() - 1), minimum)
        pieces.append(piece)
        rest -= piece
    return pieces


def _split_last(x, pieces: list[int]):
    x = tiles.pad_to(x, x.ndim - 1, sum(pieces))
    starts = [sum(pieces[:i]) for i in range(len(pieces))]
    return [x[..., a:a + n] for a, n in zip(starts, pieces)]


def _operands(q, kv, lse, q_idx, k_idx, w_idx, segment_ids, length, pieces, extra_rows: dict):
    """Padded, kernel-layout operands. Query side: name -> array with the query axis at 2
    ([B, heads, L, dim], [B, heads, L] or rows [B, 1, L]); key side: key axis at 1."""
    pos, seg = tiles.padded_positions_segments(segment_ids, length)
    pad = lambda x: tiles.pad_to(x, 1, length)
    q_side = {f"q{i}": x for i, x in enumerate(_split_last(jnp.swapaxes(pad(q), 1, 2), pieces))}
    q_side.update(lse=jnp.swapaxes(pad(lse), 1, 2), qi=jnp.swapaxes(pad(q_idx), 1, 2),
                  w=jnp.swapaxes(pad(w_idx), 1, 2), qpos=tiles.rows(pos), qseg=tiles.rows(seg))
    q_side.update({name: tiles.rows(pad(x)) for name, x in extra_rows.items()})
    k_side = {f"kv{i}": x for i, x in enumerate(_split_last(pad(kv), pieces))}
    k_side.update(ki=pad(k_idx), kpos=tiles.cols(pos), kseg=tiles.cols(seg))
    return q_side, k_side


# ---- loads: a block ref (BlockSpec) or a window of a full array ref (Triton loops) --------------

class _QuerySide:
    """Query-side loads. Triton cannot compose ref views, so windows are explicit indexers."""

    def __init__(self, refs: dict, n_pieces: int, batch=None, start=None, size: int = 0):
        self.refs, self.n_pieces = refs, n_pieces
        self.window = None if start is None else (batch, pl.ds(start, size))

    def _mat(self, name, h):  # [bq, dim]
        r = self.refs[name]
        return r[h] if self.window is None else r[self.window[0], h, self.window[1], :]

    def _head_row(self, name, h):  # [1, bq]
        r = self.refs[name]
        return r[pl.ds(h, 1), :] if self.window is None else r[self.window[0], pl.ds(h, 1), self.window[1]]

    def row(self, name):  # [1, bq]
        r = self.refs[name]
        return r[...] if self.window is None else r[self.window[0], :, self.window[1]]

    def q_main(self, h):
        return [self._mat(f"q{i}", h) for i in range(self.n_pieces)]

    def lse_row(self, h):
        return self._head_row("lse", h)

    def qi(self, j):
        return self._mat("qi", j)

    def w_row(self, j):
        return self._head_row("w", j)


class _KeySide:
    def __init__(self, refs: dict, n_pieces: int, batch=None, start=None, size: int = 0):
        self.refs, self.n_pieces = refs, n_pieces
        self.window = None if start is None else (batch, pl.ds(start, size))

    def tile(self, name):  # [bk, dim]
        r = self.refs[name]
        return r[...] if self.window is None else r[self.window[0], self.window[1], :]

    def kv(self):
        return [self.tile(f"kv{i}") for i in range(self.n_pieces)]


# ---- tile math (keys-major [bk, bq]) ----------------------------------------------------------------

def _visible(qs: _QuerySide, ks: _KeySide):
    return (ks.tile("kseg") == qs.row("qseg")) & (ks.tile("kpos") <= qs.row("qpos"))


def _target_tile(qs: _QuerySide, ks: _KeySide, vis, d: _Dims):
    kv_tiles = ks.kv()
    bk, bq = vis.shape

    def head(h, acc):
        a = sum(tiles.dot_nt(kv_t, q_h) for kv_t, q_h in zip(kv_tiles, qs.q_main(h))) * d.sm_scale
        return acc + jnp.exp(a - qs.lse_row(h))

    probs = jax.lax.fori_loop(0, d.n_heads, head, jnp.zeros((bk, bq), F32))
    return jnp.where(vis, probs * (1.0 / d.n_heads), 0.0)


def _lse_update(qs: _QuerySide, ks: _KeySide, d: _Dims, m_ref, l_ref):
    """Pass 1: fold one tile into the per-head online log-sum-exp of the main attention; m_ref,
    l_ref [H, bq] are fp32 output blocks (running max and sum)."""
    vis = _visible(qs, ks)
    kv_tiles = ks.kv()

    def head(h, carry):
        a = sum(tiles.dot_nt(kv_t, q_h) for kv_t, q_h in zip(kv_tiles, qs.q_main(h))) * d.sm_scale
        a = jnp.where(vis, a, NEG)
        m_old, l_old = m_ref[pl.ds(h, 1), :], l_ref[pl.ds(h, 1), :]
        m_new = jnp.maximum(m_old, a.max(axis=0, keepdims=True))
        m_safe = jnp.where(m_new == NEG, 0.0, m_new)
        l_ref[pl.ds(h, 1), :] = l_old * jnp.exp(m_old - m_safe) + _sum0(jnp.exp(a - m_safe))
        m_ref[pl.ds(h, 1), :] = m_new
        return carry

    jax.lax.fori_loop(0, d.n_heads, head, 0)


def _index_tile(qs: _QuerySide, ks: _KeySide, vis, d: _Dims):
    scores = tiles.tile_indexer_scores(ks.tile("ki"), qs.qi, qs.w_row, d.n_idx_heads, d.idx_scale)
    return jnp.where(vis, scores, NEG)


def _sum0(x):
    return x.sum(axis=0, keepdims=True)


def _stats_init(bq):
    return (jnp.full((1, bq), NEG, F32),) + tuple(jnp.zeros((1, bq), F32) for _ in range(4))


def _stats_update(carry, qs, ks, d: _Dims):
    """Fold one tile into the per-query statistics (rows [1, bq]): online lse_I, sum p log p,
    sum p I, sum p."""
    vis = _visible(qs, ks)
    p, score = _target_tile(qs, ks, vis, d), _index_tile(qs, ks, vis, d)
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
    lse_i = m + jnp.log(l)
    kl_ref[...] = plogp - p_dot_i + lse_i * psum
    lse_i_ref[...] = lse_i
    psum_ref[...] = psum


def _d_score(qs, ks, d: _Dims):
    """dLoss/dI tile [bk, bq] (zero where invisible)."""
    vis = _visible(qs, ks)
    p, score = _target_tile(qs, ks, vis, d), _index_tile(qs, ks, vis, d)
    soft = jnp.where(vis, jnp.exp(score - qs.row("lse_i")), 0.0)
    return qs.row("g") * (qs.row("psum") * soft - p)


def _dz(ds, qs, ki, j, d: _Dims):
    """Head j: (dz_j [bk, bq] in the input dtype, relu(z_j))."""
    z = tiles.dot_nt(ki, qs.qi(j)) * d.idx_scale
    dz = ds * qs.w_row(j).astype(F32) * (z > 0)
    return dz.astype(ki.dtype), jnp.maximum(z, 0.0)


def _accumulate_dq_dw(ds, qs, ks, d: _Dims, dq_ref, dw_ref):
    """dq_ref [Hi, bq, Di] and dw_ref [Hi, bq] (fp32 output blocks) += this tile's share."""
    ki = ks.tile("ki")

    def head(j, carry):
        dz, relu_z = _dz(ds, qs, ki, j, d)
        dq_ref[j] = dq_ref[j] + jnp.dot(dz.T, ki, preferred_element_type=F32) * d.idx_scale
        dw_ref[pl.ds(j, 1), :] = dw_ref[pl.ds(j, 1), :] + _sum0(ds * relu_z)
        return carry

    jax.lax.fori_loop(0, d.n_idx_heads, head, 0)


def _dk_tile(ds, qs, ks, d: _Dims):
    """This tile's share of dk_idx: [bk, Di] fp32."""
    ki = ks.tile("ki")

    def head(j, acc):
        dz, _ = _dz(ds, qs, ki, j, d)
        return acc + jnp.dot(dz, qs.qi(j).astype(dz.dtype), preferred_element_type=F32) * d.idx_scale

    return jax.lax.fori_loop(0, d.n_idx_heads, head, jnp.zeros(ki.shape, F32))


# ---- kernels ----------------------------------------------------------------------------------------

def _split_refs(refs, q_names, k_names):
    nq, nk = len(q_names), len(k_names)
    return dict(zip(q_names, refs[:nq])), dict(zip(k_names, refs[nq:nq + nk])), refs[nq + nk:]


def _n_visible_k(qb, d: _Dims):
    return jnp.minimum(tiles.last_visible_key_block(qb, d.block_q, d.block_k) + 1, d.n_k)


def _first_visible_q(kj, d: _Dims):
    return jax.lax.div(kj * d.block_k, d.block_q)


def _stats_kernel_triton(*refs, q_names, k_names, d: _Dims):
    q_refs, k_refs, (kl_ref, lse_i_ref, psum_ref) = _split_refs(refs, q_names, k_names)
    bi, qb = pl.program_id(0), pl.program_id(1)
    qs = _QuerySide(q_refs, d.n_pieces)

    def body(kj, carry):
        ks = _KeySide(k_refs, d.n_pieces, bi, pl.multiple_of(kj * d.block_k, d.block_k), d.block_k)
        return _stats_update(carry, qs, ks, d)

    _stats_finish(jax.lax.fori_loop(0, _n_visible_k(qb, d), body, _stats_init(d.block_q)), kl_ref, lse_i_ref, psum_ref)


def _stats_kernel_tpu(*refs, q_names, k_names, d: _Dims):
    q_refs, k_refs, rest = _split_refs(refs, q_names, k_names)
    (kl_ref, lse_i_ref, psum_ref), acc_refs = rest[:3], rest[3:]
    qb, kj = pl.program_id(1), pl.program_id(2)

    @pl.when(kj == 0)
    def _init():
        for r, v in zip(acc_refs, _stats_init(d.block_q)):
            r[...] = v

    @pl.when(kj < _n_visible_k(qb, d))
    def _update():
        carry = _stats_update(tuple(r[...] for r in acc_refs), _QuerySide(q_refs, d.n_pieces),
                              _KeySide(k_refs, d.n_pieces), d)
        for r, v in zip(acc_refs, carry):
            r[...] = v

    @pl.when(kj == d.n_k - 1)
    def _finish():
        _stats_finish(tuple(r[...] for r in acc_refs), kl_ref, lse_i_ref, psum_ref)


def _lse_kernel_triton(*refs, q_names, k_names, d: _Dims):
    q_refs, k_refs, (m_ref, l_ref) = _split_refs(refs, q_names, k_names)
    bi, qb = pl.program_id(0), pl.program_id(1)
    qs = _QuerySide(q_refs, d.n_pieces)
    m_ref[...] = jnp.full(m_ref.shape, NEG, F32)
    l_ref[...] = jnp.zeros(l_ref.shape, F32)

    def body(kj, carry):
        ks = _KeySide(k_refs, d.n_pieces, bi, pl.multiple_of(kj * d.block_k, d.block_k), d.block_k)
        _lse_update(qs, ks, d, m_ref, l_ref)
        return carry

    jax.lax.fori_loop(0, _n_visible_k(qb, d), body, 0)


def _lse_kernel_tpu(*refs, q_names, k_names, d: _Dims):
    q_refs, k_refs, (m_ref, l_ref) = _split_refs(refs, q_names, k_names)
    qb, kj = pl.program_id(1), pl.program_id(2)

    @pl.when(kj == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG, F32)
        l_ref[...] = jnp.zeros(l_ref.shape, F32)

    @pl.when(kj < _n_visible_k(qb, d))
    def _update():
        _lse_update(_QuerySide(q_refs, d.n_pieces), _KeySide(k_refs, d.n_pieces), d, m_ref, l_ref)


def _dq_dw_kernel_triton(*refs, q_names, k_names, d: _Dims):
    q_refs, k_refs, (dq_ref, dw_ref) = _split_refs(refs, q_names, k_names)
    bi, qb = pl.program_id(0), pl.program_id(1)
    qs = _QuerySide(q_refs, d.n_pieces)
    dq_ref[...] = jnp.zeros(dq_ref.shape, F32)
    dw_ref[...] = jnp.zeros(dw_ref.shape, F32)

    def body(kj, carry):
        ks = _KeySide(k_refs, d.n_pieces, bi, pl.multiple_of(kj * d.block_k, d.block_k), d.block_k)
        _accumulate_dq_dw(_d_score(qs, ks, d), qs, ks, d, dq_ref, dw_ref)
        return carry

    jax.lax.fori_loop(0, _n_visible_k(qb, d), body, 0)


def _dq_dw_kernel_tpu(*refs, q_names, k_names, d: _Dims):
    q_refs, k_refs, (dq_ref, dw_ref) = _split_refs(refs, q_names, k_names)
    qb, kj = pl.program_id(1), pl.program_id(2)

    @pl.when(kj == 0)
    def _init():
        dq_ref[...] = jnp.zeros(dq_ref.shape, F32)
        dw_ref[...] = jnp.zeros(dw_ref.shape, F32)

    @pl.when(kj < _n_visible_k(qb, d))
    def _update():
        qs, ks = _QuerySide(q_refs, d.n_pieces), _KeySide(k_refs, d.n_pieces)
        _accumulate_dq_dw(_d_score(qs, ks, d), qs, ks, d, dq_ref, dw_ref)


def _dk_kernel_triton(*refs, q_names, k_names, d: _Dims):
    q_refs, k_refs, (dk_ref,) = _split_refs(refs, q_names, k_names)
    bi, kj = pl.program_id(0), pl.program_id(1)
    ks = _KeySide(k_refs, d.n_pieces)

    def body(qb, acc):
        qs = _QuerySide(q_refs, d.n_pieces, bi, pl.multiple_of(qb * d.block_q, d.block_q), d.block_q)
        return acc + _dk_tile(_d_score(qs, ks, d), qs, ks, d)

    dk_ref[...] = jax.lax.fori_loop(_first_visible_q(kj, d), d.n_q, body, jnp.zeros(dk_ref.shape, F32))


def _dk_kernel_tpu(*refs, q_names, k_names, d: _Dims):
    q_refs, k_refs, (dk_ref,) = _split_refs(refs, q_names, k_names)
    kj, qb = pl.program_id(1), pl.program_id(2)

    @pl.when(qb == 0)
    def _init():
        dk_ref[...] = jnp.zeros(dk_ref.shape, F32)

    @pl.when(qb >= _first_visible_q(kj, d))
    def _update():
        qs, ks = _QuerySide(q_refs, d.n_pieces), _KeySide(k_refs, d.n_pieces)
        dk_ref[...] = dk_ref[...] + _dk_tile(_d_score(qs, ks, d), qs, ks, d)


# ---- pallas_call plumbing ---------------------------------------------------------------------------

def _q_spec(x, block_q: int, index):
    """BlockSpec over the query axis (2) of a query-side array; index(*grid) -> (batch, q block)."""
    shape = (pl.squeezed, x.shape[1], block_q) + x.shape[3:]
    return pl.BlockSpec(shape, lambda *g: (index(*g)[0], 0, index(*g)[1]) + (0,) * (len(x.shape) - 3))


def _k_spec(x, block_k: int, index):
    shape = (pl.squeezed, block_k) + x.shape[2:]
    return pl.BlockSpec(shape, lambda *g: (index(*g)[0], index(*g)[1]) + (0,) * (len(x.shape) - 2))


def _call(kernel, d: _Dims, q_side: dict, k_side: dict, out_shape, *, major: str, backend: str, interpret: bool,
          scratch=(), name: str):
    """major "q": grid over query blocks (Triton) / (query blocks, key blocks) (TPU), output blocks
    follow the query block; major "k": the mirror image. out_shape: list of (shape, per-side spec
    kind) with the array shapes of the outputs (batch first)."""
    b = next(iter(q_side.values())).shape[0]
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    q_names, k_names = tuple(q_side), tuple(k_side)
    if major == "q":
        if backend == "triton":
            grid, q_idx, k_idx = (b, d.n_q), (lambda i, qb: (i, qb)), None
        else:
            grid = (b, d.n_q, d.n_k)
            q_idx = lambda i, qb, kj: (i, qb)
            k_idx = lambda i, qb, kj: (i, jnp.minimum(kj, tiles.last_visible_key_block(qb, d.block_q, d.block_k)))
    else:
        if backend == "triton":
            grid, q_idx, k_idx = (b, d.n_k), None, (lambda i, kj: (i, kj))
        else:
            grid = (b, d.n_k, d.n_q)
            q_idx = lambda i, kj, qb: (i, jnp.maximum(qb, _first_visible_q(kj, d)))
            k_idx = lambda i, kj, qb: (i, kj)
    in_specs = ([any_spec if q_idx is None else _q_spec(x, d.block_q, q_idx) for x in q_side.values()]
                + [any_spec if k_idx is None else _k_spec(x, d.block_k, k_idx) for x in k_side.values()])
    out_specs = [_q_spec(s, d.block_q, q_idx) if major == "q" else _k_spec(s, d.block_k, k_idx) for s in out_shape]
    if interpret:
        params = None
    elif backend == "triton":
        params = tiles.triton_params()
    else:
        params = tiles.tpu_params(("parallel", "parallel", "arbitrary"), vmem_limit_bytes=64 * 2 ** 20)
    return pl.pallas_call(
        partial(kernel, q_names=q_names, k_names=k_names, d=d),
        out_shape=[jax.ShapeDtypeStruct(s.shape, F32) for s in out_shape], grid=grid, in_specs=in_specs,
        out_specs=out_specs, scratch_shapes=list(scratch), compiler_params=params, interpret=interpret, name=name,
    )(*q_side.values(), *k_side.values())


def _setup(q, kv, lse, q_idx, k_idx, w_idx, segment_ids, sm_scale, block_q, block_k, backend, extra_rows=None):
    b, s, h, dim = q.shape
    length = tiles.round_up(s, max(block_q, block_k))
    pieces = _pow2_pieces(dim) if backend == "triton" else [dim]
    q_side, k_side = _operands(q, kv, lse, q_idx, k_idx, w_idx, segment_ids, length, pieces, extra_rows or {})
    d = _Dims(len(pieces), h, q_idx.shape[2], float(sm_scale), q_idx.shape[3] ** -0.5, block_q, block_k,
              length // block_q, length // block_k)
    return q_side, k_side, d, length


def attention_lse(q, kv, segment_ids, *, sm_scale, block_q, block_k, backend, interpret):
    """Pass 1: per-head log-sum-exp of the causal, document-masked MQA attention -> [B, S, H] fp32."""
    b, s, h, _ = q.shape
    dummy_idx = jnp.zeros((b, s, 1, 16), q.dtype)  # the indexer operands are not used by this kernel
    q_side, k_side, d, length = _setup(q, kv, jnp.zeros((b, s, h), F32), dummy_idx, dummy_idx[:, :, 0],
                                       dummy_idx[:, :, :, 0], segment_ids, sm_scale, block_q, block_k, backend)
    q_side = {name: x for name, x in q_side.items() if name[1:].isdigit() or name in ("qpos", "qseg")}
    k_side = {name: x for name, x in k_side.items() if name != "ki"}  # only what the kernel reads gets DMA'd
    heads = jax.ShapeDtypeStruct((b, h, length), F32)
    m, l = _call(_lse_kernel_triton if backend == "triton" else _lse_kernel_tpu, d, q_side, k_side, [heads, heads],
                 major="q", backend=backend, interpret=interpret, name="indexer_kl_attention_lse")
    return jnp.swapaxes(m + jnp.log(l), 1, 2)[:, :s]


def dense_stats(q, kv, lse, q_idx, k_idx, w_idx, segment_ids, *, sm_scale, block_q, block_k, backend, interpret):
    """Pass 2 -> KL_t, lse_I(t), psum(t), each [B, S] fp32."""
    s = q.shape[1]
    q_side, k_side, d, length = _setup(q, kv, lse, q_idx, k_idx, w_idx, segment_ids, sm_scale, block_q, block_k,
                                       backend)
    row = jax.ShapeDtypeStruct((q.shape[0], 1, length), F32)
    kernel, scratch = _stats_kernel_triton, ()
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        kernel, scratch = _stats_kernel_tpu, [pltpu.VMEM((1, block_q), F32) for _ in range(5)]
    outs = _call(kernel, d, q_side, k_side, [row] * 3, major="q", backend=backend, interpret=interpret,
                 scratch=scratch, name="indexer_kl_stats")
    return tuple(x[:, 0, :s] for x in outs)


def dense_grads(q, kv, lse, q_idx, k_idx, w_idx, segment_ids, lse_i, psum, g, *, sm_scale, block_q, block_k,
                backend, interpret):
    """Gradients of sum_t g_t KL_t w.r.t. (q_idx, k_idx, w_idx), in their dtypes."""
    b, s, hi, di = q_idx.shape
    q_side, k_side, d, length = _setup(q, kv, lse, q_idx, k_idx, w_idx, segment_ids, sm_scale, block_q, block_k,
                                       backend, dict(lse_i=lse_i, psum=psum, g=g))
    common = dict(backend=backend, interpret=interpret)
    dq_shape, dw_shape = jax.ShapeDtypeStruct((b, hi, length, di), F32), jax.ShapeDtypeStruct((b, hi, length), F32)
    dq, dw = _call(_dq_dw_kernel_triton if backend == "triton" else _dq_dw_kernel_tpu, d, q_side, k_side,
                   [dq_shape, dw_shape], major="q", name="indexer_kl_dq_dw", **common)
    (dk,) = _call(_dk_kernel_triton if backend == "triton" else _dk_kernel_tpu, d, q_side, k_side,
                  [jax.ShapeDtypeStruct((b, length, di), F32)], major="k", name="indexer_kl_dk", **common)
    return (jnp.swapaxes(dq, 1, 2)[:, :s].astype(q_idx.dtype), dk[:, :s].astype(k_idx.dtype),
            jnp.swapaxes(dw, 1, 2)[:, :s].astype(w_idx.dtype))


def _blocks(variant: str | None, s: int) -> tuple[int, int]:
    """Tile sizes of a variant; Triton/interpreter tiles shrink (powers of two) for short sequences."""
    if variant == "tpu":
        return TPU_BLOCKS
    bq, bk = TRITON_BLOCKS if variant == "triton" else INTERPRET_BLOCKS
    cap = max(16, 1 << (max(s, 1) - 1).bit_length())
    return min(bq, cap), min(bk, cap)


def by_variant(fn, *args, sm_scale: float, variant: str | None, interpret: bool):
    """Run `dense_stats` / `dense_grads` as a given variant ("triton" / "tpu"), or, with variant
    None and interpret False, per lowering platform (Triton on CUDA/ROCm, Mosaic on TPU, the
    interpreter with small tiles elsewhere)."""
    s = args[0].shape[1]

    def run(which, interp, *a):
        bq, bk = _blocks(which, s)
        return fn(*a, sm_scale=sm_scale, block_q=bq, block_k=bk, backend=which or "triton", interpret=interp)

    if interpret or variant is not None:
        return run(variant, interpret, *args)
    return tiles.pallas_platform_dispatch(partial(run, "triton", False), partial(run, "tpu", False),
                                          partial(run, None, True), *args)
