"""The one batch format every data source yields, and the one error type the data layer raises.

A batch is a dict of numpy arrays, all [B, S] where B is this process's rows and S is seq_len:

- ``tokens``       int32    token ids; 0 (the pad id of the synthetic task) where ``segment_ids`` is 0.
- ``segment_ids``  int32    0 = padding, documents numbered 1, 2, ... left to right within a row.
- ``positions``    int32    position inside the token's document (0 at each document's first token,
                            also at the first token of the continuation of a split long document).
- ``loss_weights`` float32  weight of the next-token target: ``loss_weights[b, t]`` scales the loss
                            of predicting ``tokens[b, t + 1]`` from position t. 1 on real tokens
                            (0 on padding) for token shards; only on the answer-predicting positions
                            for the synthetic retrieval task. The trainer additionally drops targets
                            that cross a document boundary (``segment_ids[t + 1] != segment_ids[t]``).
"""

from __future__ import annotations

import numpy as np

BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_weights")
BATCH_DTYPES = {"tokens": np.int32, "segment_ids": np.int32, "positions": np.int32,
                "loss_weights": np.float32}


class DataError(ValueError):
    """A user-facing data problem (missing file, empty dataset, wrong tokenizer, ...): one line."""


def check_batch(batch: dict, rows: int, seq_len: int) -> None:
    """Raise AssertionError unless `batch` follows the contract above (for tests and debugging)."""
    assert set(batch) == set(BATCH_KEYS), f"batch keys {sorted(batch)} != {sorted(BATCH_KEYS)}"
    for key in BATCH_KEYS:
        value = batch[key]
        assert isinstance(value, np.ndarray), f"{key} is {type(value).__name__}, not a numpy array"
        assert value.shape == (rows, seq_len), f"{key} has shape {value.shape}, expected {(rows, seq_len)}"
        assert value.dtype == BATCH_DTYPES[key], f"{key} has dtype {value.dtype}"
    seg = batch["segment_ids"]
    assert (seg >= 0).all(), "negative segment id"
    # Documents are contiguous and numbered in order: ids never decrease, except into padding.
    nonpad_steps = np.diff(seg, axis=1)[seg[:, 1:] != 0]
    assert (nonpad_steps >= 0).all(), "segment ids decrease within a row"
    assert (batch["loss_weights"][seg == 0] == 0).all(), "loss weight on padding"
