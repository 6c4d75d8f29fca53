"""Acceptance-rate proxy of the MTP layer for speculative decoding: how often its top-1
prediction at position i equals the token two ahead, t_{i+2} (the draft a serving engine would
propose for the next step), over the held-out tokens where that target lies in the document."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_train.model import ForwardMode
from dsa_train.model.mtp import mtp_inputs
from dsa_train.ops.losses import lm_targets


@nnx.jit(static_argnames=("attention",))
def _depth1_agreement(model, tokens, segment_ids, positions, attention: str):
    targets, weights = lm_targets(tokens, segment_ids)
    inputs = mtp_inputs(tokens, targets, weights, 1)
    out = model(tokens, segment_ids, positions, ForwardMode(attention),
                mtp_tokens=(inputs["mtp_tokens_1"],))
    correct = (jnp.argmax(out.mtp.logits[0], -1) == inputs["mtp_targets_1"]).astype(jnp.float32)
    w = inputs["mtp_weights_1"]
    return (correct * w).sum(), w.sum()


class MTPAcceptance:
    """Accumulates the depth-1 top-1 agreement per attention mode over batches."""

    def __init__(self):
        self.counts: dict[str, list[float]] = {}

    def add(self, model, batch: dict, attention: str) -> None:
        hit, total = jax.device_get(_depth1_agreement(model, batch["tokens"], batch["segment_ids"],
                                                      batch["positions"], attention))
        c = self.counts.setdefault(attention, [0.0, 0.0])
        c[0] += float(hit)
        c[1] += float(total)

    def summary(self) -> dict:
        return {mode: {"top1_agreement": (hit / total) if total else None, "tokens": int(total)}
                for mode, (hit, total) in self.counts.items()}


def has_mtp(model) -> bool:
    return bool(getattr(model.config, "num_nextn_predict_layers", 0)) and hasattr(model, "mtp")


__all__ = ["MTPAcceptance", "has_mtp"]
