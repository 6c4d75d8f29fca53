"""Under the layers' remat policies the warm-up's dense indexer KL forms its target once per step.

The loss is reported (value_and_grad), so the forward pass runs pass A; the backward would run it
again to rebuild pass A's residuals unless the policy keeps them (``PASS_A_RESIDUALS``). Counted
in the compiled program: the TPU kernels by name (deviceless v5p), the pure-JAX form by XLA:CPU's
FLOPs. Each check also compiles the policy that saves nothing, where the second pass shows: the
count can tell the two apart.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_train.kernels import dense_indexer_kl
from dsa_train.kernels import dense_indexer_kl_pallas as kl_pallas
from dsa_train.parallel.layers import POLICIES

NOTHING = jax.checkpoint_policies.nothing_saveable


def _layer_loss(kl_sum, s, hi, di):
    """One layer's KL as a function of its indexer projections (applied inside, as the decoder
    layer does), the main attention's q, k, lse given."""

    def loss(weights, x, q, k, lse, positions, seg, valid):
        wq, wk, ww = weights
        q_idx = (x @ wq).reshape(x.shape[0], s, hi, di)
        return kl_sum(q, k, lse, q_idx, x @ wk, x @ ww, valid, positions, seg, seg)

    return loss


def _step(kl_sum, policy, s, hi, di):
    """value_and_grad of one checkpointed layer's KL w.r.t. its indexer projections."""
    loss = jax.checkpoint(_layer_loss(kl_sum, s, hi, di), policy=policy)
    return jax.jit(lambda weights, *rest: jax.value_and_grad(lambda w: loss(w, *rest))(weights))


def _args(spec, s, h, d, hi, di, width):
    return ((spec(width, hi * di), spec(width, di), spec(width, hi)), spec(1, s, width), spec(1, s, h, d),
            spec(1, s, h, d), spec(1, s, h, dtype=jnp.float32), spec(s, dtype=jnp.int32),
            spec(1, s, dtype=jnp.int32), spec(1, s, dtype=jnp.float32))


def _tpu_kernel_calls(text: str) -> dict:
    calls = {}
    for line in text.splitlines():
        if "custom-call(" in line and "tpu_custom_call" in line:
            name = re.search(r"dense_indexer_kl_(forward|backward)", line)
            key = name.group(0) if name else ""
            calls[key] = calls.get(key, 0) + 1
    return calls


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_tpu_step_runs_the_target_pass_once(device, policy):
    pytest.importorskip("libtpu")
    s, h, d, hi, di, width = 512, 2, 128, 2, 128, 256
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=jax.sharding.SingleDeviceSharding(device))
    args = _args(spec, s, h, d, hi, di, width)
    kl_sum = lambda *a: kl_pallas.dense_kl_sum_pallas(*a, sm_scale=0.1, variant="tpu")  # noqa: E731

    def calls(p):
        return _tpu_kernel_calls(_step(kl_sum, p, s, hi, di).lower(*args).compile().as_text())

    assert calls(POLICIES[policy]) == {"dense_indexer_kl_forward": 1, "dense_indexer_kl_backward": 1}
    assert calls(NOTHING)["dense_indexer_kl_forward"] == 2


def test_pure_jax_step_runs_the_target_pass_once():
    s, h, d, hi, di, width = 256, 8, 64, 2, 16, 32
    spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    args = _args(spec, s, h, d, hi, di, width)
    kl_sum = lambda *a: dense_indexer_kl.dense_kl_sum(*a, sm_scale=0.1)  # noqa: E731

    def flops(p):
        return _step(kl_sum, p, s, hi, di).lower(*args).compile().cost_analysis()["flops"]

    # The target's share of pass A: 2 H D of 2 H D + 14 Hi Di + 8 Hi per pair.
    saved, nothing = flops(POLICIES["full"]), flops(NOTHING)
    assert nothing > 1.5 * saved, (saved, nothing)


def test_residuals_give_the_same_gradients():
    rng = np.random.default_rng(0)
    s, h, d, hi, di, width = 48, 3, 8, 2, 16, 12
    n = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    weights = (n(width, hi * di), n(width, di), n(width, hi))
    rest = (n(1, s, width), n(1, s, h, d), n(1, s, h, d), jnp.full((1, s, h), 2.0), jnp.arange(s, dtype=jnp.int32),
            jnp.ones((1, s), jnp.int32), jnp.ones((1, s)))
    for kl_sum in (lambda *a: dense_indexer_kl.dense_kl_sum(*a, sm_scale=0.3),
                   lambda *a: kl_pallas.dense_kl_sum_pallas(*a, sm_scale=0.3, interpret=True)):
        (v, g), (rv, rg) = (_step(kl_sum, p, s, hi, di)(weights, *rest) for p in (POLICIES["full"], NOTHING))
        np.testing.assert_allclose(v, rv, rtol=1e-6)
        for a, b in zip(g, rg):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tpu_scanned_layers_keep_the_kernel_unfused(device):
    """Scanned layers stack the kept residuals per layer; XLA:TPU must not fuse those stacking
    writes into the kernel's call (the fused call gets the default scoped VMEM, not the kernel's:
    at the 671B shapes it then fails to compile)."""
    pytest.importorskip("libtpu")
    s, h, d, hi, di, width, layers = 512, 2, 128, 2, 128, 256, 2
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=jax.sharding.SingleDeviceSharding(device))
    weights, *rest = _args(spec, s, h, d, hi, di, width)
    stacked = tuple(spec(layers, *w.shape) for w in weights)
    kl_sum = lambda *a: kl_pallas.dense_kl_sum_pallas(*a, sm_scale=0.1, variant="tpu")  # noqa: E731

    layer = jax.checkpoint(_layer_loss(kl_sum, s, hi, di), policy=POLICIES["full"])

    def loss(ws, *inputs):
        return jax.lax.scan(lambda total, w: (total + layer(w, *inputs), None), jnp.float32(0), ws)[0]

    text = jax.jit(jax.value_and_grad(loss)).lower(stacked, *rest).compile().as_text()
    kernels = [line for line in text.splitlines() if re.search(r"%dense_indexer_kl_forward[.\w]* = ", line)]
    assert kernels and all(" custom-call(" in line for line in kernels), [line[:200] for line in kernels]
