"""Small building blocks. Weights keep the Hugging Face layout ([out, in] for linears) and names, so
checkpoint conversion is a name-for-name copy. Every parameter carries logical axis names
(metadata `axes`); the sharding rules map them to mesh axes, the model itself knows no mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class RouterBias(nnx.Variable):
    """MoE `e_score_correction_bias`: state updated by the balancing rule, never by gradients."""


def param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str = "normal", std: float = 0.02) -> nnx.Param:
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = jnp.zeros(shape, dtype)
    return nnx.Param(value, axes=tuple(axes))


class Linear(nnx.Module):
    """y = x W^T with W [out, in], no bias (every DeepSeek projection is bias-free)."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
                 rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.bfloat16, std: float = 0.02):
        self.weight = param(rngs, (out_features, in_features), axes, param_dtype, std=std)
        self.dtype = dtype

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        w = self.weight[...].astype(self.dtype)
        return jnp.einsum("...i,oi->...o", x.astype(self.dtype), w)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, axis_name: str | None, eps: float, *, param_dtype=jnp.float32):
        self.weight = param(None, (dim,), (axis_name,), param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, axis_name: str | None, eps: float, *, param_dtype=jnp.float32):
        self.weight = param(None, (dim,), (axis_name,), param_dtype, init="ones")
        self.bias = param(None, (dim,), (axis_name,), param_dtype, init="zeros")
        self.eps = eps

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]
        return y.astype(x.dtype)


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.bfloat16):
        self.weight = param(rngs, (vocab, dim), ("vocab", "embed"), param_dtype)
        self.dtype = dtype

    def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
        return jnp.take(self.weight[...], tokens, axis=0).astype(self.dtype)


class SwiGLU(nnx.Module):
    """Dense FFN and shared expert: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.gate_proj = Linear(dim, hidden, ("mlp", "embed"), **kw)
        self.up_proj = Linear(dim, hidden, ("mlp", "embed"), **kw)
        self.down_proj = Linear(hidden, dim, ("embed", "mlp"), **kw)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
