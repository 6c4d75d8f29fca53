"""What the sparse MLA, sparse indexer KL and dense attention Pallas Triton kernels compile to on sm_90a, without a GPU.

Lowers the kernels for CUDA on any machine (jax.jit(...).trace(...).lower with the "cuda"
platform), captures the Triton IR that Pallas hands to XLA, compiles it with the `triton` wheel
(TTIR -> TTGIR -> LLVM -> PTX) and runs the wheel's own ptxas for sm_90a on the PTX. Reported per
kernel: wgmma / mma.sync instruction counts, registers per thread, spill bytes, shared memory, and
the number of acq_rel atomics. This is what decides block sizes before a GPU measurement exists.

Needs the `triton` package (test extra). CLI: python -m dsa_train.kernels.gpu_compiled_code
writes bench/results/gpu_compiled.json (and prints it): the defaults' figures, then those of the
CANDIDATES (alternative block sizes, one kernel each) the defaults were chosen against.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

SM90_MAX_REGISTERS = 255  # per thread
SM90_MAX_SHARED_BYTES = 227 * 1024  # per block (opt-in maximum on H100/H200)
REAL_SHAPES = dict(heads=128, dim=576, v_dim=512, topk=2048, kv_len=4096, queries=4)
# Dense attention: the per-head form (192 = 128 nope + 64 rope, v 128) and the shared-key MQA form
# (576 / 512) of the context-parallel path; the sequence length changes only the loop trip counts.
DENSE_SHAPES = dict(heads=128, seq=4096, per_head=(192, 128), shared=(576, 512))


@contextlib.contextmanager
def capture_triton_ir():
    """Collect the TTIR text of every Pallas Triton kernel lowered inside the block."""
    from jax._src.pallas.triton import lowering as triton_lowering

    captured: list[str] = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    triton_lowering.lower_jaxpr_to_triton_module = recording
    try:
        yield captured
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = original


def compile_ttir(ttir: str, num_warps: int, num_stages: int, arch: int = 90) -> dict:
    """Compile TTIR for sm_{arch}a with Triton + ptxas; the figures that matter."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        t0 = time.perf_counter()
        kernel = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                                options=dict(num_warps=num_warps, num_stages=num_stages))
        compile_s = time.perf_counter() - t0
        ptx = kernel.asm["ptx"]
        ptx_path = os.path.join(tmp, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        report = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}a", "-v", ptx_path, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))
    return dict(wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"), registers=registers,
                spill_store_bytes=spills, shared_bytes=int(kernel.metadata.shared),
                acq_rel_atomics=len(re.findall(r"atom\.[^;]*acq_rel|red\.[^;]*acq_rel", ptx)),
                num_warps=num_warps, num_stages=num_stages, compile_s=round(compile_s, 2))


def sparse_mla_compiled(heads=128, dim=576, v_dim=512, topk=2048, kv_len=4096, queries=4, **block_sizes) -> dict:
    """{"forward" | "backward_dq" | "backward_dkv" | "head_summed_probs": figures} of the GPU sparse
    MLA kernels at bf16 for these shapes."""
    from dsa_train.kernels.sparse_attention_gpu import (GpuKernelConfig, sparse_mla_attention_gpu,
                                                        sparse_mla_head_summed_probs_gpu)

    q = jax.ShapeDtypeStruct((1, queries, heads, dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, kv_len, dim), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((1, queries, topk), jnp.int32)
    scale = dim ** -0.5

    def grads(q, kv, idx):
        def loss(q, kv):
            out, _ = sparse_mla_attention_gpu(q, kv, idx, scale, v_dim, **block_sizes)
            return out.astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1))(q, kv)

    with capture_triton_ir() as ttirs:
        jax.jit(grads).trace(q, kv, idx).lower(lowering_platforms=("cuda",))
    forward_ir, dq_ir, dkv_ir = ttirs  # the VJP runs the forward kernel, then the two backward kernels
    lse = jax.ShapeDtypeStruct((1, queries, heads), jnp.float32)
    with capture_triton_ir() as probs_ir:
        jax.jit(lambda q, kv, idx, lse: sparse_mla_head_summed_probs_gpu(q, kv, idx, lse, scale, v_dim)
                ).trace(q, kv, idx, lse).lower(lowering_platforms=("cuda",))
    cfg = GpuKernelConfig(sm_scale=scale, v_dim=v_dim, **block_sizes)
    value_blocks = dict(block_h=cfg.block_h, block_k=cfg.block_k, chunk_v=cfg.chunk_v, v_splits=cfg.v_splits)
    return dict(
        head_summed_probs=compile_ttir(probs_ir[0], num_warps=8, num_stages=1) | dict(block_h=64, block_k=16),
        forward=compile_ttir(forward_ir, cfg.num_warps, cfg.num_stages_fwd) | value_blocks,
        backward_dq=compile_ttir(dq_ir, cfg.num_warps, cfg.num_stages) | value_blocks | dict(v_splits=cfg.v_splits_dq),
        backward_dkv=compile_ttir(dkv_ir, cfg.num_warps_dkv, cfg.num_stages_dkv)
        | dict(block_k=cfg.block_k_bwd, block_h=cfg.block_h_bwd, chunk_v=cfg.chunk_v, v_splits=cfg.v_splits_dkv),
    )


