"""HF ``config.json`` (DeepSeek-V3 / V3.1 / V3.2) <-> our :class:`ModelConfig`.

Field names are the same on both sides; the differences handled here:
- RoPE: HF stores ``rope_theta`` + ``rope_scaling`` (checkpoint files) or, since transformers 5,
  one ``rope_parameters`` dict; ours is ``rope_theta`` + ``rope_scaling: RopeScaling | None``.
  HF treats an absent ``mscale``/``mscale_all_dim`` as "off"; we store that as 0.0, which our
  RoPE code reads the same way, so the cos/sin factor and the softmax scale match HF exactly.
- Defaults: a key missing from config.json takes the transformers default for that model type.
- Anything our model does not implement (another model_type, non-interleaved MLA RoPE, attention
  biases, tied embeddings, other router scoring, other quantization) is a :class:`ConfigError`,
  never a silent approximation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dsa_train.config import ConfigError, ModelConfig, RopeScaling
from dsa_train.paths import run_path

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v32")
V32_ARCHITECTURE = "DeepseekV32ForCausalLM"
V3_ARCHITECTURE = "DeepseekV3ForCausalLM"

# transformers 5 defaults (DeepseekV3Config / DeepseekV32Config) for the fields we read.
_HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
    routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
    qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
    norm_topk_prob=True, max_position_embeddings=4096, initializer_range=0.02, rms_norm_eps=1e-6,
)
_HF_DEFAULTS_V32 = dict(max_position_embeddings=163840, index_topk=2048, index_head_dim=128, index_n_heads=64)


@dataclass
class HFSourceInfo:
    """What the importer needs to know about the source besides our ModelConfig."""

    model_type: str
    has_indexer: bool  # the checkpoint holds lightning-indexer weights (V3.2)
    fp8_block_size: Optional[tuple[int, int]]  # from quantization_config, None if unquantized
    num_mtp_layers: int
    notes: list[str] = field(default_factory=list)


def read_hf_config(hf_dir: str | Path) -> dict:
    path = run_path(hf_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (is {hf_dir} a Hugging Face checkpoint directory?)") from None
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw


def _rope_from_hf(hf: dict, max_pos: int, origin: str) -> tuple[float, Optional[RopeScaling]]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{origin}: rope_parameters: expected a mapping")
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{origin}: rope_parameters: per-layer-type RoPE is not supported")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "yarn":
        raise ConfigError(f"{origin}: rope type '{rope_type}' is not supported (only 'default' and 'yarn')")
    if params.get("attention_factor") is not None:
        raise ConfigError(f"{origin}: rope_parameters.attention_factor is not supported (DeepSeek derives it "
                          "from mscale / mscale_all_dim)")
    if params.get("truncate", True) is False:
        raise ConfigError(f"{origin}: rope_parameters.truncate=false is not supported")
    original = int(params.get("original_max_position_embeddings",
                              hf.get("original_max_position_embeddings", max_pos)))
    factor = params.get("factor")
    factor = float(factor) if factor is not None else max_pos / original
    return theta, RopeScaling(
        type="yarn", factor=factor, original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params.get("mscale") or 0.0), mscale_all_dim=float(params.get("mscale_all_dim") or 0.0))


def _check_supported(hf: dict, get, origin: str) -> None:
    def refuse(key: str, why: str) -> None:
        raise ConfigError(f"{origin}: {key}={hf.get(key)!r}: {why}")

    if get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "only silu (SwiGLU) is supported")
    if get("attention_bias", False):
        refuse("attention_bias", "attention biases are not supported (DeepSeek has none)")
    if get("mlp_bias", False):
        refuse("mlp_bias", "MLP biases are not supported")
    if get("tie_word_embeddings", False):
        refuse("tie_word_embeddings", "tied embeddings are not supported (DeepSeek unties them)")
    if get("rope_interleave", True) is False:
        refuse("rope_interleave", "MLA RoPE must be interleaved, as in every DeepSeek release")
    if get("scoring_func", "sigmoid") != "sigmoid":
        refuse("scoring_func", "only the sigmoid router (DeepSeek-V3) is supported")
    if get("topk_method", "noaux_tc") != "noaux_tc":
        refuse("topk_method", "only 'noaux_tc' routing (DeepSeek-V3) is supported")
    if get("moe_layer_freq", 1) != 1:
        refuse("moe_layer_freq", "only 1 (every layer after first_k_dense_replace is MoE) is supported")
    kv_heads = get("num_key_value_heads", None)
    if kv_heads is not None and kv_heads != get("num_attention_heads"):
        refuse("num_key_value_heads", "must equal num_attention_heads for MLA")


def _fp8_block_size(hf: dict, origin: str) -> Optional[tuple[int, int]]:
    q = hf.get("quantization_config")
    if not q:
        return None
    method, fmt = q.get("quant_method"), q.get("fmt", "e4m3")
    if method != "fp8" or fmt != "e4m3":
        raise ConfigError(f"{origin}: quantization_config {method!r}/{fmt!r} is not supported "
                          "(only DeepSeek's block-scaled fp8 e4m3)")
    block = q.get("weight_block_size") or [128, 128]
    if len(block) != 2:
        raise ConfigError(f"{origin}: quantization_config.weight_block_size must have 2 entries")
    return int(block[0]), int(block[1])


def model_config_from_hf(hf: dict, *, origin: str = "config.json", param_dtype: str = "float32",
                         compute_dtype: str = "bfloat16", use_indexer: Optional[bool] = None,
                         index_n_heads: Optional[int] = None, index_head_dim: Optional[int] = None,
                         index_topk: Optional[int] = None) -> tuple[ModelConfig, HFSourceInfo]:
    """Our ModelConfig for a HF DeepSeek-V3 / V3.2 config dict (+ facts about the source).

    A V3 / V3.1 checkpoint (no indexer) becomes a model *with* indexers (``use_indexer`` defaults
    to True) whose ``index_*`` sizes are our defaults unless overridden; the importer initializes
    them freshly. The ``index_*`` overrides also apply to V3.2 (a different ``index_topk`` is
    common; other sizes then fail the shape check against the checkpoint's tensors).
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{origin}: model_type {model_type!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        return _model_config_from_hf(hf, model_type, origin, param_dtype, compute_dtype, use_indexer,
                                     index_n_heads, index_head_dim, index_topk)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # e.g. a string where a number belongs
        raise ConfigError(f"{origin}: unreadable value ({type(e).__name__}: {e})") from None


def _model_config_from_hf(hf, model_type, origin, param_dtype, compute_dtype, use_indexer, index_n_heads,
                          index_head_dim, index_topk) -> tuple[ModelConfig, HFSourceInfo]:
    defaults = dict(_HF_DEFAULTS, **(_HF_DEFAULTS_V32 if model_type == "deepseek_v32" else {}))

    def get(key: str, default: Any = None) -> Any:
        value = hf.get(key)
        return value if value is not None else defaults.get(key, default)

    _check_supported(hf, get, origin)
    num_layers = int(get("num_hidden_layers"))
    first_dense = int(get("first_k_dense_replace"))
    # An explicit null (allowed by DeepseekV3Config) means "no routed experts" / "no groups".
    n_routed = int(hf.get("n_routed_experts", defaults["n_routed_experts"]) or 0)
    n_group = int(hf.get("n_group", defaults["n_group"]) or 1)
    topk_group = int(hf.get("topk_group", defaults["topk_group"]) or 1)
    layer_types = hf.get("mlp_layer_types")
    if layer_types is not None:
        expected = ["dense"] * min(first_dense, num_layers) + ["sparse"] * max(num_layers - first_dense, 0)
        if list(layer_types) != expected:
            raise ConfigError(f"{origin}: mlp_layer_types must be {first_dense} 'dense' then 'sparse' "
                              "(only first_k_dense_replace layouts are supported)")
    max_pos = int(get("max_position_embeddings"))
    theta, rope_scaling = _rope_from_hf(hf, max_pos, origin)
    has_indexer = model_type == "deepseek_v32"
    use_indexer = True if use_indexer is None else use_indexer
    index_defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    source_index = (lambda k: get(k)) if has_indexer else (lambda k: index_defaults[k])

    def pick(override, key):
        return int(override) if override is not None else int(source_index(key))

    q_lora = hf.get("q_lora_rank", defaults["q_lora_rank"])
    config = ModelConfig(
        vocab_size=int(get("vocab_size")), hidden_size=int(get("hidden_size")), num_hidden_layers=num_layers,
        num_attention_heads=int(get("num_attention_heads")), intermediate_size=int(get("intermediate_size")),
        kv_lora_rank=int(get("kv_lora_rank")), qk_nope_head_dim=int(get("qk_nope_head_dim")),
        qk_rope_head_dim=int(get("qk_rope_head_dim")), v_head_dim=int(get("v_head_dim")),
        q_lora_rank=None if q_lora is None else int(q_lora),
        first_k_dense_replace=min(first_dense, num_layers) if n_routed else num_layers,
        n_routed_experts=n_routed, n_shared_experts=int(get("n_shared_experts")),
        num_experts_per_tok=int(get("num_experts_per_tok")),
        moe_intermediate_size=int(get("moe_intermediate_size")),
        n_group=n_group if n_routed else 1, topk_group=topk_group if n_routed else 1,
        routed_scaling_factor=float(get("routed_scaling_factor")), norm_topk_prob=bool(get("norm_topk_prob")),
        rms_norm_eps=float(get("rms_norm_eps")), rope_theta=theta, rope_scaling=rope_scaling,
        max_position_embeddings=max_pos, use_indexer=bool(use_indexer),
        index_n_heads=pick(index_n_heads, "index_n_heads"), index_head_dim=pick(index_head_dim, "index_head_dim"),
        index_topk=pick(index_topk, "index_topk"), param_dtype=param_dtype, compute_dtype=compute_dtype,
        initializer_range=float(get("initializer_range")),
    )
    errors = config.validate()
    if errors:
        key, message = errors[0]
        raise ConfigError(f"{origin}: {key}: {message}")
    info = HFSourceInfo(model_type=model_type, has_indexer=has_indexer, fp8_block_size=_fp8_block_size(hf, origin),
                        num_mtp_layers=int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0))
    if not has_indexer and config.use_indexer:
        info.notes.append(
            f"{model_type} checkpoint has no lightning indexer: the indexers of all {num_layers} layers are "
            f"freshly initialized (index_n_heads={config.index_n_heads}, index_head_dim={config.index_head_dim}, "
            f"index_topk={config.index_topk}); run the dense warm-up stage before sparse attention")
    if has_indexer and not config.use_indexer:
        info.notes.append("use_indexer=false: the checkpoint's indexer weights are dropped")
    return config, info


def hf_config_from_model_config(config: ModelConfig, *, dtype: str = "bfloat16",
                                extra: Optional[dict] = None) -> dict:
    """A config.json that transformers loads as DeepseekV32ForCausalLM (or DeepseekV3ForCausalLM
    for a model without indexers). ``extra`` (e.g. token ids of the source) is merged in first."""
    c = config
    if c.use_indexer and c.q_lora_rank is None:
        raise ConfigError("model.q_lora_rank: null cannot be exported with an indexer: transformers' "
                          "DeepseekV32 has no q_lora_rank=null formulation")
    v32 = c.use_indexer
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        rs = c.rope_scaling
        rope.update(rope_type="yarn", factor=rs.factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings,
                    beta_fast=rs.beta_fast, beta_slow=rs.beta_slow)
        if rs.mscale:
            rope["mscale"] = rs.mscale
        if rs.mscale_all_dim:
            rope["mscale_all_dim"] = rs.mscale_all_dim
    has_moe = c.has_moe
    out = dict(extra or {})
    out.update(
        architectures=[V32_ARCHITECTURE if v32 else V3_ARCHITECTURE],
        model_type="deepseek_v32" if v32 else "deepseek_v3",
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads, q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
        # HF builds an MoE block for every layer >= first_k_dense_replace: a dense-only model says so.
        first_k_dense_replace=c.first_k_dense_replace if has_moe else c.num_hidden_layers,
        n_routed_experts=c.n_routed_experts if has_moe else 1,
        n_shared_experts=c.n_shared_experts, num_experts_per_tok=c.num_experts_per_tok if has_moe else 1,
        moe_intermediate_size=c.moe_intermediate_size if has_moe else 1,
        n_group=c.n_group if has_moe else 1, topk_group=c.topk_group if has_moe else 1,
        routed_scaling_factor=c.routed_scaling_factor, norm_topk_prob=c.norm_topk_prob,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        rope_parameters=rope, initializer_range=c.initializer_range, hidden_act="silu",
        attention_bias=False, tie_word_embeddings=False, dtype=dtype,
    )
    if v32:
        out.update(index_n_heads=c.index_n_heads, index_head_dim=c.index_head_dim, index_topk=c.index_topk)
    else:
        out["rope_interleave"] = True
    for stale in ("rope_scaling", "rope_theta", "torch_dtype", "quantization_config", "mlp_layer_types",
                  "layer_types", "auto_map"):
        out.pop(stale, None)
    return out
