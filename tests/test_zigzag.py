"""Zig-zag (load-balanced) context-parallel layout: the permutation and its inverse, masks by row
position, the config key, the balance of causal work per shard, and loss / gradients / diagnostics
on an 8-device mesh (context 4 x fsdp 2) equal to one device in every stage."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from dsa_train.config import ConfigError, load_config
from dsa_train.ops.masks import causal_document_mask, causal_document_mask_at
from dsa_train.parallel import context_parallel
from dsa_train.parallel import sequence_order as so

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("seq_len, shards", [(16, 4), (24, 2), (8, 1), (64, 8)])
def test_permutation_and_inverse(seq_len, shards):
    perm = so.zigzag_permutation(seq_len, shards)
    assert sorted(perm.tolist()) == list(range(seq_len))
    chunk = seq_len // (2 * shards)
    per_shard = perm.reshape(shards, 2 * chunk)
    for i in range(shards):  # shard i holds chunks i and 2n-1-i, in that order
        want = np.concatenate([np.arange(i * chunk, (i + 1) * chunk),
                               np.arange((2 * shards - 1 - i) * chunk, (2 * shards - i) * chunk)])
        np.testing.assert_array_equal(per_shard[i], want)
        np.testing.assert_array_equal(np.asarray(so.local_positions("zigzag", i, shards, 2 * chunk)), want)
        np.testing.assert_array_equal(np.asarray(so.local_positions("contiguous", i, shards, 2 * chunk)),
                                      np.arange(i * 2 * chunk, (i + 1) * 2 * chunk))
    np.testing.assert_array_equal(perm[so.inverse_permutation(perm)], np.arange(seq_len))
    x = np.random.default_rng(0).normal(size=(2, seq_len, 3)).astype(np.float32)
    laid = np.asarray(so.to_zigzag(x, shards))
    np.testing.assert_array_equal(laid, x[:, perm])  # slot j holds original position perm[j]
    np.testing.assert_array_equal(np.asarray(so.from_zigzag(laid, shards)), x)
    np.testing.assert_array_equal(so.slot_positions("zigzag", seq_len, shards), perm)
    np.testing.assert_array_equal(so.slot_positions("contiguous", seq_len, shards), np.arange(seq_len))


def test_indivisible_length_is_one_clear_error():
    with pytest.raises(ValueError, match="mesh.context_order"):
        so.zigzag_permutation(12, 4)


def test_mask_by_row_position_matches_the_row_order_mask():
    seq_len, shards = 16, 4
    perm = so.zigzag_permutation(seq_len, shards)
    seg = np.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * 16], np.int32)
    full = np.asarray(causal_document_mask(seg, seg))
    laid = np.asarray(causal_document_mask_at(seg[:, perm], seg, perm, np.arange(seq_len)))
    np.testing.assert_array_equal(laid, full[:, perm])


def test_causal_work_per_shard():
    # zig-zag: every shard owns c (S + 1) causal pairs; contiguous: the last ~(2n-1)/n of the mean.
    seq_len, shards = 4096, 4
    chunk = seq_len // (2 * shards)
    assert (so.causal_pairs_per_shard("zigzag", seq_len, shards) == chunk * (seq_len + 1)).all()
    assert so.imbalance("zigzag", seq_len, shards) == 1.0
    assert so.imbalance("contiguous", seq_len, shards) == pytest.approx((2 * shards - 1) / shards, rel=1e-3)
    # Top-k work (at most k keys per query) is nearly balanced either way once S >> k.
    assert so.imbalance("contiguous", seq_len, shards, topk=64) < 1.03


def test_laid_out_is_identity_without_context_parallelism():
    x = jnp.arange(16).reshape(1, 16)
    with context_parallel.laid_out("zigzag", 16) as lay_out:
        assert lay_out(x) is x
    np.testing.assert_array_equal(context_parallel.slot_positions(16), np.arange(16))


@pytest.mark.parametrize("override, message", [
    ("mesh.context_order=striped", "mesh.context_order"),
    ("mesh.context=4", "mesh.context_order"),  # train.seq_len 36 is not a multiple of 8
])
def test_bad_context_order_is_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs/tiny.yaml", ["train.seq_len=36", "mesh.context_order=zigzag", override])


# ---- 8 simulated devices (subprocess, tests/parallel_checks.py) -----------------------------------


def _check_zigzag_stage(stage: str) -> None:
    from test_parallel import assert_matches_single_device, run_checks

    results = run_checks({"devices": 8, "stage": stage, "overrides": ["mesh.context_order=zigzag"],
                          "meshes": [{"context": 4, "fsdp": 2}]})
    assert_matches_single_device(results)
    # Diagnostics sample rows by row position: the same rows, the same numbers.
    for name, err in results[0]["metric_err"].items():
        assert err < 1e-4, (name, err)


def test_zigzag_sparse_stage_matches_one_device():
    _check_zigzag_stage("sparse")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dense", "warmup"])
def test_zigzag_dense_mode_matches_one_device(stage):
    _check_zigzag_stage(stage)


def test_plan_charges_the_slowest_context_shard():
    from dsa_train.parallel import plan

    def estimate(order):
        cfg = load_config(REPO / "configs/tiny.yaml", ["mesh.data=1", "mesh.context=4", "model.index_topk=64",
                                                       f"mesh.context_order={order}"])
        mesh = plan._abstract_or_real_mesh(cfg.mesh, 4, False)
        return plan.plan_stage(cfg, mesh, plan.resolve_rules(), plan.DEVICES["h100"], "warmup", 4, 4096)["time"]

    contiguous, zigzag = estimate("contiguous"), estimate("zigzag")
    assert contiguous["context_skew"]["dense"] == pytest.approx(1.75, rel=1e-3)
    assert zigzag["context_skew"]["dense"] == 1.0
    assert zigzag["compute_s"] < contiguous["compute_s"]
