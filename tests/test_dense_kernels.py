"""Flash dense attention and the one-pass dense indexer KL against the pure-JAX references.

Tiny shapes; every case mixes two packed documents, padding (segment 0) and lengths that are not
block multiples. Query positions cover the context-parallel case: a subset of the row's queries
(e.g. a zig-zag shard's) against the whole row's keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_train.kernels import dense_attention, dense_indexer_kl, indexer_kl
from dsa_train.kernels.backend import Backend
from dsa_train.ops import attention as attention_ops
from dsa_train.ops import losses

H, DK, DV, HI, DI = 3, 12, 8, 4, 16


def _segments(s):
    a = s // 2 + 1
    return jnp.array([[1] * a + [2] * (s - a), [3] * (s - 5) + [0] * 5], jnp.int32)


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32))


def _attention_inputs(s, seed=0):
    rng = np.random.default_rng(seed)
    return _normal(rng, 2, s, H, DK), _normal(rng, 2, s, H, DK), _normal(rng, 2, s, H, DV), _segments(s)


@pytest.mark.parametrize("s,blocks", [(21, (8, 8)), (19, (16, 8)), (9, (128, 256))])
def test_flash_attention_matches_reference(s, blocks):
    q, k, v, seg = _attention_inputs(s)
    scale = DK ** -0.5
    ct = _normal(np.random.default_rng(1), 2, s, H, DV)

    def run(fn):
        def loss(q, k, v):
            out, lse = fn(q, k, v)
            return (out * ct).sum(), (out, lse)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, (out, lse)), grads = run(lambda q, k, v: dense_attention.dense_attention_flash(
        q, k, v, seg, scale, block_q=blocks[0], block_k=blocks[1]))
    (_, (ref_out, ref_lse)), ref_grads = run(lambda q, k, v: attention_ops.dense_attention(q, k, v, seg, scale))
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    for name, a, b in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_flash_attention_shared_keys_and_query_positions():
    """MQA form (keys/values shared by the heads) on a zig-zag-like subset of the queries."""
    s = 24
    rng = np.random.default_rng(2)
    q, kv, seg = _normal(rng, 2, s, H, DK), _normal(rng, 2, s, DK), _segments(s)
    pos = jnp.array(list(range(0, 6)) + list(range(18, 24)))
    out, lse = jax.jit(lambda q, kv: dense_attention.flash_attention(
        q[:, pos], kv, kv[..., :DV], pos, seg[:, pos], seg, 0.3, block_q=8, block_k=8))(q, kv)
    per_head = jnp.broadcast_to(kv[:, :, None], (2, s, H, DK))
    ref_out, ref_lse = attention_ops.dense_attention(q, per_head, per_head[..., :DV], seg, 0.3)
    np.testing.assert_allclose(out, ref_out[:, pos], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse[:, pos], rtol=1e-5, atol=1e-5)


def test_flash_attention_skips_invisible_key_blocks():
    """The first query block never reads the later key blocks: NaN keys there leave it finite."""
    s = 32
    q, k, v, seg = _attention_inputs(s, seed=3)
    k, v = k.at[:, 16:].set(jnp.nan), v.at[:, 16:].set(jnp.nan)
    seg = jnp.ones((2, s), jnp.int32)
    out, _ = dense_attention.dense_attention_flash(q, k, v, seg, 0.3, block_q=8, block_k=8)
    assert np.isfinite(np.asarray(out[:, :16])).all()


def test_backend_dense_attention_forward_builds_no_backward():
    """Nothing differentiates the frozen main model in the warm-up: a forward-only jit of the flash
    attention must not hold the backward's residual buffers (dk/dv carries)."""
    s = 256
    shapes = [jax.ShapeDtypeStruct((1, s, 2, 16), jnp.float32)] * 3 + [jax.ShapeDtypeStruct((1, s), jnp.int32)]
    f = lambda q, k, v, seg: Backend("blocked").dense_attention(q, k, v, seg, 0.25)[0].sum()  # noqa: E731
    text = jax.jit(f).lower(*shapes).as_text()
    grad_text = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(*shapes).as_text()
    assert grad_text.count("while") > text.count("while")  # the backward's loops exist only under grad


# ---- dense indexer KL ----------------------------------------------------------------------------

