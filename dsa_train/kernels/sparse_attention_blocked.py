"""Memory-bounded top-k sparse MLA attention in pure JAX (the CPU path of `impl="auto"`).

Same math and signature as `dsa_train.ops.attention.sparse_mla_attention_reference`, but queries
are processed in blocks of `block_q`: each block gathers its own keys ([B, block_q, K, D]), so the
largest temporary is block_q x K x D instead of S x K x D. A `jax.custom_vjp` keeps only
(q, kv, indices, out, lse) for the backward pass, which walks the query blocks again, recomputes
the probabilities from the saved log-sum-exp and scatter-adds each block's key gradients into one
[B, T, D] fp32 accumulator carried through a `lax.scan`.

Gradients: dq, dkv, and the lse cotangent is supported (d lse / d score = p, folded into delta).
Indices are assumed distinct within a query (top-k output); a repeated index counts twice, exactly
as in the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsa_train.ops.attention import NEG_INF, gather_keys

DEFAULT_BLOCK_Q = 32


def sparse_mla_attention_blocked(q, kv, indices, sm_scale: float, v_dim: int = 512,
                                 block_q: int = DEFAULT_BLOCK_Q):
    """q [B, S, H, D], kv [B, T, D], indices [B, S, K] (-1 = unused) -> out [B, S, H, v_dim], lse [B, S, H]."""
    return _blocked_attention(q, kv, indices.astype(jnp.int32), float(sm_scale), int(v_dim),
                              int(min(block_q, q.shape[1])))


def _to_blocks(x: jnp.ndarray, block_q: int, fill) -> jnp.ndarray:
    """[B, S, ...] -> [S_pad / block_q, B, block_q, ...], padding S with `fill`."""
    b, s = x.shape[:2]
    pad = -s % block_q
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    x = x.reshape(b, (s + pad) // block_q, block_q, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_blocks(x: jnp.ndarray, s: int) -> jnp.ndarray:
    """Inverse of `_to_blocks`: [nb, B, block_q, ...] -> [B, S, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :s]


def _block_scores(q_blk, keys, idx_blk, sm_scale):
    """Scaled scores [B, Qb, H, K] in fp32 with invalid slots at NEG_INF, and the validity mask."""
    scores = jnp.einsum("bqhd,bqkd->bqhk", q_blk, keys, preferred_element_type=jnp.float32) * sm_scale
    valid = (idx_blk >= 0)[:, :, None, :]
    return jnp.where(valid, scores, NEG_INF), valid


def _block_forward(q_blk, kv, idx_blk, sm_scale, v_dim):
    keys = gather_keys(kv, idx_blk)  # [B, Qb, K, D]
    scores, valid = _block_scores(q_blk, keys, idx_blk, sm_scale)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    unnorm = jnp.where(valid, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(unnorm, axis=-1)
    # A query with no valid key gets out = 0 and lse = NEG_INF, as in the reference.
    lse = jnp.where(denom > 0, row_max[..., 0] + jnp.log(jnp.where(denom > 0, denom, 1.0)), NEG_INF)
    probs = unnorm / jnp.where(denom > 0, denom, 1.0)[..., None]
    out = jnp.einsum("bqhk,bqkd->bqhd", probs.astype(kv.dtype), keys[..., :v_dim],
                     preferred_element_type=jnp.float32)
    return out.astype(q_blk.dtype), lse


def _forward(q, kv, indices, sm_scale, v_dim, block_q):
    s = q.shape[1]
    q_blocks = _to_blocks(q, block_q, 0)
    idx_blocks = _to_blocks(indices, block_q, -1)
    out, lse = jax.lax.map(lambda xs: _block_forward(xs[0], kv, xs[1], sm_scale, v_dim), (q_blocks, idx_blocks))
    return _from_blocks(out, s), _from_blocks(lse, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _blocked_attention(q, kv, indices, sm_scale, v_dim, block_q):
    return _forward(q, kv, indices, sm_scale, v_dim, block_q)


def _blocked_attention_fwd(q, kv, indices, sm_scale, v_dim, block_q):
    out, lse = _forward(q, kv, indices, sm_scale, v_dim, block_q)
    return (out, lse), (q, kv, indices, out, lse)


def _blocked_attention_bwd(sm_scale, v_dim, block_q, residuals, cotangents):
    q, kv, indices, out, lse = residuals
    d_out, d_lse = cotangents
    s = q.shape[1]
    # delta = sum_k p * dp = <out, d_out>; the lse cotangent enters as d score += p * d_lse.
    delta = jnp.einsum("bshd,bshd->bsh", out.astype(jnp.float32), d_out.astype(jnp.float32))
    delta = delta - d_lse.astype(jnp.float32)

    def body(dkv_acc, xs):
        q_blk, idx_blk, do_blk, lse_blk, delta_blk = xs
        keys = gather_keys(kv, idx_blk)
        scores, valid = _block_scores(q_blk, keys, idx_blk, sm_scale)
        probs = jnp.where(valid, jnp.exp(scores - lse_blk[..., None]), 0.0)
        dp = jnp.einsum("bqhv,bqkv->bqhk", do_blk, keys[..., :v_dim], preferred_element_type=jnp.float32)
        ds = probs * (dp - delta_blk[..., None]) * sm_scale  # d loss / d (q . k), fp32
        dq_blk = jnp.einsum("bqhk,bqkd->bqhd", ds.astype(keys.dtype), keys, preferred_element_type=jnp.float32)
        dkeys = jnp.einsum("bqhk,bqhd->bqkd", ds.astype(q_blk.dtype), q_blk, preferred_element_type=jnp.float32)
        dvals = jnp.einsum("bqhk,bqhv->bqkv", probs.astype(do_blk.dtype), do_blk, preferred_element_type=jnp.float32)
        dkeys = dkeys.at[..., :v_dim].add(dvals)
        # Invalid slots carry zero gradient (p = ds = 0), so sending them to row 0 is harmless.
        safe = jnp.maximum(idx_blk, 0)
        dkv_acc = jax.vmap(lambda acc, i, g: acc.at[i].add(g))(dkv_acc, safe, dkeys)
        return dkv_acc, dq_blk.astype(q_blk.dtype)

    xs = (_to_blocks(q, block_q, 0), _to_blocks(indices, block_q, -1), _to_blocks(d_out, block_q, 0),
          _to_blocks(lse, block_q, 0.0), _to_blocks(delta, block_q, 0.0))
    dkv0 = jnp.zeros(kv.shape, jnp.float32)
    dkv, dq_blocks = jax.lax.scan(body, dkv0, xs)
    return _from_blocks(dq_blocks, s), dkv.astype(kv.dtype), None


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)
