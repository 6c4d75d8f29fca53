"""``dsa-train plan``: per-device memory, FLOPs and an estimated step time of a recipe on a mesh,
for both DSA stages (dense warm-up, sparse training), before renting the machines.

    dsa-train plan recipes/sparse.yaml --mesh data=4,fsdp=8,expert=8,tensor=1,context=8 \
        --device h200 --seq-len 131072 --batch 480 [--compile] [--remat full]

Memory per device:
- parameters, optimizer state: exact. Shapes come from ``jax.eval_shape`` of the real train state
  and each array is divided by the number of devices its sharding (the rules) splits it over.
- gradients: the trained group's parameters again (fp32, sharded like them).
- activations: a model of what the backward pass keeps per decoder layer (listed tensor by tensor
  below, per stage and remat policy) plus the largest transient (LM head logits, one layer's
  forward in the warm-up, attention blocks). An estimate: ``--compile`` gives XLA's own figures.

``--compile`` lowers and compiles the real sharded train step ahead of time against the mesh,
from abstract arrays (nothing is allocated), and prints ``compiled.memory_analysis()``. It needs
as many devices as the mesh has; on a CPU host they are simulated (``--cpu-devices``, default:
the mesh size), so it works for any mesh, but XLA:CPU fuses differently from XLA:GPU/TPU and
compile time grows with the model (use ``--set model.num_hidden_layers=...`` to shrink it).

``--target tpu-v5p:AxBxC`` (or ``tpu-v6e:AxB``) compiles the real train step for a TPU slice that
is not attached (libtpu) and reports XLA's per-chip memory, the compiled FLOPs, HBM bytes and
collective bytes (per step and per layer) and a step time built from them
(``dsa_train.parallel.plan_tpu``); ``--depth-cut DENSE+MOE`` compiles fewer layers and
extrapolates to the recipe's depth.

Step time (without ``--target``): FLOPs from ``dsa_train.flops`` at the device's bf16 peak times an efficiency per kind
of work, plus the communication the mesh implies (FSDP all-gathers / reduce-scatters, tensor
all-reduces, expert all-to-alls, context all-gathers, data all-reduce) over the link each mesh
axis crosses, of which a fraction overlaps with compute. The attention and indexer compute is
that of the slowest context shard under ``mesh.context_order`` (``context_skew``). The assumptions
are printed with it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, replace
from typing import Optional

from dsa_train.parallel.rules import resolve_rules

GB = 1e9


@dataclass(frozen=True)
class Device:
    name: str
    hbm: float  # bytes
    peak_bf16: float  # FLOP/s, dense
    hbm_bw: float  # bytes/s
    fast_bw: float  # bytes/s per device, one direction, inside the fast domain (NVLink / ICI)
    slow_bw: float  # bytes/s per device across hosts (InfiniBand / DCN)
    fast_domain: int  # devices sharing the fast interconnect (a node; a whole slice on TPU)


DEVICES = {
    # H100 / H200 SXM: 8 per node on NVLink 4 (450 GB/s per direction), one 400 Gb/s NIC per GPU.
    "h100": Device("NVIDIA H100 SXM 80GB", 80 * GB, 989e12, 3.35e12, 450e9, 50e9, 8),
    "h200": Device("NVIDIA H200 SXM 141GB", 141 * GB, 989e12, 4.8e12, 450e9, 50e9, 8),
    # TPU v5p: 95 GB HBM, 459 TFLOP/s bf16, ICI 4800 Gb/s per chip; a slice is one ICI domain.
    "tpu-v5p": Device("TPU v5p", 95 * GB, 459e12, 2.76e12, 600e9 / 2, 25e9, 8960),
    # TPU v6e (Trillium): 32 GB HBM, 918 TFLOP/s bf16, ICI 3584 Gb/s per chip, up to 256 per slice.
    "tpu-v6e": Device("TPU v6e", 32 * GB, 918e12, 1.64e12, 448e9 / 2, 25e9, 256),
    # This machine's simulated CPU devices: what `--compile` measures here (XLA:CPU lowers
    # ragged_dot densely; memory size is nominal).
    "cpu": Device("XLA:CPU (simulated devices)", 1e12, 1e12, 1e11, 1e10, 1e10, 1 << 20),
}

# Fractions of peak assumed per kind of work (see the module docstring; printed with the plan).
EFFICIENCY = {"matmul": 0.55, "attention_fwd": 0.6, "attention_bwd": 0.12, "indexer": 0.4}
OVERLAP = 0.5  # share of the communication hidden behind compute
HEADROOM = 0.9  # of HBM usable by the program (runtime, fragmentation)

STAGES = ("warmup", "sparse")


# ----------------------------------------------------------------------------------------------
# State memory: exact, from the abstract train state and its shardings
# ----------------------------------------------------------------------------------------------


def _per_device_bytes(abstract_tree, shardings) -> float:
    import jax
    import numpy as np

    total = 0.0
    for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        shard = s.shard_shape(x.shape) if x.shape else ()
        total += float(np.prod(shard, dtype=np.float64)) * x.dtype.itemsize
    return total


def state_memory(config, mesh, rules) -> dict:
    """Bytes per device of parameters (by group), optimizer state and gradients for config's stage."""
    import jax

    from dsa_train.parallel.state import abstract_train_state
    from dsa_train.train import step as step_lib
    from dsa_train.train.optim import make_optimizer

    txs = {g: make_optimizer(getattr(config.train, g), config.train.steps)[0] for g in step_lib.GROUPS}
    abstract, shardings = abstract_train_state(config, txs, mesh, rules)
    params = {g: _per_device_bytes(abstract.params[g], shardings.params[g]) for g in abstract.params}
    opt = sum(_per_device_bytes(abstract.opt[g], shardings.opt[g]) for g in abstract.opt)
    trained = step_lib.TRAINABLE[config.train.stage]
    grads = sum(params[g] for g in trained)
    largest = max((_per_device_bytes(x, s) for g in trained
                   for x, s in zip(jax.tree.leaves(abstract.params[g]), jax.tree.leaves(shardings.params[g]))),
                  default=0.0)
    bias = _per_device_bytes(abstract.router_bias, shardings.router_bias)
    return {"params": sum(params.values()) + bias, "params_by_group": params, "optimizer": opt, "grads": grads,
            "largest_trained": largest}


