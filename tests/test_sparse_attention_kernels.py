"""Sparse MLA attention implementations against the pure-JAX reference, on CPU.

Values and gradients (dq, dkv, with a cotangent on lse too) of the blocked path and of both Pallas
kernels in interpret mode; lowering of both kernels for CUDA and TPU through jax.export (forward and
backward); the kernel backend and its input checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_train.kernels import backend as backend_lib
from dsa_train.kernels.backend import Backend, resolve_impl
from dsa_train.kernels.sparse_attention_blocked import sparse_mla_attention_blocked
from dsa_train.kernels.sparse_attention_gpu import sparse_mla_attention_gpu, sparse_mla_head_summed_probs_gpu
from dsa_train.kernels import sparse_attention_tpu
from dsa_train.kernels.sparse_attention_tpu import sparse_mla_attention_tpu
from dsa_train.ops.attention import NEG_INF, sparse_mla_attention_reference
from dsa_train.ops.indexer import indexer_topk_reference


def causal_indices(rng, b, s, t, k, drop_row=None):
    """[B, S, K]: for query i, up to K distinct keys among 0..i (fewer early on), -1 elsewhere, in
    shuffled slot order so -1 slots also sit between valid ones. `drop_row` gets no valid key."""
    idx = np.full((b, s, k), -1, np.int32)
    for bi in range(b):
        for i in range(s):
            cand = rng.permutation(min(i, t - 1) + 1)[:k]
            row = np.full(k, -1, np.int32)
            row[: len(cand)] = cand
            idx[bi, i] = rng.permutation(row)
    if drop_row is not None:
        idx[:, drop_row] = -1
    return jnp.asarray(idx)


def make_inputs(b=1, s=12, t=12, h=4, d=48, k=8, dtype=jnp.float32, seed=0, drop_row=None):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, s, h, d)), dtype)
    kv = jnp.asarray(rng.standard_normal((b, t, d)), dtype)
    return q, kv, causal_indices(rng, b, s, t, k, drop_row)


def value_and_grads(fn, q, kv, indices, sm_scale, v_dim):
    """out, lse and (dq, dkv) of a loss that puts non-trivial cotangents on both out and lse."""
    def loss(q, kv):
        out, lse = fn(q, kv, indices, sm_scale, v_dim)
        out32 = out.astype(jnp.float32)
        lse_safe = jnp.where(lse > NEG_INF / 2, lse, 0.0)  # rows without keys: lse is a sentinel
        return jnp.sum(out32 * jnp.cos(out32)) + jnp.sum(jnp.sin(lse_safe)), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(q, kv)
    return out, lse, grads


def assert_matches_reference(fn, q, kv, indices, sm_scale, v_dim, atol=2e-5, rtol=2e-5):
    ref = value_and_grads(sparse_mla_attention_reference, q, kv, indices, sm_scale, v_dim)
    got = value_and_grads(fn, q, kv, indices, sm_scale, v_dim)
    names = ("out", "lse", "dq/dkv")
    for name, r, g in zip(names, ref, got):
        for r_i, g_i in zip(jax.tree.leaves(r), jax.tree.leaves(g)):
            assert r_i.shape == g_i.shape and r_i.dtype == g_i.dtype, name
            np.testing.assert_allclose(np.asarray(g_i, np.float32), np.asarray(r_i, np.float32),
                                       atol=atol, rtol=rtol, err_msg=name)
    return got


def blocked(block_q):
    return lambda q, kv, idx, scale, v: sparse_mla_attention_blocked(q, kv, idx, scale, v, block_q=block_q)


def gpu_kernel(**blocks):
    return lambda q, kv, idx, scale, v: sparse_mla_attention_gpu(q, kv, idx, scale, v, interpret=True, **blocks)


def tpu_kernel(**blocks):
    return lambda q, kv, idx, scale, v: sparse_mla_attention_tpu(q, kv, idx, scale, v, interpret=True, **blocks)


# ----------------------------------------------------------------------------------------------
# Values and gradients.


@pytest.mark.parametrize("block_q", [5, 64])
def test_blocked_matches_reference(block_q):
    q, kv, idx = make_inputs(b=2, drop_row=3)
    assert_matches_reference(blocked(block_q), q, kv, idx, 0.3, 32)


@pytest.mark.parametrize("chunk_v", [16, 128])
def test_gpu_kernel_matches_reference(chunk_v):
    # K = 20 with block_k 16: two key blocks, the second one partial; H = 4 padded to 16 heads;
    # chunk_v 16 splits the 32-wide value part into two gathered column chunks.
    q, kv, idx = make_inputs(b=2, k=20, drop_row=3)
    out, lse, _ = assert_matches_reference(gpu_kernel(block_k=16, block_k_bwd=16, chunk_v=chunk_v),
                                           q, kv, idx, 0.3, 32)
    assert np.all(np.asarray(out[:, 3]) == 0) and np.all(np.asarray(lse[:, 3]) <= NEG_INF / 2)


@pytest.mark.slow
def test_gpu_kernel_non_power_of_two_dims():
    # D = 40 = 24 (value, padded to 32) + 16 (rope); H = 6, T = 9 < S.
    q, kv, idx = make_inputs(s=10, t=9, h=6, d=40, k=8, seed=1)
    assert_matches_reference(gpu_kernel(), q, kv, idx, 0.2, 24)


def test_tpu_kernel_matches_reference():
    # block_k 8 with K = 12: two DMA blocks (double buffering), the last one partial.
    q, kv, idx = make_inputs(s=8, t=8, k=12, drop_row=3)
    out, lse, _ = assert_matches_reference(tpu_kernel(block_k=8), q, kv, idx, 0.3, 32)
    assert np.all(np.asarray(out[:, 3]) == 0) and np.all(np.asarray(lse[:, 3]) <= NEG_INF / 2)


def test_tpu_kernel_key_tiles_and_query_blocks():
    # T = 20 keys in dkv tiles of 8 (three tiles, the last one partial), S = 20 queries in blocks of
    # 8 (the last one padded), K = 12 in DMA blocks of 8: slot ranges that straddle tiles, query
    # blocks without keys in a tile (skipped), -1 slots, early rows with fewer than K candidates, a
    # row without keys.
    q, kv, idx = make_inputs(s=20, t=20, k=12, seed=7, drop_row=5)
    out, lse, _ = assert_matches_reference(tpu_kernel(block_k=8, block_q=8, tile_t=8), q, kv, idx, 0.3, 32)
    assert np.all(np.asarray(out[:, 5]) == 0) and np.all(np.asarray(lse[:, 5]) <= NEG_INF / 2)


@pytest.mark.parametrize("d", [576, 48, 7])
def test_tpu_bf16_row_packing_round_trips(d):
    # The TPU kernels gather bf16 kv rows as 32-bit words (two values each) and unpack them in VMEM.
    kv = jnp.asarray(np.random.default_rng(8).standard_normal((2, 5, d)), jnp.bfloat16)
    kv = kv.at[0, 0, 0].set(-0.0).at[0, 0, -1].set(jnp.inf)
    packed = sparse_attention_tpu._gather_source(kv)
    assert packed.dtype == jnp.uint32 and packed.shape == (2, 5, -(-d // 2))
    rows = jax.vmap(lambda r: sparse_attention_tpu._unpacked(r, d, jnp.bfloat16))(packed)
    np.testing.assert_array_equal(np.asarray(rows.view(jnp.uint16)), np.asarray(kv.view(jnp.uint16)))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["blocked", "gpu", "tpu"])
def test_real_mla_dims(impl):
    # The DeepSeek layout: 576 = 512 (value / latent) + 64 (rope), few queries.
    q, kv, idx = make_inputs(s=3, t=6, h=16, d=576, k=4, seed=2)
    fn = {"blocked": blocked(2), "gpu": gpu_kernel(), "tpu": tpu_kernel()}[impl]
    assert_matches_reference(fn, q, kv, idx, 576 ** -0.5, 512, atol=5e-5, rtol=5e-5)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["blocked", "gpu", "tpu"])
def test_bfloat16(impl):
    q, kv, idx = make_inputs(seed=3, dtype=jnp.bfloat16)
    fn = {"blocked": blocked(4), "gpu": gpu_kernel(), "tpu": tpu_kernel()}[impl]
    out, _, grads = value_and_grads(fn, q, kv, idx, 0.3, 32)
    ref_out, _, ref_grads = value_and_grads(sparse_mla_attention_reference, q.astype(jnp.float32),
                                            kv.astype(jnp.float32), idx, 0.3, 32)
    assert out.dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    for got, want in [(out, ref_out), *zip(grads, ref_grads)]:
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=0.05, rtol=0.05)


def test_full_topk_equals_dense_causal():
    # With K >= T every candidate is selected: sparse attention must equal causal dense attention.
    q, kv, _ = make_inputs(s=8, t=8, k=8, seed=4)
    idx = jnp.where(jnp.arange(8)[None, :] <= jnp.arange(8)[:, None], jnp.arange(8)[None, :], -1)[None]
    scores = jnp.einsum("bshd,btd->bhst", q, kv) * 0.3
    scores = jnp.where(jnp.tril(jnp.ones((8, 8), bool)), scores, -jnp.inf)
    dense = jnp.einsum("bhst,btd->bshd", jax.nn.softmax(scores, -1), kv[..., :32])
    out, _ = jax.jit(lambda *a: sparse_mla_attention_blocked(*a, 0.3, 32, block_q=3))(q, kv, idx.astype(jnp.int32))
    np.testing.assert_allclose(out, dense, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------------------------
# Lowering for the real platforms (no accelerator needed: export stops after lowering).

TRITON_CHECK = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def export_forward_and_backward(fn, platform, b, s, t, h, d, k, v_dim, dtype=jnp.bfloat16):
    args = (jax.ShapeDtypeStruct((b, s, h, d), dtype), jax.ShapeDtypeStruct((b, t, d), dtype),
            jax.ShapeDtypeStruct((b, s, k), jnp.int32))
    forward = lambda q, kv, idx: fn(q, kv, idx, d ** -0.5, v_dim)

    def loss(q, kv, idx):
        out, lse = forward(q, kv, idx)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(lse > NEG_INF / 2, lse, 0.0))

    texts = []
    for f in (forward, jax.grad(loss, argnums=(0, 1))):
        exported = jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=TRITON_CHECK)(*args)
        texts.append(exported.mlir_module())
    return texts


SHAPES = {"tiny": (1, 12, 12, 4, 48, 8, 32), "mla": (2, 256, 512, 128, 576, 2048, 512),
          "odd": (1, 10, 9, 6, 40, 20, 24)}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_kernel_lowers_for_cuda(shape):
    fwd, bwd = export_forward_and_backward(lambda *a: sparse_mla_attention_gpu(*a), "cuda", *SHAPES[shape])
    assert "sparse_mla_forward" in fwd and "__gpu$xla.gpu.triton" in fwd
    assert "sparse_mla_backward" in bwd and "sparse_mla_forward" in bwd


@pytest.mark.parametrize("shape", ["tiny", "mla"])
def test_tpu_kernel_lowers_for_tpu(shape):
    fwd, bwd = export_forward_and_backward(lambda *a: sparse_mla_attention_tpu(*a), "tpu", *SHAPES[shape])
    assert "tpu_custom_call" in fwd and "sparse_mla_forward" in fwd
    assert "sparse_mla_backward" in bwd


def test_pallas_impl_picks_kernel_per_lowering_platform():
    # impl="pallas" is resolved when lowering, so a CPU host can export for either accelerator.
    dispatched = lambda q, kv, idx, scale, v: Backend("pallas").sparse_mla_attention(q, kv, idx, scale, v)
    cuda_fwd, cuda_bwd = export_forward_and_backward(dispatched, "cuda", *SHAPES["tiny"])
    tpu_fwd, tpu_bwd = export_forward_and_backward(dispatched, "tpu", *SHAPES["tiny"])
    assert "xla.gpu.triton" in cuda_bwd and "tpu_custom_call" not in cuda_bwd
    assert "tpu_custom_call" in tpu_bwd and "xla.gpu.triton" not in tpu_bwd


# ----------------------------------------------------------------------------------------------
# The kernel backend.


def test_resolve_impl():
    assert resolve_impl("auto", platform="cpu") == "blocked"
    assert resolve_impl("auto", platform="gpu") == "pallas"
    assert resolve_impl("auto", platform="tpu") == "pallas"
    assert resolve_impl("reference") == "reference"
    assert resolve_impl("auto") == ("blocked" if jax.default_backend() == "cpu" else "pallas")
    with pytest.raises(ValueError, match="unknown kernel implementation"):
        resolve_impl("cuda")


@pytest.mark.parametrize("impl", ["auto", "blocked", "pallas", "pallas_interpret", "pallas_tpu_interpret",
                                  "reference"])
def test_backend_sparse_attention(impl):
    q, kv, idx = make_inputs(s=6, t=6, k=4, seed=5)
    want = sparse_mla_attention_reference(q, kv, idx, 0.3, 32)
    got = jax.jit(lambda *a: Backend.resolve(impl).sparse_mla_attention(*a, 0.3, v_dim=32))(q, kv, idx)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


def test_backend_input_errors():
    q, kv, idx = make_inputs(s=6, t=6, k=4)
    with pytest.raises(ValueError, match="shape mismatch"):
        Backend("blocked").sparse_mla_attention(q, kv[:, :, :40], idx, 0.3, 32)
    with pytest.raises(ValueError, match="v_dim"):
        Backend("blocked").sparse_mla_attention(q, kv, idx, 0.3, 64)
    with pytest.raises(ValueError, match="indices must be integers"):
        Backend("blocked").sparse_mla_attention(q, kv, idx.astype(jnp.float32), 0.3, 32)


def test_backend_indexer_topk(monkeypatch):
    rng = np.random.default_rng(6)
    qi = jnp.asarray(rng.standard_normal((1, 6, 2, 8)), jnp.float32)
    ki = jnp.asarray(rng.standard_normal((1, 6, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1, 6, 2)), jnp.float32)
    seg = jnp.ones((1, 6), jnp.int32)
    want = indexer_topk_reference(qi, ki, w, 3, seg)
    np.testing.assert_array_equal(Backend("reference").indexer_topk(qi, ki, w, 3, seg), want)
    # Every other implementation goes to dsa_train.kernels.indexer_topk.indexer_topk_kernel.
    calls = []
    fake = lambda q, k, weights, topk, segment_ids, impl, **positions: calls.append((topk, impl)) or want  # noqa: E731
    monkeypatch.setattr(backend_lib, "indexer_topk_kernel", fake)
    np.testing.assert_array_equal(Backend.resolve("auto").indexer_topk(qi, ki, w, 3, seg), want)
    assert calls == [(3, resolve_impl("auto"))]
    with pytest.raises(ValueError, match="resolved kernel name"):
        Backend("auto")


def test_gpu_head_summed_probs_match_reference():
    # -1 slots, early rows with fewer than K candidates, a row without keys (lse = NEG_INF); H = 20
    # with block_h 8: three head blocks, the last one padded.
    q, kv, idx = make_inputs(s=10, t=10, h=20, d=48, k=12, seed=2, drop_row=4)
    _, lse = sparse_mla_attention_reference(q, kv, idx, 0.3, 32)
    got = sparse_mla_head_summed_probs_gpu(q, kv, idx, lse, 0.3, 32, interpret=True, block_h=8, block_k=8)
    rows = jnp.take_along_axis(kv[:, None], jnp.maximum(idx, 0)[..., None], axis=2)  # [B, S, K, D]
    logits = jnp.einsum("bshd,bskd->bshk", q, rows) * 0.3
    ref = jnp.where(idx >= 0, jnp.exp(logits - lse[..., None]).sum(axis=2), 0.0)
    assert got.shape == idx.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=2e-5)
    # Every row with keys sums to H (each head's probabilities sum to 1 over the selected slots).
    totals = np.asarray(got.sum(-1))
    np.testing.assert_allclose(np.delete(totals, 4, axis=1), 20.0, rtol=1e-5)
    assert np.all(totals[:, 4] == 0)
