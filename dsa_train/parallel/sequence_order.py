"""How a row's tokens are laid out over the context shards: contiguous or zig-zag (load-balanced).

- ``contiguous``: shard i of n holds tokens [i S/n, (i+1) S/n). Under a causal mask its queries
  have i S/n + 1 ... (i+1) S/n candidate keys, so the last shard owns ~(2n-1)/n times the mean
  number of causal (query, key) pairs and the first ~1/n of it.
- ``zigzag``: the row is cut into 2n chunks of c = S/(2n) tokens and shard i holds chunks i and
  2n-1-i (in that order). Every shard then owns exactly c (S + 1) causal pairs (one row, no
  packing): a chunk with a short prefix paired with one with a long prefix.

Array slot j of a zig-zag row holds the token at original position ``zigzag_permutation(S, n)[j]``.
The train step lays every [B, S] input out once (train/step.py); the context-parallel ops then use
each local query's original position and put the all-gathered keys back into the original order,
so masks, top-k indices and their tie-breaking are those of the contiguous layout.

Pure functions of static sizes (numpy) and array reorders (jnp); no mesh.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

ORDERS = ("contiguous", "zigzag")


def _zigzag_chunks(shards: int) -> np.ndarray:
    """Original chunk index of each zig-zag chunk slot: [0, 2n-1, 1, 2n-2, ...]."""
    low, high = np.arange(shards), 2 * shards - 1 - np.arange(shards)
    return np.stack([low, high], axis=1).reshape(-1)


def check_divisible(seq_len: int, shards: int) -> None:
    if seq_len % (2 * shards):
        raise ValueError(f"mesh.context_order 'zigzag' needs the sequence length ({seq_len}) to be a multiple of "
                         f"2 x the context shards ({2 * shards})")


def zigzag_permutation(seq_len: int, shards: int) -> np.ndarray:
    """perm[j] = original position of the token in zig-zag slot j ([S] int32)."""
    check_divisible(seq_len, shards)
    chunk = seq_len // (2 * shards)
    return (_zigzag_chunks(shards)[:, None] * chunk + np.arange(chunk)[None, :]).reshape(-1).astype(np.int32)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size, dtype=perm.dtype)
    return inv


def slot_positions(order: str, seq_len: int, shards: int) -> np.ndarray:
    """Original position of each array slot of a row laid out in ``order`` ([S] int32)."""
    if order == "contiguous" or shards == 1:
        return np.arange(seq_len, dtype=np.int32)
    return zigzag_permutation(seq_len, shards)


def _reorder_chunks(x, chunk_order: np.ndarray, axis: int):
    """Reorder equal chunks along ``axis``: chunk slot k of the result is chunk ``chunk_order[k]``.
    A reshape and a take of whole chunks (no per-token index arrays)."""
    axis = axis % x.ndim
    n = chunk_order.size
    shape = x.shape
    chunks = x.reshape(*shape[:axis], n, shape[axis] // n, *shape[axis + 1:])
    return jnp.take(chunks, jnp.asarray(chunk_order), axis=axis).reshape(shape)


def to_zigzag(x, shards: int, axis: int = 1):
    """Original order -> zig-zag layout along ``axis``."""
    check_divisible(x.shape[axis], shards)
    return _reorder_chunks(x, _zigzag_chunks(shards), axis)


def from_zigzag(x, shards: int, axis: int = 1):
    """Zig-zag layout -> original order along ``axis`` (the inverse of ``to_zigzag``)."""
    check_divisible(x.shape[axis], shards)
    return _reorder_chunks(x, inverse_permutation(_zigzag_chunks(shards)), axis)


def local_positions(order: str, shard, shards: int, local_len: int):
    """Original positions of shard ``shard``'s ``local_len`` tokens ([local_len] int32). ``shard``
    may be traced (``jax.lax.axis_index`` inside ``shard_map``)."""
    idx = jnp.arange(local_len, dtype=jnp.int32)
    if order == "contiguous" or shards == 1:
        return shard * local_len + idx
    chunk = local_len // 2
    low = shard * chunk + idx
    high = (2 * shards - 1 - shard) * chunk + (idx - chunk)
    return jnp.where(idx < chunk, low, high).astype(jnp.int32)


def causal_pairs_per_shard(order: str, seq_len: int, shards: int, topk: int | None = None) -> np.ndarray:
    """Causal (query, key) pairs each shard's queries have, for one row without packing ([n] int64).
    ``topk``: count at most that many keys per query (top-k attention / KL over the selected set)."""
    pos = slot_positions(order, seq_len, shards).astype(np.int64).reshape(shards, -1)
    keys = pos + 1
    if topk is not None:
        keys = np.minimum(keys, topk)
    return keys.sum(axis=1)


def imbalance(order: str, seq_len: int, shards: int, topk: int | None = None) -> float:
    """max over shards / mean of ``causal_pairs_per_shard``: how much longer the slowest shard takes
    than a balanced split of the same causal work (1.0 = balanced)."""
    pairs = causal_pairs_per_shard(order, seq_len, shards, topk)
    return float(pairs.max() / pairs.mean())
