"""MoE routing and token dispatch, pure JAX.

Routing (DeepSeek-V3): sigmoid affinities; a per-expert bias is added for *selection only*;
group-limited top-k (group score = sum of its top-2 biased scores; keep `topk_group` groups);
gates are the unbiased affinities of the chosen experts, normalized, times the routed scale.

Dispatch: the (token, slot) assignments are sorted by expert and run as one grouped (ragged)
matmul per projection, so each token costs only its k experts, never all of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def route(router_logits: jnp.ndarray, bias: jnp.ndarray, *, top_k: int, n_group: int, topk_group: int,
          norm_topk_prob: bool, routed_scaling_factor: float):
    """router_logits [N, E] (fp32) -> gates [N, k], expert_idx [N, k] int32, scores [N, E]."""
    n, e = router_logits.shape
    scores = jax.nn.sigmoid(router_logits.astype(jnp.float32))
    biased = scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
    if n_group > 1:
        grouped = biased.reshape(n, n_group, e // n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
        _, keep = jax.lax.top_k(group_scores, topk_group)
        group_mask = jnp.zeros((n, n_group), bool).at[jnp.arange(n)[:, None], keep].set(True)
        biased = jnp.where(jnp.repeat(group_mask, e // n_group, axis=1), biased, -jnp.inf)
    _, expert_idx = jax.lax.top_k(biased, top_k)
    gates = jnp.take_along_axis(scores, expert_idx, axis=-1)
    if norm_topk_prob:
        gates = gates / (gates.sum(-1, keepdims=True) + 1e-20)
    return gates * routed_scaling_factor, expert_idx.astype(jnp.int32), scores


def expert_counts(expert_idx: jnp.ndarray, n_experts: int, valid: jnp.ndarray | None = None) -> jnp.ndarray:
    """Tokens routed to each expert: [E] (fp32). `valid` [N] excludes padding tokens."""
    one_hot = jax.nn.one_hot(expert_idx, n_experts, dtype=jnp.float32)  # [N, k, E]
    if valid is not None:
        one_hot = one_hot * valid[:, None, None]
    return one_hot.sum((0, 1))


def grouped_swiglu(x: jnp.ndarray, gates: jnp.ndarray, expert_idx: jnp.ndarray, w_gate: jnp.ndarray,
                   w_up: jnp.ndarray, w_down: jnp.ndarray) -> jnp.ndarray:
    """Routed SwiGLU experts with sorted dispatch.

    x [N, D], gates/expert_idx [N, k]; weights in HF [out, in] layout: w_gate/w_up [E, F, D],
    w_down [E, D, F] -> [N, D].
    """
    n, d = x.shape
    k = expert_idx.shape[-1]
    e = w_gate.shape[0]
    flat = expert_idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of = order // k
    group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    xs = x[token_of]
    h_gate = jax.lax.ragged_dot(xs, jnp.swapaxes(w_gate, 1, 2), group_sizes,
                                preferred_element_type=jnp.float32)
    h_up = jax.lax.ragged_dot(xs, jnp.swapaxes(w_up, 1, 2), group_sizes, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(h_gate) * h_up).astype(x.dtype)
    y = jax.lax.ragged_dot(h, jnp.swapaxes(w_down, 1, 2), group_sizes, preferred_element_type=jnp.float32)
    y = y * gates.reshape(-1)[order][:, None]
    return jnp.zeros((n, d), jnp.float32).at[token_of].add(y).astype(x.dtype)
