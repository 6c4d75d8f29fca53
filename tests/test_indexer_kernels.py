"""Memory-bounded indexer kernels (top-k, dense and sparse KL) against the pure-JAX references.

Shapes are tiny (interpret mode is slow); every case mixes two packed documents, padding
(segment 0), queries with fewer than K candidates and lengths that are not block multiples."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_train.kernels import indexer_kl, indexer_topk
from dsa_train.kernels.backend import Backend
from dsa_train.ops import losses
from dsa_train.ops.attention import sparse_mla_attention_reference
from dsa_train.ops.indexer import indexer_topk_reference
from dsa_train.ops.masks import causal_document_mask

H, D, HI, DI = 3, 24, 4, 16  # D = 24 is not a power of two: exercises the Triton dim split + pad


def _segments(s: int) -> jnp.ndarray:
    """Row 0: two documents; row 1: one document then padding."""
    a = s // 2 + 1
    return jnp.array([[1] * a + [2] * (s - a), [3] * (s - 5) + [0] * 5], jnp.int32)


def _inputs(s: int, seed: int = 0, dtype=jnp.float32):
    """numpy-generated (no per-shape JAX compiles on a shared CPU)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    q, kv = normal(2, s, H, D).astype(dtype), normal(2, s, D).astype(dtype)
    q_idx, k_idx = normal(2, s, HI, DI).astype(dtype), normal(2, s, DI).astype(dtype)
    w_idx = normal(2, s, HI) * HI ** -0.5  # weights may be negative
    return q, kv, q_idx, k_idx, w_idx, _segments(s)


_topk_reference = jax.jit(indexer_topk_reference, static_argnums=3)


def _same_sets(a, b):
    np.testing.assert_array_equal(np.sort(np.asarray(a), -1), np.sort(np.asarray(b), -1))


# ---- top-k ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s,topk,q_chunk,k_chunk", [
    (21, 8, 8, 4),  # K > chunk width, 3 query chunks, 6 key chunks, ragged end
    (37, 8, 16, 16),
    (13, 32, 128, 512),  # topk > T: every candidate, chunks shrink to the sequence
])
def test_topk_streaming_matches_reference(s, topk, q_chunk, k_chunk):
    _, _, q_idx, k_idx, w_idx, seg = _inputs(s)
    ref = _topk_reference(q_idx, k_idx, w_idx, topk, seg)
    out = jax.jit(lambda *a: indexer_topk.indexer_topk_streaming(*a, topk, seg, q_chunk=q_chunk, k_chunk=k_chunk))(
        q_idx, k_idx, w_idx)
    assert out.shape == ref.shape and out.dtype == jnp.int32
    np.testing.assert_array_equal(out, ref)  # same order too: scores sorted, no ties in random data
    # queries with fewer than K candidates get -1 in the unused slots
    n_candidates = causal_document_mask(seg, seg).sum(-1)
    np.testing.assert_array_equal((out >= 0).sum(-1), np.minimum(n_candidates, out.shape[-1]))


def test_topk_streaming_ties_break_like_reference():
    """All scores equal: the running merge must keep the lowest key indices, as lax.top_k does."""
    s, topk = 19, 6
    _, _, q_idx, _, w_idx, seg = _inputs(s)
    k_idx = jnp.zeros((2, s, DI))
    ref = _topk_reference(q_idx, k_idx, jnp.abs(w_idx), topk, seg)
    out = jax.jit(lambda *a: indexer_topk.indexer_topk_streaming(*a, topk, seg, q_chunk=4, k_chunk=4))(
        q_idx, k_idx, jnp.abs(w_idx))
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("variant", [None, "triton", "tpu"])
def test_topk_pallas_interpret_matches_reference(variant):
    s, topk = 37, 8
    _, _, q_idx, k_idx, w_idx, seg = _inputs(s, seed=1)
    ref = _topk_reference(q_idx, k_idx, w_idx, topk, seg)
    out = jax.jit(lambda *a: indexer_topk.indexer_topk_pallas(*a, topk, seg, interpret=True, variant=variant))(
        q_idx, k_idx, w_idx)
    _same_sets(out, ref)


@pytest.mark.parametrize("impl", ["blocked", "pallas_interpret", "pallas_tpu_interpret"])
def test_topk_through_backend(impl):
    s, topk = 21, 8
    _, _, q_idx, k_idx, w_idx, seg = _inputs(s, seed=2)
    ref = _topk_reference(q_idx, k_idx, w_idx, topk, seg)
    _same_sets(jax.jit(lambda *a: Backend(impl).indexer_topk(*a, topk, seg))(q_idx, k_idx, w_idx), ref)


