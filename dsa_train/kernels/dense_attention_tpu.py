"""Dense attention on TPU: JAX's splash attention kernel (``jax.experimental.pallas.ops.tpu``).

Self-attention over one row (queries and keys at positions 0..S-1), causal mask and segment ids
(packed documents), per-head q/k [B, S, H, Dk] and v [B, S, H, Dv]; splash skips the fully masked
(q, kv) blocks and never builds the [S, T] scores. Called with ``save_residuals`` so it returns the
per-head log-sum-exp that the dense indexer KL reuses. The backward (only the dense stage needs
one; the warm-up differentiates nothing here) is ``dense_attention``'s blocked flash backward.

Context-parallel shards' queries sit at traced row positions, which splash's static masks cannot
express: they run ``dense_attention.flash_attention``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from dsa_train.kernels import dense_attention

BLOCK = 512  # q / kv block of the splash kernel (shrunk to the sequence when shorter)


def _block(s: int) -> int:
    block = min(BLOCK, s)
    while s % block:
        block //= 2
    return block


def _splash(q, k, v, segment_ids, sm_scale: float, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, s, h, _ = q.shape
    if s % 128:
        raise ValueError(f"splash attention needs a sequence length divisible by 128, got {s}")
    block = _block(s)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block)
    kernel = splash.make_splash_mha(masks.MultiHeadMask([masks.CausalMask((s, s))] * h), block_sizes=sizes,
                                    head_shards=1, q_seq_shards=1, save_residuals=True, interpret=interpret)

    def one_row(q, k, v, seg):  # [H, S, D] each
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg))

    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    out, (lse,) = jax.vmap(one_row)(heads_major(q * jnp.asarray(sm_scale, q.dtype)), heads_major(k),
                                    heads_major(v), segment_ids.astype(jnp.int32))
    return heads_major(out).astype(q.dtype), heads_major(lse).astype(jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, segment_ids, sm_scale, interpret):
    return _splash(q, k, v, segment_ids, sm_scale, interpret)


def _attention_fwd(q, k, v, segment_ids, sm_scale, interpret):
    out, lse = _splash(q, k, v, segment_ids, sm_scale, interpret)
    return (out, lse), (q, k, v, out, lse, segment_ids)


def _attention_bwd(sm_scale, interpret, res, cts):
    q, k, v, out, lse, segment_ids = res
    cfg = dense_attention.Cfg(float(sm_scale), dense_attention.fit(q.shape[1], dense_attention.BLOCKS[0]),
                              dense_attention.fit(k.shape[1], dense_attention.BLOCKS[1]))
    pos = jnp.arange(q.shape[1])
    dq, dk, dv = dense_attention.backward(cfg, q, k, v, out, lse, cts[0], pos, segment_ids, segment_ids)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def dense_attention_splash(q, k, v, segment_ids, sm_scale: float, interpret: bool = False):
    """``ops.attention.dense_attention``'s contract through splash attention (see the module docstring)."""
    return _attention(q, k, v, segment_ids, float(sm_scale), interpret)
