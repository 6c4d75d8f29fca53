"""Memory-bounded lightning-indexer top-k: O(S K) memory and no wide sort.

Semantics = `dsa_train.ops.indexer.indexer_topk_reference`: for each query t, the K = min(topk, T)
keys with the largest I[t, s] = sum_j w[t, j] * relu(q[t, j] . k[s] * Di^-0.5) among the causal,
same-document candidates, sorted by score, -1 for unused slots. Ties: the lower key index first
(as `lax.top_k`, so equal to the reference even on ties, up to fp32 rounding differences between
the tiled and the reference score sums, which can reorder keys whose scores differ in the last bits).

Design (both implementations share the driver `_select_topk`):
- Queries are cut into chunks of `q_chunk` rows (lax.map, sequential). For each query chunk a loop
  walks the key chunks of its causal prefix only (a dynamic trip count from the chunk's largest
  query position, so the fully masked upper triangle is skipped at chunk granularity, in any
  layout: the positions may be a zig-zag context shard's). It keeps a running top-K per query,
  sorted, whose last value is the running threshold (the current K-th).
- A key chunk's scores are gated by that threshold (a key that does not beat the K-th can never
  enter: the running entries have lower indices and win ties). If no query of the chunk has more
  than `candidates` beaters, they are gathered (cumulative count + binary search) into that many
  slots and merged with one (K + candidates)-wide top_k; nothing is merged when none beats; else
  (the first chunks, while the threshold is low) the chunk is merged in pieces of <= K keys. No
  sort in the program is wider than 2 K, whatever the chunk or sequence length.
- "streaming" computes a chunk's gated scores with plain XLA einsums ([B, Qc, Hi, C] logits live).
- "pallas" computes them with a fused Pallas kernel (per-head matmul + ReLU + weighted head sum +
  causal/document mask + threshold gate, keys-major [bk, bq] tiles; logits never leave VMEM). The
  selection itself runs in XLA between kernel calls: neither the Triton nor the Mosaic lowering
  has sort, cumulative sum or scatter, which any exact selection needs.
- The chunk scores are the only [Qc, C] buffer; with Qc = 1024 and C = 2048 that is 8 MiB per
  batch row whatever the sequence length.

Queries may be a subset of the row (context parallelism): `q_positions` gives each query's position
in the row ([S] or [B, S]; default arange, i.e. queries = keys) and `k_segment_ids` the keys'
documents (default `segment_ids`). Returned indices are key positions.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dsa_train.kernels import indexer_tiles as tiles

NEG = -jnp.inf

# (q_chunk, k_chunk) of the XLA driver and (block_q, block_k) of the Pallas tile, per variant.
STREAMING_CHUNKS = (128, 512)  # (q_chunk, minimum k_chunk)
TRITON_CONFIG = dict(q_chunk=1024, k_chunk=2048, block_q=32, block_k=64)
TPU_CONFIG = dict(q_chunk=1024, k_chunk=2048, block_q=128, block_k=256)
INTERPRET_CONFIG = dict(q_chunk=64, k_chunk=32, block_q=16, block_k=16)
CANDIDATES = 256  # keys merged per round (capped at K): the widest sort in the program


def _positive_zero(scores):
    """-0.0 -> +0.0 (a negative weight times a ReLU zero): top_k orders floats totally, -0 below +0,
    so zero scores would not tie by key index otherwise."""
    return jnp.where(scores == 0, 0.0, scores)


def _slice(x: jnp.ndarray, axis: int, start, size: int) -> jnp.ndarray:
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _take(x, idx):
    return jnp.take_along_axis(x, idx, axis=-1)


def _search(sorted_asc: jnp.ndarray, values: jnp.ndarray, side: str) -> jnp.ndarray:
    """Per row, how many entries of ``sorted_asc`` [..., N] (ascending) are < values [..., M]
    (side "left") or <= values ("right"). A fixed-length vectorized binary search of gathers."""
    n = sorted_asc.shape[-1]
    lo = jnp.zeros(values.shape, jnp.int32)
    hi = jnp.full(values.shape, n, jnp.int32)
    for _ in range(n.bit_length()):
        active = lo < hi
        mid = jax.lax.shift_right_logical(lo + hi, 1)
        x = _take(sorted_asc, jnp.minimum(mid, n - 1))
        right = (x < values) if side == "left" else (x <= values)
        lo = jnp.where(active & right, mid + 1, lo)
        hi = jnp.where(active & ~right, mid, hi)
    return lo


def _merge(run_v, run_i, cand_v, cand_i):
    """Top-K of the running list [..., K] and candidates [..., W], every candidate with a higher key
    index than every running entry: one (K + W)-wide stable top_k (ties: the lower key index)."""
    top_v, pos = jax.lax.top_k(jnp.concatenate([run_v, cand_v], -1), run_v.shape[-1])
    return top_v, _take(jnp.concatenate([run_i, cand_i], -1), pos)


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _merge_chunk(run_v, run_i, scores, first_key, candidates: int):
    """Fold a key chunk's scores [..., C] (-inf where masked) into the running top-K.

    Keys that do not beat the running K-th are dropped. If no query has more than `candidates`
    beaters, they are gathered (cumulative count + binary search) into `candidates` slots and merged
    with one (K + candidates)-wide top_k; nothing is merged when none beats. Otherwise (the first
    chunks, while the threshold is still low) the chunk is merged in pieces of at most K keys."""
    k, c = run_v.shape[-1], scores.shape[-1]
    beats = scores > run_v[..., -1:]
    rank = jnp.cumsum(beats, axis=-1, dtype=jnp.int32)  # rank[p] = beaters among keys <= p
    n_beats = rank[..., -1:]
    most = jnp.max(n_beats)

    def narrow(carry):
        wanted = jnp.broadcast_to(jnp.arange(1, candidates + 1, dtype=jnp.int32), n_beats.shape[:-1] + (candidates,))
        pos = jnp.minimum(_search(rank, wanted, "left"), c - 1)  # position of the wanted-th beater
        ok = wanted <= n_beats
        return _merge(*carry, jnp.where(ok, _take(scores, pos), NEG), jnp.where(ok, first_key + pos, -1))

    piece = _largest_divisor_at_most(c, k)

    def wide(carry):
        def one_piece(j, carry):
            cand_v = jnp.where(_slice(beats, beats.ndim - 1, j * piece, piece),
                               _slice(scores, scores.ndim - 1, j * piece, piece), NEG)
            cand_i = first_key + j * piece + jnp.arange(piece, dtype=jnp.int32)
            return _merge(*carry, cand_v, jnp.broadcast_to(cand_i, cand_v.shape))

        return jax.lax.fori_loop(0, c // piece, one_piece, carry)

    branch = jnp.where(most == 0, 0, jnp.where(most <= candidates, 1, 2))
    return jax.lax.switch(branch, [lambda carry: carry, narrow, wide], (run_v, run_i))


def _select_topk(score_chunk, q_side: dict, k_side: dict, q_pos: jnp.ndarray, n_queries: int, n_keys: int,
                 k_out: int, q_chunk: int, k_chunk: int, candidates: int) -> jnp.ndarray:
    """Running top-k over key chunks. `q_side`/`k_side` map names to (array, axis) with the padded
    query/key axis; q_pos [B, n_queries] the queries' row positions (-1 for padding);
    `score_chunk(qc, kc, threshold [B, Qc])` returns gated, masked scores [B, Qc, k_chunk]."""
    batch = q_pos.shape[0]
    n_k_chunks = n_keys // k_chunk
    candidates = min(candidates, k_out)

    def one_query_chunk(qi):
        qc = {name: _slice(x, axis, qi * q_chunk, q_chunk) for name, (x, axis) in q_side.items()}
        last = jnp.max(_slice(q_pos, 1, qi * q_chunk, q_chunk))

        def merge(kj, carry):
            kc = {name: _slice(x, axis, kj * k_chunk, k_chunk) for name, (x, axis) in k_side.items()}
            scores = score_chunk(qc, kc, carry[0][..., -1])
            return _merge_chunk(*carry, scores, kj * k_chunk, candidates)

        init = (jnp.full((batch, q_chunk, k_out), NEG, jnp.float32),
                jnp.full((batch, q_chunk, k_out), -1, jnp.int32))
        n_visible = jnp.clip(last // k_chunk + 1, 0, n_k_chunks)
        top_v, top_i = jax.lax.fori_loop(0, n_visible, merge, init)
        return jnp.where(top_v > NEG, top_i, -1)

    out = jax.lax.map(one_query_chunk, jnp.arange(n_queries // q_chunk))  # [nq, B, Qc, K]
    return jnp.moveaxis(out, 0, 1).reshape(batch, n_queries, k_out)


class _Layout:
    """Queries and keys padded to chunk multiples, with positions and segments (padding: position
    -1 for queries, segment PAD_SEGMENT for both, so padding sees and is seen by nothing real)."""

    def __init__(self, q, k, segment_ids, q_positions, k_segment_ids, q_chunk: int, k_chunk: int,
                 block_q: int = 1, block_k: int = 1):
        b, s = q.shape[:2]
        t = k.shape[1]
        k_segment_ids = segment_ids if k_segment_ids is None else k_segment_ids
        if segment_ids.shape != (b, s) or k_segment_ids.shape != (b, t):
            raise ValueError(f"indexer top-k: segment ids {segment_ids.shape} / key segment ids "
                             f"{k_segment_ids.shape} do not match q {q.shape} / k {k.shape}")
        if q_positions is None:
            tiles.check_self_attention(s, t)
            q_positions = jnp.arange(s, dtype=jnp.int32)
        q_positions = jnp.broadcast_to(jnp.asarray(q_positions, jnp.int32), (b, s))
        self.q_chunk = min(q_chunk, tiles.round_up(s, block_q))
        self.k_chunk = min(k_chunk, tiles.round_up(t, block_k))
        self.n_queries = tiles.round_up(s, self.q_chunk)
        self.n_keys = tiles.round_up(t, self.k_chunk)
        self.q_pos = tiles.pad_to(q_positions, 1, self.n_queries, -1)
        self.q_seg = tiles.pad_to(segment_ids.astype(jnp.int32), 1, self.n_queries, tiles.PAD_SEGMENT)
        self.k_pos = jnp.broadcast_to(jnp.arange(self.n_keys, dtype=jnp.int32), (b, self.n_keys))
        self.k_seg = tiles.pad_to(k_segment_ids.astype(jnp.int32), 1, self.n_keys, tiles.PAD_SEGMENT)


def indexer_topk_streaming(q, k, weights, topk: int, segment_ids, q_chunk: int = STREAMING_CHUNKS[0],
                           k_chunk: int | None = None, *, q_positions=None, k_segment_ids=None,
                           candidates: int = CANDIDATES) -> jnp.ndarray:
    """Pure-JAX top-k (the CPU path). Returns int32 [B, S, min(topk, T)], -1 = unused.

    k_chunk default: max(512, min(K, 2048))."""
    b, s, _, _ = q.shape
    k_out = min(topk, k.shape[1])
    if k_chunk is None:
        k_chunk = max(STREAMING_CHUNKS[1], min(k_out, 2048))
    lay = _Layout(q, k, segment_ids, q_positions, k_segment_ids, q_chunk, k_chunk)
    q_side = dict(q=(tiles.pad_to(q, 1, lay.n_queries), 1), w=(tiles.pad_to(weights, 1, lay.n_queries), 1),
                  pos=(lay.q_pos, 1), seg=(lay.q_seg, 1))
    k_side = dict(k=(tiles.pad_to(k, 1, lay.n_keys), 1), pos=(lay.k_pos, 1), seg=(lay.k_seg, 1))

    def score_chunk(qs, ks, threshold):
        scores = _positive_zero(tiles.indexer_score_block(qs["q"], ks["k"], qs["w"]))
        keep = tiles.visible(qs["pos"], qs["seg"], ks["pos"], ks["seg"]) & (scores > threshold[..., None])
        return jnp.where(keep, scores, NEG)

    out = _select_topk(score_chunk, q_side, k_side, lay.q_pos, lay.n_queries, lay.n_keys, k_out, lay.q_chunk,
                       lay.k_chunk, candidates)
    return out[:, :s]


# ---- Pallas scoring kernel ------------------------------------------------------------------------

def _score_tile_kernel(q_ref, k_ref, w_ref, qpos_ref, qseg_ref, thr_ref, kpos_ref, kseg_ref, o_ref, *,
                       n_heads: int, scale: float):
    """One keys-major tile: o [bk, bq] = masked sum_j w[j] relu(k . q[j] * scale), -inf where the
    key is not a candidate or does not beat the query's running K-th score."""
    scores = _positive_zero(tiles.tile_indexer_scores(k_ref[...], lambda j: q_ref[j], lambda j: w_ref[pl.ds(j, 1), :],
                                                     n_heads, scale))
    keep = (kseg_ref[...] == qseg_ref[...]) & (kpos_ref[...] <= qpos_ref[...]) & (scores > thr_ref[...])
    o_ref[...] = jnp.where(keep, scores, NEG)