@pytest.mark.parametrize("impl", ["blocked", "pallas_interpret"])
def test_topk_merges_in_rounds_of_candidates(impl):
    """candidates (2) < beaters per chunk: several merge rounds per key chunk; K (7) is a multiple
    of neither the chunk nor the tile sizes."""
    s, topk = 37, 7
    _, _, q_idx, k_idx, w_idx, seg = _inputs(s, seed=3)
    ref = _topk_reference(q_idx, k_idx, w_idx, topk, seg)
    if impl == "blocked":
        fn = lambda *a: indexer_topk.indexer_topk_streaming(*a, topk, seg, q_chunk=8, k_chunk=12, candidates=2)
    else:
        fn = lambda *a: indexer_topk.indexer_topk_pallas(*a, topk, seg, interpret=True, candidates=2)
    np.testing.assert_array_equal(jax.jit(fn)(q_idx, k_idx, w_idx), ref)


@pytest.mark.parametrize("impl", ["reference", "blocked", "pallas_interpret"])
def test_topk_of_a_query_subset_with_positions(impl):
    """Queries that are a subset of the row in any order (a zig-zag context shard): their row
    positions drive the causal mask; the result equals the full row's top-k at those rows."""
    s, topk = 24, 5
    _, _, q_idx, k_idx, w_idx, seg = _inputs(s, seed=4)
    ref = np.asarray(_topk_reference(q_idx, k_idx, w_idx, topk, seg))
    rows = np.array([18, 19, 20, 21, 22, 23, 0, 1, 2, 3, 4, 5], np.int32)  # a late chunk before an early one
    out = jax.jit(lambda *a: Backend(impl).indexer_topk(*a, topk, seg[:, rows], q_positions=rows,
                                                        k_segment_ids=seg))(
        q_idx[:, rows], k_idx, w_idx[:, rows])
    np.testing.assert_array_equal(out, ref[:, rows])


def _last_dim(dims: str) -> int:
    return int(re.split("[x,]", dims)[-1])


def _sort_widths(text: str) -> list[int]:
    """Widths (last operand dim) of every sort and top_k in a StableHLO or HLO text."""
    widths = []
    for m in re.finditer(r"stablehlo\.sort\b", text):  # operand types follow the comparator region
        widths.append(_last_dim(re.search(r"\}\) : \(tensor<([0-9x]+)x[a-z]", text[m.end():]).group(1)))
    for line in text.splitlines():
        if re.search(r"chlo\.top_k\b", line) and "tensor<" in line and not line.lstrip().startswith("func"):
            widths.append(_last_dim(re.search(r":\s*\(?tensor<([0-9x]+)x[a-z]", line).group(1)))
    # Compiled HLO: sort(...) and the CPU's TopK custom call; the width is the first operand's.
    shapes = dict(re.findall(r"^\s*(?:ROOT )?(%[\w.-]+) = [a-z0-9]+\[([0-9,]*)\]", text, re.M))
    for m in re.finditer(r"\b(?:sort|custom-call)\((%[\w.-]+)[^\n]*", text):
        if m.group(0).startswith("sort") or 'custom_call_target="TopK"' in m.group(0):
            widths.append(_last_dim(shapes[m.group(1)]))
    return widths


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_no_wide_sort_in_the_lowered_topk(platform):
    """K = 2048 at L = 8192: no sort is wider than 2 K (the running K + a piece of <= K keys), never L."""
    s, topk = 8192, 2048
    shapes = (jax.ShapeDtypeStruct((1, s, 4, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1, s, 128), jnp.bfloat16),
              jax.ShapeDtypeStruct((1, s, 4), jnp.float32), jax.ShapeDtypeStruct((1, s), jnp.int32))
    impl = "blocked" if platform == "cpu" else "pallas"
    fn = lambda q, k, w, sg: indexer_topk.indexer_topk_kernel(q, k, w, topk, sg, impl=impl)
    if platform == "cpu":
        lowered = jax.jit(fn).lower(*shapes)
        texts = [lowered.as_text(), lowered.compile().as_text()]
    else:
        texts = [_export(fn, platform, *shapes)]
    for text in texts:
        widths = _sort_widths(text)
        assert widths and max(widths) <= 2 * topk, widths


