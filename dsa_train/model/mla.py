"""Multi-head latent attention with a lightning indexer, in dense or top-k sparse mode."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_train.config import ModelConfig
from dsa_train.kernels.backend import Backend
from dsa_train.model.indexer import Indexer
from dsa_train.model.layers import DTYPES, Linear, RMSNorm
from dsa_train.ops.diagnostics import indexer_quality
from dsa_train.ops.local_window import local_window_indices
from dsa_train.ops.masks import document_positions
from dsa_train.ops.row_stats import RowStatsOptions, layer_row_stats
from dsa_train.ops.rope import apply_rope_interleaved, softmax_scale
from dsa_train.parallel import context_parallel

sg = jax.lax.stop_gradient
# The q / kv latent RMSNorms use a fixed eps of 1e-6 in DeepSeek's reference code and in
# transformers (`RMSNorm(q_lora_rank)`), whatever rms_norm_eps says (that one is for the layer norms).
LATENT_NORM_EPS = 1e-6


class ForwardMode(NamedTuple):
    """What a forward pass computes (static under jit)."""

    attention: str = "dense"  # "dense" | "sparse"
    indexer_loss: bool = False  # dense KL in dense mode, KL over the selected set in sparse mode
    logits: bool = True
    diagnostic_rows: int = 0  # > 0: measure captured mass / k90 on that many query rows
    # Sparse mode's top-k: "indexer", or "local" (the first `sink_tokens` keys and the most recent
    # ones, ops/local_window.py): an evaluation control of what locality alone retrieves.
    selection: str = "indexer"
    sink_tokens: int = 4
    # Evaluation: every query row's indexer statistics (ops/row_stats.py), in AttentionAux.row_stats.
    row_stats: Optional[RowStatsOptions] = None


class AttentionAux(NamedTuple):
    indexer_loss: jnp.ndarray
    diagnostics: dict
    indices: Optional[jnp.ndarray]
    row_stats: Optional[dict] = None  # name -> [B, S] with mode.row_stats (and an indexer)


class MLA(nnx.Module):
    """``backend`` runs the ops that look across the sequence (default: the one ``config.kernels``
    resolves to on this platform)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, backend: Backend | None = None):
        c = self.config = config
        self.backend = Backend.resolve(c.kernels) if backend is None else backend
        kw = dict(rngs=rngs, param_dtype=DTYPES[c.param_dtype], dtype=DTYPES[c.compute_dtype])
        h, dqk = c.num_attention_heads, c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = Linear(c.hidden_size, h * dqk, ("heads", "embed"), **kw)
        else:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, ("q_lora", "embed"), **kw)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, "q_lora", LATENT_NORM_EPS, param_dtype=kw["param_dtype"])
            self.q_b_proj = Linear(c.q_lora_rank, h * dqk, ("heads", "q_lora"), **kw)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim,
                                         ("kv_lora", "embed"), **kw)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, "kv_lora", LATENT_NORM_EPS, param_dtype=kw["param_dtype"])
        self.kv_b_proj = Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), ("heads", "kv_lora"), **kw)
        self.o_proj = Linear(h * c.v_head_dim, c.hidden_size, ("embed", "heads"), **kw)
        self.indexer = Indexer(config, rngs=rngs) if c.use_indexer else None
        self.sm_scale = softmax_scale(config)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe):
        """MQA form: q [B, S, H, kv_lora + rope], kv [B, T, kv_lora + rope], and W_UV [H, v, kv_lora]."""
        c = self.config
        w = self.kv_b_proj.weight[...].astype(q_nope.dtype)
        w = w.reshape(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        q_latent = jnp.einsum("bshn,hnc->bshc", q_nope, w[:, : c.qk_nope_head_dim])
        return (jnp.concatenate([q_latent, q_pe], -1), jnp.concatenate([c_kv, k_pe], -1),
                w[:, c.qk_nope_head_dim:])

    def __call__(self, x, segment_ids, cos, sin, mode: ForwardMode) -> tuple[jnp.ndarray, AttentionAux]:
        c = self.config
        b, s, _ = x.shape
        h = c.num_attention_heads
        if c.q_lora_rank is None:
            q_in = x
            q = self.q_proj(x)
        else:
            q_in = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_in)
        q = q.reshape(b, s, h, c.qk_head_dim)
        q_nope, q_pe = q[..., : c.qk_nope_head_dim], apply_rope_interleaved(q[..., c.qk_nope_head_dim:], cos, sin)
        kv_a = self.kv_a_proj_with_mqa(x)
        c_kv = self.kv_a_layernorm(kv_a[..., : c.kv_lora_rank])
        k_pe = apply_rope_interleaved(kv_a[..., c.kv_lora_rank:], cos, sin)

        use_indexer = self.indexer is not None and (
            mode.attention == "sparse" or mode.indexer_loss or mode.diagnostic_rows > 0 or mode.row_stats is not None)
        if use_indexer:
            # Detached: the indexer learns only from its own loss, never from the LM loss path.
            q_i, k_i, w_i = self.indexer(sg(x), sg(q_in), cos, sin)
        elif mode.attention == "sparse":
            raise ValueError("sparse attention needs the lightning indexer (model.use_indexer)")

        ops = context_parallel.sequence_ops(self.backend)
        indices = None
        q_mqa, kv_mqa, w_uv = self._absorbed(q_nope, q_pe, c_kv, k_pe)
        if mode.attention == "dense" and context_parallel.active():
            # MQA form: only the 576-dim latent + rope key crosses the context shards, never the
            # per-head K/V of the whole row (see context_parallel.dense_attention for the cost).
            latent_out, lse = ops.dense_attention(q_mqa, kv_mqa, kv_mqa[..., : c.kv_lora_rank], segment_ids,
                                                  self.sm_scale)
            out = jnp.einsum("bshc,hvc->bshv", latent_out, w_uv)
            kl_q, kl_kv = q_mqa, kv_mqa
        elif mode.attention == "dense":
            kv = self.kv_b_proj(c_kv).reshape(b, s, h, c.qk_nope_head_dim + c.v_head_dim)
            k = jnp.concatenate([kv[..., : c.qk_nope_head_dim],
                                 jnp.broadcast_to(k_pe[:, :, None, :], (b, s, h, c.qk_rope_head_dim))], -1)
            q_heads = jnp.concatenate([q_nope, q_pe], -1)
            out, lse = ops.dense_attention(q_heads, k, kv[..., c.qk_nope_head_dim:], segment_ids, self.sm_scale)
            # The one-pass KL kernels form their target from the per-head keys the attention just used
            # (192-dim per head instead of the 576-dim absorbed form); the reference takes the MQA form.
            kl_q, kl_kv = (q_mqa, kv_mqa) if self.backend.impl == "reference" else (q_heads, k)
        else:
            # Selection is discrete: no gradient flows through it (and the streaming top-k's loop
            # need not be linearized).
            if mode.selection == "local":
                indices = local_window_indices(segment_ids, c.index_topk, mode.sink_tokens)
            else:
                indices = ops.indexer_topk(sg(q_i), sg(k_i), sg(w_i), c.index_topk, segment_ids)
            latent_out, lse = ops.sparse_mla_attention(q_mqa, kv_mqa, indices, self.sm_scale, v_dim=c.kv_lora_rank)
            out = jnp.einsum("bshc,hvc->bshv", latent_out, w_uv)
        y = self.o_proj(out.reshape(b, s, h * c.v_head_dim))

        loss = jnp.zeros((), jnp.float32)
        if mode.indexer_loss:
            if mode.attention == "dense":
                loss = ops.indexer_kl_loss(sg(kl_q), sg(kl_kv), self.sm_scale, q_i, k_i, w_i, segment_ids,
                                           lse=sg(lse))
            else:
                loss = ops.sparse_indexer_kl_loss(sg(q_mqa), sg(kv_mqa), indices, sg(lse), self.sm_scale,
                                                  q_i, k_i, w_i, segment_ids)
        diagnostics = {}
        if mode.diagnostic_rows > 0 and use_indexer:
            diagnostics = indexer_quality(sg(q_mqa), sg(kv_mqa), self.sm_scale, sg(q_i), sg(k_i), sg(w_i),
                                          segment_ids, c.index_topk, mode.diagnostic_rows,
                                          key_positions=context_parallel.slot_positions(s))
        row_stats = None
        if mode.row_stats is not None and use_indexer:
            row_stats = self._row_stats(ops, sg(q_mqa), sg(kv_mqa), sg(q_i), sg(k_i), sg(w_i), segment_ids,
                                        mode.row_stats)
        return y, AttentionAux(loss, diagnostics, indices, row_stats)

    def _row_stats(self, ops, q_mqa, kv_mqa, q_i, k_i, w_i, segment_ids, options: RowStatsOptions) -> dict:
        """Per-row indexer statistics of this layer; with ``output_error`` also the sparse output
        through the same ops sparse training runs (top-k, sparse MLA kernel) against the dense one."""
        c = self.config
        extra = {}
        if options.output_error:
            indices = ops.indexer_topk(q_i, k_i, w_i, c.index_topk, segment_ids)
            latent, _ = ops.sparse_mla_attention(q_mqa, kv_mqa, indices, self.sm_scale, v_dim=c.kv_lora_rank)
            w = self.kv_b_proj.weight[...].reshape(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim,
                                                   c.kv_lora_rank)
            extra = dict(sparse_latent=latent, w_uv=sg(w[:, c.qk_nope_head_dim:]), w_o=sg(self.o_proj.weight[...]))
        return layer_row_stats(q_mqa, kv_mqa, self.sm_scale, q_i, k_i, w_i, segment_ids,
                               document_positions(segment_ids), c.index_topk, recent_window=options.recent_window,
                               sink_tokens=options.sink_tokens, block_q=options.block_q, **extra)
