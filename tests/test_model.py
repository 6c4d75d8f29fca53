"""Model-level invariants: sparse attention that selects every key is dense attention, and packed
documents never see each other."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flax import nnx

from dsa_train.config import load_model_config
from dsa_train.model import ForwardMode, create_model

SEQ = 24


@pytest.fixture(scope="module")
def config():
    return dataclasses.replace(load_model_config("configs/tiny.yaml"), compute_dtype="float32")


@nnx.jit(static_argnames="mode")
def _logits(model, tokens, segment_ids, mode):
    return model(tokens, segment_ids=segment_ids, mode=ForwardMode(mode)).logits


def _tokens(config, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (2, SEQ)).astype(np.int32)


def test_sparse_with_topk_at_least_seq_len_equals_dense(config):
    model = create_model(dataclasses.replace(config, index_topk=SEQ), seed=1)
    tokens = _tokens(config)
    segments = np.ones((2, SEQ), np.int32)
    segments[1, 9:] = 2  # the second row packs two documents
    dense = np.asarray(_logits(model, tokens, segments, "dense"))
    sparse = np.asarray(_logits(model, tokens, segments, "sparse"))
    assert np.abs(sparse - dense).max() <= 1e-5 * np.abs(dense).max()


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_packed_documents_do_not_influence_each_other(config, mode):
    # index_topk 4 < every document's length: sparse mode really selects.
    model = create_model(dataclasses.replace(config, index_topk=4), seed=2)
    tokens = _tokens(config)
    segments = np.array([[1] * 10 + [2] * 14, [1] * 6 + [2] * 12 + [0] * 6], np.int32)  # row 1: + padding
    base = np.asarray(_logits(model, tokens, segments, mode))
    perturbed = tokens.copy()
    perturbed[0, :10] = (tokens[0, :10] + 7) % config.vocab_size  # document A of row 0
    perturbed[1, :6] = (tokens[1, :6] + 7) % config.vocab_size  # document A of row 1
    perturbed[1, 18:] = (tokens[1, 18:] + 3) % config.vocab_size  # the padding of row 1
    out = np.asarray(_logits(model, perturbed, segments, mode))
    assert np.abs(out[0, :10] - base[0, :10]).max() > 1e-3 * np.abs(base).max()  # A itself changed
    scale = np.abs(base).max()
    np.testing.assert_allclose(out[0, 10:], base[0, 10:], rtol=0, atol=1e-6 * scale)  # document B of row 0
    np.testing.assert_allclose(out[1, 6:18], base[1, 6:18], rtol=0, atol=1e-6 * scale)  # document B of row 1