def _kl_inputs(s, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k = _normal(rng, 2, s, H, DK), _normal(rng, 2, s, H, DK)
    q_idx, k_idx = _normal(rng, 2, s, HI, DI), _normal(rng, 2, s, DI)
    w_idx = _normal(rng, 2, s, HI) * HI ** -0.5
    return [x.astype(dtype) for x in (q, k, q_idx, k_idx)] + [w_idx, _segments(s)]


def _as_mqa(q, k):
    """Per-head q/k as the MQA form with the same scores: head h's query sits in slot h of a
    H x DK-wide query, the shared key concatenates every head's key."""
    b, s, h, d = q.shape
    eye = jnp.eye(h, dtype=q.dtype)
    return jnp.einsum("bshd,hg->bshgd", q, eye).reshape(b, s, h, h * d), k.reshape(b, s, h * d)


def _value_and_grads(f, *args):
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*args)


def _check(got, want, rtol=1e-5, atol=1e-6):
    (v, g), (rv, rg) = got, want
    np.testing.assert_allclose(v, rv, rtol=rtol, atol=atol)
    for name, a, b in zip(("q_idx", "k_idx", "w_idx"), g, rg):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("s,blocks", [(21, (8, 8)), (37, (16, 8)), (9, (64, 256))])
def test_one_pass_kl_per_head_matches_reference(s, blocks):
    q, k, q_idx, k_idx, w_idx, seg = _kl_inputs(s, seed=4)
    scale = DK ** -0.5
    q_mqa, kv_mqa = _as_mqa(q, k)
    _, lse = attention_ops.dense_attention(q, k, k[..., :DV], seg, scale)
    got = _value_and_grads(lambda a, b, c: indexer_kl.dense_indexer_kl_loss(
        q, k, scale, a, b, c, seg, lse, block_q=blocks[0], block_k=blocks[1]), q_idx, k_idx, w_idx)
    want = _value_and_grads(lambda a, b, c: losses.indexer_kl_loss(q_mqa, kv_mqa, scale, a, b, c, seg),
                            q_idx, k_idx, w_idx)
    _check(got, want)


def test_one_pass_kl_shards_add_up():
    """Zig-zag-like query subsets against the whole row's keys: the shards' sums (values and
    gradients) add up to the whole row's."""
    s = 24
    q, k, q_idx, k_idx, w_idx, seg = _kl_inputs(s, seed=5)
    scale = DK ** -0.5
    _, lse = attention_ops.dense_attention(q, k, k[..., :DV], seg, scale)
    valid = (seg != 0).astype(jnp.float32)
    shards = [jnp.array(list(range(0, 6)) + list(range(18, 24))), jnp.arange(6, 18)]

    def total(a, b, c):
        parts = [dense_indexer_kl.dense_kl_sum(q[:, p], k, lse[:, p], a[:, p], b, c[:, p], valid[:, p], p,
                                               seg[:, p], seg, sm_scale=scale, block_q=8, block_k=8)
                 for p in shards]
        return sum(parts) / valid.sum()

    q_mqa, kv_mqa = _as_mqa(q, k)
    want = _value_and_grads(lambda a, b, c: losses.indexer_kl_loss(q_mqa, kv_mqa, scale, a, b, c, seg),
                            q_idx, k_idx, w_idx)
    _check(_value_and_grads(total, q_idx, k_idx, w_idx), want)


def test_one_pass_kl_bf16_close_to_reference():
    s = 21
    q, k, q_idx, k_idx, w_idx, seg = _kl_inputs(s, seed=6, dtype=jnp.bfloat16)
    scale = DK ** -0.5
    v, g = _value_and_grads(lambda a, b, c: Backend("blocked").indexer_kl_loss(q, k, scale, a, b, c, seg),
                            q_idx, k_idx, w_idx)
    q_mqa, kv_mqa = _as_mqa(q.astype(jnp.float32), k.astype(jnp.float32))
    rv, rg = _value_and_grads(lambda a, b, c: losses.indexer_kl_loss(q_mqa, kv_mqa, scale, a, b, c, seg),
                              q_idx.astype(jnp.float32), k_idx.astype(jnp.float32), w_idx)
    assert all(x.dtype == jnp.bfloat16 for x in g[:2])
    np.testing.assert_allclose(v, rv, rtol=1e-2)
    for a, b in zip(g, rg):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=3e-2, atol=3e-3)


