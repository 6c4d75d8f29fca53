"""Rotary position embeddings with YaRN, in the two layouts DeepSeek uses.

MLA rotates *interleaved* pairs (x[2i], x[2i+1]); the lightning indexer rotates the two halves
(NeoX style). Both share one frequency table per position. The interleaved variant writes its output
de-interleaved (rotated evens, then rotated odds), as `transformers` does: queries and keys get the
same permutation, so every dot product is unchanged and the HF checkpoint needs no reordering.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dsa_train.config import ModelConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies for `qk_rope_head_dim` rotary dims, and the cos/sin scaling factor."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    rs = config.rope_scaling
    if rs is None:
        return inv_freq.astype(np.float32), 1.0

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1 where the original (high-frequency) dims are kept
    inv_freq = (inv_freq / rs.factor) * (1 - extrapolation) + inv_freq * extrapolation
    if rs.mscale and rs.mscale_all_dim:
        attention_factor = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(rs.factor)
    return inv_freq.astype(np.float32), float(attention_factor)


def softmax_scale(config: ModelConfig) -> float:
    """MLA softmax scale: qk_head_dim^-0.5, times mscale^2 under YaRN."""
    scale = config.qk_head_dim ** -0.5
    rs = config.rope_scaling
    if rs is not None and rs.mscale_all_dim:
        m = yarn_mscale(rs.factor, rs.mscale_all_dim)
        scale *= m * m
    return scale


def rope_angles(positions: jnp.ndarray, config: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [..., rope_dim // 2] for integer positions [...] (fp32)."""
    inv_freq, factor = rope_inv_freq(config)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def _bcast(t: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    # cos/sin are [B, S, D/2]; x is [B, S, D] or [B, S, H, D].
    return t[:, :, None, :] if x.ndim == 4 else t


def apply_rope_interleaved(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    cos, sin = _bcast(cos, x), _bcast(sin, x)
    x1, x2 = x[..., 0::2].astype(jnp.float32), x[..., 1::2].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def apply_rope_half(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    cos, sin = _bcast(cos, x), _bcast(sin, x)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
