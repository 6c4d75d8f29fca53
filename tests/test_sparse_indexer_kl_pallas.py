"""The sparse indexer KL's Pallas kernels (GPU Triton and TPU Mosaic, interpret mode) against the
pure reference `ops.losses.sparse_indexer_kl_loss`: values and gradients w.r.t. the indexer query,
key and head weights.

Tiny shapes (interpret mode is slow). Every case has batch 2, two packed documents in row 0,
padding (segment 0) in row 1, -1 slots (queries with fewer than K candidates: short rows) and
sizes that are not block multiples; the small-block cases also run several slot blocks per query
and, on TPU, several dk tiles with slot ranges that straddle slot blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_train.kernels import indexer_kl, sparse_indexer_kl_gpu, sparse_indexer_kl_tpu
from dsa_train.kernels.backend import Backend
from dsa_train.ops import losses
from dsa_train.ops.attention import sparse_mla_attention_reference
from dsa_train.ops.indexer import indexer_topk_reference

H, D, V, HI, DI = 4, 40, 32, 4, 24  # D, DI not powers of two: the Triton pads; HI < 16 too
SCALE = D ** -0.5


def _segments(s: int) -> jnp.ndarray:
    a = s // 2 + 1
    return jnp.array([[1] * a + [2] * (s - a), [3] * (s - 5) + [0] * 5], jnp.int32)


def _case(s: int, topk: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    q, kv = normal(2, s, H, D), normal(2, s, D)
    q_idx, k_idx = normal(2, s, HI, DI), normal(2, s, DI)
    w_idx = normal(2, s, HI) * HI ** -0.5  # weights may be negative
    seg = _segments(s)
    indices = jax.jit(indexer_topk_reference, static_argnums=3)(q_idx, k_idx, w_idx, topk, seg)
    _, lse = jax.jit(sparse_mla_attention_reference, static_argnums=(3, 4))(q, kv, indices, SCALE, V)
    assert bool((indices < 0).any()), "the case needs -1 slots"
    return q, kv, indices, lse, q_idx, k_idx, w_idx, seg


def _reference(q, kv, indices, lse, q_idx, k_idx, w_idx, seg):
    f = lambda a, b, c: losses.sparse_indexer_kl_loss(q, kv, indices, lse, SCALE, a, b, c, seg)  # noqa: E731
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q_idx, k_idx, w_idx)


def _check(got, want, rtol=2e-5, atol=2e-6):
    (v, g), (rv, rg) = got, want
    np.testing.assert_allclose(v, rv, rtol=rtol, atol=atol)
    for name, a, b in zip(("q_idx", "k_idx", "w_idx"), g, rg):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("impl", ["pallas_gpu_interpret", "pallas_tpu_interpret", "pallas_interpret"])
def test_backend_sparse_kl_matches_reference(impl):
    case = _case(16, 8, seed=1)
    q, kv, indices, lse, q_idx, k_idx, w_idx, seg = case
    f = lambda a, b, c: Backend(impl).sparse_indexer_kl_loss(q, kv, indices, lse, SCALE, a, b, c, seg)  # noqa: E731
    _check(jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q_idx, k_idx, w_idx), _reference(*case))


def _kernel_loss(variant: str, case, blocks: dict):
    """Loss and gradients straight from one variant's kernels, with given block sizes."""
    q, kv, indices, lse, q_idx, k_idx, w_idx, seg = case
    if variant == "triton":
        p = jax.jit(lambda: indexer_kl._head_mean_probs_gpu(q, kv, indices, lse, sm_scale=SCALE, interpret=True))()
        stats, grads = sparse_indexer_kl_gpu.sparse_kl_stats_gpu, sparse_indexer_kl_gpu.sparse_kl_grads_gpu
    else:
        p = jax.jit(lambda: sparse_indexer_kl_tpu.head_mean_probs_tpu(q, kv, indices, lse, sm_scale=SCALE,
                                                                      interpret=True, **blocks))()
        stats, grads = sparse_indexer_kl_tpu.sparse_kl_stats_tpu, sparse_indexer_kl_tpu.sparse_kl_grads_tpu
    kl, lse_i, psum = jax.jit(lambda: stats(q_idx, k_idx, w_idx, indices, p, interpret=True, **blocks))()
    valid = (seg != 0).astype(jnp.float32)
    g = valid / valid.sum()
    d = jax.jit(lambda: grads(q_idx, k_idx, w_idx, indices, p, lse_i, psum, g, interpret=True, **blocks))()
    return (kl * valid).sum() / valid.sum(), d


