"""Shared pieces of the memory-bounded indexer kernels (top-k selection and the KL losses).

Everything here works on tiles: a block of queries against a block of keys, never the full
S x T score matrix. Sequences are padded to block multiples; padded tokens get segment id -1, so
they are never visible to a real token (real ids are >= 0, padding id 0 included) and they form a
harmless causal segment of their own (their rows are cut off or carry zero loss weight).

Pallas tiles are laid out keys-major, [block_k, block_q]: per-query quantities (indexer weights,
log-sum-exps, positions) are then lane-dense rows [1, block_q] and per-key quantities are columns
[block_k, 1]. That is the layout both Mosaic TPU (no dynamic lane slicing, per-head rows are
sublane slices) and Triton (any orientation) accept with one kernel body.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dsa_train.kernels.padding import pad_to, round_up  # noqa: F401  (the indexer kernels' tiles.pad_to / tiles.round_up)

PAD_SEGMENT = -1


class Impl(NamedTuple):
    """A resolved implementation: kind "streaming" (pure JAX) or "pallas"; variant "triton" / "tpu"
    (None: chosen per lowering platform, or the small interpreter tiles); interpret mode or not."""

    kind: str
    variant: str | None
    interpret: bool


# Names as resolved by `dsa_train.kernels.backend.resolve_impl` ("blocked" is its CPU default),
# plus "streaming", this module's own name for the pure-JAX path.
IMPLS = {
    "streaming": Impl("streaming", None, False),
    "blocked": Impl("streaming", None, False),
    "pallas": Impl("pallas", None, False),
    "pallas_interpret": Impl("pallas", None, True),
    "pallas_gpu": Impl("pallas", "triton", False),
    "pallas_tpu": Impl("pallas", "tpu", False),
    "pallas_gpu_interpret": Impl("pallas", "triton", True),
    "pallas_tpu_interpret": Impl("pallas", "tpu", True),
}


def resolve(impl: str) -> Impl:
    if impl not in IMPLS:
        raise ValueError(f"unknown indexer kernel impl {impl!r}; expected one of {', '.join(IMPLS)}")
    return IMPLS[impl]


def check_self_attention(s: int, t: int) -> None:
    if s != t:
        raise ValueError(f"indexer kernels need as many keys as queries (self-attention), got S={s}, T={t}")


def padded_positions_segments(segment_ids: jnp.ndarray, length: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Token positions [B, length] and segment ids [B, length], padding positions get PAD_SEGMENT."""
    b = segment_ids.shape[0]
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    seg = pad_to(segment_ids.astype(jnp.int32), 1, length, PAD_SEGMENT)
    return pos, seg


def visible(q_pos, q_seg, k_pos, k_seg) -> jnp.ndarray:
    """[B, bq] query and [B, bk] key positions/segments -> bool [B, bq, bk]: causal, same document."""
    same_doc = q_seg[:, :, None] == k_seg[:, None, :]
    return same_doc & (k_pos[:, None, :] <= q_pos[:, :, None])


def indexer_score_block(q: jnp.ndarray, k: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """Unmasked indexer scores of a tile, same formula as `ops.indexer.indexer_scores`.

    q [B, bq, Hi, Di], k [B, bk, Di], w [B, bq, Hi] -> [B, bq, bk] fp32."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bshd,btd->bsht", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    return jnp.einsum("bsh,bsht->bst", w.astype(jnp.float32), jax.nn.relu(logits))


def last_visible_key_block(q_block, block_q: int, block_k: int):
    """Index of the last key block that query block `q_block` can see. Non-negative operands, so a
    truncating lax.div (floor division would emit sign ops that Mosaic lowers per TPU generation)."""
    return jax.lax.div((q_block + 1) * block_q - 1, block_k)


def causal_key_blocks(q_block: jnp.ndarray, block_q: int, block_k: int, n_key_blocks: int) -> jnp.ndarray:
    """Number of key blocks that query block `q_block` can see (the causal prefix)."""
    return jnp.minimum(last_visible_key_block(q_block, block_q, block_k) + 1, n_key_blocks)


# ---- Pallas helpers -------------------------------------------------------------------------------

def pallas_platform_dispatch(triton_fn, tpu_fn, interpret_fn, *args):
    """Pick the kernel variant per lowering platform: Triton on CUDA/ROCm, Mosaic on TPU, the
    interpreter elsewhere (CPU). Tracing happens once per variant; only the lowered platform's
    variant ends up in the compiled program, so `jax.export` for cuda or tpu works from a CPU host."""
    return jax.lax.platform_dependent(*args, cuda=triton_fn, rocm=triton_fn, tpu=tpu_fn, default=interpret_fn)


def triton_params(num_warps: int = 4, num_stages: int = 2):
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tpu_params(dimension_semantics: tuple[str, ...], vmem_limit_bytes: int | None = None):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=dimension_semantics, vmem_limit_bytes=vmem_limit_bytes)


def rows(x: jnp.ndarray) -> jnp.ndarray:
    """[B, L] -> [B, 1, L]: per-query data as lane-dense rows."""
    return x[:, None, :]


def cols(x: jnp.ndarray) -> jnp.ndarray:
    """[B, L] -> [B, L, 1]: per-key data as columns."""
    return x[:, :, None]


def dot_nt(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """a [M, K] . b [N, K]^T -> [M, N] fp32 (keys-major tile = key rows . query rows^T)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def tile_indexer_scores(k_tile: jnp.ndarray, q_head, w_row, n_heads: int, scale: float) -> jnp.ndarray:
    """Keys-major indexer score tile [bk, bq] = sum_j w[j] * relu(k . q[j]^T * scale).

    k_tile [bk, Di] (a value); q_head(j) -> [bq, Di] and w_row(j) -> [1, bq] load one head (a leading
    / sublane slice, cheap for Mosaic and Triton; accessors because Triton cannot compose ref views).
    The head loop keeps the live tile at [bk, bq] instead of [bk, Hi * bq]."""
    bk = k_tile.shape[0]

    def head(j, acc):
        z = dot_nt(k_tile, q_head(j)) * scale
        return acc + jnp.maximum(z, 0.0) * w_row(j).astype(jnp.float32)

    bq = w_row(0).shape[-1]
    return jax.lax.fori_loop(0, n_heads, head, jnp.zeros((bk, bq), jnp.float32))
