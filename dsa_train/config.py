"""One typed configuration for everything: model, train, mesh, data, checkpoint.

A recipe is a YAML file with those five sections. The `model` section may be a mapping or the path
of a model YAML (``model: ../configs/tiny.yaml``, resolved relative to the recipe). Any key can be
overridden from the command line with ``--set section.key=value`` (the value is parsed as YAML, so
``--set model.q_lora_rank=null`` works) and ``--set model=configs/tiny.yaml`` swaps the whole model.

Every field is typed; loading checks unknown keys, types and cross-field consistency and raises a
single :class:`ConfigError` that names the key and the file (or the ``--set`` flag) it came from.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A user-facing configuration error: names the key and where it came from."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension, as in the HF `rope_scaling` / `rope_parameters` of DeepSeek-V3."""

    type: Literal["yarn"] = "yarn"
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3 architecture plus one lightning indexer per layer (field names follow HF)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: Optional[int] = None
    first_k_dense_replace: int = 0
    # MoE (n_routed_experts = 0 makes every layer a dense FFN).
    n_routed_experts: int = 0
    n_shared_experts: int = 1
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    # RoPE
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 4096
    # Lightning indexer (use_indexer = false models a DeepSeek-V3 checkpoint without one).
    use_indexer: bool = True
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    # Numerics and implementation choices.
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    initializer_range: float = 0.02
    # Sparse-path implementation (dsa_train/kernels/backend.py): `auto` picks the Pallas kernels
    # on GPU/TPU and the memory-bounded pure-JAX path (`blocked`) on CPU; `reference` is the
    # materializing oracle the kernels are tested against.
    kernels: Literal["auto", "reference", "blocked", "pallas"] = "auto"
    # Store the decoder layers stacked (one stack of dense-FFN layers, one of MoE layers, each with
    # a leading `layers` axis) and run them with jax.lax.scan: compile time stops growing with
    # depth. The per-layer (HF) names stay the checkpoint-conversion format (model/layer_layout.py).
    scan_layers: bool = False
    # Multi-token prediction depths (DeepSeek-V3 MTP, stored as HF layers num_hidden_layers..);
    # 0: none. The released V3 / V3.1 / V3.2 checkpoints carry one.
    num_nextn_predict_layers: int = 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        return self.n_routed_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.has_moe and layer >= self.first_k_dense_replace

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim", "max_position_embeddings"]
        for name in positive:
            if getattr(self, name) < 1:
                errors.append((name, f"must be >= 1, got {getattr(self, name)}"))
        if self.qk_rope_head_dim % 2:
            errors.append(("qk_rope_head_dim", "must be even (RoPE rotates pairs)"))
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            errors.append(("q_lora_rank", "must be >= 1 or null (queries read the hidden state directly)"))
        if self.use_indexer:
            if self.index_topk < 1:
                errors.append(("index_topk", f"must be >= 1, got {self.index_topk}"))
            if self.index_n_heads < 1 or self.index_head_dim < 1:
                errors.append(("index_n_heads", "index_n_heads and index_head_dim must be >= 1"))
            if self.index_head_dim < self.qk_rope_head_dim:
                errors.append(("index_head_dim", "must be >= qk_rope_head_dim (RoPE covers its first dims)"))
        if self.has_moe:
            if self.moe_intermediate_size < 1:
                errors.append(("moe_intermediate_size", "must be >= 1 when n_routed_experts > 0"))
            if self.n_group < 1 or self.n_routed_experts % self.n_group:
                errors.append(("n_group", f"must divide n_routed_experts ({self.n_routed_experts})"))
            elif not 1 <= self.topk_group <= self.n_group:
                errors.append(("topk_group", f"must be in [1, n_group={self.n_group}]"))
            elif self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
                errors.append(("num_experts_per_tok", "exceeds the experts in the kept groups"))
            if self.n_routed_experts // max(self.n_group, 1) < 2 and self.n_group > 1:
                errors.append(("n_group", "each group needs at least 2 experts (group score = top-2 sum)"))
            if self.num_experts_per_tok < 1:
                errors.append(("num_experts_per_tok", "must be >= 1"))
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            errors.append(("first_k_dense_replace", "must be in [0, num_hidden_layers]"))
        if self.num_nextn_predict_layers < 0:
            errors.append(("num_nextn_predict_layers", "must be >= 0 (0: no MTP)"))
        return errors


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up then constant or cosine decay, for one parameter group."""

    lr: float = 1e-3
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        if self.lr < 0:
            errors.append(("lr", "must be >= 0"))
        if self.warmup_steps < 0:
            errors.append(("warmup_steps", "must be >= 0"))
        if not 0 <= self.min_lr_ratio <= 1:
            errors.append(("min_lr_ratio", "must be in [0, 1]"))
        if self.clip_norm <= 0:
            errors.append(("clip_norm", "must be > 0"))
        return errors


@dataclass(frozen=True)
class TrainConfig:
    """What one training stage does.

    stage: ``dense`` trains the whole model with dense attention on the LM loss (used to make a
    stand-in base model for the smoke run); ``warmup`` trains only the indexers on the dense KL;
    ``sparse`` trains everything with top-k attention (LM loss for the model, sparse KL for the
    indexers).
    """

    stage: Literal["dense", "warmup", "sparse"] = "warmup"
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 4096
    grad_accum: int = 1
    seed: int = 0
    main: OptimizerConfig = field(default_factory=OptimizerConfig)
    indexer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # The report gives no coefficient for the indexer KL; it only matters through clipping and
    # learning rates because the indexer's parameters and inputs are disjoint from the model's.
    indexer_loss_weight: float = 1.0
    # Weight of the MTP cross-entropy (mean over depths). DeepSeek-V3 pre-training used 0.3 for the
    # first 10T tokens and 0.1 for the last 4.8T; continued training starts from that converged
    # model, so it keeps the later value.
    mtp_loss_weight: float = 0.1
    moe_bias_update_rate: float = 1e-3
    moe_balance_loss_alpha: float = 1e-4
    max_nonfinite_steps: int = 5
    log_every: int = 1
    # Every eval_every steps (0: never): indexer diagnostics on eval_batches held-out batches
    # (dsa_train.eval.heldout), logged as heldout/*; stop_at_captured_mass then uses them.
    eval_every: int = 0
    eval_batches: int = 1
    # Rows per batch on which captured mass / k90 are measured in the sparse stage.
    diagnostic_rows: int = 64
    # Stop the warm-up early once every layer's captured mass reaches this (0 disables).
    stop_at_captured_mass: float = 0.0
    # Activation rematerialization per decoder layer: none | full (recompute everything in the
    # backward pass) | dots (keep matmul outputs without a batch dimension, recompute the rest).
    remat: Literal["none", "full", "dots"] = "none"
    run_dir: str = "runs/default"
    # Steps traced with jax.profiler into <run_dir>/profile (TensorBoard's profile tab / XProf):
    # from the first to the last step listed, e.g. [10, 12]. Empty: no trace.
    profile_steps: tuple[int, ...] = ()
    # JAX's persistent compilation cache: a restarted or requeued job skips recompiling.
    compile_cache_dir: Optional[str] = None
    # Weights & Biases beside JSONL and TensorBoard (pip install 'dsa-train[wandb]'); "offline"
    # writes the run under <run_dir>/wandb for a later `wandb sync`.
    wandb: Literal["off", "online", "offline"] = "off"
    wandb_project: str = "dsa-train"

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        if any(s < 1 for s in self.profile_steps):
            errors.append(("profile_steps", "steps are >= 1"))
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                errors.append((name, f"must be >= 1, got {getattr(self, name)}"))
        if self.batch_size % self.grad_accum:
            errors.append(("grad_accum", f"must divide batch_size ({self.batch_size})"))
        for name in ("moe_bias_update_rate", "moe_balance_loss_alpha", "indexer_loss_weight", "mtp_loss_weight"):
            if getattr(self, name) < 0:
                errors.append((name, "must be >= 0"))
        if self.eval_every < 0:
            errors.append(("eval_every", "must be >= 0 (0: no held-out evaluation)"))
        if self.eval_batches < 1:
            errors.append(("eval_batches", f"must be >= 1, got {self.eval_batches}"))
        errors += [(f"main.{k}", m) for k, m in self.main.validate()]
        errors += [(f"indexer.{k}", m) for k, m in self.indexer.validate()]
        return errors


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 on one axis means "all remaining devices".

    ``rules`` overrides entries of the logical-to-mesh axis rules (defaults:
    ``dsa_train.parallel.rules.DEFAULT_RULES``), e.g. ``rules: {vocab: null, batch: [data, fsdp]}``;
    null replicates. ``expert_capacity``: with expert parallelism, the rows each device may send to
    another per MoE layer, as a multiple of the even share (tokens x k / expert axis size); rows
    beyond it are dropped. 0 never drops (buffers sized for the worst case). ``context_order``: how
    the train step lays a row's tokens out over the ``context`` shards, ``contiguous`` (shard i
    holds the i-th slice) or ``zigzag`` (2 x context chunks, shard i holds chunks i and
    2 x context - 1 - i: equal causal work per shard; dsa_train/parallel/sequence_order.py).
    """

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    context: int = 1
    rules: dict[str, Optional[tuple[str, ...]]] = field(default_factory=dict)
    expert_capacity: float = 0.0
    context_order: Literal["contiguous", "zigzag"] = "contiguous"

    def validate(self) -> list[tuple[str, str]]:
        sizes = {k: getattr(self, k) for k in ("data", "fsdp", "expert", "tensor", "context")}
        errors = [(k, "must be >= 1 or -1") for k, v in sizes.items() if v == 0 or v < -1]
        if sum(v == -1 for v in sizes.values()) > 1:
            errors.append(("data", "at most one mesh axis may be -1"))
        from dsa_train.parallel.rules import validate_rules

        errors += [(f"rules.{k}", m) for k, m in validate_rules(self.rules)]
        if self.expert_capacity < 0:
            errors.append(("expert_capacity", "must be >= 0 (0: never drop tokens)"))
        return errors