def _pallas_score_chunk(qs: dict, ks: dict, threshold, *, block_q: int, block_k: int, compiler_params,
                        interpret):
    """qs: qT [B, Hi, Qc, Di], wT [B, Hi, Qc], pos/seg [B, 1, Qc]; ks: k [B, C, Di], pos/seg [B, C, 1];
    threshold [B, Qc] -> gated, masked scores [B, Qc, C] fp32."""
    b, n_heads, q_chunk, d = qs["q"].shape
    k_chunk = ks["k"].shape[1]
    grid = (b, q_chunk // block_q, k_chunk // block_k)
    sq = pl.squeezed
    q_row = pl.BlockSpec((sq, 1, block_q), lambda i, qi, kj: (i, 0, qi))
    k_col = pl.BlockSpec((sq, block_k, 1), lambda i, qi, kj: (i, kj, 0))
    out = pl.pallas_call(
        partial(_score_tile_kernel, n_heads=n_heads, scale=d ** -0.5),
        out_shape=jax.ShapeDtypeStruct((b, k_chunk, q_chunk), jnp.float32),
        grid=grid,
        in_specs=[
            pl.BlockSpec((sq, n_heads, block_q, d), lambda i, qi, kj: (i, 0, qi, 0)),
            pl.BlockSpec((sq, block_k, d), lambda i, qi, kj: (i, kj, 0)),
            pl.BlockSpec((sq, n_heads, block_q), lambda i, qi, kj: (i, 0, qi)),
            q_row, q_row, q_row, k_col, k_col,
        ],
        out_specs=pl.BlockSpec((sq, block_k, block_q), lambda i, qi, kj: (i, kj, qi)),
        compiler_params=compiler_params,
        interpret=interpret,
        name="indexer_score_tiles",
    )(qs["q"], ks["k"], qs["w"], qs["pos"], qs["seg"], tiles.rows(threshold), ks["pos"], ks["seg"])
    return jnp.swapaxes(out, 1, 2)


def _pallas_topk_variant(q, k, weights, segment_ids, q_positions, k_segment_ids, *, topk: int, config: dict,
                         compiler_params, interpret, candidates: int) -> jnp.ndarray:
    b, s, _, _ = q.shape
    k_out = min(topk, k.shape[1])
    lay = _Layout(q, k, segment_ids, q_positions, k_segment_ids, config["q_chunk"], config["k_chunk"],
                  config["block_q"], config["block_k"])
    block_q, block_k = min(config["block_q"], lay.q_chunk), min(config["block_k"], lay.k_chunk)
    q_t = jnp.swapaxes(tiles.pad_to(q, 1, lay.n_queries), 1, 2)  # [B, Hi, L, Di]: one head = one sublane slab
    w_t = jnp.swapaxes(tiles.pad_to(weights, 1, lay.n_queries), 1, 2)  # [B, Hi, L]
    q_side = dict(q=(q_t, 2), w=(w_t, 2), pos=(tiles.rows(lay.q_pos), 2), seg=(tiles.rows(lay.q_seg), 2))
    k_side = dict(k=(tiles.pad_to(k, 1, lay.n_keys), 1), pos=(tiles.cols(lay.k_pos), 1),
                  seg=(tiles.cols(lay.k_seg), 1))
    score_chunk = partial(_pallas_score_chunk, block_q=block_q, block_k=block_k,
                          compiler_params=compiler_params, interpret=interpret)
    out = _select_topk(score_chunk, q_side, k_side, lay.q_pos, lay.n_queries, lay.n_keys, k_out, lay.q_chunk,
                       lay.k_chunk, candidates)
    return out[:, :s]


def indexer_topk_pallas(q, k, weights, topk: int, segment_ids, interpret: bool = False,
                        variant: str | None = None, *, q_positions=None, k_segment_ids=None,
                        candidates: int = CANDIDATES) -> jnp.ndarray:
    """Pallas-scored top-k. `variant` "triton" (GPU) or "tpu" (Mosaic) picks the kernel variant;
    None picks it per lowering platform (Triton on CUDA/ROCm, Mosaic on TPU, the interpreter
    elsewhere). `interpret=True` runs the chosen variant's tiles in the Pallas interpreter
    (variant None: small interpreter tiles)."""
    configs = {"triton": (TRITON_CONFIG, tiles.triton_params()),
               "tpu": (TPU_CONFIG, tiles.tpu_params(("parallel", "parallel", "parallel"))),
               None: (INTERPRET_CONFIG, None)}

    def run(which, interp, *args):
        config, params = configs[which]
        return _pallas_topk_variant(*args, topk=topk, config=config, compiler_params=None if interp else params,
                                    interpret=interp, candidates=candidates)

    if q_positions is None:
        tiles.check_self_attention(q.shape[1], k.shape[1])
        q_positions = jnp.arange(q.shape[1], dtype=jnp.int32)
    k_segment_ids = segment_ids if k_segment_ids is None else k_segment_ids
    args = (q, k, weights, segment_ids, jnp.asarray(q_positions, jnp.int32), k_segment_ids)
    if interpret or variant is not None:
        return run(variant, interpret, *args)
    return tiles.pallas_platform_dispatch(partial(run, "triton", False), partial(run, "tpu", False),
                                          partial(run, None, True), *args)


def indexer_topk_kernel(q, k, weights, topk: int, segment_ids, impl: str, *, q_positions=None,
                        k_segment_ids=None) -> jnp.ndarray:
    """Entry point used by `dsa_train.kernels.backend.Backend.indexer_topk` for every non-reference impl
    ("streaming"/"blocked": pure JAX; "pallas", "pallas_gpu", "pallas_tpu" and their "_interpret"
    forms: the Pallas-scored version)."""
    chosen = tiles.resolve(impl)
    if chosen.kind == "streaming":
        return indexer_topk_streaming(q, k, weights, topk, segment_ids, q_positions=q_positions,
                                      k_segment_ids=k_segment_ids)
    return indexer_topk_pallas(q, k, weights, topk, segment_ids, interpret=chosen.interpret, variant=chosen.variant,
                               q_positions=q_positions, k_segment_ids=k_segment_ids)
