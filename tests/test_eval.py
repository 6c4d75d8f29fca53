"""dsa_train.eval: each diagnostic against a direct numpy computation, the accumulators, the needle
sequences, and the layer-by-layer forward against the model's own (tiny shapes, CPU)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_train.config import load_model_config
from dsa_train.data.synthetic import RetrievalTask, answers
from dsa_train.eval.aggregate import IndexerAccumulator, QualityAccumulator, bucket_labels
from dsa_train.ops.row_stats import layer_row_stats
from dsa_train.eval.forward import DiagnosticOptions, LayerRunner
from dsa_train.eval.needle import score_case, summarize, synthetic_case, token_case
from dsa_train.model import ForwardMode, create_model
from dsa_train.ops.masks import document_positions

B, S, H, D, C, HI, DI = 2, 22, 3, 12, 8, 4, 8  # C: value (latent) dims = kv[..., :C]
V, DM = 5, 10  # per-head value dim after W_UV, model dim after o_proj
SCALE = 0.3


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, S, H, D)).astype(np.float32)
    kv = rng.normal(size=(B, S, D)).astype(np.float32)
    # Positive indexer q/k: every ReLU is active, so indexer scores have no ties at 0 and the top-k
    # set is unambiguous.
    qi = np.abs(rng.normal(size=(B, S, HI, DI))).astype(np.float32)
    ki = np.abs(rng.normal(size=(B, S, DI))).astype(np.float32)
    wi = rng.normal(size=(B, S, HI)).astype(np.float32)
    seg = np.array([[1] * S, [1] * 9 + [2] * 9 + [0] * 4], np.int32)  # packed row with padding
    w_uv = rng.normal(size=(H, V, C)).astype(np.float32)
    w_o = rng.normal(size=(DM, H * V)).astype(np.float32)
    return q, kv, qi, ki, wi, seg, w_uv, w_o


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_row_stats(q, kv, qi, ki, wi, seg, topk, recent, sink, w_uv, w_o):
    """The definitions of diagnostics.py, one query row at a time, in float64."""
    q, kv, qi, ki, wi = (x.astype(np.float64) for x in (q, kv, qi, ki, wi))
    pos = np.asarray(document_positions(jnp.asarray(seg)))
    out = {k: np.zeros((B, S)) for k in ("captured_mass", "k50", "k90", "k99", "kl", "kl_uniform", "recent_share",
                                         "sink_share", "candidates", "out_err2", "out_norm2",
                                         "top_key", "top_share")}
    for b in range(B):
        for t in range(S):
            cand = np.array([s for s in range(S) if seg[b, s] == seg[b, t] and s <= t])
            probs_h = _softmax(np.einsum("hd,nd->hn", q[b, t], kv[b, cand]) * SCALE)  # [H, n]
            p = probs_h.mean(0)
            index = (wi[b, t][:, None] * np.maximum(qi[b, t] @ ki[b, cand].T * DI ** -0.5, 0)).sum(0)
            order = np.argsort(-index)[:topk]
            sel = cand[order]
            out["candidates"][b, t] = len(cand)
            out["captured_mass"][b, t] = p[order].sum()
            cum = np.cumsum(np.sort(p)[::-1])
            for name, level in (("k50", 0.5), ("k90", 0.9), ("k99", 0.99)):
                out[name][b, t] = min(int(np.searchsorted(cum, level)) + 1, len(cand))
            log_q = index - index.max() - np.log(np.exp(index - index.max()).sum())
            plogp = np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0))
            out["kl"][b, t] = plogp - np.sum(p * log_q)
            out["kl_uniform"][b, t] = plogp + np.log(len(cand))
            out["top_key"][b, t], out["top_share"][b, t] = cand[np.argmax(p)], p.max()
            out["recent_share"][b, t] = np.mean(t - sel < recent)
            out["sink_share"][b, t] = np.mean(pos[b, sel] < sink)
            dense = probs_h @ kv[b, cand, :C]  # [H, C]
            sparse_h = _softmax(np.einsum("hd,nd->hn", q[b, t], kv[b, sel]) * SCALE)
            sparse = sparse_h @ kv[b, sel, :C]
            project = lambda lat: w_o @ np.einsum("hc,hvc->hv", lat, w_uv).reshape(-1)  # noqa: E731
            out["out_err2"][b, t] = np.sum((project(sparse) - project(dense)) ** 2)
            out["out_norm2"][b, t] = np.sum(project(dense) ** 2)
    return out, pos


def numpy_sparse_latent(q, kv, qi, ki, wi, seg, topk):
    lat = np.zeros((B, S, H, C), np.float32)
    for b in range(B):
        for t in range(S):
            cand = np.array([s for s in range(S) if seg[b, s] == seg[b, t] and s <= t])
            index = (wi[b, t][:, None] * np.maximum(qi[b, t] @ ki[b, cand].T * DI ** -0.5, 0)).sum(0)
            sel = cand[np.argsort(-index)[:topk]]
            probs = _softmax(np.einsum("hd,nd->hn", q[b, t], kv[b, sel]) * SCALE)
            lat[b, t] = probs @ kv[b, sel, :C]
    return lat


@pytest.mark.parametrize("topk,block_q", [(5, 8), (3, 22)])
def test_row_stats_match_numpy(topk, block_q):
    q, kv, qi, ki, wi, seg, w_uv, w_o = _inputs()
    ref, pos = numpy_row_stats(q, kv, qi, ki, wi, seg, topk, recent=4, sink=2, w_uv=w_uv, w_o=w_o)
    latent = numpy_sparse_latent(q, kv, qi, ki, wi, seg, topk)
    got = layer_row_stats(q, kv, SCALE, qi, ki, wi, seg, pos, topk, recent_window=4, sink_tokens=2,
                          block_q=block_q, sparse_latent=latent, w_uv=w_uv, w_o=w_o)
    got = jax.device_get(got)
    valid = seg != 0
    np.testing.assert_array_equal(got["valid"], valid.astype(np.float32))
    for name in ("candidates", "k50", "k90", "k99", "recent_share", "sink_share", "top_key"):
        np.testing.assert_allclose(got[name][valid], ref[name][valid], rtol=0, atol=1e-6, err_msg=name)
    for name in ("captured_mass", "kl", "kl_uniform", "top_share"):
        np.testing.assert_allclose(got[name][valid], ref[name][valid], rtol=1e-4, atol=1e-5, err_msg=name)
    for name in ("out_err2", "out_norm2"):
        np.testing.assert_allclose(got[name][valid], ref[name][valid], rtol=1e-3, atol=1e-4, err_msg=name)
    # Selection really happened somewhere, and rows with few candidates keep everything.
    assert (ref["captured_mass"][valid] < 0.999).any()
    few = valid & (ref["candidates"] <= topk)
    np.testing.assert_allclose(got["captured_mass"][few], 1.0, atol=1e-6)


def test_topk_at_least_length_captures_all_mass_and_sparse_equals_dense():
    q, kv, qi, ki, wi, seg, w_uv, w_o = _inputs(seed=3)
    pos = np.asarray(document_positions(jnp.asarray(seg)))
    dense_latent = numpy_sparse_latent(q, kv, qi, ki, wi, seg, topk=S)  # selecting all = dense
    got = jax.device_get(layer_row_stats(q, kv, SCALE, qi, ki, wi, seg, pos, S, block_q=8,
                                         sparse_latent=dense_latent, w_uv=w_uv, w_o=w_o))
    valid = seg != 0
    np.testing.assert_allclose(got["captured_mass"][valid], 1.0, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got["recent_share"][valid], 1.0)  # window 128 > S
    assert got["out_err2"][valid].max() <= 1e-9 * got["out_norm2"][valid].max()


def _assert_close_trees(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_close_trees(a[k], b[k])
    else:
        assert a == pytest.approx(b, rel=1e-9)


def test_indexer_accumulator_matches_numpy():
    rng = np.random.default_rng(1)
    shape = (3, 40)
    positions = np.tile(np.arange(40) * 50, (3, 1))  # 0 .. 1950: buckets [0, 1000), [1000, 1500), 1500+
    stats = {"valid": (rng.random(shape) > 0.1).astype(np.float32),
             "candidates": rng.integers(1, 30, shape).astype(np.float32),
             "captured_mass": rng.random(shape).astype(np.float32)}
    for name in ("k50", "k90", "k99", "kl", "kl_uniform", "recent_share", "sink_share", "out_err2", "out_norm2"):
        stats[name] = (rng.random(shape) + 0.1).astype(np.float32)
    edges = (1000, 1500)
    acc = IndexerAccumulator(2, topk=10, edges=edges, rows="selective")
    acc.add(1, stats, positions)
    half = {k: v[:1] for k, v in stats.items()}  # the same rows in two calls add up
    acc.add(0, half, positions[:1])
    acc.add(0, {k: v[1:] for k, v in stats.items()}, positions[1:])
    summary = acc.summary()
    _assert_close_trees({**summary["layers"][0], "layer": 1}, summary["layers"][1])
    layer = summary["layers"][0]
    chosen = (stats["valid"] > 0) & (stats["candidates"] > 10)
    bucket = np.digitize(positions, edges)
    for label, sel in [("all", chosen)] + [(bucket_labels(edges)[i], chosen & (bucket == i)) for i in range(3)]:
        entry = layer if label == "all" else layer["by_position"][label]
        mass = stats["captured_mass"][sel].astype(np.float64)
        assert entry["rows"] == sel.sum()
        assert entry["captured_mass"] == pytest.approx(mass.mean(), rel=1e-6)
        assert entry["captured_mass_min"] == pytest.approx(mass.min(), rel=1e-6)
        exact_p10 = np.quantile(mass, 0.1, method="inverted_cdf")
        assert abs(entry["captured_mass_p10"] - exact_p10) <= 0.5 / acc.bins + 1e-7
        assert entry["k90"] == pytest.approx(stats["k90"][sel].mean(), rel=1e-6)
        assert entry["kl_captured"] == pytest.approx(1 - stats["kl"][sel].sum() / stats["kl_uniform"][sel].sum(),
                                                     rel=1e-5)
        assert entry["attn_out_rel_l2"] == pytest.approx(
            math.sqrt(stats["out_err2"][sel].sum() / stats["out_norm2"][sel].sum()), rel=1e-5)
    assert bucket_labels((1024, 8192, 32768)) == ["0-1K", "1K-8K", "8K-32K", "32K+"]
    # "all" rows count every valid row; a percentile of identical values is exact.
    acc_all = IndexerAccumulator(1, topk=10, edges=(), rows="all")
    acc_all.add(0, {**stats, "captured_mass": np.ones(shape, np.float32)}, positions)
    entry = acc_all.summary()["layers"][0]
    assert entry["rows"] == (stats["valid"] > 0).sum()
    assert entry["captured_mass"] == entry["captured_mass_p10"] == entry["captured_mass_min"] == 1.0


def test_quality_accumulator():
    rng = np.random.default_rng(2)
    nll, correct = rng.random((2, 10)), (rng.random((2, 10)) > 0.5).astype(np.float32)
    tw = np.ones((2, 10))
    tw[:, -1] = 0
    lw = np.zeros((2, 10))
    lw[:, [3, 7]] = 1
    positions = np.tile(np.arange(10), (2, 1))
    acc = QualityAccumulator(edges=(5,))
    acc.add("dense", nll, correct, tw, lw, positions)
    s = acc.summary()["dense"]
    assert s["lm_loss"] == pytest.approx(nll[:, [3, 7]].mean())
    assert s["lm_accuracy"] == pytest.approx(correct[:, [3, 7]].mean())
    assert s["token_loss"] == pytest.approx(nll[:, :-1].mean())
    assert s["lm_perplexity"] == pytest.approx(math.exp(nll[:, [3, 7]].mean()))
    assert s["by_position"]["5+"]["lm_loss"] == pytest.approx(nll[:, 7].mean())


def test_needle_sequences():
    task = RetrievalTask(vocab_size=64, seq_len=40, num_pairs=3, num_queries=1)
    for depth in (0.0, 0.5, 1.0):
        case = synthetic_case(task, 40, depth, trials=3, seed=0)
        assert case.tokens.shape == (3, 40)
        for row in case.tokens:
            [(at, value)] = answers(row, np.ones(40, np.int32))  # the reference solver agrees
            assert at == case.answer_positions[0] and row[at + 1] == value
            key_cell = int(np.flatnonzero(row[:at - 1] == row[at])[0])
            if depth == 0.0:
                assert key_cell == 1  # right after BOS
            if depth == 1.0:
                assert key_cell == 40 - 5 - 1  # the pair ends where the context ends
    # A model trained on structured filler is tested on structured filler (its own distribution).
    structured = dataclasses.replace(task, filler="structured")
    row = synthetic_case(structured, 40, 0.5, trials=1, seed=0).tokens[0]
    filler = np.flatnonzero(row >= structured.filler_range[0])
    rule = filler[(filler >= 2) & np.isin(filler - 2, filler)]
    lo, hi = structured.filler_range
    assert len(rule) > 20 and np.all(row[rule] == lo + (row[rule - 2] - lo + 1) % (hi - lo))
    hay = np.arange(100, 200, dtype=np.int32)
    case = token_case(hay, 48, 0.5, trials=2, seed=0, span=4)
    row = case.tokens[0]
    key, value = row[-8:-4], row[-4:]
    middle = (48 - 16) // 2
    np.testing.assert_array_equal(row[middle:middle + 8], np.concatenate([key, value]))
    np.testing.assert_array_equal(case.answer_positions, np.arange(48 - 5, 48 - 1))
    nll = np.zeros((2, 48))
    correct = np.ones((2, 48))
    nll[:, case.answer_positions] = 0.5
    correct[1, case.answer_positions[2]] = 0
    loglik, ok = score_case(nll, correct, case)
    np.testing.assert_allclose(loglik, -2.0)
    assert list(ok) == [True, False]
    summary = summarize([case], {(48, 0.5): (loglik, ok)})
    assert summary["correct"] == 1 and summary["needles"] == 2 and summary["accuracy"] == [[0.5]]


def test_layer_runner_matches_the_model():
    # Dense FFNs only (the CLI tests run the MoE layers): this test compares against the eager model.
    config = dataclasses.replace(load_model_config("configs/tiny.yaml"), compute_dtype="float32", index_topk=6,
                                 n_routed_experts=0)
    model = create_model(config, seed=1)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16)).astype(np.int32)
    seg = np.array([[1] * 16, [1] * 7 + [2] * 9], np.int32)
    runner = LayerRunner(model, DiagnosticOptions(block_q=8, head_chunk=5))
    targets = np.concatenate([tokens[:, 1:], tokens[:, :1]], 1)
    seen = []
    for mode in ("dense", "sparse"):
        hook = (lambda i, stats: seen.append((i, jax.device_get(stats)))) if mode == "dense" else None
        nll, correct = jax.device_get(runner.forward(tokens, seg, attention=mode, on_layer_stats=hook))
        logits = np.asarray(model(jnp.asarray(tokens), jnp.asarray(seg), mode=ForwardMode(mode)).logits)
        log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        ref = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
        np.testing.assert_allclose(nll[:, :-1], ref[:, :-1], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(correct[:, :-1], (logits.argmax(-1) == targets)[:, :-1])
    assert [i for i, _ in seen] == [0, 1]
    stats = seen[0][1]
    assert stats["captured_mass"].shape == (2, 16)
    assert np.all(stats["captured_mass"][stats["candidates"] <= 6] > 1 - 1e-6)
    assert np.all(stats["out_err2"][stats["candidates"] <= 6] <= 1e-10 * stats["out_norm2"].max())
    assert np.any(stats["out_err2"] > 0)
