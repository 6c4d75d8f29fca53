"""Ahead-of-time compile of the TPU sparse indexer KL (forward + backward) for a v5p chip.

No TPU needed: libtpu compiles for a deviceless v5p topology (real Mosaic compilation, so VMEM
overflows fail here as they would on the chip). Records, per sequence length: compile success or
the error, compile time, XLA's memory analysis (HBM arguments / outputs / temporaries), the scoped
VMEM of each of the four kernels, and the module docstring's per-(query, slot) counts.

    python bench/tpu_sparse_indexer_kl_compile.py --lengths 131072
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from dsa_train.parallel.hlo_costs import kernel_scoped_vmem
from dsa_train.kernels.indexer_kl import sparse_indexer_kl_loss_pallas

RESULTS = Path(__file__).parent / "results" / "tpu_sparse_indexer_kl_compile.json"


def v5p_device():
    from jax.experimental import topologies

    return topologies.get_topology_desc("v5p:2x2x1", "tpu").devices[0]


def compile_fwd_bwd(device, length: int, heads: int = 128, topk: int = 2048, d: int = 576, idx_heads: int = 64,
                    idx_dim: int = 128):
    """Lower and compile the loss and its gradients w.r.t. the indexer inputs (bf16 q / keys, fp32
    head weights, batch 1, self-attention) for one device; returns (compiled, seconds)."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    bf16, f32 = jnp.bfloat16, jnp.float32
    args = (spec((1, length, idx_heads, idx_dim), bf16), spec((1, length, idx_dim), bf16),
            spec((1, length, idx_heads), f32), spec((1, length, heads, d), bf16), spec((1, length, d), bf16),
            spec((1, length, topk), jnp.int32), spec((1, length, heads), f32), spec((1, length), jnp.int32))

    def loss(q_idx, k_idx, w_idx, q, kv, indices, lse, segment_ids):
        return sparse_indexer_kl_loss_pallas(q, kv, indices, lse, d ** -0.5, q_idx, k_idx, w_idx, segment_ids,
                                             impl="pallas_tpu")

    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    return compiled, time.perf_counter() - start


def kernel_vmem(hlo_text: str) -> dict:
    """Scoped VMEM each Mosaic kernel uses, as the compiled program's custom calls record it."""
    return kernel_scoped_vmem(hlo_text, r"(sparse_indexer_kl_[a-z_]*[a-z])")


def stated_counts(length: int, heads: int, topk: int, d: int, idx_heads: int, idx_dim: int) -> dict:
    """The TPU module docstring's per-(query, slot) counts, times the number of (query, slot) pairs."""
    pairs = length * topk
    return {"pairs": pairs,
            "flops_target": pairs * 2 * heads * d, "flops_forward": pairs * 2 * idx_heads * idx_dim,
            "flops_backward": pairs * 8 * idx_heads * idx_dim,
            "hbm_bytes_per_pair": {"target": 2 * d + 8, "forward": 2 * idx_dim + 8, "backward": 4 * idx_dim + 8}}


def record(device, length: int, heads: int, topk: int) -> dict:
    entry = {"seq_len": length, "heads": heads, "topk": topk, "d": 576, "idx_heads": 64, "idx_dim": 128,
             "dtype": "bfloat16", "batch": 1, "target": "v5p:2x2x1 (one chip)"}
    try:
        compiled, seconds = compile_fwd_bwd(device, length, heads, topk)
    except Exception as err:  # noqa: BLE001 - the error is the figure being recorded
        entry.update(compiled=False, error=str(err).splitlines()[0][:400])
        return entry
    mem = compiled.memory_analysis()
    entry.update(
        compiled=True, compile_seconds=round(seconds, 1),
        hbm_argument_bytes=mem.argument_size_in_bytes, hbm_output_bytes=mem.output_size_in_bytes,
        hbm_temp_bytes=mem.temp_size_in_bytes, vmem_bytes_per_kernel=kernel_vmem(compiled.as_text()),
        stated=stated_counts(length, heads, topk, 576, 64, 128))
    return entry


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072])
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = v5p_device()
    entries = []
    for length in args.lengths:
        entry = record(device, length, args.heads, args.topk)
        print(json.dumps(entry), flush=True)
        entries.append(entry)
    payload = {"jax": jax.__version__, "python": platform.python_version(), "runs": entries,
               "note": "vmem_bytes_per_kernel: the scoped VMEM each kernel uses in the compiled program; "
                       "'stated' holds the TPU module docstring's counts (bytes per (query, slot) pair)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