@dataclass(frozen=True)
class DataConfig:
    """Where batches come from: ``synthetic`` (built-in key-value retrieval task) or token shards.

    ``paths``: prepared dataset directories (``dsa-train data prepare``), mixed in proportion to
    ``weights`` (default: equal). ``tokenizer``: optional tokenizer.json (or a directory holding
    one) the model expects; every dataset must have been prepared with exactly that file.
    Synthetic task (see dsa_train/data/synthetic.py): ``num_pairs`` key-value pairs per document,
    ``num_queries`` of them asked at the end; ``synthetic_doc_len`` 0 makes one document per row,
    otherwise documents of up to that many tokens are packed into each row.
    ``prefetch``: batches prepared ahead in a background thread (0: none).
    ``cache_dir``: local directory holding the copies of remote ``paths`` (``gs://``...; each host
    fetches them once, see dsa_train/data/cache.py); default ``~/.cache/dsa-train/datasets``
    (``$XDG_CACHE_HOME`` honoured). It needs the datasets' size free on every host.
    """

    source: Literal["synthetic", "arrayrecord"] = "synthetic"
    paths: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    tokenizer: Optional[str] = None
    num_pairs: int = 8
    num_queries: int = 4
    synthetic_doc_len: int = 0
    # "structured": predictable filler that needs sharp local attention (dsa_train/data/synthetic.py)
    synthetic_filler: Literal["random", "structured"] = "random"
    # Loss weight of each answer target (filler targets weigh 1): with structured filler a row has
    # ~100 filler targets per answer, which would drown the retrieval signal.
    synthetic_answer_weight: float = 1.0
    # "pairs": key and value tokens side by side (two hops); "fused": one token per pair (one hop,
    # the `dsa-train demo` task; see FusedPairTask in dsa_train/data/synthetic.py)
    synthetic_task: Literal["pairs", "fused"] = "pairs"
    synthetic_min_pairs: int = 0  # fused task: > 0 draws each row's pair count from [this, num_pairs]
    seed: int = 0
    shuffle: bool = True
    prefetch: int = 2
    cache_dir: Optional[str] = None

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        if self.cache_dir is not None and ("://" in self.cache_dir or not self.cache_dir.strip()):
            errors.append(("cache_dir", f"must be a local directory (the copies are read at random), got "
                                        f"{self.cache_dir!r}"))
        if self.source == "arrayrecord" and not self.paths:
            errors.append(("paths", "source 'arrayrecord' needs at least one path"))
        if self.weights and len(self.weights) != len(self.paths):
            errors.append(("weights", "needs one weight per path"))
        if any(w <= 0 for w in self.weights):
            errors.append(("weights", "must all be > 0"))
        if self.num_pairs < 1:
            errors.append(("num_pairs", f"must be >= 1, got {self.num_pairs}"))
        if not 1 <= self.num_queries <= max(self.num_pairs, 1):
            errors.append(("num_queries", f"must be in [1, num_pairs={self.num_pairs}], got {self.num_queries}"))
        if self.synthetic_answer_weight <= 0:
            errors.append(("synthetic_answer_weight", f"must be > 0, got {self.synthetic_answer_weight}"))
        if self.synthetic_doc_len < 0:
            errors.append(("synthetic_doc_len", "must be >= 0 (0: one document per row)"))
        if self.prefetch < 0:
            errors.append(("prefetch", "must be >= 0"))
        return errors


