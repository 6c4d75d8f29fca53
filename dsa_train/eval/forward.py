"""Evaluation forward passes: the model run layer by layer, so one layer's captured attention
inputs (q/kv in MQA form, the indexer's q/k/w) are measured and dropped before the next layer runs.

Running the layers one at a time keeps memory at one layer's captures (CausalLM with
ForwardMode(capture=True) would hold every layer's at once). `embed` and `head` mirror the
prologue and epilogue of `CausalLM.__call__`; tests check the layer-by-layer hidden state equals
the model's own.

Each piece is jitted once per (layer structure, shapes): the dense and the MoE layers share their
compiled code across layers and across checkpoints of the same model config.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_train.eval.diagnostics import layer_row_stats
from dsa_train.model import CausalLM, ForwardMode
from dsa_train.ops.attention import sparse_mla_attention
from dsa_train.ops.indexer import indexer_topk
from dsa_train.ops.losses import lm_targets
from dsa_train.ops.masks import document_positions
from dsa_train.ops.rope import rope_angles


@dataclasses.dataclass(frozen=True)
class DiagnosticOptions:
    """What the dense pass measures per layer (static under jit)."""

    recent_window: int = 128
    sink_tokens: int = 16
    block_q: int = 64
    output_error: bool = True  # relative L2 of the sparse vs dense attention output
    head_chunk: int = 512  # positions per LM-head chunk: [B, chunk, vocab] logits at a time


def _embed(graphdef, state, tokens, segment_ids, positions):
    model = nnx.merge(graphdef, state)
    cos, sin = rope_angles(positions, model.config)
    return model.model.embed_tokens(tokens), cos, sin


def _layer(graphdef, state, x, segment_ids, cos, sin, mode: ForwardMode):
    layer = nnx.merge(graphdef, state)
    valid = (segment_ids != 0).astype(jnp.float32)
    x, _, _ = layer(x, segment_ids, valid, cos, sin, mode)
    return x


def _layer_with_stats(graphdef, state, x, segment_ids, positions, cos, sin, kernels: str, topk: int,
                      options: DiagnosticOptions):
    """One dense layer step plus the row statistics of its attention (diagnostics.layer_row_stats)."""
    layer = nnx.merge(graphdef, state)
    valid = (segment_ids != 0).astype(jnp.float32)
    x_next, aux, _ = layer(x, segment_ids, valid, cos, sin, ForwardMode("dense", logits=False, kernels=kernels,
                                                                      capture=True))
    q, kv, q_i, k_i, w_i = aux.captured
    attn, c = layer.self_attn, layer.self_attn.config
    extra = {}
    if options.output_error:
        # The sparse output through the same ops sparse training runs (top-k, sparse MLA kernel).
        indices = indexer_topk(q_i, k_i, w_i, topk, segment_ids, impl=kernels)
        latent, _ = sparse_mla_attention(q, kv, indices, attn.sm_scale, v_dim=c.kv_lora_rank, impl=kernels)
        w = attn.kv_b_proj.weight[...].reshape(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim,
                                              c.kv_lora_rank)
        extra = dict(sparse_latent=latent, w_uv=w[:, c.qk_nope_head_dim:], w_o=attn.o_proj.weight[...])
    stats = layer_row_stats(q, kv, attn.sm_scale, q_i, k_i, w_i, segment_ids, positions, topk,
                            recent_window=options.recent_window, sink_tokens=options.sink_tokens,
                            block_q=options.block_q, **extra)
    return x_next, stats


def _head(graphdef, state, x, tokens, segment_ids, chunk: int):
    """Final norm + LM head in position chunks -> (nll [B, S], argmax correct [B, S]) of the next token."""
    model = nnx.merge(graphdef, state)
    hidden = model.model.norm(x)
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


_embed_jit = jax.jit(_embed, static_argnums=0)
_layer_jit = jax.jit(_layer, static_argnums=(0, 6))
_layer_stats_jit = jax.jit(_layer_with_stats, static_argnums=(0, 7, 8, 9))
_head_jit = jax.jit(_head, static_argnums=(0, 5))


class LayerRunner:
    """A model split into jittable pieces: embed, each decoder layer, the LM head."""

    def __init__(self, model: CausalLM, kernels: str, options: DiagnosticOptions = DiagnosticOptions()):
        self.config = model.config
        self.kernels, self.options = kernels, options
        self.model_graphdef, self.model_state = nnx.split(model)
        self.layers = [nnx.split(layer) for layer in model.model.layers]

    @property
    def has_indexer(self) -> bool:
        return self.config.use_indexer

    def forward(self, tokens, segment_ids, positions=None, *, attention: str = "dense",
                on_layer_stats: Optional[Callable[[int, dict], None]] = None, head: bool = True,
                selection: str = "indexer", sink_tokens: int = 4):
        """Run the model; returns (nll [B, S], correct [B, S]) for the next token at every position
        (None without `head`: the LM head is skipped).

        With `on_layer_stats` (dense attention only), each layer's row statistics (device arrays,
        see diagnostics.layer_row_stats) are handed to it right after the layer ran."""
        tokens, segment_ids = jnp.asarray(tokens), jnp.asarray(segment_ids)
        positions = document_positions(segment_ids) if positions is None else jnp.asarray(positions)
        x, cos, sin = _embed_jit(self.model_graphdef, self.model_state, tokens, segment_ids, positions)
        mode = ForwardMode(attention, logits=False, kernels=self.kernels, selection=selection, sink_tokens=sink_tokens)
        measure = on_layer_stats is not None and self.has_indexer
        if measure and attention != "dense":
            raise ValueError("layer statistics are measured in the dense pass")
        for i, (graphdef, state) in enumerate(self.layers):
            if measure:
                x, stats = _layer_stats_jit(graphdef, state, x, segment_ids, positions, cos, sin, self.kernels,
                                            self.config.index_topk, self.options)
                on_layer_stats(i, stats)
            else:
                x = _layer_jit(graphdef, state, x, segment_ids, cos, sin, mode)
        if not head:
            return None
        return _head_jit(self.model_graphdef, self.model_state, x, tokens, segment_ids, self.options.head_chunk)
