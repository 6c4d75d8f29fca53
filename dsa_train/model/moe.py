"""DeepSeek-V3 MoE layer: sigmoid router with selection bias, routed SwiGLU experts, shared expert."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_train.config import ModelConfig
from dsa_train.model.layers import DTYPES, RouterBias, SwiGLU, param
from dsa_train.ops import moe as moe_ops
from dsa_train.parallel import expert as expert_parallel


class MoEStats(NamedTuple):
    expert_counts: jnp.ndarray  # [E] tokens routed to each expert (padding excluded)
    scores: jnp.ndarray  # [B, S, E] sigmoid affinities (for the sequence-wise balance loss)
    expert_idx: jnp.ndarray  # [B, S, k]


class Router(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.weight = param(rngs, (config.n_routed_experts, config.hidden_size), (None, "embed"), jnp.float32)
        self.e_score_correction_bias = RouterBias(jnp.zeros((config.n_routed_experts,), jnp.float32),
                                                  axes=(None,))


class Experts(nnx.Module):
    """Routed experts stacked along a leading expert axis, HF [out, in] layout per expert."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        e, d, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        pdt = DTYPES[config.param_dtype]
        self.gate_proj = param(rngs, (e, f, d), ("expert", "mlp", "embed"), pdt)
        self.up_proj = param(rngs, (e, f, d), ("expert", "mlp", "embed"), pdt)
        self.down_proj = param(rngs, (e, d, f), ("expert", "embed", "mlp"), pdt)


class MoE(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.gate = Router(config, rngs=rngs)
        self.experts = Experts(config, rngs=rngs)
        self.shared_experts = SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                                     rngs=rngs, param_dtype=DTYPES[config.param_dtype],
                                     dtype=DTYPES[config.compute_dtype]) if config.n_shared_experts else None

    def __call__(self, x: jnp.ndarray, valid: jnp.ndarray) -> tuple[jnp.ndarray, MoEStats]:
        """x [B, S, D], valid [B, S] (1 for real tokens) -> y [B, S, D], routing statistics."""
        c = self.config
        b, s, d = x.shape
        flat = x.reshape(b * s, d)
        logits = jnp.einsum("nd,ed->ne", flat.astype(jnp.float32), self.gate.weight[...])
        gates, idx, scores = moe_ops.route(
            logits, self.gate.e_score_correction_bias[...], top_k=c.num_experts_per_tok, n_group=c.n_group,
            topk_group=c.topk_group, norm_topk_prob=c.norm_topk_prob,
            routed_scaling_factor=c.routed_scaling_factor)
        dt = x.dtype
        weights = (self.experts.gate_proj[...].astype(dt), self.experts.up_proj[...].astype(dt),
                   self.experts.down_proj[...].astype(dt))
        if expert_parallel.active(c.n_routed_experts, c.moe_intermediate_size):
            # Tokens or experts sharded over the mesh: per-device dispatch, all-to-all across experts.
            y = expert_parallel.routed_swiglu(x, gates.astype(dt).reshape(b, s, -1), idx.reshape(b, s, -1), *weights)
        else:
            y = moe_ops.grouped_swiglu(flat, gates.astype(dt), idx, *weights).reshape(b, s, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        counts = moe_ops.expert_counts(idx, c.n_routed_experts, valid.reshape(-1))
        return y, MoEStats(jax.lax.stop_gradient(counts), scores.reshape(b, s, -1), idx.reshape(b, s, -1))