@dataclass(frozen=True)
class CheckpointConfig:
    """Where to start from and how often to save."""

    init_from: Optional[str] = None
    save_every: int = 500
    keep: int = 3
    keep_every: Optional[int] = None
    async_save: bool = True

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        if self.save_every < 1:
            errors.append(("save_every", "must be >= 1"))
        if self.keep < 1:
            errors.append(("keep", "must be >= 1"))
        return errors


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        for section in ("model", "train", "mesh", "data", "checkpoint"):
            errors += [(f"{section}.{k}", m) for k, m in getattr(self, section).validate()]
        m, mesh = self.model, self.mesh
        if mesh.tensor > 0:
            if m.num_attention_heads % mesh.tensor:
                errors.append(("mesh.tensor", f"must divide model.num_attention_heads ({m.num_attention_heads})"))
            if m.use_indexer and m.index_n_heads % mesh.tensor:
                errors.append(("mesh.tensor", f"must divide model.index_n_heads ({m.index_n_heads})"))
        if mesh.expert > 0 and m.has_moe and m.n_routed_experts % mesh.expert:
            errors.append(("mesh.expert", f"must divide model.n_routed_experts ({m.n_routed_experts})"))
        if mesh.context > 0 and self.train.seq_len % mesh.context:
            errors.append(("mesh.context", f"must divide train.seq_len ({self.train.seq_len})"))
        if mesh.context > 1 and mesh.context_order == "zigzag" and self.train.seq_len % (2 * mesh.context):
            errors.append(("mesh.context_order", f"'zigzag' needs train.seq_len ({self.train.seq_len}) to be a "
                                                 f"multiple of 2 x mesh.context ({2 * mesh.context})"))
        if self.train.stage == "sparse" and m.use_indexer and m.index_topk >= self.train.seq_len:
            errors.append(("model.index_topk", f"{m.index_topk} >= train.seq_len ({self.train.seq_len}): every "
                                               "token would be kept and the sparse stage would train dense"))
        if self.train.stage in ("warmup", "sparse") and not m.use_indexer:
            errors.append(("model.use_indexer", f"stage '{self.train.stage}' needs the indexer"))
        return errors


