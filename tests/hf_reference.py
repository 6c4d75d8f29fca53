"""Tiny random Hugging Face DeepSeek models (the reference for our importer/exporter tests).

Weights are re-drawn at unit scale (std 1/sqrt(fan_in), norms around 1, non-zero router biases)
so attention, routing and the indexer's top-k are far from uniform: a wrong RoPE layout, scale
or routing rule then changes the logits by far more than fp32 rounding.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

if os.environ.get("CI"):  # CI installs the test extras: a missing torch there is a failure, not a skip
    import torch
    import transformers
else:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
    topk_group=1, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
    first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=256, rms_norm_eps=1e-6,
)
V32_EXTRA = dict(index_topk=6, index_head_dim=32, index_n_heads=8)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32,
            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.7)


def hf_config(kind: str = "v32", rope: dict | None = None, **overrides):
    kw = dict(BASE, **(V32_EXTRA if kind == "v32" else {}))
    kw.update(overrides)
    kw["num_key_value_heads"] = kw["num_attention_heads"]
    kw["rope_parameters"] = dict(rope) if rope else {"rope_type": "default", "rope_theta": 10000.0}
    cls = transformers.DeepseekV32Config if kind == "v32" else transformers.DeepseekV3Config
    return cls(**kw)


def build_hf_model(config, seed: int = 0):
    """A DeepseekV32ForCausalLM / DeepseekV3ForCausalLM (by config type) with unit-scale weights."""
    cls = (transformers.DeepseekV32ForCausalLM if config.model_type == "deepseek_v32"
           else transformers.DeepseekV3ForCausalLM)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if name.endswith("e_score_correction_bias"):
                value = 0.1 * noise
            elif t.ndim == 1 and name.endswith("bias"):
                value = 0.2 * noise
            elif t.ndim == 1:
                value = 1.0 + 0.2 * noise
            elif "embed_tokens" in name:
                value = noise
            else:
                value = noise / math.sqrt(t.shape[-1])
            t.copy_(value.to(t.dtype))
    return model


def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask),
                    use_cache=False)
    return out.logits.float().numpy()


def set_hf_index_topk(model, k: int) -> None:
    model.config.index_topk = k
    for layer in model.model.layers:
        layer.self_attn.indexer.index_topk = k


def capture_hf_indices(model):
    """Register hooks that record each layer's indexer top-k indices; returns (list, remove)."""
    captured: list = []
    handles = [layer.self_attn.indexer.register_forward_hook(
        lambda _m, _i, out: captured.append(out.numpy().copy())) for layer in model.model.layers]
    return captured, lambda: [h.remove() for h in handles]
