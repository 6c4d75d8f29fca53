"""Data layer: the built-in synthetic task, `dsa-train data prepare`, and the grain input pipeline.

Public API (imported lazily so `dsa-train data prepare` workers don't pay for grain):

- :func:`make_train_iterator` (dsa_train.data.pipeline): batches for training, checkpointable.
- :func:`prepare_main` (dsa_train.data.prepare): the `dsa-train data prepare` command.
- :data:`BATCH_KEYS`, :class:`DataError`, :func:`check_batch` (dsa_train.data.batch): the contract.
"""

from dsa_train.data.batch import BATCH_KEYS, DataError, check_batch

__all__ = ["BATCH_KEYS", "DataError", "check_batch", "make_train_iterator", "prepare_main"]


def __getattr__(name):
    if name == "make_train_iterator":
        from dsa_train.data.pipeline import make_train_iterator

        return make_train_iterator
    if name == "prepare_main":
        from dsa_train.data.prepare import prepare_main

        return prepare_main
    raise AttributeError(f"module 'dsa_train.data' has no attribute {name!r}")