# ----------------------------------------------------------------------------------------------
# Loading: YAML -> dict (with provenance) -> overrides -> typed, validated dataclasses
# ----------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


class _Sources:
    """Remembers which file or flag each dotted key came from, for error messages."""

    def __init__(self) -> None:
        self._origin: dict[str, str] = {}

    def record(self, prefix: str, tree: Any, origin: str) -> None:
        self._origin[prefix] = origin
        if isinstance(tree, dict):
            for k, v in tree.items():
                self.record(f"{prefix}.{k}" if prefix else str(k), v, origin)

    def explicit(self, key: str) -> Optional[str]:
        """Where ``key`` itself was set (None: it has its default)."""
        return self._origin.get(key)

    def of(self, key: str) -> str:
        while key:
            if key in self._origin:
                return self._origin[key]
            key = key.rpartition(".")[0]
        return self._origin.get("", "<defaults>")


def _resolve_model_ref(raw: dict, base_dir: Path, sources: _Sources, origin: str) -> None:
    """Replace ``model: path.yaml`` by that file's contents."""
    ref = raw.get("model")
    if isinstance(ref, str):
        path = Path(ref)
        if not path.is_absolute() and not path.exists():
            path = base_dir / ref
        model = _read_yaml(path)
        model = model.get("model", model) if isinstance(model.get("model"), dict) else model
        raw["model"] = model
        sources.record("model", model, str(path))
    elif ref is None and "model" in raw:
        raise ConfigError(f"{origin}: 'model' is empty; give a mapping or a model YAML path")


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=100")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def _apply_override(raw: dict, key: str, value: Any, sources: _Sources) -> None:
    origin = f"--set {key}"
    parts = key.split(".")
    if parts[0] == "model" and len(parts) > 1 and isinstance(raw.get("model"), str):
        _resolve_model_ref(raw, Path.cwd(), sources, origin)
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    sources.record(key, value, origin)
    if key == "model":
        _resolve_model_ref(raw, Path.cwd(), sources, origin)


