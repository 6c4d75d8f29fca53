"""The trainer's held-out hook: every `train.eval_every` steps, indexer diagnostics of the current
model on `train.eval_batches` held-out batches (same data source, another seed), logged as
``heldout/*`` per-layer metrics. In the warm-up, `train.stop_at_captured_mass` then stops on the
held-out captured mass instead of the training batches' sampled rows.

Only the dense pass with the per-layer row statistics runs (no LM head, no sparse pass); each
batch has the training micro-batch's rows (batch_size / grad_accum), so it fits where training does.
"""

from __future__ import annotations

import dataclasses

import jax

from dsa_train.config import Config
from dsa_train.eval.aggregate import IndexerAccumulator
from dsa_train.eval.forward import DiagnosticOptions, LayerRunner
from dsa_train.eval.defaults import DEFAULT_HELDOUT_SEED
from dsa_train.eval.run import load_batches

PREFIX = "heldout/"
REPORTED = {"captured_mass": "captured_mass", "captured_mass_p10": "captured_mass_p10", "k90": "k90",
            "kl": "indexer_kl"}


def heldout_seed(train_seed: int) -> int:
    """A data seed that differs from the training stream's (seeds are (data.seed, train.seed))."""
    return train_seed + DEFAULT_HELDOUT_SEED


class HeldoutIndexerEval:
    def __init__(self, config: Config):
        t = config.train
        self.config = config
        self.batches = load_batches(dataclasses.replace(config.data, prefetch=0), batches=t.eval_batches,
                                    batch_size=t.batch_size // t.grad_accum, seq_len=t.seq_len,
                                    vocab_size=config.model.vocab_size, seed=heldout_seed(t.seed))
        self.options = DiagnosticOptions(output_error=False)

    def __call__(self, model) -> dict:
        """-> {"heldout/captured_mass": [L], "heldout/captured_mass_p10": [L], "heldout/k90": [L],
        "heldout/indexer_kl": [L]}; a layer whose rows all have <= index_topk candidates reports None."""
        c = model.config
        runner = LayerRunner(model, self.options)
        acc = IndexerAccumulator(c.num_hidden_layers, c.index_topk, edges=(), rows="selective")
        for batch in self.batches:
            positions = batch["positions"]
            runner.forward(batch["tokens"], batch["segment_ids"], positions, head=False,
                           on_layer_stats=lambda i, stats: acc.add(i, jax.device_get(stats), positions))
        layers = acc.summary()["layers"]
        return {PREFIX + name: [e.get(key) for e in layers] for key, name in REPORTED.items()}

