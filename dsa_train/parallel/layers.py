"""Per-decoder-layer hooks the model calls: remat policy and activation sharding constraints.

Both read the parallel scope (scope.py) and do nothing outside one, so the model stays free of
mesh names and runs unchanged on one device.
"""

from __future__ import annotations

import jax
from flax import nnx

from dsa_train.ops.indexer import TOPK_INDICES
from dsa_train.ops.losses import PASS_A_RESIDUALS
from dsa_train.parallel.scope import constrain, remat_policy

# The residual stream between layers: [batch, sequence, hidden] (hidden replicated).
RESIDUAL = ("batch", "sequence", None)

# What the backward pass may keep instead of recomputing, per `train.remat`. Both keep what costs a
# pass over every causal (query, key) pair to recompute:
# - the indexer's selected indices (sparse stage; int32 [B, S, K]): else a second top-k scoring;
# - the warm-up's dense-KL pass A residuals (fp32 [B, S, Hi, Di] + [B, T, Di] + O(S) per layer:
#   0.34 GB per layer on a 671B chip at 128K under context 16): else the 128-head target again.
_KEEP_PAIR_PASSES = jax.checkpoint_policies.save_only_these_names(TOPK_INDICES, PASS_A_RESIDUALS)
POLICIES = {
    "full": _KEEP_PAIR_PASSES,  # keep only the layer's inputs and those: recompute everything else
    "dots": jax.checkpoint_policies.save_from_both_policies(  # also keep weight matmul outputs
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _KEEP_PAIR_PASSES),
}


def constrain_residual(x):
    return constrain(x, RESIDUAL)


def run_layer(layer, x, segment_ids, valid, cos, sin, mode):
    """``layer(x, ...)`` under the scope's remat policy; the output residual is constrained to its
    logical sharding (batch over data/fsdp/expert, sequence over context)."""
    policy = remat_policy()
    if policy == "none":
        x, aux, stats = layer(x, segment_ids, valid, cos, sin, mode)
    else:
        # Plain jax.checkpoint over the layer's state (split/merge): the forward pass mutates
        # nothing, and nnx.remat's write-back would touch variables of an outer trace.
        graphdef, state = nnx.split(layer)

        def body(state, h, seg, val, c, s):
            return nnx.merge(graphdef, state)(h, seg, val, c, s, mode)

        x, aux, stats = jax.checkpoint(body, policy=POLICIES[policy])(state, x, segment_ids, valid, cos, sin)
    return constrain_residual(x), aux, stats
