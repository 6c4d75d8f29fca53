"""Training-time indexer metrics (ops/diagnostics.py): the sampled rows are the rows where selection
matters (more than k same-document candidates), also when documents are packed into one row, and
their captured mass is the one `dsa-train eval` reports for those rows."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dsa_train.ops.diagnostics import indexer_quality, sample_rows
from dsa_train.ops.row_stats import layer_row_stats

B, S, H, D, HI, DI, K = 1, 64, 2, 16, 2, 8, 8


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in
              ((B, S, H, D), (B, S, D), (B, S, HI, DI), (B, S, DI), (B, S, HI))]
    return [jnp.asarray(a) for a in arrays]


def test_sampled_rows_skip_the_first_k_tokens_of_every_document():
    seg = jnp.asarray(np.array([[1] * 40 + [2] * 24]))
    rows, valid = sample_rows(seg, K, S)
    picked = np.asarray(rows)[np.asarray(valid)]
    assert set(picked) == set(range(K, 40)) | set(range(40 + K, 64))
    rows, valid = sample_rows(seg, K, 5)  # fewer rows than eligible ones: spread over them, distinct
    assert np.asarray(valid).all() and len(set(np.asarray(rows)[0])) == 5
    assert all(K <= r < 40 or r >= 40 + K for r in np.asarray(rows)[0])
    rows, valid = sample_rows(jnp.asarray(np.array([[1] * 6 + [2] * 6 + [0] * 52])), K, 4)
    assert not np.asarray(valid).any()  # no document longer than k: nothing to measure


def test_packed_captured_mass_counts_only_rows_with_more_than_k_candidates():
    q, kv, qi, ki, wi = _inputs()
    seg = jnp.asarray(np.array([[1] * 40 + [2] * 24], np.int32))
    got = indexer_quality(q, kv, D ** -0.5, qi, ki, wi, seg, K, rows=S)
    stats = layer_row_stats(q, kv, D ** -0.5, qi, ki, wi, seg, jnp.asarray(np.r_[np.arange(40), np.arange(24)])[None],
                            K, block_q=16)
    mass, candidates = np.asarray(stats["captured_mass"][0]), np.asarray(stats["candidates"][0])
    selective = candidates > K
    assert selective.sum() == (40 - K) + (24 - K)
    np.testing.assert_allclose(float(got["captured_mass"]), mass[selective].mean(), rtol=1e-5)
    # Counting the rows just after the second document's start (<= k candidates, mass 1) would
    # report a higher figure: the measured one must not include them.
    assert mass[~selective].min() > 1 - 1e-6 and mass[selective].mean() < mass[K:].mean() - 0.01


def test_packed_captured_mass_of_a_uniform_target_is_k_over_candidates():
    """Two documents of 40 + 24 tokens, k = 8, and zero main queries: each row's dense target is
    uniform over its c causal same-document keys, so any k of them capture k / c. The logged figure
    is the mean of k / c over the 48 rows with c > k (0.4365); counting by position in the packed
    row instead would add the second document's first 8 rows at 1.0 (0.5170)."""
    _, kv, qi, ki, wi = _inputs(1)
    q = jnp.zeros((B, S, H, D), jnp.float32)
    seg = jnp.asarray(np.array([[1] * 40 + [2] * 24], np.int32))
    got = float(indexer_quality(q, kv, D ** -0.5, qi, ki, wi, seg, K, rows=S)["captured_mass"])
    candidates = np.r_[np.arange(1, 41), np.arange(1, 25)].astype(np.float64)
    selective = candidates > K
    want = (K / candidates[selective]).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    by_position = np.minimum(K / candidates[K:], 1.0).mean()
    assert round(want, 4) == 0.4365 and round(by_position, 4) == 0.517