def _convert(value: Any, tp: Any, key: str, sources: _Sources) -> Any:
    """Check/convert one YAML value against a type annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = f"{sources.of(key)}: {key}"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, sources)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(v, args[1], f"{key}.{k}", sources) for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_convert(v, args[0], f"{key}[{i}]", sources) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, sources)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-3` (no dot) as a string; accept it as the number it obviously is.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def _build(cls: type, raw: Any, prefix: str, sources: _Sources) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{sources.of(prefix)}: {prefix}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = _closest(str(key), fields)
            hint = f" (did you mean '{close}'?)" if close else ""
            raise ConfigError(f"{sources.of(full)}: unknown key '{full}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], full, sources)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sources.of(prefix)}: missing required key '{full}'")
    return cls(**kwargs)


def _closest(key: str, options) -> Optional[str]:
    import difflib

    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return match[0] if match else None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check_paths: bool = False) -> Config:
    """Load a recipe (or a bare model YAML) and apply ``--set`` overrides; validate everything.
    ``check_paths``: also require ``checkpoint.init_from`` and the ``data.paths`` to exist (training)."""
    config, sources = _load(path, overrides)
    if check_paths:
        _check_paths(config, sources)
    return config


def _load(path: str | Path, overrides) -> tuple[Config, _Sources]:
    path = Path(path)
    raw = _read_yaml(path)
    sources = _Sources()
    if "model" not in raw and "vocab_size" in raw:  # a bare model config: default everything else
        raw = {"model": raw}
    sources.record("", raw, str(path))
    _resolve_model_ref(raw, path.parent, sources, str(path))
    for item in overrides:
        key, value = _parse_override(item)
        _apply_override(raw, key, value, sources)
    if "model" not in raw:
        raise ConfigError(f"{path}: missing required key 'model'")
    config = _build(Config, raw, "", sources)
    errors = config.validate()
    if errors:
        key, message = errors[0]
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(f"{sources.of(key)}: {key}: {message}{more}")
    return config, sources


def _check_paths(config: Config, sources: _Sources) -> None:
    """Paths that must exist before any device work starts (relative ones: to the working directory)."""
    from dsa_train.paths import as_path, is_uri

    init_from = config.checkpoint.init_from
    if init_from and not as_path(init_from).exists():
        raise ConfigError(f"{sources.of('checkpoint.init_from')}: checkpoint.init_from: {init_from} does not exist")
    if config.data.source == "arrayrecord":
        for item in config.data.paths:
            if not as_path(item).exists():
                raise ConfigError(f"{sources.of('data.paths')}: data.paths: {item} does not exist")
        if any(is_uri(item) for item in config.data.paths):
            _check_cache_dir(config.data.cache_dir, sources)


def _check_cache_dir(cache_dir: Optional[str], sources: _Sources) -> None:
    """Remote datasets are copied into data.cache_dir: it must be (or be creatable as) a writable directory."""
    from dsa_train.data.cache import cache_root

    root = cache_root(cache_dir)
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{sources.of('data.cache_dir')}: data.cache_dir: {root} is not a writable directory "
                          f"({existing} {'is not a directory' if not existing.is_dir() else 'is not writable'}); "
                          "the copies of remote data.paths are kept there")


def check_for_devices(config: Config, n_devices: int, n_processes: int) -> None:
    """Checks that need the job's device and process counts (one ConfigError naming the key)."""
    import numpy as np

    from dsa_train.parallel.mesh import MESH_AXES, MeshError, data_shards, mesh_shape

    try:
        sizes = mesh_shape(config.mesh, n_devices)
    except MeshError as e:
        raise ConfigError(f"mesh: {e} (mesh.data/fsdp/expert/tensor/context must multiply to the device count)") \
            from None
    batch_ways = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    b = config.train.batch_size
    if b % batch_ways:
        raise ConfigError(f"train.batch_size: {b} is not divisible by the data-parallel size data x fsdp x expert = "
                          f"{batch_ways}; the batch would be replicated instead of split")
    # Processes get equal, consecutive blocks of devices (make_mesh's process-major layout). No
    # per-process batch check: the data-shard count divides data x fsdp x expert, checked above.
    if n_devices % n_processes:
        raise ConfigError(f"mesh: the {n_devices} devices are not shared equally by the {n_processes} processes")
    processes = np.arange(n_devices).reshape([sizes[a] for a in MESH_AXES]) // (n_devices // n_processes)
    try:
        data_shards(processes)
    except MeshError as e:
        raise ConfigError(f"mesh: {e}") from None