def dense_forward_compiled(form: str, heads: int, seq: int, dims: tuple[int, int], **block_sizes) -> dict:
    """Figures of the GPU flash dense attention forward (kernels/dense_attention_gpu.py) at bf16 in
    one form: "per_head" (k/v [B, T, H, D]) or "shared" (k/v [B, T, D], the MQA form)."""
    return _dense_compiled(form, heads, seq, dims, backward=False, **block_sizes)["forward"]


def dense_backward_compiled(heads: int, seq: int, dims: tuple[int, int], **block_sizes) -> dict:
    """{"backward_dq" | "backward_dkv": figures} of the per-head form's backward kernels at bf16."""
    figures = _dense_compiled("per_head", heads, seq, dims, backward=True, **block_sizes)
    return {k: v for k, v in figures.items() if k != "forward"}


def _dense_compiled(form: str, heads: int, seq: int, dims: tuple[int, int], backward: bool, **block_sizes) -> dict:
    from dsa_train.kernels.dense_attention_gpu import default_config, flash_attention_gpu

    dk, dv = dims
    shared = form == "shared"
    kv = (1, seq) if shared else (1, seq, heads)
    args = (jax.ShapeDtypeStruct((1, seq, heads, dk), jnp.bfloat16), jax.ShapeDtypeStruct((*kv, dk), jnp.bfloat16),
            jax.ShapeDtypeStruct((*kv, dv), jnp.bfloat16), jax.ShapeDtypeStruct((seq,), jnp.int32),
            jax.ShapeDtypeStruct((1, seq), jnp.int32))

    def attend(q, k, v, pos, seg):
        return flash_attention_gpu(q, k, v, pos, seg, seg, dk ** -0.5, **block_sizes)

    def grads(q, k, v, pos, seg):
        return jax.grad(lambda q, k, v: attend(q, k, v, pos, seg)[0].astype(jnp.float32).sum(),
                        argnums=(0, 1, 2))(q, k, v)
    with capture_triton_ir() as ttirs:
        jax.jit(grads if backward else attend).trace(*args).lower(lowering_platforms=("cuda",))
    cfg = default_config(dk ** -0.5, shared=shared, **block_sizes)
    blocks = dict(block_k=cfg.block_k, v_splits=cfg.v_splits)
    blocks |= dict(block_h=cfg.block_h) if shared else dict(block_q=cfg.block_q)
    figures = dict(forward=compile_ttir(ttirs[0], cfg.num_warps, cfg.num_stages) | blocks)
    if backward:  # the VJP runs the forward kernel, then the dQ and the dK/dV kernels
        figures["backward_dq"] = compile_ttir(ttirs[1], cfg.num_warps_bwd, cfg.num_stages_bwd) | dict(
            block_q=cfg.block_q_dq, block_k=cfg.block_k_dq)
        figures["backward_dkv"] = compile_ttir(ttirs[2], cfg.num_warps_bwd, cfg.num_stages_bwd) | dict(
            block_k=cfg.block_k_dkv, block_q=cfg.block_q_dkv)
    return figures


def dense_attention_compiled(heads=128, seq=4096, per_head=(192, 128), shared=(576, 512)) -> dict:
    """{"forward_per_head" | "forward_shared" | "backward_dq_per_head" | "backward_dkv_per_head":
    figures} at the defaults."""
    figures = {f"forward_{form}": dense_forward_compiled(form, heads, seq, dims)
               for form, dims in (("per_head", per_head), ("shared", shared))}
    return figures | {f"{kernel}_per_head": f for kernel, f in dense_backward_compiled(heads, seq, per_head).items()}


