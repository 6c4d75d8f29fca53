"""The synthetic key-value retrieval task: deterministic, well-formed, answers right by construction."""

import json

import numpy as np
import pytest

from dsa_train.config import DataConfig
from dsa_train.data import DataError, check_batch, make_train_iterator
from dsa_train.data.synthetic import BOS, EOS, NUM_RESERVED, QUERY, RetrievalTask, answers, make_document


def _iterator(batch_size=4, seq_len=128, vocab_size=512, seed=0, **data):
    return make_train_iterator(DataConfig(**data), batch_size=batch_size, seq_len=seq_len,
                               vocab_size=vocab_size, seed=seed)


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_deterministic_from_seed():
    a, b, c = _iterator(seed=3), _iterator(seed=3), _iterator(seed=4)
    first = [next(a) for _ in range(3)]
    assert all(_same(x, next(b)) for x in first)
    assert not _same(first[0], next(c))
    assert not _same(first[0], first[1])  # batches differ from step to step
    other_data_seed = make_train_iterator(DataConfig(seed=1), batch_size=4, seq_len=128, vocab_size=512, seed=3)
    assert not _same(next(other_data_seed), first[0])  # data.seed is part of the stream too


@pytest.mark.parametrize("doc_len", [0, 40, 100])
def test_rows_follow_the_contract_and_answers_are_correct(doc_len):
    task_kw = dict(num_pairs=6, num_queries=3, synthetic_doc_len=doc_len)
    batch = next(_iterator(batch_size=3, seq_len=128, **task_kw))
    check_batch(batch, 3, 128)
    task = RetrievalTask(vocab_size=512, seq_len=128, num_pairs=6, num_queries=3, doc_len=doc_len)
    for row in range(3):
        tokens, seg, pos, w = (batch[k][row] for k in ("tokens", "segment_ids", "positions", "loss_weights"))
        docs = np.unique(seg[seg > 0])
        assert list(docs) == list(range(1, len(docs) + 1))
        if doc_len == 0:
            assert len(docs) == 1 and (seg == 1).all()
        else:
            assert len(docs) >= 2 and (seg == 0).sum() < task.min_doc_len
        for d in docs:
            idx = np.flatnonzero(seg == d)
            assert (np.diff(idx) == 1).all() and (pos[idx] == np.arange(len(idx))).all()
            doc = tokens[idx]
            assert doc[0] == BOS and doc[-1] == EOS and len(idx) <= task.max_doc_len
            assert (doc == QUERY).sum() == 3
        solved = answers(tokens, seg)
        assert len(solved) == 3 * len(docs)
        # The loss marks exactly the query keys, and the next token there is the stored value.
        assert sorted(np.flatnonzero(w).tolist()) == sorted(p for p, _ in solved)
        for p, value in solved:
            assert tokens[p + 1] == value
            assert task.value_range[0] <= value < task.value_range[1]
            assert task.key_range[0] <= tokens[p] < task.key_range[1]
        assert tokens[seg == 0].tolist() == [0] * int((seg == 0).sum())
        assert tokens.min() >= 0 and tokens.max() < 512


def test_pairs_are_spread_over_the_context():
    """Retrieval distances cover the row: the task really needs long-range attention."""
    batch = next(_iterator(batch_size=16, seq_len=256))
    distances = []
    for row in range(16):
        tokens = batch["tokens"][row]
        for p, value in answers(tokens, batch["segment_ids"][row]):
            distances.append(p + 1 - np.flatnonzero(tokens[:p] == value)[0])
    assert min(distances) < 64 and max(distances) > 192


def test_data_shards_split_the_global_batch_and_state_round_trips():
    whole = _iterator(batch_size=4)
    parts = [make_train_iterator(DataConfig(), batch_size=4, seq_len=128, vocab_size=512, seed=0,
                                 shard_index=i, shard_count=2) for i in range(2)]
    for _ in range(2):
        full = next(whole)
        halves = [next(p) for p in parts]
        for k in full:
            assert np.array_equal(full[k], np.concatenate([h[k] for h in halves]))
    state = json.loads(json.dumps(whole.get_state()))
    expected = next(whole)
    resumed = _iterator(batch_size=4)
    resumed.set_state(state)
    assert _same(next(resumed), expected)
    with pytest.raises(DataError, match="different synthetic task"):
        _iterator(batch_size=8).set_state(state)
    with pytest.raises(DataError, match="source 'arrayrecord'"):
        resumed.set_state({"source": "arrayrecord"})


@pytest.mark.parametrize("kw, message", [
    (dict(vocab_size=20), "vocab_size 20 is too small"),
    (dict(seq_len=29), "seq_len 29 is shorter than one document"),
    (dict(synthetic_doc_len=200), "exceeds seq_len"),
    (dict(synthetic_doc_len=20), "synthetic_doc_len 20 is shorter"),
    (dict(batch_size=3, shard_count=2), "multiple of the data-shard count"),
])
def test_bad_shapes_fail_with_one_line(kw, message):
    args = dict(batch_size=4, seq_len=128, vocab_size=512, seed=0)
    data = {k: v for k, v in kw.items() if k == "synthetic_doc_len"}
    args.update({k: v for k, v in kw.items() if k != "synthetic_doc_len"})
    with pytest.raises(DataError, match=message) as e:
        make_train_iterator(DataConfig(**data), **args)
    assert "\n" not in str(e.value)


def test_reserved_ids_are_disjoint_from_keys_values_filler():
    task = RetrievalTask(vocab_size=512, seq_len=256)
    ranges = [(0, NUM_RESERVED), task.key_range, task.value_range, task.filler_range]
    assert [r[0] for r in ranges[1:]] == [r[1] for r in ranges[:-1]] and ranges[-1][1] == 512
    assert all(hi - lo >= 64 for lo, hi in ranges[1:])


def test_config_validation_names_the_field():
    errors = dict(DataConfig(num_pairs=2, num_queries=3, synthetic_doc_len=-1, prefetch=-1,
                             synthetic_answer_weight=0.0).validate())
    assert set(errors) == {"num_queries", "synthetic_doc_len", "prefetch", "synthetic_answer_weight"}
    assert dict(DataConfig(paths=("a", "b"), weights=(1.0, 0.0)).validate()).keys() == {"weights"}


def test_structured_filler_weights_mark_exactly_the_targets_its_rule_predicts():
    task = RetrievalTask(vocab_size=512, seq_len=128, num_pairs=4, num_queries=2, filler="structured",
                         answer_weight=7.0)
    lo, hi = task.filler_range
    weighted = 0
    for seed in range(20):
        tokens, weights = make_document(task, 128, np.random.default_rng(seed))
        answer_at = {at for at, _ in answers(tokens, np.ones(128, np.int32))}
        filler = (tokens >= lo) & (tokens < hi)
        for t in range(1, 127):
            rule = bool(filler[t - 1] and filler[t + 1]) and tokens[t + 1] == lo + (tokens[t - 1] - lo + 1) % (hi - lo)
            assert weights[t] == (7.0 if t in answer_at else float(rule)), t
            weighted += rule
    assert weighted > 20 * 100