@pytest.mark.parametrize("variant, blocks", [
    ("triton", dict(block_k=16)),  # K = 40: three slot blocks, the last partly padded
    # three slot blocks, three dk tiles, padded queries
    pytest.param("tpu", dict(block_k=8, block_q=8, tile_t=8), marks=pytest.mark.slow),
])
def test_kernels_with_small_blocks_match_reference(variant, blocks):
    case = _case(37, 40, seed=2) if variant == "triton" else _case(21, 20, seed=2)
    _check(_kernel_loss(variant, case, blocks), _reference(*case))


def test_target_kernels_match_reference():
    q, kv, indices, lse, *_ = _case(21, 8, seed=3)
    want = losses.sparse_target(q, kv, indices, lse, SCALE)
    gpu = indexer_kl._head_mean_probs_gpu(q, kv, indices, lse, sm_scale=SCALE, interpret=True)
    tpu = sparse_indexer_kl_tpu.head_mean_probs_tpu(q, kv, indices, lse, sm_scale=SCALE, interpret=True)
    np.testing.assert_allclose(gpu, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tpu, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_tpu_kernels_take_bf16_keys():
    """bf16 rows travel packed two per 32-bit word: same loss as the reference on the same bf16 data."""
    case = list(_case(13, 8, seed=4))
    for i in (0, 1, 4, 5):  # q, kv, q_idx, k_idx
        case[i] = case[i].astype(jnp.bfloat16)
    q, kv, indices, lse, q_idx, k_idx, w_idx, seg = case
    f = lambda a, b, c: Backend("pallas_tpu_interpret").sparse_indexer_kl_loss(  # noqa: E731
        q, kv, indices, lse, SCALE, a, b, c, seg)
    got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q_idx, k_idx, w_idx)
    want = _reference(*[x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in case])
    np.testing.assert_allclose(got[0], want[0], rtol=2e-2)
    for a, b in zip(got[1], want[1]):
        assert a.dtype == jnp.bfloat16 or a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=5e-2, atol=5e-3)


_CONTEXT_PARALLEL_KL = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
import jax.numpy as jnp
import numpy as np
from dsa_train.config import MeshConfig
from dsa_train.kernels.backend import Backend
from dsa_train.ops.attention import sparse_mla_attention_reference
from dsa_train.ops.indexer import indexer_topk_reference
from dsa_train.parallel import activate, make_mesh, sequence_order
from dsa_train.parallel import context_parallel as cp

s, topk, scale = 32, 6, 0.2
orders = sys.argv[2].split(",")
rng = np.random.default_rng(0)
normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
q, kv, qi, ki, wi = normal(2, s, 4, 24), normal(2, s, 24), normal(2, s, 4, 16), normal(2, s, 16), normal(2, s, 4)
seg = np.ones((2, s), np.int32); seg[:, 13:] = 2; seg[1, -6:] = 0
seg = jnp.asarray(seg)
idx = indexer_topk_reference(qi, ki, wi, topk, seg)
_, lse = sparse_mla_attention_reference(q, kv, idx, scale, 16)

def value_and_grads(ops, q, kv, idx, lse, qi, ki, wi, seg):
    f = lambda a, b, c: ops.sparse_indexer_kl_loss(q, kv, idx, lse, scale, a, b, c, seg)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(qi, ki, wi)

want = value_and_grads(Backend("reference"), q, kv, idx, lse, qi, ki, wi, seg)
out = {}
for order in orders:
    with activate(make_mesh(MeshConfig(data=1, context=4))):
        with cp.laid_out(order, s) as lay:
            ops = cp.sequence_ops(Backend(sys.argv[1]))
            value, grads = value_and_grads(ops, *(lay(x) for x in (q, kv, idx, lse, qi, ki, wi, seg)))
    if order == "zigzag":
        grads = [sequence_order.from_zigzag(g, 4) for g in grads]
    close = [np.allclose(a, b, rtol=2e-5, atol=2e-6) for a, b in zip((value, *grads), (want[0], *want[1]))]
    out[order] = all(close) and type(ops).__name__ == "ContextParallelOps"
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("impl, orders", [
    ("pallas_gpu_interpret", ("contiguous", "zigzag")),
    pytest.param("pallas_tpu_interpret", ("zigzag",), marks=pytest.mark.slow),  # the interpreter is slow
])
def test_context_parallel_sparse_kl_equals_one_device(impl, orders):
    """mesh.context = 4, contiguous and zig-zag: each shard runs the Pallas kernels on its queries
    against the gathered keys; loss and indexer gradients equal one device's reference."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", _CONTEXT_PARALLEL_KL, impl, ",".join(orders)], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads(lines[-1][len("RESULT "):]) == {order: True for order in orders}
