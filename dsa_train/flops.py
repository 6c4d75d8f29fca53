"""Parameter counts and per-token FLOPs, from the config alone (nothing is allocated).

Counts come from the model's abstract shapes (`nnx.eval_shape`), so they cannot drift from the
model code. FLOPs count a multiply-add as 2 and follow the usual conventions: matmuls against
parameters cost 2 x (active parameters) per token; attention adds the score and value products.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from flax import nnx

from dsa_train.config import ModelConfig
from dsa_train.kernels.dense_indexer_kl_pallas import pair_flops


@dataclass(frozen=True)
class ParamCounts:
    total: int
    by_group: dict  # embedding, attention, indexer, dense_ffn, moe_router, moe_experts, shared_experts, norms, lm_head
    active_per_token: int  # parameters a token's matmuls touch (k routed experts + shared)
    # The MTP depths (model.num_nextn_predict_layers), by the same groups and counted apart: none
    # of the figures above include them (HF's parameter count of the main model excludes them too).
    mtp_by_group: dict = field(default_factory=dict)
    mtp_active_per_token: int = 0  # their matmuls (embedding lookup and lm_head are the main model's)

    @property
    def mtp_total(self) -> int:
        return sum(self.mtp_by_group.values())


def _group(path: tuple) -> str:
    names = [str(p) for p in path]
    if "embed_tokens" in names:
        return "embedding"
    if "lm_head" in names:
        return "lm_head"
    if "indexer" in names:
        return "indexer"
    if "self_attn" in names:
        return "attention"
    if "experts" in names:
        return "moe_experts"
    if "shared_experts" in names:
        return "shared_experts"
    if "gate" in names and "mlp" in names:
        return "moe_router"
    if "mlp" in names:
        return "dense_ffn"
    return "norms"


def count_params(config: ModelConfig) -> ParamCounts:
    from dsa_train.model import create_model

    abstract = nnx.eval_shape(lambda: create_model(config))
    groups: dict[str, int] = defaultdict(int)
    mtp_groups: dict[str, int] = defaultdict(int)
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        size = 1
        for d in var.shape:
            size *= d
        if str(path[0]) == "mtp":
            mtp_groups[_mtp_group(path)] += size
        else:
            groups[_group(path)] += size
    total = sum(groups.values())
    inactive = 0
    if config.has_moe:
        per_expert = groups["moe_experts"] // (config.n_routed_experts * _moe_layers(config))
        inactive = per_expert * (config.n_routed_experts - config.num_experts_per_tok) * _moe_layers(config)
    # The embedding is a lookup, not a matmul.
    active = total - inactive - groups["embedding"]
    mtp_active = sum(mtp_groups.values())
    if config.has_moe and mtp_groups.get("moe_experts"):
        mtp_active -= mtp_groups["moe_experts"] * (config.n_routed_experts - config.num_experts_per_tok) \
            // config.n_routed_experts
    return ParamCounts(total, dict(groups), active, dict(mtp_groups), mtp_active)


def _mtp_group(path: tuple) -> str:
    """The MTP layer's own blocks: its input projection (enorm, hnorm, eh_proj) apart, the rest
    (its decoder layer, shared_head.norm) as in the main model."""
    names = [str(p) for p in path]
    if "eh_proj" in names:
        return "eh_proj"
    return _group(path[2:])


def _moe_layers(config: ModelConfig) -> int:
    return sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers)) if config.has_moe else 0


@dataclass(frozen=True)
class TokenFlops:
    """Forward FLOPs per token at a sequence length, split by where they go."""

    matmul: float  # projections, FFN/experts, LM head (2 x active params)
    attention: float  # main attention scores + values
    indexer: float  # indexer scores over all causal keys

    @property
    def total(self) -> float:
        return self.matmul + self.attention + self.indexer


def forward_flops_per_token(config: ModelConfig, seq_len: int, attention: str, with_indexer: bool,
                            counts: ParamCounts | None = None) -> TokenFlops:
    """Average over the positions of a causal sequence of `seq_len` tokens."""
    c = config
    counts = counts or count_params(c)
    indexer_params = counts.by_group.get("indexer", 0)
    matmul = 2.0 * (counts.active_per_token - (0 if with_indexer else indexer_params))
    avg_ctx = (seq_len + 1) / 2
    if attention == "dense":
        # MHA form: q.k over qk_head_dim, p.v over v_head_dim.
        per_key = 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
        ctx = avg_ctx
    else:
        # MQA form, as FlashMLA counts it: 576-dim keys, 512-dim values.
        per_key = 2 * c.num_attention_heads * (c.kv_lora_rank + c.qk_rope_head_dim + c.kv_lora_rank)
        ctx = sum(min(t + 1, c.index_topk) for t in range(seq_len)) / seq_len
        # kv_b_proj is absorbed into the queries and the output (W_UK, W_UV): same parameter
        # count, applied once per query instead of once per key, so `matmul` is unchanged.
    attention_flops = per_key * ctx * c.num_hidden_layers
    indexer = 0.0
    if with_indexer and c.use_indexer:
        indexer = 2.0 * c.index_n_heads * (c.index_head_dim + 1) * avg_ctx * c.num_hidden_layers
    return TokenFlops(matmul, attention_flops, indexer)


def dense_kl_flops_per_token(config: ModelConfig, seq_len: int, context_parallel: bool = False) -> float:
    """The warm-up's dense indexer KL, forward and backward, per token as the accelerators' kernel
    runs it (``kernels/dense_indexer_kl_pallas.pair_flops`` per causal pair: the target once, in
    the per-head qk_head_dim form, or the 576-dim MQA form under context parallelism, plus the
    indexer's two passes, its recomputation included)."""
    c = config
    head_dim = c.kv_lora_rank + c.qk_rope_head_dim if context_parallel else c.qk_head_dim
    per_pair = pair_flops(c.num_attention_heads, head_dim, c.index_n_heads, c.index_head_dim)
    return per_pair * (seq_len + 1) / 2 * c.num_hidden_layers


def train_flops_per_token(config: ModelConfig, seq_len: int, stage: str, context_parallel: bool = False) -> float:
    """Model FLOPs per trained token for one stage (forward + backward where gradients flow).

    dense: everything x3. warmup: frozen main forward (x1, no backward is built) + the dense KL as
    its kernel runs it (:func:`dense_kl_flops_per_token`) + the indexer projections forward/backward
    (x3). sparse: main model x3 (top-k attention) + indexer x3 + the KL over selected keys.
    ``context_parallel``: the dense attention and KL run in the MQA form there (576-dim keys, 512-dim
    values shared by the heads), which costs more FLOPs per pair than the per-head form."""
    counts = count_params(config)
    if stage == "dense":
        f = forward_flops_per_token(config, seq_len, "dense", False, counts)
        return 3 * (f.total + (_mqa_extra(config, seq_len) if context_parallel else 0.0))
    idx_matmul = 2.0 * counts.by_group.get("indexer", 0)
    if stage == "warmup":
        f = forward_flops_per_token(config, seq_len, "dense", True, counts)
        main_forward = f.matmul - idx_matmul - 2.0 * counts.by_group["lm_head"]  # no LM head in the warm-up
        attention = f.attention + (_mqa_extra(config, seq_len) if context_parallel else 0.0)
        return main_forward + attention + dense_kl_flops_per_token(config, seq_len, context_parallel) \
            + 3 * idx_matmul
    f = forward_flops_per_token(config, seq_len, "sparse", True, counts)
    return 3 * f.total + f.attention / 2


def _mqa_extra(config: ModelConfig, seq_len: int) -> float:
    """Extra dense-attention FLOPs per token of the MQA form over the per-head form."""
    c = config
    mqa = c.kv_lora_rank + c.qk_rope_head_dim + c.kv_lora_rank
    per_head = c.qk_head_dim + c.v_head_dim
    return 2 * c.num_attention_heads * (mqa - per_head) * (seq_len + 1) / 2 * c.num_hidden_layers
