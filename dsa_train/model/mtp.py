"""Multi-token prediction (DeepSeek-V3 report, section 2.2), as the released checkpoints store it.

Depth k (1..D) predicts token t_{i+k+1} at position i:

    h'_i^k = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i^{k-1})])      (embedding first, as vLLM/SGLang read it)
    h_i^k  = DecoderLayer(h'^k)_i                                    (MLA + MoE, its own indexer in V3.2)
    logits = lm_head(shared_head.norm(h_i^k))

h^0 is the main model's final normed hidden state (what the serving engines hand the MTP layer);
the embedding and the output head are the main model's (the checkpoint's per-layer copies,
``embed_tokens`` and ``shared_head.head``, are written back on export). Depth k is stored as HF
layer ``num_hidden_layers + k - 1``; our names are ``mtp.{k-1}.<the HF names inside that layer>``.

The attention of the MTP layer follows the main layers: dense (its indexer trained by KL) in the
warm-up, top-k sparse in the sparse stage.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from flax import nnx

from dsa_train.config import ModelConfig
from dsa_train.model.layers import DTYPES, Linear, RMSNorm
from dsa_train.model.transformer import DecoderLayer
from dsa_train.ops.losses import token_nll


class MTPOutput(NamedTuple):
    logits: tuple  # per depth [B, S, V] fp32 (empty when mode.logits is False)
    indexer_loss: jnp.ndarray  # [D] the MTP layers' indexer KL (zeros when not requested)
    moe: tuple  # MoEStats of the MTP layers that are MoE layers


class SharedHead(nnx.Module):
    """The norm before the shared output head (HF `shared_head.norm`; the head is the model's lm_head)."""

    def __init__(self, config: ModelConfig):
        self.norm = RMSNorm(config.hidden_size, "embed", config.rms_norm_eps, param_dtype=DTYPES[config.param_dtype])


class MTPLayer(DecoderLayer):
    """One MTP depth: a full decoder layer plus its input projection and head norm."""

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs, backend=None):
        super().__init__(config, layer, rngs=rngs, backend=backend)
        c = config
        pdt, cdt = DTYPES[c.param_dtype], DTYPES[c.compute_dtype]
        self.enorm = RMSNorm(c.hidden_size, "embed", c.rms_norm_eps, param_dtype=pdt)
        self.hnorm = RMSNorm(c.hidden_size, "embed", c.rms_norm_eps, param_dtype=pdt)
        self.eh_proj = Linear(2 * c.hidden_size, c.hidden_size, ("embed", None), rngs=rngs, param_dtype=pdt,
                              dtype=cdt)
        self.shared_head = SharedHead(c)

    def project(self, embedded: jnp.ndarray, hidden: jnp.ndarray) -> jnp.ndarray:
        """h' = eh_proj([enorm(embedded); hnorm(hidden)]), the decoder layer's input."""
        return self.eh_proj(jnp.concatenate([self.enorm(embedded), self.hnorm(hidden)], axis=-1))


def shift_left(x: jnp.ndarray, k: int) -> jnp.ndarray:
    """x[:, i + k] at position i, zero-padded past the end."""
    return jnp.concatenate([x[:, k:], jnp.zeros((x.shape[0], k), x.dtype)], axis=1)


def mtp_inputs(tokens: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray, depth: int) -> dict:
    """Per depth k: the input tokens t_{i+k} and the targets t_{i+k+1} with their weights, all [B, S].

    ``targets`` / ``weights`` are the next-token ones (weight 0 across a document boundary or into
    padding, loss weights applied). A depth-k target counts only where every step i -> i+1 -> ...
    -> i+k stays in the document, and with the loss weight of the target token itself:
    w_k[i] = weights[i + k] * prod_{j<k} [weights[i + j] > 0]."""
    out = {}
    step_ok = (weights > 0).astype(weights.dtype)
    chain = jnp.ones_like(weights)
    for k in range(1, depth + 1):
        chain = chain * shift_left(step_ok, k - 1)
        out[f"mtp_tokens_{k}"] = shift_left(tokens, k)
        out[f"mtp_targets_{k}"] = shift_left(targets, k)
        out[f"mtp_weights_{k}"] = shift_left(weights, k) * chain
    return out


def mtp_loss_and_accuracy(logits: tuple, inputs: dict, totals=None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(cross-entropy, top-1 agreement with the target), each the mean over depths of the
    weighted token means. The top-1 agreement of depth 1 with the next-next token is the proxy of
    the speculative-decoding acceptance rate. ``totals`` (one per depth) replaces each depth's
    weighted-target count as the denominator (a micro-batch divides by the whole batch's)."""
    losses, accuracies = [], []
    for k, depth_logits in enumerate(logits, start=1):
        targets, weights = inputs[f"mtp_targets_{k}"], inputs[f"mtp_weights_{k}"]
        total = jnp.maximum(weights.sum() if totals is None else totals[k - 1], 1.0)
        losses.append((token_nll(depth_logits, targets) * weights).sum() / total)
        correct = (jnp.argmax(depth_logits, -1) == targets).astype(jnp.float32)
        accuracies.append((correct * weights).sum() / total)
    return jnp.mean(jnp.stack(losses)), jnp.mean(jnp.stack(accuracies))