def test_remat_keeps_the_selected_indices():
    """Under `remat: full` the backward pass reuses the saved top-k indices: the gradient program
    runs the Pallas scoring kernel as often as the forward alone (once per chunk loop)."""
    from dsa_train.parallel.layers import POLICIES

    s, topk = 32, 4
    _, kv, q_idx, k_idx, w_idx, seg = _inputs(s, seed=5)
    q = jnp.asarray(np.random.default_rng(5).standard_normal((2, s, H, D), np.float32))
    backend = Backend("pallas_interpret")

    def layer(q, kv):
        indices = backend.indexer_topk(q_idx, k_idx, w_idx, topk, seg)
        out, _ = backend.sparse_mla_attention(q, kv, indices, 0.2, v_dim=16)
        return out.sum()

    def count(fn):
        return str(jax.make_jaxpr(fn)(q, kv)).count("indexer_score_tiles")

    forward = count(layer)
    assert forward >= 1
    for policy in ("full", "dots"):
        assert count(jax.grad(jax.checkpoint(layer, policy=POLICIES[policy]), argnums=(0, 1))) == forward
    # Without the name in the policy, the backward would select again (the test can fail).
    assert count(jax.grad(jax.checkpoint(layer), argnums=(0, 1))) > forward


_CONTEXT_PARALLEL_TOPK = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
import jax.numpy as jnp
import numpy as np
from dsa_train.config import MeshConfig
from dsa_train.kernels.backend import Backend
from dsa_train.parallel import activate, make_mesh, sequence_order
from dsa_train.parallel import context_parallel as cp

