"""The lightning indexer: one per layer, scores every causal key cheaply and picks the top-k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_train.config import ModelConfig
from dsa_train.model.layers import DTYPES, LayerNorm, Linear
from dsa_train.ops.rope import apply_rope_half


class Indexer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        pdt, cdt = DTYPES[c.param_dtype], DTYPES[c.compute_dtype]
        q_in = c.q_lora_rank if c.q_lora_rank is not None else c.hidden_size
        self.wq_b = Linear(q_in, c.index_n_heads * c.index_head_dim, ("index_heads", "q_lora"), rngs=rngs,
                           param_dtype=pdt, dtype=cdt)
        self.wk = Linear(c.hidden_size, c.index_head_dim, ("index_dim", "embed"), rngs=rngs,
                         param_dtype=pdt, dtype=cdt)
        self.k_norm = LayerNorm(c.index_head_dim, "index_dim", 1e-6, param_dtype=pdt)
        # Kept in fp32, as in DeepSeek's release: the head weights are small and may be negative.
        self.weights_proj = Linear(c.hidden_size, c.index_n_heads, ("index_heads", "embed"), rngs=rngs,
                                   param_dtype=jnp.float32, dtype=jnp.float32)
        self.n_heads, self.head_dim, self.rope_dim = c.index_n_heads, c.index_head_dim, c.qk_rope_head_dim

    def __call__(self, x: jnp.ndarray, q_latent: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray):
        """x [B, S, D] and q_latent [B, S, q_lora] (both detached by the caller)
        -> q [B, S, Hi, Di], k [B, S, Di], weights [B, S, Hi] (fp32, scaled by Hi^-0.5)."""
        b, s, _ = x.shape
        q = self.wq_b(q_latent).reshape(b, s, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(x))
        r = self.rope_dim  # RoPE on the first `r` dims, half-split layout ([rope | nope])
        q = jnp.concatenate([apply_rope_half(q[..., :r], cos, sin), q[..., r:]], axis=-1)
        k = jnp.concatenate([apply_rope_half(k[..., :r], cos, sin), k[..., r:]], axis=-1)
        weights = self.weights_proj(x.astype(jnp.float32)) * self.n_heads ** -0.5
        return q, k, weights
