"""Attention forward+backward time and peak memory vs sequence length: dense vs top-k sparse.

Methods (batch 1, H heads, top-k K, causal):
- dense:        causal attention in the MHA form (q/k 192 = 128 nope + 64 rope, v 128 per head),
                `dsa_train.ops.attention.dense_attention`; builds [H, L, L] scores.
- dense_mask:   the same MHA-form dense attention plus an additive top-k mask built from the indexer's
                indices (what MaxText and HF transformers do for DSA): still O(L^2) time and memory.
- sparse:       top-k sparse attention in the MQA/latent form (576 = 512 + 64, value 512), through
                `dsa_train.kernels.backend.Backend(--impl).sparse_mla_attention` (CPU default: blocked).

Each (method, length) runs in its own subprocess: peak memory is that process's ru_maxrss (it
includes the JAX runtime, about a few hundred MB, also reported on its own) next to XLA's compiled
memory_analysis(). A configuration whose compiled footprint exceeds --mem-budget-gb is compiled
but not run and is recorded as "does not fit". Results are merged into the JSON file after every
configuration, so a long sweep can be run in the background and resumed with other --lengths.

CPU:  python bench/sparse_attention.py --lengths 2048 4096 8192 16384 32768 --repeats 2
GPU:  python bench/sparse_attention.py --gpu --lengths 4096 8192 16384 --heads 128
      (bf16, impl pallas; adds forward / backward TFLOPS with FlashMLA's FLOP convention.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QK_NOPE, QK_ROPE, V_HEAD, KV_LORA = 128, 64, 128, 512  # DeepSeek-V3 MLA dims


def fwd_flops(method: str, length: int, heads: int, topk: int) -> float:
    """Forward matmul FLOPs actually executed (dense XLA does not skip the masked half)."""
    if method == "sparse":  # FlashMLA convention: 2 * s_q * topk * h * (576 + 512)
        return 2.0 * length * min(topk, length) * heads * (KV_LORA + QK_ROPE + KV_LORA)
    return 2.0 * length * length * heads * (QK_NOPE + QK_ROPE + V_HEAD)


def bwd_flops(method: str, length: int, heads: int, topk: int) -> float:
    """Backward matmul FLOPs: recompute s, dp, dq, dk, dv (sparse: 3 x 576 + 2 x 512 per pair and head)."""
    if method == "sparse":
        return 2.0 * length * min(topk, length) * heads * (3 * (KV_LORA + QK_ROPE) + 2 * KV_LORA)
    return 2.0 * length * length * heads * (3 * (QK_NOPE + QK_ROPE) + 2 * V_HEAD)


# ----------------------------------------------------------------------------------------------
# Child process: one configuration.


def causal_topk_indices(length: int, topk: int, seed: int = 0):
    """[1, L, K] int32: all candidates when t < K, else K distinct stratified-random keys in [0, t]."""
    import numpy as np

    k = min(topk, length)
    rng = np.random.default_rng(seed)
    t = np.arange(length)[:, None]
    slots = np.arange(k)[None, :]
    dense_rows = np.where(slots <= t, slots, -1)
    # One random key per stratum of width (t + 1) / K >= 1: distinct keys spread over [0, t].
    strat = np.floor((slots + rng.random((length, k))) * (t + 1) / k).astype(np.int64)
    idx = np.where(t + 1 <= k, dense_rows, np.minimum(strat, t))
    return idx.astype(np.int32)[None]


def build(method: str, length: int, heads: int, topk: int, dtype_name: str, impl: str):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsa_train.kernels.backend import Backend
    from dsa_train.ops.attention import NEG_INF, dense_attention

    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(1)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    indices = jnp.asarray(causal_topk_indices(length, topk))
    if method == "sparse":
        d = KV_LORA + QK_ROPE
        args = (normal(1, length, heads, d), normal(1, length, d))
        scale = d ** -0.5

        def loss(q, kv):
            out, _ = Backend.resolve(impl).sparse_mla_attention(q, kv, indices, scale, KV_LORA)
            return jnp.sum(out.astype(jnp.float32))
    else:
        dqk = QK_NOPE + QK_ROPE
        args = (normal(1, length, heads, dqk), normal(1, length, heads, dqk), normal(1, length, heads, V_HEAD))
        scale = dqk ** -0.5
        segment_ids = jnp.ones((1, length), jnp.int32)
        if method == "dense":
            def loss(q, k, v):
                out, _ = dense_attention(q, k, v, segment_ids, scale)
                return jnp.sum(out.astype(jnp.float32))
        else:
            def loss(q, k, v):
                # Additive top-k mask: [L, L] bias, 0 on the selected keys, NEG_INF elsewhere.
                rows = jnp.broadcast_to(jnp.arange(length)[:, None], indices.shape[1:])
                cols = jnp.where(indices[0] >= 0, indices[0], length)  # -1 -> dropped column
                bias = jnp.full((length, length + 1), NEG_INF, jnp.float32).at[rows, cols].set(0.0)[:, :length]
                scores = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32) * scale
                causal = jnp.tril(jnp.ones((length, length), bool))
                scores = jnp.where(causal, scores + bias, NEG_INF)
                probs = jax.nn.softmax(scores, axis=-1)
                out = jnp.einsum("bhst,bthd->bshd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
                return jnp.sum(out)
    step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
    return step, args


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def run_child(opts) -> dict:
    import jax

    rec = {"method": opts.method, "length": opts.length}
    rec["rss_after_import_gb"] = rss_gb()
    step, args = build(opts.method, opts.length, opts.heads, opts.topk, opts.dtype, opts.impl)
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    rec["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    budget = opts.mem_budget_gb
    if opts.gpu and not budget:
        budget = 0.9 * (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0) / 2**30
    if mem is not None and budget:
        rec["xla_temp_gb"] = mem.temp_size_in_bytes / 2**30
        rec["xla_args_out_gb"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**30
        rec["xla_total_gb"] = rec["xla_temp_gb"] + rec["xla_args_out_gb"]
        if rec["xla_total_gb"] > budget:
            rec["status"] = f"does not fit: XLA needs {rec['xla_total_gb']:.1f} GB > budget {budget:.1f} GB"
            return rec
    times, cpu_times = [], []
    for _ in range(opts.repeats + 1):  # the first call is a warm-up
        t0, c0 = time.perf_counter(), cpu_seconds()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
        cpu_times.append(cpu_seconds() - c0)
    rec["times_s"] = times[1:]
    # CPU seconds of all the process's threads: less sensitive than wall time to other jobs'
    # load on a shared machine (wall ~ cpu / cores when the machine is otherwise idle).
    rec["cpu_s"] = min(cpu_times[1:])
    rec["load_avg_1min_after"] = os.getloadavg()[0]  # the machine is shared: context for the timings
    rec["fwd_bwd_s"] = min(times[1:])
    rec["peak_rss_gb"] = rss_gb()
    if opts.gpu:
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            rec["device_peak_gb"] = stats["peak_bytes_in_use"] / 2**30
        rec.update(gpu_forward_timing(opts, args))
    rec["status"] = "ok"
    return rec


def gpu_forward_timing(opts, args) -> dict:
    """Forward alone on the accelerator (fwd+bwd minus this gives the backward time)."""
    import jax
    import jax.numpy as jnp

    from dsa_train.kernels.backend import Backend

    if opts.method != "sparse":
        return {}
    indices = jnp.asarray(causal_topk_indices(opts.length, opts.topk))
    scale = (KV_LORA + QK_ROPE) ** -0.5
    fwd = jax.jit(lambda q, kv: Backend.resolve(opts.impl).sparse_mla_attention(q, kv, indices, scale, KV_LORA))
    jax.block_until_ready(fwd(*args))
    times = []
    for _ in range(max(opts.repeats, 3)):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(*args))
        times.append(time.perf_counter() - t0)
    return {"fwd_s": min(times)}


def child_main(argv) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", required=True)
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--heads", type=int, required=True)
    parser.add_argument("--topk", type=int, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--impl", required=True)
    parser.add_argument("--mem-budget-gb", type=float, required=True)
    parser.add_argument("--gpu", action="store_true")
    opts = parser.parse_args(argv)
    try:
        rec = run_child(opts)
    except Exception as err:  # reported, not raised: the sweep goes on
        rec = {"method": opts.method, "length": opts.length, "status": f"error: {type(err).__name__}: {err}"[:500]}
    print("RESULT " + json.dumps(rec), flush=True)


# ----------------------------------------------------------------------------------------------
# Parent process: sweep, merge, summarize, plot.


def environment(opts) -> dict:
    import jax

    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "load_avg_1min_at_start": os.getloadavg()[0],
        "note": ("CPU run on a machine shared with other jobs (2 cores); no GPU was available, "
                 "GPU TFLOPS remain to be measured with --gpu." if not opts.gpu else "GPU run"),
    }


def loglog_slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(value) vs log(length)."""
    if len(points) < 2:
        return None
    xs = [math.log(l) for l, _ in points]
    ys = [math.log(v) for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def summarize(entries: list[dict]) -> dict:
    by = {(e["method"], e["length"]): e for e in entries}
    summary = {}
    for metric in ("fwd_bwd_s", "cpu_s"):
        ratios, pts = {}, []
        for (method, length), e in sorted(by.items()):
            if method != "sparse" or e.get("status") != "ok" or metric not in e:
                continue
            if 4096 <= length <= 32768:
                pts.append((length, e[metric]))
            for base in ("dense", "dense_mask"):
                b = by.get((base, length))
                if b is None:
                    continue
                ok = b.get("status") == "ok" and metric in b
                status = b.get("status")
                ratios[f"{base}/sparse@{length}"] = (b[metric] / e[metric] if ok else
                                                      status if status != "ok" else "not measured")
        summary[metric] = {"time_ratios": ratios, "sparse_loglog_slope_4k_32k": loglog_slope(pts),
                           "sparse_slope_points": [l for l, _ in pts]}
    return summary


def print_table(entries: list[dict]) -> None:
    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    print(f"{'method':<11} {'L':>6} {'fwd+bwd s':>10} {'cpu s':>8} {'GFLOP/s':>8} {'peak RSS GB':>11} "
          f"{'XLA GB':>7}  status")
    for e in sorted(entries, key=lambda e: (e["method"], e["length"])):
        print(f"{e['method']:<11} {e['length']:>6} {fmt(e.get('fwd_bwd_s'), '.3f'):>10} {fmt(e.get('cpu_s'), '.1f'):>8} "
              f"{fmt(e.get('fwd_bwd_gflops'), '.1f'):>8} {fmt(e.get('peak_rss_gb'), '.2f'):>11} "
              f"{fmt(e.get('xla_total_gb'), '.2f'):>7}  {e.get('status')}")


def plot(entries: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"dense": "tab:blue", "dense_mask": "tab:orange", "sparse": "tab:green"}
    for method in sorted({e["method"] for e in entries}):
        color = colors.get(method)
        ok = sorted((e for e in entries if e["method"] == method and e.get("status") == "ok"),
                    key=lambda e: e["length"])
        if ok:
            ax_t.plot([e["length"] for e in ok], [e["fwd_bwd_s"] for e in ok], "o-", color=color, label=f"{method} (wall)")
            cpu = [e for e in ok if "cpu_s" in e]
            if cpu:
                ax_t.plot([e["length"] for e in cpu], [e["cpu_s"] for e in cpu], "s:", color=color,
                          label=f"{method} (CPU s, all threads)")
            ax_m.plot([e["length"] for e in ok], [e["peak_rss_gb"] for e in ok], "o-", color=color, label=f"{method} (RSS)")
        est = sorted((e for e in entries if e["method"] == method and "xla_total_gb" in e), key=lambda e: e["length"])
        if est:
            ax_m.plot([e["length"] for e in est], [e["xla_total_gb"] for e in est], "x--", color=color,
                      label=f"{method} (XLA compiled)")
    for ax, ylabel in ((ax_t, "fwd+bwd time [s]"), (ax_m, "peak memory [GB]")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parent_main(opts) -> None:
    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = "sparse_attention_gpu" if opts.gpu else "sparse_attention_cpu"
    json_path = results_dir / f"{stem}.json"
    doc = json.loads(json_path.read_text()) if json_path.exists() else {}
    config = {"batch": 1, "heads": opts.heads, "topk": opts.topk, "dtype": opts.dtype, "impl": opts.impl,
              "dense_form": "MHA (q/k 192 = 128 + 64 rope, v 128 per head)",
              "sparse_form": "MQA/latent (q/k 576 = 512 + 64 rope, v 512, shared by all heads)",
              "indices": "causal; all candidates when t < K, else K stratified-random distinct keys in [0, t]",
              "timing": "min over repeats of one jitted value_and_grad call, after one warm-up call"}
    if doc.get("config") not in (None, config):
        print(f"{json_path} holds results for another configuration; starting a new file", flush=True)
        doc = {}
    doc["config"] = config
    if not (opts.summarize_only and "environment" in doc):
        doc["environment"] = environment(opts)
    entries = {(e["method"], e["length"]): e for e in doc.get("entries", [])}
    if opts.summarize_only:
        opts.lengths = []
    # GPU: the child takes 90% of the device's memory when no budget is given.
    mem_budget = opts.mem_budget_gb or (0.0 if opts.gpu else 0.75 * available_memory_gb())
    for length in opts.lengths:
        for method in opts.methods:
            cmd = [sys.executable, __file__, "--child", "--method", method, "--length", str(length),
                   "--heads", str(opts.heads), "--topk", str(opts.topk), "--repeats", str(opts.repeats),
                   "--dtype", opts.dtype, "--impl", opts.impl, "--mem-budget-gb", f"{mem_budget:.2f}"]
            if opts.gpu:
                cmd.append("--gpu")
            print(f"[{time.strftime('%H:%M:%S')}] {method} L={length} ...", flush=True)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout)
                lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if lines:
                    rec = json.loads(lines[-1][len("RESULT "):])
                else:
                    rec = {"method": method, "length": length,
                           "status": f"crashed (rc {proc.returncode}, likely out of memory): {proc.stderr[-300:]}"}
            except subprocess.TimeoutExpired:
                rec = {"method": method, "length": length, "status": f"timeout after {opts.timeout} s"}
            rec["wall_s"] = time.perf_counter() - t0
            if rec.get("status") == "ok":
                flops = fwd_flops(method, length, opts.heads, opts.topk) + bwd_flops(method, length, opts.heads, opts.topk)
                rec["fwd_bwd_gflops"] = flops / rec["fwd_bwd_s"] / 1e9
                if "fwd_s" in rec:
                    rec["fwd_tflops"] = fwd_flops(method, length, opts.heads, opts.topk) / rec["fwd_s"] / 1e12
                    bwd_s = rec["fwd_bwd_s"] - rec["fwd_s"]
                    rec["bwd_tflops"] = bwd_flops(method, length, opts.heads, opts.topk) / bwd_s / 1e12
            print(f"    -> {rec.get('status')}  fwd+bwd {rec.get('fwd_bwd_s')}", flush=True)
            entries[(method, length)] = rec
            doc["entries"] = sorted(entries.values(), key=lambda e: (e["method"], e["length"]))
            doc["summary"] = summarize(doc["entries"])
            json_path.write_text(json.dumps(doc, indent=1))
            plot(doc["entries"], results_dir / f"{stem}.png",
                 f"{doc['environment']['device']}, B=1 H={opts.heads} K={opts.topk} {opts.dtype}; "
                 f"dense: MHA 192/128, sparse: MQA 576/512 ({opts.impl})")
    doc["entries"] = sorted(entries.values(), key=lambda e: (e["method"], e["length"]))
    doc["summary"] = summarize(doc["entries"])
    json_path.write_text(json.dumps(doc, indent=1))
    plot(doc["entries"], results_dir / f"{stem}.png",
         f"{doc['environment']['device']}, B=1 H={opts.heads} K={opts.topk} {opts.dtype}; "
         f"dense: MHA 192/128, sparse: MQA 576/512 ({opts.impl})")
    print_table(doc["entries"])
    print(json.dumps(doc["summary"], indent=1))


def available_memory_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 8.0


def main() -> None:
    if "--child" in sys.argv:
        argv = [a for a in sys.argv[1:] if a != "--child"]
        return child_main(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--methods", nargs="+", default=["sparse", "dense_mask", "dense"],
                        choices=["sparse", "dense_mask", "dense"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 with --gpu")
    parser.add_argument("--impl", default=None, help="sparse implementation; default: blocked on CPU, pallas with --gpu")
    parser.add_argument("--mem-budget-gb", type=float, default=0.0, help="default: 75%% of MemAvailable")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    parser.add_argument("--gpu", action="store_true", help="accelerator run: bf16, Pallas kernel, TFLOPS")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    parser.add_argument("--summarize-only", action="store_true", help="recompute summary, table and plot")
    opts = parser.parse_args()
    opts.dtype = opts.dtype or ("bfloat16" if opts.gpu else "float32")
    opts.impl = opts.impl or ("pallas" if opts.gpu else "blocked")
    parent_main(opts)


if __name__ == "__main__":
    main()
