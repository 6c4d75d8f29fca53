"""The whole model: DeepSeek-V3 decoder with one lightning indexer per layer (DeepSeek-V3.2).

Module names mirror the Hugging Face checkpoint (`model.layers.3.self_attn.indexer.wk.weight`), so
the converter maps names one to one (routed experts are stacked along a leading expert axis).
With `model.scan_layers` the layers are stored stacked instead (`model.dense_layers`,
`model.moe_layers`, see layer_layout.py) and run under `jax.lax.scan`, so the compiled program
holds one layer per stack whatever the depth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_train.config import ModelConfig
from dsa_train.kernels.backend import Backend
from dsa_train.model.layer_layout import layer_stacks
from dsa_train.model.layers import DTYPES, Embedding, Linear, RMSNorm, SwiGLU
from dsa_train.model.mla import MLA, ForwardMode
from dsa_train.model.moe import MoE, MoEStats
from dsa_train.ops.masks import default_segment_ids, document_positions
from dsa_train.ops.rope import rope_angles
from dsa_train.parallel.layers import constrain_residual, run_layer

if TYPE_CHECKING:  # mtp.py imports this module
    from dsa_train.model.mtp import MTPOutput


class ModelOutput(NamedTuple):
    logits: Optional[jnp.ndarray]  # [B, S, V] fp32, None when mode.logits is False
    hidden: jnp.ndarray  # [B, S, D] final normed hidden state
    indexer_loss: jnp.ndarray  # [L] per-layer indexer KL (zeros when not requested)
    moe: tuple[MoEStats, ...]  # one per MoE layer
    diagnostics: dict  # name -> [L] per-layer indexer quality (empty unless requested)
    indices: tuple  # per-layer top-k indices [B, S, K] in sparse mode
    row_stats: dict = {}  # name -> [L, B, S] per-row indexer statistics with mode.row_stats (see mla.py)
    mtp: Optional[MTPOutput] = None  # the MTP depths' outputs (model.num_nextn_predict_layers > 0)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs, backend: Backend | None = None):
        c = config
        pdt, cdt = DTYPES[c.param_dtype], DTYPES[c.compute_dtype]
        self.input_layernorm = RMSNorm(c.hidden_size, "embed", c.rms_norm_eps, param_dtype=pdt)
        self.self_attn = MLA(config, rngs=rngs, backend=backend)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, "embed", c.rms_norm_eps, param_dtype=pdt)
        if c.is_moe_layer(layer):
            self.mlp = MoE(config, rngs=rngs)
        else:
            self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, rngs=rngs, param_dtype=pdt, dtype=cdt)
        self.is_moe = c.is_moe_layer(layer)

    def __call__(self, x, segment_ids, valid, cos, sin, mode: ForwardMode):
        attn_out, aux = self.self_attn(self.input_layernorm(x), segment_ids, cos, sin, mode)
        x = x + attn_out
        h = self.post_attention_layernorm(x)
        stats = None
        if self.is_moe:
            ffn_out, stats = self.mlp(h, valid)
        else:
            ffn_out = self.mlp(h)
        return x + ffn_out, aux, stats


def stack_layers(layers: list[DecoderLayer]) -> DecoderLayer:
    """One DecoderLayer whose variables hold ``layers``' values stacked along a leading axis, named
    `layers` in their logical axes (the sharding rules map it to no mesh axis by default)."""
    graphdef, _ = nnx.split(layers[0])

    def stack(*variables):
        first = variables[0]
        return first.copy(jnp.stack([v.get_value() for v in variables]),
                          axes=("layers", *first.get_metadata()["axes"]))

    states = [nnx.state(layer) for layer in layers]
    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda v: isinstance(v, nnx.Variable)))


class DecoderStack(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, backend: Backend | None = None):
        c = self.config = config
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, rngs=rngs, param_dtype=DTYPES[c.param_dtype],
                                      dtype=DTYPES[c.compute_dtype])
        # Layers are created in layer order either way: the same seed gives the same weights in
        # both layouts (the stacks are filled from the same random stream).
        layers = [DecoderLayer(c, i, rngs=rngs, backend=backend) for i in range(c.num_hidden_layers)]
        if c.scan_layers:
            for name, held in layer_stacks(c).items():  # dense_layers, moe_layers
                setattr(self, name, stack_layers([layers[i] for i in held]))
        else:
            self.layers = nnx.List(layers)
        self.norm = RMSNorm(c.hidden_size, "embed", c.rms_norm_eps, param_dtype=DTYPES[c.param_dtype])

    def run_layers(self, x, segment_ids, valid, cos, sin, mode: ForwardMode):
        """(residual out, [(AttentionAux, MoEStats | None)] per layer in layer order). Remat and
        activation sharding per layer (run_layer), when a parallel scope is active (trainer)."""
        if not self.config.scan_layers:
            per_layer = []
            for layer in self.layers:
                x, aux, stats = run_layer(layer, x, segment_ids, valid, cos, sin, mode)
                per_layer.append((aux, stats))
            return x, per_layer
        per_layer = []
        for name, held in layer_stacks(self.config).items():
            graphdef, stacked = nnx.split(getattr(self, name))

            def body(h, layer_state, graphdef=graphdef):
                h, aux, stats = run_layer(nnx.merge(graphdef, layer_state), h, segment_ids, valid, cos, sin, mode)
                return h, (aux, stats)

            x, outputs = jax.lax.scan(body, x, stacked)
            per_layer += [jax.tree.map(lambda a, j=j: a[j], outputs) for j in range(len(held))]
        return x, per_layer


class CausalLM(nnx.Module):
    """`model` (embeddings, layers, final norm) + untied `lm_head`, as in `DeepseekV32ForCausalLM`.

    ``backend``: the kernel backend every layer runs (default: what ``config.kernels`` resolves to)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, backend: Backend | None = None):
        self.config = config
        backend = Backend.resolve(config.kernels) if backend is None else backend
        self.model = DecoderStack(config, rngs=rngs, backend=backend)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, ("vocab", "embed"), rngs=rngs,
                              param_dtype=DTYPES[config.param_dtype], dtype=DTYPES[config.compute_dtype])
        if config.num_nextn_predict_layers:
            from dsa_train.model.mtp import MTPLayer  # mtp.py builds on DecoderLayer

            # Created after everything else: the main model's weights do not depend on the depth.
            self.mtp = nnx.List([MTPLayer(config, config.num_hidden_layers + k, rngs=rngs, backend=backend)
                                 for k in range(config.num_nextn_predict_layers)])

    def __call__(self, tokens: jnp.ndarray, segment_ids: jnp.ndarray | None = None,
                 positions: jnp.ndarray | None = None, mode: ForwardMode = ForwardMode(),
                 mtp_tokens: tuple | None = None) -> ModelOutput:
        """tokens [B, S] int32; segment_ids [B, S] (0 = padding; default one document per row);
        positions [B, S] (default: position inside each document); mtp_tokens: per MTP depth k the
        tokens t_{i+k} [B, S] (default: shifted from ``tokens``; the train step passes them, built
        before any context-parallel reordering, see mtp.mtp_inputs)."""
        if segment_ids is None:
            segment_ids = default_segment_ids(tokens)
        if positions is None:
            positions = document_positions(segment_ids)
        valid = (segment_ids != 0).astype(jnp.float32)
        cos, sin = rope_angles(positions, self.config)
        x = constrain_residual(self.model.embed_tokens(tokens))
        x, per_layer = self.model.run_layers(x, segment_ids, valid, cos, sin, mode)
        kl, moe, diags, indices, row_stats = [], [], [], [], []
        for aux, stats in per_layer:
            kl.append(aux.indexer_loss)
            diags.append(aux.diagnostics)
            if aux.indices is not None:
                indices.append(aux.indices)
            if aux.row_stats is not None:
                row_stats.append(aux.row_stats)
            if stats is not None:
                moe.append(stats)
        hidden = self.model.norm(x)
        logits = self.lm_head(hidden).astype(jnp.float32) if mode.logits else None
        diagnostics = {k: jnp.stack([d[k] for d in diags]) for k in diags[0]} if diags and diags[0] else {}
        mtp = None
        if hasattr(self, "mtp") and (mode.logits or mode.indexer_loss):
            mtp = self._mtp(tokens, hidden, mtp_tokens, segment_ids, valid, cos, sin, mode)
            moe += list(mtp.moe)  # after the main layers, as the router biases sort (mtp/ after model/)
        stacked_rows = {k: jnp.stack([r[k] for r in row_stats]) for k in row_stats[0]} if row_stats else {}
        return ModelOutput(logits, hidden, jnp.stack(kl), tuple(moe), diagnostics, tuple(indices), stacked_rows, mtp)

    def _mtp(self, tokens, hidden, mtp_tokens, segment_ids, valid, cos, sin, mode: ForwardMode):
        from dsa_train.model.mtp import MTPOutput, shift_left

        if mtp_tokens is None:
            mtp_tokens = tuple(shift_left(tokens, k + 1) for k in range(len(self.mtp)))
        logits, kl, moe = [], [], []
        h = hidden
        for layer, depth_tokens in zip(self.mtp, mtp_tokens):
            x = constrain_residual(layer.project(self.model.embed_tokens(depth_tokens), h))
            x, aux, stats = run_layer(layer, x, segment_ids, valid, cos, sin, mode)
            kl.append(aux.indexer_loss)
            if stats is not None:
                moe.append(stats)
            # h^k feeds depth k+1 through its hnorm; shared_head.norm is on the way to the head only.
            h = x
            if mode.logits:
                logits.append(self.lm_head(layer.shared_head.norm(x)).astype(jnp.float32))
        return MTPOutput(tuple(logits), jnp.stack(kl), tuple(moe))


def create_model(config: ModelConfig, seed: int = 0, backend: Backend | None = None) -> CausalLM:
    return CausalLM(config, rngs=nnx.Rngs(params=seed), backend=backend)