s, topk = 32, 5
rng = np.random.default_rng(0)
q = jnp.asarray(rng.standard_normal((2, s, 4, 16), np.float32))
k = jnp.asarray(rng.standard_normal((2, s, 16), np.float32))
w = jnp.asarray(rng.standard_normal((2, s, 4), np.float32))
seg = np.ones((2, s), np.int32); seg[:, 13:] = 2; seg[1, -6:] = 0
seg = jnp.asarray(seg)
backend = Backend(sys.argv[1])
want = np.asarray(jax.jit(lambda *a: backend.indexer_topk(*a, topk, seg))(q, k, w))
out = {}
for order in ("contiguous", "zigzag"):
    with activate(make_mesh(MeshConfig(data=1, context=4))):
        with cp.laid_out(order, s) as lay:
            ops = cp.sequence_ops(backend)
            got = jax.jit(lambda q, k, w, seg: ops.indexer_topk(q, k, w, topk, seg))(lay(q), lay(k), lay(w), lay(seg))
    got = np.asarray(got)
    if order == "zigzag":
        got = np.asarray(sequence_order.from_zigzag(jnp.asarray(got), 4))
    out[order] = bool(np.array_equal(got, want)) and type(ops).__name__ == "ContextParallelOps"
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("impl", ["pallas_interpret", pytest.param("blocked", marks=pytest.mark.slow)])
def test_context_parallel_topk_equals_one_device(impl):
    """mesh.context = 4, contiguous and zig-zag: each shard runs the same kernel on its queries
    (with their row positions) against the gathered keys; the indices equal one device's."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", _CONTEXT_PARALLEL_TOPK, impl], env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads(lines[-1][len("RESULT "):]) == {"contiguous": True, "zigzag": True}


def test_unknown_impl_is_a_clear_error():
    _, _, q_idx, k_idx, w_idx, seg = _inputs(8)
    with pytest.raises(ValueError, match="unknown indexer kernel impl"):
        indexer_topk.indexer_topk_kernel(q_idx, k_idx, w_idx, 4, seg, impl="fast")


# ---- dense warm-up KL -------------------------------------------------------------------------------

def _value_and_indexer_grads(loss_fn, q, kv, q_idx, k_idx, w_idx, seg):
    """Jitted value and gradients w.r.t. (q_idx, k_idx, w_idx) of loss_fn(q, kv, q_idx, k_idx, w_idx, seg)."""
    return jax.jit(jax.value_and_grad(loss_fn, argnums=(2, 3, 4)))(q, kv, q_idx, k_idx, w_idx, seg)


def _dense_reference(q, kv, q_idx, k_idx, w_idx, seg):
    f = lambda q_, kv_, a, b, c, sg: losses.indexer_kl_loss(q_, kv_, D ** -0.5, a, b, c, sg)
    return _value_and_indexer_grads(f, q, kv, q_idx, k_idx, w_idx, seg)


def _check_loss_and_grads(got, want, rtol=1e-5, atol=1e-6):
    (v, g), (rv, rg) = got, want
    np.testing.assert_allclose(v, rv, rtol=rtol, atol=atol)
    for name, a, b in zip(("q_idx", "k_idx", "w_idx"), g, rg):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)


def test_attention_lse_streaming_matches_dense():
    s = 21
    q, kv, *_, seg = _inputs(s)
    scores = jnp.einsum("bshd,btd->bsht", q, kv) * D ** -0.5
    mask = causal_document_mask(seg, seg)[:, :, None, :]
    want = jax.nn.logsumexp(jnp.where(mask, scores, -jnp.inf), axis=-1)
    got = jax.jit(indexer_kl.attention_lse_streaming, static_argnums=(2, 4, 5))(q, kv, D ** -0.5, seg, 8, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s,blocks,given_lse", [(21, (8, 4), False), (37, (16, 16), True), (9, (64, 256), False)])
def test_dense_kl_streaming_matches_reference(s, blocks, given_lse):
    q, kv, q_idx, k_idx, w_idx, seg = _inputs(s, seed=3)
    lse = jax.jit(indexer_kl.attention_lse_streaming, static_argnums=2)(q, kv, D ** -0.5, seg) if given_lse else None
    f = lambda q_, kv_, a, b, c, sg: indexer_kl.dense_indexer_kl_loss(
        q_, kv_, D ** -0.5, a, b, c, sg, lse, block_q=blocks[0], block_k=blocks[1])
    got = _value_and_indexer_grads(f, q, kv, q_idx, k_idx, w_idx, seg)
    _check_loss_and_grads(got, _dense_reference(q, kv, q_idx, k_idx, w_idx, seg))


@pytest.mark.parametrize("impl", ["pallas_interpret", "pallas_gpu_interpret", "pallas_tpu_interpret"])
def test_dense_kl_pallas_interpret_matches_reference(impl):
    s = 21
    q, kv, q_idx, k_idx, w_idx, seg = _inputs(s, seed=4)
    f = lambda q_, kv_, a, b, c, sg: Backend(impl).indexer_kl_loss(q_, kv_, D ** -0.5, a, b, c, sg)
    got = _value_and_indexer_grads(f, q, kv, q_idx, k_idx, w_idx, seg)
    _check_loss_and_grads(got, _dense_reference(q, kv, q_idx, k_idx, w_idx, seg))


def test_dense_kl_bf16_inputs_close_to_reference():
    s = 21
    q, kv, q_idx, k_idx, w_idx, seg = _inputs(s, seed=5, dtype=jnp.bfloat16)
    f = lambda q_, kv_, a, b, c, sg: Backend("blocked").indexer_kl_loss(q_, kv_, D ** -0.5, a, b, c, sg)
    v, g = _value_and_indexer_grads(f, q, kv, q_idx, k_idx, w_idx, seg)
    rv, rg = _dense_reference(q, kv, q_idx, k_idx, w_idx, seg)
    assert all(x.dtype == jnp.bfloat16 for x in g[:2])
    np.testing.assert_allclose(v, rv, rtol=1e-3)
    for a, b in zip(g, rg):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2, atol=2e-3)


def test_dense_kl_main_inputs_get_no_gradient():
    q, kv, q_idx, k_idx, w_idx, seg = _inputs(13, seed=6)
    f = lambda q_, kv_: Backend("streaming").indexer_kl_loss(q_, kv_, D ** -0.5, q_idx, k_idx, w_idx, seg)
    dq, dkv = jax.jit(jax.grad(f, argnums=(0, 1)))(q, kv)
    assert not np.any(dq) and not np.any(dkv)


def test_dense_kl_against_uniform_indexer():
    """An indexer with all scores equal is uniform over the candidates, so the loss must be
    KL(p || uniform) = log n_t - H(p_t), averaged over the valid queries."""
    s = 11
    q, kv, _, _, _, seg = _inputs(s, seed=7)
    loss = jax.jit(indexer_kl.dense_indexer_kl_loss, static_argnums=2)(
        q, kv, D ** -0.5, jnp.zeros((2, s, 1, DI)), jnp.zeros((2, s, DI)), jnp.ones((2, s, 1)), seg)
    target = losses.head_summed_attention_probs(q, kv, D ** -0.5, seg)
    n = causal_document_mask(seg, seg).sum(-1)
    entropy = -losses._xlogy(target).sum(-1)
    valid = seg != 0
    np.testing.assert_allclose(loss, ((jnp.log(n) - entropy) * valid).sum() / valid.sum(), rtol=1e-5)


def test_streaming_dense_kl_has_no_quadratic_buffer():
    """Compiled temp memory of the streaming loss (forward + backward) stays far below one fp32
    L x L matrix, while the reference needs H of them."""
    s, h = 1024, 2
    shapes = (jax.ShapeDtypeStruct((1, s, h, 32), jnp.float32), jax.ShapeDtypeStruct((1, s, 32), jnp.float32),
              jax.ShapeDtypeStruct((1, s, 2, 16), jnp.float32), jax.ShapeDtypeStruct((1, s, 16), jnp.float32),
              jax.ShapeDtypeStruct((1, s, 2), jnp.float32), jax.ShapeDtypeStruct((1, s), jnp.int32))

    def temp_bytes(impl):
        f = lambda q, kv, a, b, c, sg: Backend(impl).indexer_kl_loss(q, kv, 0.1, a, b, c, sg)
        compiled = jax.jit(jax.value_and_grad(f, argnums=(2, 3, 4))).lower(*shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    one_square = s * s * 4
    assert temp_bytes("reference") >= h * one_square
    assert temp_bytes("streaming") < one_square / 4


# ---- sparse KL --------------------------------------------------------------------------------------

@pytest.mark.parametrize("s,topk,block_q", [(21, 8, 4), (14, 32, 16)])
def test_sparse_kl_matches_reference(s, topk, block_q):
    q, kv, q_idx, k_idx, w_idx, seg = _inputs(s, seed=8)
    indices = _topk_reference(q_idx, k_idx, w_idx, topk, seg)
    _, lse = jax.jit(sparse_mla_attention_reference, static_argnums=(3, 4))(q, kv, indices, D ** -0.5, 16)
    def loss(impl, block=block_q):
        def f(q_, kv_, a, b, c, sg):
            if impl == "reference":
                return losses.sparse_indexer_kl_loss(q_, kv_, indices, lse, D ** -0.5, a, b, c, sg)
            if impl == "auto":
                return Backend.resolve("auto").sparse_indexer_kl_loss(q_, kv_, indices, lse, D ** -0.5, a, b, c, sg)
            return indexer_kl.sparse_indexer_kl_loss_streaming(q_, kv_, indices, lse, D ** -0.5, a, b, c, sg,
                                                               block_q=block)
        return _value_and_indexer_grads(f, q, kv, q_idx, k_idx, w_idx, seg)

    want = loss("reference")
    _check_loss_and_grads(loss("streaming"), want)
    np.testing.assert_allclose(loss("auto")[0], want[0], rtol=1e-5)


# ---- Pallas kernels lower for both device platforms -------------------------------------------------

TRITON_CALL = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def _export(fn, platform, *shapes):
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=[TRITON_CALL])(*shapes)
    return exported.mlir_module()


def _kernel_call_target(platform):
    return "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_topk_kernel_lowers(platform):
    s = 512
    shapes = (jax.ShapeDtypeStruct((1, s, 4, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1, s, 128), jnp.bfloat16),
              jax.ShapeDtypeStruct((1, s, 4), jnp.float32), jax.ShapeDtypeStruct((1, s), jnp.int32))
    text = _export(lambda q, k, w, sg: indexer_topk.indexer_topk_kernel(q, k, w, 64, sg, impl="pallas"),
                   platform, *shapes)
    assert _kernel_call_target(platform) in text and "indexer_score_tiles" in text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("given_lse", [False, True])
def test_dense_kl_kernel_lowers(platform, grad, given_lse):
    s, h, d = 512, 4, 576  # MLA's 576 = 512 + 64 pieces on Triton
    shapes = (jax.ShapeDtypeStruct((1, s, h, d), jnp.bfloat16), jax.ShapeDtypeStruct((1, s, d), jnp.bfloat16),
              jax.ShapeDtypeStruct((1, s, 4, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1, s, 128), jnp.bfloat16),
              jax.ShapeDtypeStruct((1, s, 4), jnp.float32), jax.ShapeDtypeStruct((1, s), jnp.int32),
              jax.ShapeDtypeStruct((1, s, h), jnp.float32))
    f = lambda q, kv, a, b, c, sg, lse: Backend("pallas").indexer_kl_loss(q, kv, 0.07, a, b, c, sg,
                                                                  lse=lse if given_lse else None)
    kernels = ["dense_indexer_kl_forward"]  # without an lse it is streamed in plain JAX first
    if grad:  # the backward is Pallas too: the softmax part of the gradient (indexer tiles only)
        f = jax.grad(f, argnums=(2, 3, 4))
        kernels += ["dense_indexer_kl_backward"]
    text = _export(f, platform, *shapes)
    assert text.count(f"custom_call @{_kernel_call_target(platform)}") == len(kernels)
    assert all(name in text for name in kernels)