# ----------------------------------------------------------------------------------------------
# Activation memory: a per-layer model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Local:
    """Per-device sizes of one micro-batch."""

    rows: int
    seq: int  # local sequence length (S / context)
    seq_full: int
    tokens: int  # rows x seq
    tp: int  # tensor-parallel ways of heads / mlp / vocab
    ep: int
    ctx: int
    capacity_factor: float = 0.0  # mesh.expert_capacity


def local_sizes(config, mesh, rules, batch: int, seq_len: int) -> Local:
    from dsa_train.parallel.rules import mesh_axes_of

    sizes = dict(mesh.shape)
    ways = lambda name: math.prod(sizes[a] for a in mesh_axes_of(name, mesh, rules))  # noqa: E731
    micro = batch // config.train.grad_accum
    rows = max(1, micro // ways("batch")) if micro % ways("batch") == 0 else micro
    ctx = ways("sequence") if seq_len % ways("sequence") == 0 else 1
    seq = seq_len // ctx
    return Local(rows, seq, seq_len, rows * seq, ways("heads"), ways("expert"), ctx, config.mesh.expert_capacity)


def _div(x: int, ways: int) -> float:
    return x / ways if ways > 1 and x % ways == 0 else float(x)


def layer_activations(m, loc: Local, stage: str, moe_layer: bool, c: int) -> dict:
    """Bytes per token of the tensors one decoder layer keeps for the backward pass (no remat),
    and of its forward-only transients, for `stage`. `c`: compute dtype bytes."""
    h, tp = m.num_attention_heads, loc.tp
    d, qr, kr, rope = m.hidden_size, (m.q_lora_rank or m.hidden_size), m.kv_lora_rank, m.qk_rope_head_dim
    mqa = kr + rope
    hi, di = m.index_n_heads, m.index_head_dim
    k = min(m.index_topk, loc.seq_full)
    attn = {
        "residual + norm": 2 * c * d,
        "q latent (+norm)": 2 * c * qr,
        "q heads": c * _div(h * (m.qk_head_dim + rope), tp),
        "kv latent (+norm, rope)": c * (mqa + kr + rope),
        "q absorbed [H, 576]": c * _div(h * mqa, tp),
        "kv absorbed [576]": c * mqa,
        "attention out + lse": c * _div(h * (kr + m.v_head_dim), tp) + 4 * _div(h, tp),
        "indexer q/k/w": c * _div(hi * di, tp) + 2 * c * di + 4 * hi,
    }
    if stage == "sparse":
        attn["top-k indices"] = 4 * k
    else:
        # Dense MHA form for the main attention: per-head keys and values.
        attn["dense k/v heads"] = c * _div(h * (m.qk_head_dim + m.v_head_dim), tp)
    if moe_layer:
        kk, f, e = m.num_experts_per_tok, m.moe_intermediate_size, m.n_routed_experts
        fs = f * m.n_shared_experts
        ffn = {
            "residual + norm": 2 * c * d,
            "router logits/scores": 2 * 4 * e,
            "routed tokens": kk * (c * d + 4 * d),
            "expert hidden (gate, up f32; act)": kk * (2 * 4 + c) * _div(f, tp),
            "shared expert": 3 * c * _div(fs, tp),
        }
        if loc.ep > 1:
            # Exact (drop-free) all-to-all buffers hold up to ep x the average rows.
            ffn["all-to-all buffers"] = kk * c * d * 2
    else:
        ffn = {"residual + norm": 2 * c * d, "dense FFN hidden": 3 * c * _div(m.intermediate_size, tp)}
    return {"attention": attn, "ffn": ffn}


def remat_kept_per_layer(m, loc: Local, stage: str) -> float:
    """Bytes per device that one decoder layer keeps under ``remat: full`` (parallel/layers.py's
    policy): its input, and what costs a pass over every causal pair to recompute: the sparse
    stage's top-k indices (int32 [K] per query), the warm-up's dense-KL pass A residuals (fp32
    lse_I, psum, the target part's dq [Hi, Di] and dw [Hi] per query, dk [Di] per key of the whole
    row)."""
    c = 2 if m.compute_dtype == "bfloat16" else 4
    kept = c * m.hidden_size * loc.tokens
    if stage == "sparse":
        kept += 4 * min(m.index_topk, loc.seq_full) * loc.tokens
    elif stage == "warmup":
        hi, di = m.index_n_heads, m.index_head_dim
        kept += 4 * (hi * di + hi + 2) * loc.tokens + 4 * di * loc.rows * loc.seq_full
    return kept


def activation_memory(config, loc: Local, stage: str, remat: str, *, fsdp: int = 1, cpu_lowering: bool = False,
                      largest_param: float = 0.0) -> dict:
    """Bytes per device: what the backward pass keeps for every layer, plus the largest of the
    transient phases of a step (each lives alone on top of the saved activations):

    - LM head: fp32 logits and their softmax / gradient / scatter (4 x tokens x vocab), and the
      LM head weight all-gathered over FSDP (fp32, plus its compute-dtype copy);
    - embedding gradient: a dense fp32 [vocab, hidden] scatter-add and its reduction buffer when
      the embedding is FSDP-sharded (sparse stage);
    - one layer: its forward (warm-up: nothing is kept, the layer itself is the transient), the
      attention kernels' blocks, the MoE dispatch (all-to-all buffers; on XLA:CPU ``ragged_dot`` is
      lowered densely, [local experts, rows, width] per product, which ``cpu_lowering`` models);
    - optimizer update: ~3 fp32 copies of the largest trained parameter shard.
    """
    m = config.model
    c = 2 if m.compute_dtype == "bfloat16" else 4
    n = loc.tokens
    trains_main = stage != "warmup"
    saved_total, layer_max, moe_tmp = 0.0, 0.0, 0.0
    for i in range(m.num_hidden_layers):
        moe_layer = m.is_moe_layer(i)
        parts = layer_activations(m, loc, stage, moe_layer, c)
        per_token = sum(parts["attention"].values()) + sum(parts["ffn"].values())
        layer_max = max(layer_max, per_token * n)
        if moe_layer:
            # Only the backward pass (weight gradients) of ragged_dot is lowered densely on CPU.
            moe_tmp = max(moe_tmp, _moe_transient(m, loc, c, cpu_lowering and trains_main))
        if not trains_main and remat != "none":
            # Frozen main model under remat: what the policy keeps (remat_kept_per_layer); the
            # backward pass recomputes the rest of the layer's forward (see the "one layer" phase).
            saved_total += remat_kept_per_layer(m, loc, stage)
        elif not trains_main:
            # Frozen main model: the backward pass needs only the indexer's inputs/outputs and the
            # (detached) attention inputs of the KL; everything else is transient.
            att = parts["attention"]
            keep = (att["indexer q/k/w"] + att["q latent (+norm)"] / 2 + c * m.hidden_size
                    + att["q absorbed [H, 576]"] + att["kv absorbed [576]"] + 4 * _div(m.num_attention_heads, loc.tp))
            saved_total += keep * n
        elif remat == "full":
            saved_total += remat_kept_per_layer(m, loc, stage)
        elif remat == "dots":
            saved_total += 0.5 * per_token * n
        else:
            saved_total += per_token * n
    v = _div(m.vocab_size, loc.tp)
    # FSDP: the LM head weight is all-gathered (fp32 + compute copy) and its gradient is built at
    # full size (fp32) before the reduce-scatter (+ the reduction buffer).
    gathered_head = (4 + c + 4 + 4) * v * m.hidden_size if fsdp > 1 else 0.0
    phases = {
        "LM head": (4 * 4 * v * n + gathered_head) if trains_main else 0.0,
        "embedding gradient": (2 * 4 * v * m.hidden_size) if (trains_main and fsdp > 1) else 0.0,
        # Warm-up: a frozen layer's forward is transient; about half of its intermediates are
        # live at once. Remat: the recomputed layer is live again in the backward pass.
        "one layer": _attention_transient(m, loc, stage, c) + moe_tmp + _one_layer(m, loc, stage, remat, layer_max),
        "optimizer update": 3 * largest_param,
    }
    name = max(phases, key=phases.get)
    return {"saved": saved_total, "transient": phases[name], "transient_phase": name, "phases": phases,
            "total": saved_total + phases[name]}


def _one_layer(m, loc: Local, stage: str, remat: str, layer_max: float) -> float:
    """The layer whose forward is live. Warm-up: about half its intermediates at once, and under
    remat the KL's fp32 copies of the absorbed queries (x2) and of the latent attention output
    (the backward pass recomputes only the indexer's projections: the dense KL's pass A residuals
    are kept). Sparse: any recomputation (remat) holds all of them."""
    if stage != "warmup":
        return layer_max if remat != "none" else 0.0
    if remat == "none":
        return 0.5 * layer_max
    h = _div(m.num_attention_heads, loc.tp)
    kl_copies = 4 * h * (2 * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank) * loc.tokens
    return 0.5 * layer_max + kl_copies


# An upper bound of the fp32 tiles the dense kernels hold per shard and layer (a [1, 128, 128, 256]
# score tile is 16 MiB; scores, probabilities and exponentials live together).
SCORE_BUDGET = 1 << 27


def _attention_transient(m, loc: Local, stage: str, c: int) -> float:
    """Working set of the attention kernels for one layer (query-blocked implementations)."""
    h = _div(m.num_attention_heads, loc.tp)
    t = loc.seq_full
    if stage == "warmup":
        if loc.ctx > 1:
            # Context-parallel dense attention / KL: query blocks of at most SCORE_BUDGET bytes of
            # fp32 scores each (scores, probabilities, mask, exponentials live together).
            return 4 * min(SCORE_BUDGET, 4 * loc.rows * h * t * loc.seq)
        # Query-blocked dense attention (256 queries) and dense KL tiles: fp32 scores and probs.
        return 4 * 4 * 256 * h * t * loc.rows
    k = min(m.index_topk, t)
    mqa = m.kv_lora_rank + m.qk_rope_head_dim
    gather = 32 * k * mqa * c * loc.rows * 3  # blocked sparse attention: 32 queries' gathered keys
    topk = 128 * t * _div(m.index_n_heads, loc.tp) * 4 * loc.rows * 2  # top-k query chunk scores
    return max(gather, topk)


def ep_rows(m, loc: Local) -> int:
    """Rows of one device's all-to-all buffers (all destinations), as dsa_train/parallel/expert.py
    sizes them: drop-free worst case, or the capacity factor ``mesh.expert_capacity``."""
    kk, n = m.num_experts_per_tok, loc.tokens
    e_local = m.n_routed_experts // loc.ep
    capacity = n * min(kk, e_local)
    if loc.capacity_factor > 0:
        capacity = min(capacity, max(1, math.ceil(loc.capacity_factor * n * kk / loc.ep)))
    return loc.ep * capacity


def _moe_transient(m, loc: Local, c: int, cpu_lowering: bool) -> float:
    kk, d, f = m.num_experts_per_tok, m.hidden_size, _div(m.moe_intermediate_size, loc.tp)
    n = loc.tokens
    e_local = m.n_routed_experts // loc.ep if m.n_routed_experts % max(loc.ep, 1) == 0 else m.n_routed_experts
    rows = n * kk
    buffers = 0.0
    if loc.ep > 1:
        rows = ep_rows(m, loc)
        buffers = 4 * rows * d * c  # send, receive, results, returned
    grouped = rows * (2 * 4 * f + c * f + 4 * d)  # gate/up fp32, activation, down fp32
    if cpu_lowering:
        # XLA:CPU's ragged_dot transpose masks every row for every local expert: fp32
        # [experts, rows, width] for the inputs and outputs of the three products.
        grouped = e_local * rows * (3 * d + 3 * f) * 4
    return buffers + grouped


# ----------------------------------------------------------------------------------------------
# FLOPs and step time
# ----------------------------------------------------------------------------------------------


def context_skew(config, seq_len: int, shards: int) -> dict:
    """Slowest context shard's causal work / the mean: ``dense`` (every earlier key: dense attention,
    indexer scores, dense KL) and ``topk`` (at most index_topk keys: sparse attention and KL)."""
    from dsa_train.parallel.sequence_order import imbalance

    order = config.mesh.context_order
    return {"order": order, "dense": imbalance(order, seq_len, shards),
            "topk": imbalance(order, seq_len, shards, config.model.index_topk)}


def step_estimate(config, mesh, rules, device: Device, stage: str, batch: int, seq_len: int,
                  state: dict, loc: Local) -> dict:
    from dsa_train.flops import count_params, forward_flops_per_token, train_flops_per_token

    m = config.model
    n_dev = mesh.size
    sizes = dict(mesh.shape)
    counts = count_params(m)
    tokens = batch * seq_len
    total_flops = train_flops_per_token(m, seq_len, stage) * tokens
    f = forward_flops_per_token(m, seq_len, "sparse" if stage == "sparse" else "dense", True, counts)
    if stage == "sparse":
        matmul = 3 * f.matmul * tokens
        attn_f, attn_b = f.attention * tokens * 1.5, f.attention * tokens * 2
        idx = 3 * f.indexer * tokens
    else:
        matmul = (f.matmul - 2.0 * counts.by_group["lm_head"]) * tokens
        attn_f, attn_b = 2 * f.attention * tokens, 0.0
        idx = 3 * f.indexer * tokens
    # The step waits for the slowest context shard. The FLOPs above are causal means; how evenly a
    # row's causal work spreads over the shards depends on mesh.context_order (contiguous: the last
    # shard has ~(2n-1)/n of the mean on every earlier key; zigzag: equal), so the quadratic parts
    # are scaled by the slowest shard's share (sequence_order.imbalance, one document per row).
    skew = context_skew(config, seq_len, loc.ctx)
    if stage == "sparse":
        attn_f, attn_b = attn_f * skew["topk"], attn_b * skew["topk"]
    else:
        attn_f, attn_b = attn_f * skew["dense"], attn_b * skew["dense"]
    idx = idx * skew["dense"]
    peak = device.peak_bf16
    compute = (matmul / EFFICIENCY["matmul"] + attn_f / EFFICIENCY["attention_fwd"]
               + attn_b / EFFICIENCY["attention_bwd"] + idx / EFFICIENCY["indexer"]) / (peak * n_dev)

    # Communication per step, per device, by mesh axis; an axis whose devices stay within the fast
    # domain uses the fast link. Layout is major -> minor (data, fsdp, expert, tensor, context).
    def link(axis: str) -> float:
        inner = 1
        for a in reversed(mesh.axis_names):
            inner *= sizes[a]
            if a == axis:
                break
        return device.fast_bw if inner <= device.fast_domain else device.slow_bw

    c = 2 if m.compute_dtype == "bfloat16" else 4
    comm = {}
    micro_steps = config.train.grad_accum
    params_bytes_c = sum(state["params_by_group"].values()) * c / 4  # gathered in compute dtype
    trained_frac = 1.0 if stage == "sparse" else state["params_by_group"].get("indexer", 0) / max(
        sum(state["params_by_group"].values()), 1)
    if sizes["fsdp"] > 1:
        p = sizes["fsdp"]
        gather = params_bytes_c * (p - 1) * (2 if stage == "sparse" else 1) * micro_steps
        scatter = state["grads"] * (p - 1) * micro_steps
        comm["fsdp all-gather + reduce-scatter"] = (gather + scatter) / link("fsdp")
    dp = sizes["data"]
    if dp > 1:
        comm["data all-reduce (grads)"] = 2 * state["grads"] * (dp - 1) / dp / link("data")
    n = loc.tokens
    layers, moe_layers = m.num_hidden_layers, sum(m.is_moe_layer(i) for i in range(m.num_hidden_layers))
    passes = 3 if stage == "sparse" else 1
    if sizes["tensor"] > 1:
        t = sizes["tensor"]
        comm["tensor all-reduce"] = (2 * layers * passes * micro_steps * 2 * n * m.hidden_size * c * (t - 1) / t
                                     / link("tensor"))
    if loc.ep > 1 and m.has_moe:
        e = loc.ep
        # Dense all-to-alls send whole buffers, padding included (dispatch + combine).
        a2a = 2 * ep_rows(m, loc) * m.hidden_size * c * (e - 1) / e
        comm["expert all-to-all"] = a2a * moe_layers * (2 if stage == "sparse" else 1) * micro_steps / link("expert")
    if loc.ctx > 1:
        cx = loc.ctx
        kv = (m.kv_lora_rank + m.qk_rope_head_dim + m.index_head_dim) * c
        comm["context all-gather"] = (kv * loc.rows * seq_len * (cx - 1) / cx * layers * 2 * micro_steps
                                      / link("context"))
    comm_total = sum(comm.values())
    step_time = compute + (1 - OVERLAP) * comm_total if compute >= comm_total else comm_total + (1 - OVERLAP) * compute
    return {"flops": total_flops, "flops_per_token": total_flops / tokens, "compute_s": compute, "comm_s": comm,
            "comm_total_s": comm_total, "step_s": step_time, "context_skew": skew,
            "mfu": total_flops / (step_time * n_dev * peak) if step_time else 0.0}


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile: XLA's own figures
# ----------------------------------------------------------------------------------------------


def abstract_train_step(config, mesh, rules):
    """The sharded, jitted train step the trainer runs and abstract (state, batch) arguments for it:
    nothing is allocated. Lower it under ``parallel.scope.activate(mesh, rules, ...)``."""
    import jax
    import numpy as np

    from dsa_train.data.batch import BATCH_DTYPES, BATCH_KEYS
    from dsa_train.parallel.sharding import batch_sharding
    from dsa_train.parallel.state import abstract_train_state, jit_train_step, model_graphdef
    from dsa_train.train import step as step_lib
    from dsa_train.train.optim import make_optimizer

    t = config.train
    opt = {g: make_optimizer(getattr(t, g), t.steps) for g in step_lib.GROUPS}
    txs, scheds = {g: o[0] for g, o in opt.items()}, {g: o[1] for g, o in opt.items()}
    abstract, shardings = abstract_train_state(config, txs, mesh, rules)
    mode = step_lib.forward_mode(config)
    step = jit_train_step(step_lib.make_train_step(model_graphdef(config), config, txs, scheds, mode), shardings,
                          mesh, rules, t.batch_size, t.seq_len)
    bsh = batch_sharding(mesh, rules, t.batch_size, t.seq_len)
    batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), np.dtype(BATCH_DTYPES[k]), sharding=bsh)
             for k in BATCH_KEYS}
    return step, abstract, batch


