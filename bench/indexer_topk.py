"""Lightning-indexer top-k selection: full-score reference vs streaming (running top-k merge).

Methods (batch 1, one causal document, float32 on CPU; forward only, selection has no gradient):
- reference: `dsa_train.ops.indexer.indexer_topk_reference`, builds [Hi, L, L] logits and the
  [L, L] score matrix, then one lax.top_k;
- streaming: `dsa_train.kernels.indexer_topk.indexer_topk_streaming` (the CPU path of
  impl="auto"): query chunks x causal key chunks, running top-k; O(L K) memory.
Shapes: q [1, L, Hi, 128], k [1, L, 128], w [1, L, Hi], K = 2048 (DeepSeek-V3.2's index_topk).
Default Hi = 16 (the real indexer has 64): reduced heads so that a 2-core CPU finishes.

CPU:  python bench/indexer_topk.py --lengths 2048 4096 8192 16384
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import indexer_bench_common as common  # noqa: E402

D_IDX = 128


def run_child(method: str, length: int, options: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsa_train.kernels.indexer_topk import indexer_topk_streaming
    from dsa_train.ops.indexer import indexer_topk_reference

    hi, topk = options["index_heads"], options["topk"]
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    args = (normal(1, length, hi, D_IDX), normal(1, length, D_IDX), normal(1, length, hi) * hi ** -0.5,
            jnp.ones((1, length), jnp.int32))
    fn = indexer_topk_reference if method == "reference" else indexer_topk_streaming
    step = jax.jit(lambda q, k, w, seg: fn(q, k, w, topk, seg))
    return common.measure(step, args, options["budget_gb"], 2 if length <= 4096 else 1)


def summarize(entries: list[dict]) -> dict:
    by = {(e["method"], e["length"]): e for e in entries}
    out = {"memory_ratio_reference_over_streaming_xla": {}, "time_ratio_reference_over_streaming": {}}
    for (method, length), e in sorted(by.items()):
        ref = by.get(("reference", length))
        if method != "streaming" or ref is None:
            continue
        if "xla_total_gb" in e and "xla_total_gb" in ref:
            out["memory_ratio_reference_over_streaming_xla"][length] = ref["xla_total_gb"] / e["xla_total_gb"]
        if e.get("status") == "ok" and ref.get("status") == "ok":
            out["time_ratio_reference_over_streaming"][length] = ref["time_s"] / e["time_s"]
    pts = sorted((e["length"], e["xla_total_gb"]) for e in entries
                 if e["method"] == "streaming" and "xla_total_gb" in e and e["length"] >= 4096)
    out["streaming_xla_footprint_loglog_slope_from_4k"] = common.loglog_slope(pts)
    return out


def main() -> None:
    if "--child" in sys.argv:
        return common.child_entry(run_child)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--methods", nargs="+", default=["reference", "streaming"], choices=["reference", "streaming"])
    parser.add_argument("--index-heads", type=int, default=16)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--mem-budget-gb", type=float, default=0.0,
                        help="default: min(8, 50%% of MemAvailable) -- the machine is shared")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    opts = parser.parse_args()
    budget = opts.mem_budget_gb or min(8.0, 0.5 * common.available_memory_gb())
    config = {"batch": 1, "index_heads": opts.index_heads, "index_dim": D_IDX, "topk": opts.topk,
              "dtype": "float32", "documents": 1, "timed": "jit(forward); min over calls (2 up to 4K, 1 above)"}
    note = ("CPU timings (the Pallas scoring kernel is covered on CPU in interpret mode and by lowering only). "
            "Timings on a shared 2-core host are indicative. "
            f"Reduced indexer heads (Hi={opts.index_heads}; the real indexer has 64).")
    title = (f"indexer top-k (K={opts.topk}), CPU, B=1 Hi={opts.index_heads} Di=128 fp32: "
             "full scores (reference) vs streaming")
    common.sweep(__file__, "indexer_topk_cpu", config, opts.methods, opts.lengths,
                 {"index_heads": opts.index_heads, "topk": opts.topk, "budget_gb": budget}, opts.timeout,
                 Path(opts.results_dir), note, summarize, title)


if __name__ == "__main__":
    main()
