"""The full train steps, exported for the accelerators, run the Pallas kernels on every layout.

A reduced config with the real attention shapes (128 heads, 576 = 512 + 64 latent keys, qk_nope
128, v 128, indexer 64 heads x 128) and few, small layers; the sparse and the warm-up train steps
(train/step.py, with the trainer's shardings) on fsdp = 2 x context = 1 or 4 simulated CPU devices
are lowered with ``jax.export`` for ``cuda`` and for ``tpu`` (lowering only, nothing compiled). The
exported StableHLO is read for:
- the Pallas custom calls (``__gpu$xla.gpu.triton`` / ``tpu_custom_call``), by kernel name: every
  layer calls the top-k, the sparse attention forward and backward and the sparse indexer KL
  forward and backward kernels in the sparse step, the dense indexer KL kernels in the warm-up, and
  on CUDA the dense attention forward kernel;
- the sparse step's array types: none scales with the sequence squared. The sequence length is
  5 x 1024 and no model dimension has the prime factor 5, so an array whose element count has 5^2
  among its factors has two sequence-sized axes (a [queries, keys] buffer, however reshaped).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

LAYERS = 2
SEQ = 5 * 1024  # longer than the kernels' fixed chunks; the prime 5 as in the module docstring
SEQ_PRIME = 5
BATCH = 2
FSDP = 2
PLATFORMS = ("cuda", "tpu")
CALL_TARGET = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
NAME_ATTRIBUTE = {"cuda": re.compile(r'[{,] name = "([^"]*)"'), "tpu": re.compile(r'kernel_name = "([^"]*)"')}
TRITON_CALL = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
STAGES = ("sparse", "warmup")
CASES = [(context, platform) for context in (1, 4) for platform in PLATFORMS]

# Each op as the kernel names it runs (``pallas_call(name=...)``) and the calls a layer makes at least.
SPARSE_STEP_KERNELS = {
    "indexer top-k": (("indexer_score_tiles", "indexer_topk"), 1),
    "sparse attention forward": (("sparse_mla_forward",), 1),
    "sparse attention backward": (("sparse_mla_backward",), 1),
    "sparse indexer KL forward": (("sparse_indexer_kl_forward",), 1),
    "sparse indexer KL backward": (("sparse_indexer_kl_backward",), 1),
}
WARMUP_STEP_KERNELS = {
    # the KL's forward and its backward (the target is detached: no main-attention backward)
    "dense indexer KL": (("dense_indexer_kl_forward", "dense_indexer_kl_backward"), 2),
}


def _config(stage: str, context: int):
    from dsa_train.config import load_config

    return load_config("configs/deepseek-v3.2.yaml", [
        f"train.stage={stage}", f"train.batch_size={BATCH}", f"train.seq_len={SEQ}", "model.index_topk=128",
        f"model.num_hidden_layers={LAYERS}", "model.first_k_dense_replace=1", "model.num_nextn_predict_layers=0",
        "model.scan_layers=false", "model.hidden_size=256", "model.vocab_size=1024", "model.intermediate_size=256",
        "model.q_lora_rank=64", "model.n_routed_experts=4", "model.num_experts_per_tok=2",
        "model.moe_intermediate_size=64", "model.n_group=1", "model.topk_group=1", "model.kernels=pallas",
        f"mesh.fsdp={FSDP}", f"mesh.context={context}", "mesh.data=1"])


def exported_step(stage: str, context: int, platform: str) -> str:
    """The StableHLO text of the sharded train step, exported for ``platform`` (needs FSDP x
    context devices: run in the subprocess of :func:`exports`)."""
    from dsa_train.data.batch import BATCH_DTYPES, BATCH_KEYS
    from dsa_train.parallel import activate, make_mesh, resolve_rules
    from dsa_train.parallel.sharding import batch_sharding
    from dsa_train.parallel.state import abstract_train_state, jit_train_step, model_graphdef
    from dsa_train.train import step as step_lib
    from dsa_train.train.optim import make_optimizer

    cfg = _config(stage, context)
    mesh = make_mesh(cfg.mesh, jax.devices()[: FSDP * context])
    rules = resolve_rules(cfg.mesh.rules)
    t = cfg.train
    opt = {g: make_optimizer(getattr(t, g), t.steps) for g in step_lib.GROUPS}
    txs, scheds = {g: o[0] for g, o in opt.items()}, {g: o[1] for g, o in opt.items()}
    abstract, shardings = abstract_train_state(cfg, txs, mesh, rules)
    step = jit_train_step(step_lib.make_train_step(model_graphdef(cfg), cfg, txs, scheds, step_lib.forward_mode(cfg)),
                          shardings, mesh, rules, t.batch_size, t.seq_len)
    bsh = batch_sharding(mesh, rules, t.batch_size, t.seq_len)
    batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), np.dtype(BATCH_DTYPES[k]), sharding=bsh)
             for k in BATCH_KEYS}
    with activate(mesh, rules, remat=t.remat, expert_capacity=cfg.mesh.expert_capacity):
        exported = jax.export.export(step, platforms=[platform], disabled_checks=[TRITON_CALL])(abstract, batch)
    return exported.mlir_module()


def kernel_calls(text: str, platform: str) -> Counter:
    """Pallas custom calls by kernel name ("" for a call without one)."""
    calls = Counter()
    for line in text.splitlines():
        if f"custom_call @{CALL_TARGET[platform]}(" in line:
            name = NAME_ATTRIBUTE[platform].search(line)
            calls[name.group(1) if name else ""] += 1
    return calls


def _factor_count(n: int, p: int) -> int:
    count = 0
    while n and n % p == 0:
        n, count = n // p, count + 1
    return count


def quadratic_arrays(text: str, seq: int, context: int) -> list[str]:
    """Array types (outside string attributes: the kernels' own serialized IR) with two
    sequence-sized axes and at least seq x seq / context elements."""
    types = set(re.findall(r"tensor<([0-9x]+)x[a-z]+[0-9]*>", re.sub(r'"[^"]*"', '""', text)))
    found = []
    for dims in types:
        size = int(np.prod([int(d) for d in dims.split("x")]))
        if _factor_count(size, SEQ_PRIME) >= 2 * _factor_count(seq, SEQ_PRIME) and size >= seq * seq // context:
            found.append(dims)
    return sorted(found)


def _main() -> dict:
    """Every (stage, context, platform) step exported; its kernel calls and quadratic arrays."""
    jax.config.update("jax_num_cpu_devices", FSDP * 4)
    results = {}
    for stage in STAGES:
        for context, platform in CASES:
            start = time.perf_counter()
            try:
                text = exported_step(stage, context, platform)
            except Exception as e:  # reported per case; the other cases still run
                results[f"{stage}-{context}-{platform}"] = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
                continue
            results[f"{stage}-{context}-{platform}"] = {
                "calls": dict(kernel_calls(text, platform)), "quadratic": quadratic_arrays(text, SEQ, context),
                "seconds": round(time.perf_counter() - start, 1)}
    return results


@pytest.fixture(scope="module")
def exports() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


def _case(exports: dict, stage: str, context: int, platform: str) -> dict:
    case = exports[f"{stage}-{context}-{platform}"]
    assert "error" not in case, case["error"]
    return case


def _expect_kernels(case: dict, op: str, table: dict) -> None:
    names, per_layer = table[op]
    calls = case["calls"]
    assert "" not in calls, f"Pallas calls without a kernel name: {calls}"
    count = sum(n for name, n in calls.items() if name.startswith(names))
    assert count >= per_layer * LAYERS, f"{op}: {count} calls of {names} for {LAYERS} layers; all calls: {calls}"


@pytest.mark.slow
@pytest.mark.parametrize("op", list(SPARSE_STEP_KERNELS))
@pytest.mark.parametrize("context, platform", CASES)
def test_sparse_step_runs_the_kernels(exports, context, platform, op):
    _expect_kernels(_case(exports, "sparse", context, platform), op, SPARSE_STEP_KERNELS)


@pytest.mark.slow
@pytest.mark.parametrize("op", list(WARMUP_STEP_KERNELS))
@pytest.mark.parametrize("context, platform", CASES)
def test_warmup_step_runs_the_kernels(exports, context, platform, op):
    _expect_kernels(_case(exports, "warmup", context, platform), op, WARMUP_STEP_KERNELS)


# CUDA only: on TPU the warm-up's attention is splash (one device) or the pure-JAX flash kernel
# (context shards, whose traced query positions splash's static masks cannot take).
CUDA_WARMUP_KERNELS = {"dense attention forward": (("dense_attention_forward",), 1)}


@pytest.mark.slow
@pytest.mark.parametrize("context", (1, 4))
def test_cuda_warmup_step_runs_the_dense_attention_kernel(exports, context):
    _expect_kernels(_case(exports, "warmup", context, "cuda"), "dense attention forward", CUDA_WARMUP_KERNELS)


@pytest.mark.slow
@pytest.mark.parametrize("context, platform", CASES)
def test_sparse_step_holds_no_sequence_squared_array(exports, context, platform):
    assert _case(exports, "sparse", context, platform)["quadratic"] == []


def test_quadratic_array_check_sees_a_score_matrix():
    """The check above can fail: the reference top-k's [B, S, T] scores are found."""
    from dsa_train.ops.indexer import indexer_topk_reference

    shapes = (jax.ShapeDtypeStruct((1, SEQ, 4, 32), jnp.float32), jax.ShapeDtypeStruct((1, SEQ, 32), jnp.float32),
              jax.ShapeDtypeStruct((1, SEQ, 4), jnp.float32), jax.ShapeDtypeStruct((1, SEQ), jnp.int32))
    text = jax.export.export(jax.jit(lambda q, k, w, s: indexer_topk_reference(q, k, w, 8, s)),
                             platforms=["cuda"])(*shapes).mlir_module()
    assert f"1x{SEQ}x{SEQ}" in " ".join(quadratic_arrays(text, SEQ, 1))
    assert quadratic_arrays(text, SEQ, 1) and not quadratic_arrays(text.replace(str(SEQ), "128"), SEQ, 1)


if __name__ == "__main__":
    print("RESULT " + json.dumps(_main()), flush=True)
