"""Loss oracles: the JAX losses against a direct numpy evaluation of the formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_train.ops import losses
from dsa_train.ops.attention import sparse_mla_attention_reference
from dsa_train.ops.indexer import indexer_topk_reference


def _inputs(seed=0, b=2, s=10, h=3, d=8, hi=2, di=6):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, s, h, d)).astype(np.float32)
    kv = rng.normal(size=(b, s, d)).astype(np.float32)
    qi = rng.normal(size=(b, s, hi, di)).astype(np.float32)
    ki = rng.normal(size=(b, s, di)).astype(np.float32)
    wi = rng.normal(size=(b, s, hi)).astype(np.float32)  # weights may be negative
    # row 0: two packed documents then padding; row 1: one document
    seg = np.array([[1] * 4 + [2] * 4 + [0] * (s - 8), [1] * s], np.int32)
    return q, kv, qi, ki, wi, seg


def _softmax(x):
    x = x - x.max()
    e = np.exp(x)
    return e / e.sum()


def _candidates(seg, b, t):
    return [s for s in range(t + 1) if seg[b, s] == seg[b, t]]


def _index_score(qi, ki, wi, b, t, s):
    return float(np.sum(wi[b, t] * np.maximum(qi[b, t] @ ki[b, s] * qi.shape[-1] ** -0.5, 0)))


def _kl(p, logits):
    q = _softmax(np.asarray(logits, np.float64))
    p = np.asarray(p, np.float64)
    m = p > 0
    return float(np.sum(p[m] * (np.log(p[m]) - np.log(q[m]))))


def numpy_dense_kl(q, kv, qi, ki, wi, seg, scale):
    total, n = 0.0, 0
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            if seg[b, t] == 0:
                continue
            cand = _candidates(seg, b, t)
            p = np.mean([_softmax(np.array([q[b, t, h] @ kv[b, s] * scale for s in cand]))
                         for h in range(q.shape[2])], axis=0)
            logits = [_index_score(qi, ki, wi, b, t, s) for s in cand]
            total += _kl(p, logits)
            n += 1
    return total / n


def numpy_sparse_kl(q, kv, qi, ki, wi, seg, scale, indices):
    total, n = 0.0, 0
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            if seg[b, t] == 0:
                continue
            sel = [int(s) for s in indices[b, t] if s >= 0]
            p = np.mean([_softmax(np.array([q[b, t, h] @ kv[b, s] * scale for s in sel]))
                         for h in range(q.shape[2])], axis=0)
            total += _kl(p, [_index_score(qi, ki, wi, b, t, s) for s in sel])
            n += 1
    return total / n


def test_dense_indexer_kl_matches_numpy():
    q, kv, qi, ki, wi, seg = _inputs()
    got = losses.indexer_kl_loss(q, kv, 0.3, qi, ki, wi, seg)
    np.testing.assert_allclose(float(got), numpy_dense_kl(q, kv, qi, ki, wi, seg, 0.3), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("topk", [3, 20])
def test_sparse_indexer_kl_matches_numpy(topk):
    q, kv, qi, ki, wi, seg = _inputs(seed=1)
    indices = indexer_topk_reference(qi, ki, wi, topk, seg)
    _, lse = sparse_mla_attention_reference(q, kv, indices, 0.3, v_dim=4)
    got = losses.sparse_indexer_kl_loss(q, kv, indices, lse, 0.3, qi, ki, wi, seg)
    want = numpy_sparse_kl(q, kv, qi, ki, wi, seg, 0.3, np.asarray(indices))
    np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-6)


def test_topk_selects_causal_same_document_candidates():
    q, kv, qi, ki, wi, seg = _inputs(seed=2)
    indices = np.asarray(indexer_topk_reference(qi, ki, wi, 3, seg))
    for b in range(2):
        for t in range(10):
            cand = _candidates(seg, b, t)
            sel = sorted(int(s) for s in indices[b, t] if s >= 0)
            assert len(sel) == min(3, len(cand))  # fewer than k candidates: all of them
            assert set(sel) <= set(cand)
            scores = {s: _index_score(qi, ki, wi, b, t, s) for s in cand}
            best = sorted(cand, key=lambda s: -scores[s])[: len(sel)]
            assert set(sel) == set(best)


def test_kl_gradient_reaches_only_indexer_inputs():
    q, kv, qi, ki, wi, seg = _inputs(seed=3)
    grads = jax.grad(lambda *a: losses.indexer_kl_loss(a[0], a[1], 0.3, a[2], a[3], a[4], seg),
                     argnums=(0, 1, 2, 3, 4))(q, kv, qi, ki, wi)
    assert float(jnp.abs(grads[0]).max()) == 0.0 and float(jnp.abs(grads[1]).max()) == 0.0
    assert all(float(jnp.abs(g).max()) > 0 for g in grads[2:])


def test_lm_cross_entropy_skips_boundaries_and_padding():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(1, 6, 5)).astype(np.float32)
    tokens = np.array([[1, 2, 3, 4, 0, 0]], np.int32)
    seg = np.array([[1, 1, 2, 2, 0, 0]], np.int32)
    total, n = losses.lm_cross_entropy(logits, tokens, seg)
    # targets: t=0 -> tokens[1] (same doc), t=2 -> tokens[3]; t=1 crosses a boundary, t=3 into padding
    want = sum(-np.log(_softmax(logits[0, t])[tokens[0, t + 1]]) for t in (0, 2))
    assert float(n) == 2
    np.testing.assert_allclose(float(total), want, rtol=1e-5)


def test_sequence_balance_loss_matches_formula():
    rng = np.random.default_rng(5)
    b, s, e, k = 2, 7, 4, 2
    scores = rng.uniform(size=(b, s, e)).astype(np.float32)
    idx = np.argsort(-scores, -1)[..., :k].astype(np.int32)
    valid = np.ones((b, s), np.float32)
    got = losses.moe_sequence_balance_loss(scores, idx, valid, 1e-4)
    want = 0.0
    for i in range(b):
        f = np.array([(idx[i] == j).sum() for j in range(e)]) * e / (k * s)
        p = (scores[i] / scores[i].sum(-1, keepdims=True)).mean(0)
        want += 1e-4 * (f * p).sum()
    np.testing.assert_allclose(float(got), want / b, rtol=1e-5)
