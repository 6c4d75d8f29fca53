"""The GPU flash dense attention (Pallas Triton forward, kernels/dense_attention_gpu.py) against the
pure-JAX reference (ops.attention.dense_attention), in Pallas interpret mode on CPU, and its
lowering for CUDA.

Tiny shapes: batch 2, two packed documents in one row and trailing padding (segment 0) in the
other, lengths that are not block multiples, Dk = 48 (two column pieces, as 192 = 128 + 64) and
Dv = 32. The context-parallel case: a zig-zag shard's queries (two separated chunks of the row) at
their row positions against the whole row's keys, in the per-head and the shared-key (MQA) form.
Gradients: the Triton backward kernels (per-head form), the blocked flash backward (shared keys)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_train.kernels.backend import Backend
from dsa_train.ops import attention as attention_ops

H, DK, DV, S = 3, 48, 32, 40
SCALE = DK ** -0.5
ZIGZAG = np.r_[0:10, 30:40]  # shard 0 of 2 with chunks of 10: chunks 0 and 3
UNSORTED = np.r_[30:40, 0:10]  # the backward's key-block skip does not rely on sorted positions
# blocks smaller than the row, so that every kernel walks and skips several blocks
SMALL = dict(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_k_dkv=16, block_q_dkv=16)
TRITON_CALL = "__gpu$xla.gpu.triton"


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32))


def _segments():
    return jnp.array([[1] * 15 + [2] * 25, [3] * 33 + [0] * 7], jnp.int32)


def _value_and_grads(fn, args, ct):
    def loss(*args):
        out, lse = fn(*args)
        return (out * ct).sum(), (out, lse)
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)


def _assert_close(got, want, names):
    (_, (out, lse)), grads = got
    (_, (ref_out, ref_lse)), ref_grads = want
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(names, grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("blocks", [SMALL, dict(block_q=32, block_k=16, block_k_dkv=32)])
def test_self_attention_matches_reference(blocks):
    from dsa_train.kernels.dense_attention_gpu import dense_attention_gpu

    rng = np.random.default_rng(0)
    q, k, v, ct = _normal(rng, 2, S, H, DK), _normal(rng, 2, S, H, DK), _normal(rng, 2, S, H, DV), _normal(
        rng, 2, S, H, DV)
    seg = _segments()
    got = _value_and_grads(lambda q, k, v: dense_attention_gpu(q, k, v, seg, SCALE, interpret=True, **blocks),
                           (q, k, v), ct)
    want = _value_and_grads(lambda q, k, v: attention_ops.dense_attention(q, k, v, seg, SCALE), (q, k, v), ct)
    _assert_close(got, want, "qkv")
    # padded queries (segment 0 rows attend only to themselves) and the first query of a document
    assert np.isfinite(np.asarray(got[0][1][1])).all()


def test_backend_runs_the_gpu_kernel_in_interpret_mode():
    rng = np.random.default_rng(1)
    q, k, v = _normal(rng, 2, S, H, DK), _normal(rng, 2, S, H, DK), _normal(rng, 2, S, H, DV)
    seg = _segments()
    out, lse = jax.jit(lambda q, k, v: Backend("pallas_gpu_interpret").dense_attention(q, k, v, seg, SCALE))(q, k, v)
    ref_out, ref_lse = attention_ops.dense_attention(q, k, v, seg, SCALE)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


def _full_row(q_shard, positions, s):
    """The shard's queries placed at their row positions of a full-length query array."""
    return jnp.zeros((q_shard.shape[0], s, *q_shard.shape[2:]), q_shard.dtype).at[:, positions].set(q_shard)


@pytest.mark.parametrize("shared, positions", [(False, ZIGZAG), (True, ZIGZAG), (False, UNSORTED)],
                         ids=["per_head", "mqa", "per_head_unsorted"])
def test_zigzag_queries_match_reference(shared, positions):
    """A zig-zag shard's queries at their row positions: values, lse and gradients of the shard's
    queries and the row's keys/values equal the reference's rows at those positions."""
    from dsa_train.kernels.dense_attention_gpu import flash_attention_gpu

    rng = np.random.default_rng(2)
    seg = _segments()
    pos = jnp.asarray(positions, jnp.int32)
    q = _normal(rng, 2, len(pos), H, DK)
    kv_shape = (2, S, DK) if shared else (2, S, H, DK)
    k, v = _normal(rng, *kv_shape), _normal(rng, *kv_shape[:-1], DV)
    ct = _normal(rng, 2, len(pos), H, DV)
    got = _value_and_grads(lambda q, k, v: flash_attention_gpu(q, k, v, pos, seg[:, pos], seg, SCALE, interpret=True,
                                                               **SMALL), (q, k, v), ct)

    def reference(q, k, v):
        per_head = (lambda x: jnp.broadcast_to(x[:, :, None], (2, S, H, x.shape[-1]))) if shared else (lambda x: x)
        out, lse = attention_ops.dense_attention(_full_row(q, pos, S), per_head(k), per_head(v), seg, SCALE)
        return out[:, pos], lse[:, pos]

    _assert_close(got, _value_and_grads(reference, (q, k, v), ct), "qkv")


def _shapes(shared: bool, s=256, h=4):
    dk, dv = (576, 512) if shared else (192, 128)
    kv = (1, s) if shared else (1, s, h)
    return (jax.ShapeDtypeStruct((1, s, h, dk), jnp.bfloat16), jax.ShapeDtypeStruct((*kv, dk), jnp.bfloat16),
            jax.ShapeDtypeStruct((*kv, dv), jnp.bfloat16))


def _triton_kernel_names(text: str) -> list[str]:
    import re
    return [m.group(1) for line in text.splitlines() if f"custom_call @{TRITON_CALL}(" in line
            for m in [re.search(r'[{,] name = "([^"]*)"', line)] if m]


def test_pallas_lowers_the_triton_kernel_for_cuda():
    """Backend("pallas") exported for CUDA calls the Triton forward and, in its VJP, the two Triton
    backward kernels for the single-device form (per-head), and the forward for the
    context-parallel form (shared keys, traced positions); for CPU it calls none."""
    q, k, v = _shapes(False)
    seg = jax.ShapeDtypeStruct((1, q.shape[1]), jnp.int32)
    backend = Backend("pallas")
    disabled = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]

    def grads(q, k, v, seg):
        return jax.grad(lambda q, k, v: backend.dense_attention(q, k, v, seg, 0.07)[0].astype(jnp.float32).sum(),
                        argnums=(0, 1, 2))(q, k, v)

    text = jax.export.export(jax.jit(grads), platforms=["cuda"], disabled_checks=disabled)(q, k, v, seg).mlir_module()
    assert sorted(_triton_kernel_names(text)) == ["dense_attention_backward_dkv", "dense_attention_backward_dq",
                                                   "dense_attention_forward"]
    cpu = jax.export.export(jax.jit(grads), platforms=["cpu"])(q, k, v, seg).mlir_module()
    assert TRITON_CALL not in cpu

    q, k, v = _shapes(True)
    pos = jax.ShapeDtypeStruct((q.shape[1],), jnp.int32)
    at = lambda q, k, v, pos, seg: backend.dense_attention_at(q, k, v, pos, seg, seg, 0.07)  # noqa: E731
    text = jax.export.export(jax.jit(at), platforms=["cuda"], disabled_checks=disabled)(q, k, v, pos, seg).mlir_module()
    assert _triton_kernel_names(text) == ["dense_attention_forward"]