def test_one_pass_kl_forms_the_target_once():
    """Forward + backward: exactly one einsum contracts the main heads' queries with the keys (the
    target, pass A); the backward (pass B) forms indexer tiles only."""
    s, h, d = 64, 4, 16
    shapes = (jax.ShapeDtypeStruct((1, s, h, d), jnp.float32), jax.ShapeDtypeStruct((1, s, h, d), jnp.float32),
              jax.ShapeDtypeStruct((1, s, h), jnp.float32), jax.ShapeDtypeStruct((1, s, 2, 8), jnp.float32),
              jax.ShapeDtypeStruct((1, s, 8), jnp.float32), jax.ShapeDtypeStruct((1, s, 2), jnp.float32),
              jax.ShapeDtypeStruct((1, s), jnp.int32))
    f = lambda q, k, lse, a, b, c, seg: Backend("blocked").indexer_kl_loss(q, k, 0.2, a, b, c, seg, lse=lse)  # noqa: E731
    text = jax.jit(jax.grad(f, argnums=(3, 4, 5))).lower(*shapes).as_text()
    # the target tile's contraction: [1, bq, 4 heads, 16] x [1, bk, 4, 16] over the 16-dim
    target_dots = [line for line in text.splitlines() if "dot_general" in line and "4x16xf32" in line
                   and "contracting_dims = [3] x [3]" in line]
    assert len(target_dots) == 1, target_dots


def test_flops_count_the_warmup_kl_as_the_kernel_runs_it():
    """flops.py's warm-up KL per token = the accelerators' (Pallas) kernel's stated per-pair count
    over the causal pairs, in the per-head form on one device and the MQA form under context
    parallelism."""
    from dsa_train.config import load_model_config
    from dsa_train.flops import dense_kl_flops_per_token
    from dsa_train.kernels import dense_indexer_kl_pallas

    c = load_model_config("configs/deepseek-v3.2.yaml")
    pairs = (c.num_hidden_layers * (64 + 1) / 2)
    count = dense_indexer_kl_pallas.pair_flops
    per_head = count(c.num_attention_heads, c.qk_head_dim, c.index_n_heads, c.index_head_dim)
    mqa = count(c.num_attention_heads, c.kv_lora_rank + c.qk_rope_head_dim, c.index_n_heads, c.index_head_dim)
    assert dense_kl_flops_per_token(c, 64) == per_head * pairs
    assert dense_kl_flops_per_token(c, 64, context_parallel=True) == mqa * pairs
    assert count(128, 192, 64, 128) == 2 * 128 * 192 + 14 * 64 * 128 + 8 * 64 == 164_352
    assert dense_indexer_kl.pair_flops(128, 192, 64, 128) == 2 * 128 * 192 + 12 * 64 * 128 + 8 * 64


# ---- TPU: splash attention -----------------------------------------------------------------------

def test_splash_attention_interpret_matches_reference():
    """Values, lse and gradients (the backward is the flash one) at S = 256 with two documents."""
    rng = np.random.default_rng(7)
    s = 256
    q, k = _normal(rng, 1, s, 2, 192), _normal(rng, 1, s, 2, 192)
    v, ct = _normal(rng, 1, s, 2, 128), _normal(rng, 1, s, 2, 128)
    seg = jnp.asarray([[1] * 100 + [2] * 156], jnp.int32)

    def run(backend):
        def loss(q, k, v):
            out, lse = Backend(backend).dense_attention(q, k, v, seg, 0.1)
            return (out * ct).sum(), (out, lse)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, (out, lse)), grads = run("pallas_tpu_interpret")
    (_, (ref_out, ref_lse)), ref_grads = run("reference")
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    for name, a, b in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def test_dense_attention_lowers_to_splash_for_tpu():
    shapes = [jax.ShapeDtypeStruct((1, 512, 4, 192), jnp.bfloat16)] * 2 + [
        jax.ShapeDtypeStruct((1, 512, 4, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1, 512), jnp.int32)]
    f = lambda q, k, v, seg: Backend("pallas").dense_attention(q, k, v, seg, 0.07)  # noqa: E731
    text = jax.export.export(jax.jit(f), platforms=["tpu"])(*shapes).mlir_module()
    assert "tpu_custom_call" in text and "splash" in text