def compile_memory(config, mesh, rules) -> dict:
    """Lower + compile the sharded train step from abstract arrays; memory_analysis per device."""
    from dsa_train.parallel.scope import activate

    t = config.train
    step, abstract, batch = abstract_train_step(config, mesh, rules)
    with activate(mesh, rules, remat=t.remat, expert_capacity=config.mesh.expert_capacity):
        compiled = step.lower(abstract, batch).compile()
    ma = compiled.memory_analysis()
    out = {"argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes,
           "alias": ma.alias_size_in_bytes, "temp": ma.temp_size_in_bytes,
           "code": ma.generated_code_size_in_bytes}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out["xla_flops"] = float(cost.get("flops", 0.0))
    except Exception:  # cost analysis is optional and backend-dependent
        pass
    return out


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


def stage_config(config, stage: str, batch: int, seq_len: int, remat: Optional[str]):
    from dsa_train.config import Config

    t = replace(config.train, stage=stage, batch_size=batch, seq_len=seq_len,
                remat=remat or config.train.remat,
                grad_accum=config.train.grad_accum if batch % config.train.grad_accum == 0 else 1)
    return Config(config.model, t, config.mesh, config.data, config.checkpoint)


def plan_stage(config, mesh, rules, device: Device, stage: str, batch: int, seq_len: int,
               remat: Optional[str] = None, compile_: bool = False) -> dict:
    cfg = stage_config(config, stage, batch, seq_len, remat)
    state = state_memory(cfg, mesh, rules)
    loc = local_sizes(cfg, mesh, rules, batch, seq_len)
    sizes = dict(mesh.shape)
    act = activation_memory(cfg, loc, stage, cfg.train.remat, fsdp=sizes["fsdp"], cpu_lowering=device.name.startswith("XLA:CPU"),
                            largest_param=state["largest_trained"])
    total = state["params"] + state["optimizer"] + state["grads"] + act["total"]
    out = {"stage": stage, "remat": cfg.train.remat, "state": state, "local": loc, "activations": act,
           "total": total, "fits": total <= HEADROOM * device.hbm,
           "time": step_estimate(cfg, mesh, rules, device, stage, batch, seq_len, state, loc)}
    if compile_:
        out["xla"] = compile_memory(cfg, mesh, rules)
    return out


