"""Evaluation forward passes through the model's own forward (`CausalLM.__call__`), whatever its
layer layout (per-layer or `model.scan_layers`).

The dense pass asks the model for every layer's per-row indexer statistics
(`ForwardMode(row_stats=...)`, ops/row_stats.py): each layer computes them from its attention inputs
and drops those inputs, so only the [L, B, S] statistics leave the forward. The LM head then runs
over the final hidden state in position chunks, so [B, S, vocab] logits never exist at once.

Both pieces are jitted once per (model structure, shapes), so checkpoints of the same model config
share their compiled code.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_train.model import CausalLM, ForwardMode
from dsa_train.ops.losses import lm_targets
from dsa_train.ops.masks import document_positions
from dsa_train.ops.row_stats import RowStatsOptions


@dataclasses.dataclass(frozen=True)
class DiagnosticOptions:
    """What the dense pass measures per layer (static under jit)."""

    recent_window: int = 128
    sink_tokens: int = 16
    block_q: int = 64
    output_error: bool = True  # relative L2 of the sparse vs dense attention output
    head_chunk: int = 512  # positions per LM-head chunk: [B, chunk, vocab] logits at a time

    def row_stats(self) -> RowStatsOptions:
        return RowStatsOptions(self.recent_window, self.sink_tokens, self.block_q, self.output_error)


def _forward(graphdef, state, tokens, segment_ids, positions, mode: ForwardMode):
    """The model's forward without logits -> (final normed hidden [B, S, D], row stats name -> [L, B, S])."""
    out = nnx.merge(graphdef, state)(tokens, segment_ids, positions, mode=mode)
    return out.hidden, out.row_stats


def _head(graphdef, state, hidden, tokens, segment_ids, chunk: int):
    """LM head in position chunks -> (nll [B, S], argmax correct [B, S]) of the next token."""
    model = nnx.merge(graphdef, state)
    targets, _ = lm_targets(tokens, segment_ids)
    b, s, d = hidden.shape
    chunk = max(1, min(chunk, s))
    blocks = -(-s // chunk)
    pad = blocks * chunk - s
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, blocks, chunk, d)
    tg = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, blocks, chunk)

    def one(args):
        h_c, t_c = args
        logits = model.lm_head(h_c).astype(jnp.float32)
        target_logit = jnp.take_along_axis(logits, t_c[..., None], -1)[..., 0]
        return jax.nn.logsumexp(logits, -1) - target_logit, (jnp.argmax(logits, -1) == t_c).astype(jnp.float32)

    nll, correct = jax.lax.map(one, (jnp.moveaxis(h, 1, 0), jnp.moveaxis(tg, 1, 0)))
    unblock = lambda v: jnp.moveaxis(v, 0, 1).reshape(b, blocks * chunk)[:, :s]  # noqa: E731
    return unblock(nll), unblock(correct)


_forward_jit = jax.jit(_forward, static_argnums=(0, 5))
_head_jit = jax.jit(_head, static_argnums=(0, 5))


class LayerRunner:
    """A model's forward pass for evaluation: next-token scores and, in the dense pass, every
    layer's per-row indexer statistics. The model runs on its own kernel backend."""

    def __init__(self, model: CausalLM, options: DiagnosticOptions = DiagnosticOptions()):
        self.config = model.config
        self.options = options
        self.graphdef, self.state = nnx.split(model)

    @property
    def has_indexer(self) -> bool:
        return self.config.use_indexer

    def forward(self, tokens, segment_ids, positions=None, *, attention: str = "dense",
                on_layer_stats: Optional[Callable[[int, dict], None]] = None, head: bool = True,
                selection: str = "indexer", sink_tokens: int = 4):
        """Run the model; returns (nll [B, S], correct [B, S]) for the next token at every position
        (None without `head`: the LM head is skipped).

        With `on_layer_stats` (dense attention only), each layer's row statistics (device arrays,
        see ops/row_stats.layer_row_stats) are handed to it, in layer order."""
        tokens, segment_ids = jnp.asarray(tokens), jnp.asarray(segment_ids)
        positions = document_positions(segment_ids) if positions is None else jnp.asarray(positions)
        measure = on_layer_stats is not None and self.has_indexer
        if measure and attention != "dense":
            raise ValueError("layer statistics are measured in the dense pass")
        mode = ForwardMode(attention, logits=False, row_stats=self.options.row_stats() if measure else None,
                           selection=selection, sink_tokens=sink_tokens)
        hidden, row_stats = _forward_jit(self.graphdef, self.state, tokens, segment_ids, positions, mode)
        if measure:
            for i in range(self.config.num_hidden_layers):
                on_layer_stats(i, {k: v[i] for k, v in row_stats.items()})
        if not head:
            return None
        return _head_jit(self.graphdef, self.state, hidden, tokens, segment_ids, self.options.head_chunk)
