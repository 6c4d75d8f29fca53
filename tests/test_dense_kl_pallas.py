"""The Pallas one-pass dense indexer KL (kernels/dense_indexer_kl_pallas.py) in interpret mode,
GPU (Triton) and TPU (Mosaic) kernels, against the pure-JAX reference: values and gradients.

Tiny shapes; two packed documents in row 0, one document then padding (segment 0) in row 1,
lengths that are not block multiples, per-head and MQA keys, and zig-zag query shards (a subset
of the row's queries at their row positions against the whole row's keys, as context parallelism
runs it) whose sums add up to the whole row's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_train.kernels import dense_indexer_kl_pallas as kl_pallas
from dsa_train.kernels.backend import Backend
from dsa_train.ops import attention as attention_ops
from dsa_train.ops import losses
from dsa_train.parallel import sequence_order

H, DK, HI, DI = 3, 12, 4, 16
S = 44  # 4 zig-zag chunks of 11
SHARDS = 2
IMPLS = ["pallas_interpret", "pallas_gpu_interpret", "pallas_tpu_interpret"]


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    q, k = normal(2, S, H, DK), normal(2, S, H, DK)
    q_idx, k_idx, w_idx = normal(2, S, HI, DI), normal(2, S, DI), normal(2, S, HI) * HI ** -0.5
    seg = jnp.array([[1] * 20 + [2] * (S - 20), [3] * (S - 6) + [0] * 6], jnp.int32)
    return q, k, q_idx, k_idx, w_idx, seg


def _as_mqa(q, k):
    """Per-head q/k as the MQA form with the same scores (block-diagonal queries)."""
    b, s, h, d = q.shape
    eye = jnp.eye(h, dtype=q.dtype)
    return jnp.einsum("bshd,hg->bshgd", q, eye).reshape(b, s, h, h * d), k.reshape(b, s, h * d)


def _value_and_grads(f, *args):
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*args)


def _check(got, want, rtol=2e-5, atol=2e-6):
    (v, g), (rv, rg) = got, want
    np.testing.assert_allclose(v, rv, rtol=rtol, atol=atol)
    for name, a, b in zip(("q_idx", "k_idx", "w_idx"), g, rg):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)


def _reference(q, k, q_idx, k_idx, w_idx, seg):
    q_mqa, kv_mqa = _as_mqa(q, k)
    return _value_and_grads(lambda a, b, c: losses.indexer_kl_loss(q_mqa, kv_mqa, DK ** -0.5, a, b, c, seg),
                            q_idx, k_idx, w_idx)


def _zigzag_shard_sums(kl_sum, q, k, lse, seg):
    """sum over the zig-zag shards of kl_sum(shard's inputs) / n_valid, as a function of the indexer inputs."""
    valid = (seg != 0).astype(jnp.float32)
    positions = sequence_order.slot_positions("zigzag", S, SHARDS).reshape(SHARDS, -1)

    def total(a, b, c):
        parts = [kl_sum(q[:, p], k, lse[:, p], a[:, p], b, c[:, p], valid[:, p], jnp.asarray(p), seg[:, p], seg)
                 for p in positions]
        return sum(parts) / valid.sum()

    return total


@pytest.mark.parametrize("form", ["per_head", "mqa"])
@pytest.mark.parametrize("impl", IMPLS)
def test_zigzag_shards_match_reference(impl, form):
    """Through the backend's context-shard entry (what context_parallel.py calls on each shard)."""
    q, k, q_idx, k_idx, w_idx, seg = _inputs(seed=1)
    _, lse = attention_ops.dense_attention(q, k, k, seg, DK ** -0.5)
    main_q, main_k = (q, k) if form == "per_head" else _as_mqa(q, k)
    backend = Backend(impl)
    kl_sum = lambda *args: backend.indexer_kl_sum_at(*args, sm_scale=DK ** -0.5)  # noqa: E731
    got = _value_and_grads(_zigzag_shard_sums(kl_sum, main_q, main_k, lse, seg), q_idx, k_idx, w_idx)
    _check(got, _reference(q, k, q_idx, k_idx, w_idx, seg))


@pytest.mark.parametrize("variant, blocks", [("triton", (16, 16)), ("tpu", (128, 8))])
def test_small_key_blocks_match_reference(variant, blocks):
    """Several key blocks per query block, so the visible range [lo, hi) is exercised on both
    variants (zig-zag shards, per-head keys)."""
    q, k, q_idx, k_idx, w_idx, seg = _inputs(seed=2)
    _, lse = attention_ops.dense_attention(q, k, k, seg, DK ** -0.5)
    kl_sum = lambda *args: kl_pallas.dense_kl_sum_pallas(*args, sm_scale=DK ** -0.5, variant=variant,  # noqa: E731
                                                         interpret=True, blocks=blocks)
    got = _value_and_grads(_zigzag_shard_sums(kl_sum, q, k, lse, seg), q_idx, k_idx, w_idx)
    _check(got, _reference(q, k, q_idx, k_idx, w_idx, seg))


@pytest.mark.parametrize("variant, blocks", [("triton", (16, 16)), ("tpu", (128, 16))])
def test_fully_masked_key_blocks_are_never_read(variant, blocks):
    """Queries 32..47 of a document that starts at 32: the key blocks of the earlier document and
    of the causal future are skipped, so NaN indexer keys there leave the loss and its gradients
    finite and equal to clean keys'."""
    s = 64
    rng = np.random.default_rng(3)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    q, k = normal(1, 16, H, DK), normal(1, s, H, DK)
    q_idx, k_idx, w_idx = normal(1, 16, HI, DI), normal(1, s, DI), normal(1, 16, HI)
    seg = jnp.array([[1] * 32 + [2] * 32], jnp.int32)
    pos = jnp.arange(32, 48)
    lse = jnp.zeros((1, 16, H))
    poisoned = k_idx.at[:, :32].set(jnp.nan).at[:, 48:].set(jnp.nan)

    def run(keys):
        def f(a, b, c):
            return kl_pallas.dense_kl_sum_pallas(q, k, lse, a, b, c, jnp.ones((1, 16)), pos, seg[:, 32:48], seg,
                                                 sm_scale=0.3, variant=variant, interpret=True, blocks=blocks)
        return _value_and_grads(f, q_idx, keys, w_idx)

    (v, (dq, dk, dw)), (rv, (rdq, rdk, rdw)) = run(poisoned), run(k_idx)
    seen = slice(32, 48)
    assert np.isfinite(float(v)) and np.isfinite(np.asarray(dq)).all() and np.isfinite(np.asarray(dk[:, seen])).all()
    np.testing.assert_allclose(v, rv, rtol=1e-6)
    for a, b in ((dq, rdq), (dk[:, seen], rdk[:, seen]), (dw, rdw)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_cuda_lowering_names_the_kernels():
    """The Triton kernels lower for CUDA from a CPU host (forward and backward)."""
    spec, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
    shapes = (spec((1, 256, 4, 192), bf16), spec((1, 256, 4, 192), bf16), spec((1, 256, 4), jnp.float32),
              spec((1, 256, 8, 128), bf16), spec((1, 256, 128), bf16), spec((1, 256, 8), bf16),
              spec((1, 256), jnp.float32), spec((256,), jnp.int32), spec((1, 256), jnp.int32),
              spec((1, 256), jnp.int32))

    def loss(q, k, lse, a, b, c, wt, pos, qs, ks):
        return kl_pallas.dense_kl_sum_pallas(q, k, lse, a, b, c, wt, pos, qs, ks, sm_scale=0.1, variant="triton")

    text = jax.export.export(jax.jit(jax.grad(loss, argnums=(3, 4, 5))), platforms=["cuda"],
                             disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        *shapes).mlir_module()
    for name in ("dense_indexer_kl_forward", "dense_indexer_kl_backward"):
        assert name in text


@pytest.mark.parametrize("form", ["per_head", "mqa"])
def test_tpu_kernels_compile_deviceless(form):
    """Mosaic compiles the forward and backward kernels for a deviceless v5p chip (libtpu; the real
    passes, so VMEM overflows and unsupported layouts fail here). Real-shape figures at 32K and
    128K: bench/tpu_dense_kl_compile.py."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    try:
        device = topologies.get_topology_desc("v5p:2x2x1", "tpu").devices[0]
    except Exception as err:  # noqa: BLE001 - libtpu present but unusable here (e.g. a held lockfile)
        pytest.skip(f"no deviceless v5p topology: {err}")
    s, t, h, d = 256, 512, 4, 192 if form == "per_head" else 576
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=jax.sharding.SingleDeviceSharding(device))
    keys = spec(1, t, h, d) if form == "per_head" else spec(1, t, d)
    args = (spec(1, s, h, d), keys, spec(1, s, h, dtype=jnp.float32), spec(1, s, 8, 128), spec(1, t, 128),
            spec(1, s, 8), spec(1, s, dtype=jnp.float32), spec(1, s, dtype=jnp.int32), spec(1, t, dtype=jnp.int32))
    positions = np.concatenate([np.arange(128), np.arange(384, 512)])  # a zig-zag shard's rows

    def loss(q, k, lse, a, b, c, wt, q_seg, k_seg):
        return kl_pallas.dense_kl_sum_pallas(q, k, lse, a, b, c, wt, positions, q_seg, k_seg, sm_scale=0.1,
                                             variant="tpu")

    text = jax.jit(jax.grad(loss, argnums=(3, 4, 5))).lower(*args).compile().as_text()
    assert "dense_indexer_kl_forward" in text and "dense_indexer_kl_backward" in text
