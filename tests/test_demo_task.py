"""The demo's fused-pair retrieval task, its needle rows and the local-window control's top-k."""

import numpy as np
import pytest

from dsa_train.config import DataConfig
from dsa_train.data import DataError, check_batch, make_train_iterator
from dsa_train.data.synthetic import FusedPairTask, fused_answers
from dsa_train.eval.needle import fused_case


def _batch(seed=0, **kw):
    data = DataConfig(synthetic_task="fused", num_pairs=12, num_queries=8, **kw)
    return next(make_train_iterator(data, batch_size=3, seq_len=96, vocab_size=256, seed=seed))


def test_fused_rows_follow_the_contract_and_answers_are_correct():
    batch = _batch()
    check_batch(batch, 3, 96)
    task = FusedPairTask(vocab_size=256, seq_len=96, num_pairs=12, num_queries=8)
    for row in range(3):
        tokens, weights = batch["tokens"][row], batch["loss_weights"][row]
        found = fused_answers(task, tokens)
        assert [t for t, _ in found] == list(np.flatnonzero(weights))  # loss only on the answers
        assert len(found) == 8
        assert all(tokens[t + 1] == answer for t, answer in found)
        # Pair, query and value ids never overlap with the filler.
        lo, _ = task.filler_range
        context = tokens[1:1 + task.context_len]
        assert (context >= lo).sum() == task.context_len - 12
    assert not np.array_equal(_batch(seed=1)["tokens"], batch["tokens"])


def test_fused_values_are_independent_of_keys():
    # The answer can't be guessed from the key: each key's value is uniform over the values.
    task = FusedPairTask(vocab_size=256, seq_len=96, num_pairs=12, num_queries=8)
    rng = np.random.default_rng(0)
    values = []
    for _ in range(400):
        tokens = task.make_document(rng)[0]
        values += [answer - int(task.value_token(0)) for t, answer in fused_answers(task, tokens)
                   if tokens[t] == task.query_token(0)]
    counts = np.bincount(values, minlength=task.num_values)
    assert counts.min() > 0.5 * counts.mean()


def test_fused_task_rejects_what_cannot_fit():
    with pytest.raises(DataError, match="vocab_size 64 is too small"):
        FusedPairTask(vocab_size=64, seq_len=96, num_pairs=12, num_queries=8).check()
    with pytest.raises(DataError, match="too short"):
        FusedPairTask(vocab_size=256, seq_len=25, num_pairs=12, num_queries=8).check()


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_fused_needle_rows_put_the_asked_pair_at_the_depth(depth):
    task = FusedPairTask(vocab_size=256, seq_len=96, num_pairs=12, num_queries=8)
    case = fused_case(task, depth, trials=5, seed=1)
    (answer_at,) = case.answer_positions
    cell = 1 + int(round(depth * (task.context_len - 1)))
    for tokens in case.tokens:
        found = dict(fused_answers(task, tokens))
        key = int(tokens[answer_at]) - int(task.query_token(0))
        assert (int(tokens[cell]) - 4) // task.num_values == key  # the needle pair holds the asked key
        assert tokens[answer_at + 1] == found[answer_at]


def test_local_window_indices_are_sinks_and_most_recent_keys():
    import jax.numpy as jnp

    from dsa_train.ops.local_window import local_window_indices

    seg = jnp.array([[1] * 10 + [2] * 6])
    idx = np.asarray(local_window_indices(seg, topk=5, sink_tokens=2))[0]
    as_sets = [set(int(i) for i in row if i >= 0) for row in idx]
    assert as_sets[3] == {0, 1, 2, 3}  # fewer candidates than k: all of them
    assert as_sets[9] == {0, 1, 7, 8, 9}  # 2 sinks + the 3 most recent
    assert as_sets[15] == {10, 11, 13, 14, 15}  # the second document's own sinks and recent keys
    assert all((row >= 0).sum() == min(5, len(s)) for row, s in zip(idx, as_sets))


def test_fused_min_pairs_varies_the_pair_count_and_answers_stay_unique():
    task = FusedPairTask(vocab_size=256, seq_len=96, num_pairs=12, num_queries=8, min_pairs=1)
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(30):
        tokens = task.make_document(rng)[0]
        pair_lo, pair_hi = int(task.pair_token(0, 0)), int(task.query_token(0))
        counts.add(int(((tokens >= pair_lo) & (tokens < pair_hi)).sum()))
        assert len(fused_answers(task, tokens)) == 8  # every query matches exactly one pair
    assert min(counts) < 6 and max(counts) > 9


def test_local_window_mode_is_dense_within_k_and_differs_beyond():
    # The local-window control reaches the sparse path through ForwardMode(selection="local"):
    # with every key inside the window it is exactly dense attention; with k smaller it is not.
    import dataclasses

    import jax

    from dsa_train.config import load_model_config
    from dsa_train.eval.forward import LayerRunner
    from dsa_train.model import create_model

    tokens = np.random.default_rng(0).integers(0, 512, (2, 16)).astype(np.int32)
    seg = np.ones_like(tokens)
    out = {}
    for topk in (16, 5):
        config = dataclasses.replace(load_model_config("configs/tiny.yaml"), compute_dtype="float32",
                                     index_topk=topk, n_routed_experts=0, kernels="reference")
        runner = LayerRunner(create_model(config, seed=1))
        dense = np.asarray(jax.device_get(runner.forward(tokens, seg, attention="dense"))[0])
        local = np.asarray(jax.device_get(runner.forward(tokens, seg, attention="sparse", selection="local",
                                                         sink_tokens=2))[0])
        out[topk] = (dense, local)
    np.testing.assert_allclose(out[16][1], out[16][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[5][1][:, :5], out[5][0][:, :5], rtol=1e-5, atol=1e-5)  # <= k candidates
    assert np.abs(out[5][1][:, 6:] - out[5][0][:, 6:]).max() > 1e-4