def sparse_indexer_kl_compiled(idx_heads=64, idx_dim=128, topk=2048, kv_len=4096, queries=4) -> dict:
    """{"forward" | "backward": figures} of the sparse indexer KL's Triton kernels
    (kernels/sparse_indexer_kl_gpu.py) at bf16 for these shapes, with their default blocks."""
    from dsa_train.kernels import sparse_indexer_kl_gpu as kl_gpu

    spec = jax.ShapeDtypeStruct
    args = (spec((1, queries, idx_heads, idx_dim), jnp.bfloat16), spec((1, kv_len, idx_dim), jnp.bfloat16),
            spec((1, queries, idx_heads), jnp.float32), spec((1, queries, topk), jnp.int32),
            spec((1, queries, topk), jnp.float32))
    row = spec((1, queries), jnp.float32)
    with capture_triton_ir() as forward_ir:
        jax.jit(kl_gpu.sparse_kl_stats_gpu).trace(*args).lower(lowering_platforms=("cuda",))
    with capture_triton_ir() as backward_ir:
        jax.jit(kl_gpu.sparse_kl_grads_gpu).trace(*args, row, row, row).lower(lowering_platforms=("cuda",))
    cfg = kl_gpu.GpuKlConfig()
    return dict(forward=compile_ttir(forward_ir[0], cfg.num_warps, cfg.num_stages) | dict(block_k=cfg.block_k),
                backward=compile_ttir(backward_ir[0], cfg.num_warps_bwd, cfg.num_stages) | dict(block_k=cfg.block_k))


# Alternatives to the defaults, one kernel each: (kernel, block sizes that differ from the defaults).
# Compiled by the CLI next to the defaults, so the choice stays visible and re-checkable.
CANDIDATES = [
    ("forward", dict(v_splits=1)),
    ("forward", dict(v_splits=1, num_warps=16)),
    ("forward", dict(v_splits=2, chunk_v=64)),
    ("forward", dict(v_splits=2, block_k=32)),
    ("forward", dict(v_splits=4)),
    ("backward_dq", dict(v_splits_dq=2)),
    ("backward_dq", dict(v_splits_dq=4, num_stages=1)),
    ("backward_dq", dict(v_splits_dq=4, num_stages=2)),
    ("backward_dkv", dict(v_splits_dkv=2)),
    ("backward_dkv", dict(block_h_bwd=32)),
    ("backward_dkv", dict(num_stages_dkv=1)),
    ("backward_dkv", dict(num_warps_dkv=4)),
    ("backward_dkv", dict(num_warps_dkv=16, num_stages_dkv=1)),
]


def candidates_compiled(shapes: dict) -> list[dict]:
    """Figures of each CANDIDATES entry (its kernel only)."""
    return [dict(kernel=kernel, overrides=overrides) | sparse_mla_compiled(**shapes, **overrides)[kernel]
            for kernel, overrides in CANDIDATES]


# The dense forward's alternatives: (form, block sizes that differ from that form's defaults).
DENSE_CANDIDATES = [
    ("per_head", dict(num_stages=3)),
    ("per_head", dict(block_q=64, num_warps=4)),
    ("shared", dict(block_k=32)),
    ("shared", dict(block_k=32, v_splits=4)),
]
# The per-head backward's alternatives: (kernel, block sizes that differ from the defaults).
DENSE_BACKWARD_CANDIDATES = [
    ("backward_dq", dict(block_k_dq=64)),
    ("backward_dkv", dict(block_q_dkv=64)),
    ("backward_dkv", dict(block_q_dkv=16)),
    ("backward_dq", dict(num_stages_bwd=3)),
    ("backward_dkv", dict(num_warps_bwd=4)),
]


def dense_candidates_compiled(shapes: dict) -> list[dict]:
    """Figures of each DENSE_CANDIDATES and DENSE_BACKWARD_CANDIDATES entry."""
    forward = [dict(kernel=f"dense_forward_{form}", overrides=overrides)
               | dense_forward_compiled(form, shapes["heads"], shapes["seq"], shapes[form], **overrides)
               for form, overrides in DENSE_CANDIDATES]
    return forward + [dict(kernel=f"dense_{kernel}_per_head", overrides=overrides)
                      | dense_backward_compiled(shapes["heads"], shapes["seq"], shapes["per_head"], **overrides)[kernel]
                      for kernel, overrides in DENSE_BACKWARD_CANDIDATES]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/gpu_compiled.json")
    parser.add_argument("--defaults-only", action="store_true", help="skip the CANDIDATES (about 2 min on 2 cores)")
    args = parser.parse_args(argv)
    try:
        import triton
    except ImportError:
        print("error: the `triton` package is needed (pip install 'dsa-train[test]')", file=sys.stderr)
        return 2
    result = dict(arch="sm_90a", triton=triton.__version__, jax=jax.__version__, shapes=REAL_SHAPES,
                  dtype="bfloat16", sparse_mla=sparse_mla_compiled(**REAL_SHAPES), dense_shapes=DENSE_SHAPES,
                  dense_attention=dense_attention_compiled(**DENSE_SHAPES),
                  sparse_indexer_kl=sparse_indexer_kl_compiled(topk=REAL_SHAPES["topk"], kv_len=REAL_SHAPES["kv_len"],
                                                               queries=REAL_SHAPES["queries"]))
    if not args.defaults_only:
        result["candidates"] = candidates_compiled(REAL_SHAPES) + dense_candidates_compiled(DENSE_SHAPES)
    text = json.dumps(result, indent=1)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
