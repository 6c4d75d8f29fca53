"""Ahead-of-time compile of the TPU sparse MLA attention (forward + backward) for a v5p chip.

No TPU needed: libtpu compiles for a deviceless v5p topology (real Mosaic compilation, so VMEM
overflows fail here as they would on the chip). Records, per sequence length: compile success or
the error, compile time, XLA's memory analysis (HBM arguments / outputs / temporaries) and the
compiled cost analysis (FLOPs, bytes accessed), next to the kernels' stated per-(query, slot) counts.

    python bench/tpu_sparse_attention_compile.py --lengths 32768 131072
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
from dsa_train.kernels.sparse_attention_tpu import sparse_mla_attention_tpu
from dsa_train.ops.attention import NEG_INF

RESULTS = Path(__file__).parent / "results" / "tpu_sparse_attention_compile.json"


def v5p_device():
    from jax.experimental import topologies

    return topologies.get_topology_desc("v5p:2x2x1", "tpu").devices[0]


def attention_grad(d: int, v_dim: int):
    def loss(q, kv, idx):
        out, lse = sparse_mla_attention_tpu(q, kv, idx, d ** -0.5, v_dim)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(lse > NEG_INF / 2, lse, 0.0))

    return jax.grad(loss, argnums=(0, 1))


def compile_fwd_bwd(device, length: int, heads: int = 128, topk: int = 2048, d: int = 576, v_dim: int = 512,
                    dtype=jnp.bfloat16):
    """Lower and compile grad(q, kv) of the attention for one device; returns (compiled, seconds)."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = (jax.ShapeDtypeStruct((1, length, heads, d), dtype, sharding=sharding),
            jax.ShapeDtypeStruct((1, length, d), dtype, sharding=sharding),
            jax.ShapeDtypeStruct((1, length, topk), jnp.int32, sharding=sharding))
    start = time.perf_counter()
    compiled = jax.jit(attention_grad(d, v_dim)).lower(*args).compile()
    return compiled, time.perf_counter() - start


def stated_counts(length: int, heads: int, topk: int, d: int, v_dim: int) -> dict:
    """The module docstring's per-(query, slot) counts, times the number of (query, slot) pairs."""
    pairs = length * topk
    row_bytes = 4 * -(-d // 2)  # a bf16 row packed two values per 32-bit word
    return {"pairs": pairs, "gathered_row_bytes": row_bytes,
            "matmul_flops_fwd": pairs * 2 * heads * (d + v_dim),
            "matmul_flops_bwd": pairs * 2 * heads * ((2 * d + v_dim) + (2 * d + 2 * v_dim)),
            "gathered_bytes_fwd_plus_bwd": pairs * 3 * row_bytes}


def kernel_vmem(hlo_text: str) -> dict:
    """Scoped VMEM each Mosaic kernel uses, as the compiled program's custom calls record it."""
    return kernel_scoped_vmem(hlo_text, r'op_name="[^"]*?(sparse_mla_[a-z_]+?)[_)]*/pallas_call"')


def record(device, length: int, heads: int, topk: int, d: int, v_dim: int) -> dict:
    entry = {"seq_len": length, "heads": heads, "topk": topk, "d": d, "v_dim": v_dim, "dtype": "bfloat16",
             "batch": 1, "target": "v5p:2x2x1 (one chip)"}
    try:
        compiled, seconds = compile_fwd_bwd(device, length, heads, topk, d, v_dim)
    except Exception as err:  # noqa: BLE001 - the error is the figure being recorded
        entry.update(compiled=False, error=str(err).splitlines()[0][:400])
        return entry
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    entry.update(
        compiled=True, compile_seconds=round(seconds, 1),
        hbm_argument_bytes=mem.argument_size_in_bytes, hbm_output_bytes=mem.output_size_in_bytes,
        hbm_temp_bytes=mem.temp_size_in_bytes, hbm_generated_code_bytes=mem.generated_code_size_in_bytes,
        cost_flops=cost.get("flops"), cost_bytes_accessed=cost.get("bytes accessed"),
        vmem_bytes_per_kernel=kernel_vmem(compiled.as_text()),
        stated=stated_counts(length, heads, topk, d, v_dim))
    return entry


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--label", default="current", help="key of these runs in the results file")
    parser.add_argument("--no-stated", action="store_true", help="leave out this module's stated counts "
                        "(for runs of other versions of the kernels)")
    args = parser.parse_args()
    device = v5p_device()
    entries = []
    for length in args.lengths:
        entry = record(device, length, args.heads, args.topk, 576, 512)
        if args.no_stated:
            entry.pop("stated", None)
        print(json.dumps(entry), flush=True)
        entries.append(entry)
    payload = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    payload.update(jax=jax.__version__, python=platform.python_version(),
                   note="cost_flops / cost_bytes_accessed: XLA's compiled cost analysis, which takes each Mosaic "
                        "kernel's own cost estimate; 'stated' holds the module docstring's counts; "
                        "vmem_bytes_per_kernel: the scoped VMEM each kernel uses in the compiled program")
    payload["runs"][args.label] = entries
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
