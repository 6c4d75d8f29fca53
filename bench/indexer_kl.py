"""Dense warm-up indexer KL, forward + backward: materialized reference vs streaming kernel.

Methods (batch 1, one causal document, float32 on CPU):
- reference: `dsa_train.ops.losses.indexer_kl_loss` (the reference), builds [H, L, L] main
  attention scores/probabilities and [Hi, L, L] indexer logits;
- streaming: `Backend("streaming")` (dsa_train.kernels.indexer_kl): pass 1 (per-head lse) + pass 2 +
  custom_vjp backward over key blocks; nothing of size L x L;
- streaming_lse: the same with the main attention's lse given (what the warm-up step can do when
  the dense attention already produced it): pass 1 skipped.
The timed function is jit(value_and_grad) w.r.t. the indexer inputs (what the warm-up trains).
Shapes: MQA main attention q [1, L, H, 576], kv [1, L, 576]; indexer q [1, L, Hi, 128],
k [1, L, 128], w [1, L, Hi]. Default H = Hi = 16 (DeepSeek-V3.2 uses H = 128, Hi = 64): reduced
heads so that a 2-core CPU finishes; memory scales with H for the reference and not for streaming.

CPU:  python bench/indexer_kl.py --lengths 1024 2048 4096 8192 16384
(every configuration in its own subprocess; see bench/indexer_bench_common.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import indexer_bench_common as common  # noqa: E402

D_MAIN, D_IDX = 576, 128


def run_child(method: str, length: int, options: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsa_train.kernels.indexer_kl import attention_lse_streaming
    from dsa_train.kernels.backend import Backend

    h, hi = options["heads"], options["index_heads"]
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    q, kv = normal(1, length, h, D_MAIN), normal(1, length, D_MAIN)
    q_idx, k_idx, w_idx = normal(1, length, hi, D_IDX), normal(1, length, D_IDX), normal(1, length, hi) * hi ** -0.5
    seg = jnp.ones((1, length), jnp.int32)
    sm_scale = D_MAIN ** -0.5
    impl = "reference" if method == "reference" else "streaming"
    args = [q, kv, q_idx, k_idx, w_idx, seg]
    if method == "streaming_lse":
        args.append(jax.jit(attention_lse_streaming, static_argnums=2)(q, kv, sm_scale, seg))

    def loss(q, kv, a, b, c, seg, lse=None):
        return Backend(impl).indexer_kl_loss(q, kv, sm_scale, a, b, c, seg, lse=lse)

    step = jax.jit(jax.value_and_grad(loss, argnums=(2, 3, 4)))
    repeats = 2 if length <= 4096 else 1
    return common.measure(step, args, options["budget_gb"], repeats)


def summarize(entries: list[dict]) -> dict:
    by = {(e["method"], e["length"]): e for e in entries}
    out = {"memory_ratio_reference_over_streaming_xla": {}, "memory_ratio_reference_over_streaming_rss": {}}
    for (method, length), e in sorted(by.items()):
        ref = by.get(("reference", length))
        if method != "streaming" or ref is None:
            continue
        if "xla_total_gb" in e and "xla_total_gb" in ref:
            out["memory_ratio_reference_over_streaming_xla"][length] = ref["xla_total_gb"] / e["xla_total_gb"]
        if e.get("status") == "ok" and ref.get("status") == "ok":
            out["memory_ratio_reference_over_streaming_rss"][length] = ref["peak_rss_gb"] / e["peak_rss_gb"]
    pts = sorted((e["length"], e["xla_total_gb"]) for e in entries if e["method"] == "streaming" and "xla_total_gb" in e
                 and e["length"] >= 2048)
    out["streaming_xla_footprint_loglog_slope"] = common.loglog_slope(pts)
    pts = sorted((e["length"], e["time_s"]) for e in entries if e["method"] == "streaming" and e.get("status") == "ok"
                 and e["length"] >= 2048)
    out["streaming_time_loglog_slope"] = common.loglog_slope(pts)
    s16 = by.get(("streaming", 16384), {})
    r16 = by.get(("reference", 16384), {})
    if "peak_rss_gb" in s16 and "xla_total_gb" in r16:
        out["target_16k"] = {"streaming_peak_rss_gb": s16["peak_rss_gb"], "reference_xla_gb": r16["xla_total_gb"],
                             "reference_status": r16.get("status"),
                             "met (streaming <= reference / 8)": s16["peak_rss_gb"] <= r16["xla_total_gb"] / 8}
    return out


def main() -> None:
    if "--child" in sys.argv:
        return common.child_entry(run_child)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--methods", nargs="+", default=["reference", "streaming"],
                        choices=["reference", "streaming", "streaming_lse"])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--index-heads", type=int, default=16)
    parser.add_argument("--mem-budget-gb", type=float, default=0.0,
                        help="default: min(8, 50%% of MemAvailable) -- the machine is shared")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    opts = parser.parse_args()
    budget = opts.mem_budget_gb or min(8.0, 0.5 * common.available_memory_gb())
    config = {"batch": 1, "heads": opts.heads, "index_heads": opts.index_heads, "main_dim": D_MAIN,
              "index_dim": D_IDX, "dtype": "float32", "documents": 1,
              "timed": "jit(value_and_grad) w.r.t. q_idx, k_idx, w_idx; min over calls (2 calls up to 4K, 1 above)"}
    note = ("CPU timings (the Pallas kernels are covered on CPU in interpret mode and by lowering only). "
            "Timings on a shared 2-core host are indicative; see load_avg. "
            f"Reduced heads (H={opts.heads}, Hi={opts.index_heads}; the real model has 128 and 64).")
    title = (f"indexer dense KL fwd+bwd, CPU, B=1 H={opts.heads} Hi={opts.index_heads} D=576 Di=128 fp32: "
             "reference (materialized) vs streaming")
    common.sweep(__file__, "indexer_kl_cpu", config, opts.methods, opts.lengths,
                 {"heads": opts.heads, "index_heads": opts.index_heads, "budget_gb": budget}, opts.timeout,
                 Path(opts.results_dir), note, summarize, title)


if __name__ == "__main__":
    main()