def resolved_items(path: str | Path, overrides=()) -> list[tuple[str, Any, str]]:
    """(dotted key, resolved value, where it came from: a file, a --set flag or 'default')."""
    config, sources = _load(path, overrides)
    items = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            key, value = f"{prefix}{f.name}", getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                items.append((key, value, sources.explicit(key) or "default"))

    walk(config, "")
    return items


def key_listing() -> list[tuple[str, str, str]]:
    """(dotted key, type, default) of every config key; 'required' where there is no default."""
    rows = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            nested = [a for a in (tp, *inner) if dataclasses.is_dataclass(a)]
            if nested:  # a section (or an optional sub-section such as model.rope_scaling)
                walk(nested[0], f"{prefix}{f.name}.")
                continue
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "required"
            rows.append((f"{prefix}{f.name}", _type_name(tp), default))

    walk(Config, "")
    return rows


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]"
    return getattr(tp, "__name__", str(tp))


def load_model_config(path: str | Path, overrides=()) -> ModelConfig:
    return load_config(path, overrides).model


def to_dict(config: Any) -> dict:
    """Plain-dict form (for saving the resolved config beside checkpoints and metrics)."""
    return dataclasses.asdict(config)


def from_dict(raw: dict, origin: str = "<dict>") -> Config:
    sources = _Sources()
    sources.record("", raw, origin)
    config = _build(Config, raw, "", sources)
    errors = config.validate()
    if errors:
        key, message = errors[0]
        raise ConfigError(f"{origin}: {key}: {message}")
    return config