def parse_mesh(text: str) -> dict:
    from dsa_train.parallel.rules import MESH_AXES

    sizes = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in MESH_AXES:
            raise ValueError(f"--mesh {text!r}: expected AXIS=SIZE,... with axes {', '.join(MESH_AXES)}")
        try:
            sizes[key] = int(value)
        except ValueError:
            raise ValueError(f"--mesh {text!r}: size of {key} is not an integer") from None
    return sizes


def _fmt_gb(x: float) -> str:
    return f"{x / GB:8.2f} GB"


def format_plan(config_path: str, device: Device, mesh_desc: str, n_devices: int, plans: list[dict]) -> str:
    lines = [f"# dsa-train plan: {config_path}", "",
             f"device: {device.name} ({device.hbm / GB:.0f} GB HBM, {device.peak_bf16 / 1e12:.0f} TFLOP/s bf16), "
             f"mesh {mesh_desc} = {n_devices} devices", ""]
    for p in plans:
        loc, st, act, tm = p["local"], p["state"], p["activations"], p["time"]
        cfg_line = (f"## stage {p['stage']} (remat {p['remat']}): per device {loc.rows} row(s) x {loc.seq:,} tokens "
                    f"per micro-batch (tensor {loc.tp}, expert {loc.ep}, context {loc.ctx})")
        lines += [cfg_line, "", "| per device | plan |" + (" XLA (compiled) |" if "xla" in p else ""),
                  "|---|---:|" + ("---:|" if "xla" in p else "")]
        x = p.get("xla")
        rows = [("parameters", st["params"], None), ("optimizer state", st["optimizer"], None),
                ("gradients", st["grads"], None), ("activations (saved for backward)", act["saved"], None),
                (f"activations (largest transient: {act['transient_phase']})", act["transient"], None)]
        for name, value, _ in rows:
            lines.append(f"| {name} | {_fmt_gb(value)} |" + (" |" if x else ""))
        if x:
            lines.append(f"| XLA arguments (params + optimizer + batch) | | {_fmt_gb(x['argument'])} |")
            lines.append(f"| XLA temporaries (gradients + activations) | {_fmt_gb(st['grads'] + act['total'])} | "
                         f"{_fmt_gb(x['temp'])} |")
        lines.append(f"| **total** | **{_fmt_gb(p['total'])}** |" + (f" **{_fmt_gb(x['peak'])}** |" if x else ""))
        verdict = "fits" if p["fits"] else "DOES NOT FIT"
        lines += ["", f"{verdict} in {HEADROOM:.0%} of {device.hbm / GB:.0f} GB.", ""]
        lines.append(f"FLOPs per step {tm['flops']:.4g} ({tm['flops_per_token']:.4g} per token); "
                     f"compute {tm['compute_s']:.2f} s, communication {tm['comm_total_s']:.2f} s "
                     + ("(" + ", ".join(f"{k} {v:.2f} s" for k, v in tm["comm_s"].items()) + ")" if tm["comm_s"] else "")
                     + f"; estimated step time {tm['step_s']:.2f} s (MFU {tm['mfu']:.1%}).")
        if loc.ctx > 1:
            sk = tm["context_skew"]
            lines.append(f"Context layout {sk['order']} (mesh.context_order): the slowest of the {loc.ctx} context "
                         f"shards has {sk['dense']:.2f}x the mean causal work of dense attention and indexer "
                         f"scoring, {sk['topk']:.2f}x of top-k attention; compute time includes it.")
        if x and x.get("xla_flops"):
            lines.append(f"XLA cost analysis: {x['xla_flops']:.4g} FLOPs per device per step "
                         "(XLA:CPU counts gathers and elementwise work too).")
        lines.append("")
    lines += ["Assumptions: efficiency of peak " + ", ".join(f"{k} {v:.0%}" for k, v in EFFICIENCY.items())
              + f"; {OVERLAP:.0%} of communication overlapped; links {device.fast_bw / 1e9:.0f} GB/s inside "
              f"{device.fast_domain} devices, {device.slow_bw / 1e9:.0f} GB/s per device across them.", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsa-train plan", description=__doc__.splitlines()[0])
    p.add_argument("config", help="recipe or model YAML")
    p.add_argument("--mesh", default="", help="e.g. data=4,fsdp=8,expert=8,context=8 (default: the recipe's)")
    p.add_argument("--device", default="h200", choices=sorted(DEVICES))
    p.add_argument("--seq-len", type=int, default=None, help="default: the recipe's train.seq_len")
    p.add_argument("--batch", type=int, default=None, help="global batch (rows); default: the recipe's")
    p.add_argument("--stage", action="append", choices=STAGES, help="default: both stages")
    p.add_argument("--remat", choices=("none", "full", "dots"), default=None)
    p.add_argument("--compile", action="store_true", help="also compile the step ahead of time (XLA's figures)")
    p.add_argument("--cpu-devices", type=int, default=None, help="simulated CPU devices for --compile")
    p.add_argument("--target", default=None, metavar="tpu-v5p[:AxBxC]",
                   help="compile for this TPU slice (no TPU needed: libtpu) and plan from the compiled costs")
    p.add_argument("--depth-cut", default=None, metavar="DENSE+MOE",
                   help="with --target: compile this many dense + MoE layers, extrapolate to the recipe's depth")
    p.add_argument("--out", help="also write the report (Markdown) to this file")
    p.add_argument("--json", action="store_true", help="print one JSON line of per-stage totals after the report")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def plan_main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    from dsa_train.config import load_config

    mesh_sizes = parse_mesh(args.mesh)
    overrides = list(args.overrides) + [f"mesh.{k}={v}" for k, v in mesh_sizes.items()]
    if mesh_sizes and "data" not in mesh_sizes:
        overrides.append("mesh.data=1")
    config = load_config(args.config, overrides)
    sizes = {a: getattr(config.mesh, a) for a in ("data", "fsdp", "expert", "tensor", "context")}
    if any(v == -1 for v in sizes.values()):
        raise ValueError("plan needs explicit mesh sizes (no -1): pass --mesh data=..,fsdp=..,...")
    n_devices = math.prod(sizes.values())
    if args.target:
        return _plan_target(args, config, sizes, n_devices)
    import jax

    if args.compile:
        # Simulated devices must be configured before the CPU backend starts.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices or n_devices)
    mesh = _abstract_or_real_mesh(config.mesh, n_devices, args.compile)
    rules = resolve_rules(config.mesh.rules)
    device = DEVICES[args.device]
    batch = args.batch or config.train.batch_size
    batch_ways = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if batch % batch_ways:
        print(f"dsa-train plan: warning: train.batch_size {batch} is not divisible by data x fsdp x expert = "
              f"{batch_ways}: the batch would be replicated (dsa-train train refuses this)", file=sys.stderr)
    seq_len = args.seq_len or config.train.seq_len
    plans = [plan_stage(config, mesh, rules, device, stage, batch, seq_len, args.remat, args.compile)
             for stage in (args.stage or STAGES)]
    mesh_desc = ",".join(f"{k}={v}" for k, v in sizes.items())
    report = format_plan(args.config, device, mesh_desc, n_devices, plans)
    if args.out:
        from dsa_train.paths import run_path

        run_path(args.out).write_text(report)
    print(report)
    if args.json:
        import json

        print(json.dumps([{"stage": p["stage"], "total": p["total"],
                           "state": p["state"]["params"] + p["state"]["optimizer"],
                           "activations": p["activations"]["total"], "grads": p["state"]["grads"],
                           **({"xla_peak": p["xla"]["peak"], "xla_argument": p["xla"]["argument"],
                               "xla_temp": p["xla"]["temp"]} if "xla" in p else {})} for p in plans]))
    return report


def depth_cut_model(model, text: str):
    """``DENSE+MOE`` -> the model with that many dense and MoE layers (MTP depths kept)."""
    m = re.fullmatch(r"(\d+)\+(\d+)", text or "")
    if not m:
        raise ValueError(f"--depth-cut {text!r}: expected DENSE+MOE, e.g. 1+2")
    dense, moe = int(m.group(1)), int(m.group(2))
    if dense + moe < 1 or (moe and not model.has_moe):
        raise ValueError(f"--depth-cut {text!r}: needs at least one layer (MoE layers only in a MoE model)")
    return replace(model, num_hidden_layers=dense + moe, first_k_dense_replace=dense)


def _plan_target(args, config, sizes: dict, n_devices: int) -> str:
    """``--target``: compile each stage for a TPU slice and report the compiled costs."""
    import json

    from dsa_train.config import Config
    from dsa_train.parallel import plan_tpu

    chip, topology = plan_tpu.parse_target(args.target, n_devices)
    rules = resolve_rules(config.mesh.rules)
    batch = args.batch or config.train.batch_size
    seq_len = args.seq_len or config.train.seq_len
    # On a TPU `model.kernels: auto` resolves to the Pallas kernels; the compile host is no TPU.
    model = replace(config.model, kernels="pallas") if config.model.kernels == "auto" else config.model
    full_stacks = plan_tpu.layer_stacks(model)
    full_config = Config(model, config.train, config.mesh, config.data, config.checkpoint)
    if args.depth_cut:
        model = depth_cut_model(model, args.depth_cut)
    config = Config(model, config.train, config.mesh, config.data, config.checkpoint)
    mesh_desc = ",".join(f"{k}={v}" for k, v in sizes.items())
    lines = [f"# dsa-train plan: {args.config} on {chip.name} {topology}", "",
             f"mesh {mesh_desc} = {n_devices} chips; model.kernels {model.kernels}", ""]
    results = []
    for stage in args.stage or STAGES:
        cfg = stage_config(config, stage, batch, seq_len, args.remat)
        full_cfg = stage_config(full_config, stage, batch, seq_len, args.remat)
        m = plan_tpu.plan_tpu_stage(cfg, rules, chip, topology, full_stacks, full_cfg)
        lines += plan_tpu.format_tpu_stage(stage, cfg, chip, topology, m)
        results.append({"stage": stage, "batch": batch, "seq_len": seq_len, "remat": cfg.train.remat,
                        "grad_accum": cfg.train.grad_accum, "topology": topology, "mesh": sizes,
                        "depth_cut": args.depth_cut, **{k: v for k, v in m.items() if k != "loops"},
                        "loops": [list(x) for x in m["loops"]]})
    lines += plan_tpu.assumptions(chip) + [""]
    report = "\n".join(lines)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(report)
    print(report)
    if args.json:
        print(json.dumps(results))
    return report


def _abstract_or_real_mesh(mesh_config, n_devices: int, real: bool):
    import jax
    from jax.sharding import AbstractMesh

    from dsa_train.parallel.mesh import make_mesh, mesh_shape
    from dsa_train.parallel.rules import MESH_AXES

    if real:
        if jax.device_count() < n_devices:
            raise ValueError(f"--compile needs {n_devices} devices, {jax.device_count()} are available "
                             "(on CPU pass --cpu-devices, before anything else starts JAX)")
        return make_mesh(mesh_config, jax.devices()[:n_devices])
    # Shardings only need the axis names and sizes: an abstract mesh, no devices.
    sizes = mesh_shape(mesh_config, n_devices)
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


if __name__ == "__main__":
    try:
        plan_main(sys.argv[1:])
    except ValueError as e:
        print(f"dsa-train plan: error: {e}", file=sys.stderr)
        sys.exit(2)
