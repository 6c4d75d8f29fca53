"""Ahead-of-time compile of the TPU dense indexer KL (Pallas one-pass kernel, forward + backward) for a v5p chip.

No TPU needed: libtpu compiles for a deviceless v5p topology (real Mosaic compilation, so VMEM
overflows fail here as they would on the chip). Two forms at the real DeepSeek-V3.2 shapes
(H = 128 main heads, indexer 64 heads x 128, bf16, batch 1):
- "per_head": one device, S = T = L, per-head main keys (qk_head_dim 192);
- "mqa_cp4": one context shard of 4 under the zig-zag layout, S = L / 4 queries at their row
  positions against the T = L gathered keys in the MQA/latent form (576).
Records compile success or the error, compile time, XLA's memory analysis, the compiled cost
analysis and the scoped VMEM of each kernel, next to the module's stated per-pair FLOPs.

    python bench/tpu_dense_kl_compile.py --lengths 32768 131072
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dsa_train.parallel.hlo_costs import kernel_scoped_vmem
from dsa_train.kernels.dense_indexer_kl_pallas import TPU_BLOCKS, dense_kl_sum_pallas, pair_flops
from dsa_train.parallel import sequence_order

RESULTS = Path(__file__).parent / "results" / "tpu_dense_kl_compile.json"
HEADS, IDX_HEADS, IDX_DIM = 128, 64, 128
FORMS = {"per_head": (192, 1), "mqa_cp4": (576, 4)}  # (main head dim, context shards)


def v5p_device():
    from jax.experimental import topologies

    return topologies.get_topology_desc("v5p:2x2x1", "tpu").devices[0]


def compile_fwd_bwd(device, length: int, form: str):
    """grad in (q_idx, k_idx, w_idx) of the KL sum for one shard; returns (compiled, seconds, S)."""
    d, shards = FORMS[form]
    s = length // shards
    sharding = jax.sharding.SingleDeviceSharding(device)
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    keys = spec(1, length, HEADS, d) if shards == 1 else spec(1, length, d)
    args = (spec(1, s, HEADS, d), keys, spec(1, s, HEADS, dtype=jnp.float32), spec(1, s, IDX_HEADS, IDX_DIM),
            spec(1, length, IDX_DIM), spec(1, s, IDX_HEADS), spec(1, s, dtype=jnp.float32),
            spec(1, s, dtype=jnp.int32), spec(1, length, dtype=jnp.int32))
    positions = np.asarray(sequence_order.slot_positions("zigzag" if shards > 1 else "contiguous", length, shards)[:s])

    def loss(q, k, lse, a, b, c, wt, q_seg, k_seg):
        return dense_kl_sum_pallas(q, k, lse, a, b, c, wt, positions, q_seg, k_seg, sm_scale=d ** -0.5, variant="tpu")

    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(3, 4, 5))).lower(*args).compile()
    return compiled, time.perf_counter() - start, s


def kernel_vmem(hlo_text: str) -> dict:
    """Scoped VMEM each Mosaic kernel uses, as the compiled program's custom calls record it."""
    return kernel_scoped_vmem(hlo_text, r'(dense_indexer_kl_(?:forward|backward))')


def record(device, length: int, form: str) -> dict:
    d, shards = FORMS[form]
    entry = {"form": form, "seq_len": length, "heads": HEADS, "head_dim": d, "idx_heads": IDX_HEADS,
             "idx_dim": IDX_DIM, "context_shards": shards, "blocks": list(TPU_BLOCKS), "dtype": "bfloat16",
             "batch": 1, "target": "v5p:2x2x1 (one chip)"}
    try:
        compiled, seconds, s = compile_fwd_bwd(device, length, form)
    except Exception as err:  # noqa: BLE001 - the error is the figure being recorded
        entry.update(compiled=False, error=str(err).splitlines()[0][:400])
        return entry
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    pairs = s * length // 2
    entry.update(
        compiled=True, compile_seconds=round(seconds, 1), queries=s,
        hbm_argument_bytes=mem.argument_size_in_bytes, hbm_output_bytes=mem.output_size_in_bytes,
        hbm_temp_bytes=mem.temp_size_in_bytes, cost_flops=cost.get("flops"),
        cost_bytes_accessed=cost.get("bytes accessed"), vmem_bytes_per_kernel=kernel_vmem(compiled.as_text()),
        stated={"causal_pairs": pairs, "flops_per_pair": pair_flops(HEADS, d, IDX_HEADS, IDX_DIM),
                "flops": pairs * pair_flops(HEADS, d, IDX_HEADS, IDX_DIM)})
    return entry


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = v5p_device()
    entries = []
    for form in args.forms:
        for length in args.lengths:
            entry = record(device, length, form)
            print(json.dumps(entry), flush=True)
            entries.append(entry)
    payload = {"jax": jax.__version__, "python": platform.python_version(), "runs": entries,
               "note": "cost_flops / cost_bytes_accessed: XLA's compiled cost analysis, which takes each Mosaic "
                       "kernel's own cost estimate (built from the stated per-pair count, so it is not an "
                       "independent measurement of the kernels); vmem_bytes_per_kernel: the scoped VMEM each "
                       "kernel uses in the compiled program (the limit is 64 MiB per TensorCore)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
