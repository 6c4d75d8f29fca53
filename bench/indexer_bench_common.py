"""Harness shared by bench/indexer_kl.py and bench/indexer_topk.py: one subprocess per
(method, length) so that each peak RSS (ru_maxrss) belongs to that configuration alone, XLA's
compiled memory_analysis() next to it, results merged into a JSON file after every configuration,
a table and a PNG plot.

A configuration whose compiled footprint exceeds the memory budget is compiled (which allocates
nothing) but not run, and recorded as "does not fit" with XLA's number.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def available_memory_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 8.0


def measure(step, args, budget_gb: float, repeats: int) -> dict:
    """Compile `step` (a jitted function) for `args`, read XLA's footprint, run it if it fits."""
    import jax

    rec = {"rss_before_compile_gb": rss_gb()}
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    rec["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is not None:
        rec["xla_temp_gb"] = mem.temp_size_in_bytes / 2**30
        rec["xla_args_out_gb"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**30
        rec["xla_total_gb"] = rec["xla_temp_gb"] + rec["xla_args_out_gb"]
        if rec["xla_total_gb"] > budget_gb:
            rec["status"] = f"does not fit: XLA needs {rec['xla_total_gb']:.1f} GB > budget {budget_gb:.1f} GB"
            return rec
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    rec["times_s"] = times
    rec["time_s"] = min(times)
    rec["load_avg_1min_after"] = os.getloadavg()[0]  # shared machine: context for the timings
    rec["peak_rss_gb"] = rss_gb()
    rec["status"] = "ok"
    return rec


def child_entry(run_child) -> None:
    """argv: --child method length json-options. Prints one RESULT line; never raises."""
    method, length, options = sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    try:
        rec = run_child(method, length, options)
    except Exception as err:  # reported, not raised: the sweep goes on
        rec = {"status": f"error: {type(err).__name__}: {err}"[:600]}
    rec.update(method=method, length=length)
    print("RESULT " + json.dumps(rec), flush=True)


def environment(note: str) -> dict:
    import jax

    dev = jax.devices()[0]
    return {"device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}",
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": __import__("jaxlib").__version__, "note": note}


def sweep(script: str, stem: str, config: dict, methods, lengths, options: dict, timeout: float,
          results_dir: Path, note: str, summarize, title: str) -> dict:
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{stem}.json"
    doc = json.loads(json_path.read_text()) if json_path.exists() else {}
    if doc.get("config") not in (None, config):
        print(f"{json_path} holds results for another configuration; starting a new file", flush=True)
        doc = {}
    doc["config"], doc["environment"] = config, environment(note)
    entries = {(e["method"], e["length"]): e for e in doc.get("entries", [])}
    for length in lengths:
        for method in methods:
            print(f"[{time.strftime('%H:%M:%S')}] {method} L={length} ...", flush=True)
            cmd = [sys.executable, script, "--child", method, str(length), json.dumps(options)]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                rec = json.loads(lines[-1][7:]) if lines else {
                    "method": method, "length": length,
                    "status": f"crashed (rc {proc.returncode}, likely out of memory): {proc.stderr[-300:]}"}
            except subprocess.TimeoutExpired:
                rec = {"method": method, "length": length, "status": f"timeout after {timeout:.0f} s"}
            rec["wall_s"] = time.perf_counter() - t0
            print(f"    -> {rec.get('status')}  time {rec.get('time_s')}  peak RSS {rec.get('peak_rss_gb')} GB  "
                  f"XLA {rec.get('xla_total_gb')} GB", flush=True)
            entries[(method, length)] = rec
            doc["entries"] = sorted(entries.values(), key=lambda e: (e["method"], e["length"]))
            doc["summary"] = summarize(doc["entries"])
            json_path.write_text(json.dumps(doc, indent=1))
            plot(doc["entries"], results_dir / f"{stem}.png", title)
    print_table(doc.get("entries", []))
    print(json.dumps(doc.get("summary", {}), indent=1))
    return doc


def print_table(entries: list[dict]) -> None:
    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    print(f"{'method':<12} {'L':>6} {'time s':>9} {'peak RSS GB':>11} {'XLA GB':>8}  status")
    for e in sorted(entries, key=lambda e: (e["method"], e["length"])):
        print(f"{e['method']:<12} {e['length']:>6} {fmt(e.get('time_s'), '.3f'):>9} "
              f"{fmt(e.get('peak_rss_gb'), '.2f'):>11} {fmt(e.get('xla_total_gb'), '.2f'):>8}  {e.get('status')}")


def plot(entries: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, method in enumerate(sorted({e["method"] for e in entries})):
        color = f"C{i}"
        ok = sorted((e for e in entries if e["method"] == method and e.get("status") == "ok"),
                    key=lambda e: e["length"])
        if ok:
            ax_t.plot([e["length"] for e in ok], [e["time_s"] for e in ok], "o-", color=color, label=method)
            ax_m.plot([e["length"] for e in ok], [e["peak_rss_gb"] for e in ok], "o-", color=color,
                      label=f"{method} (measured peak RSS)")
        est = sorted((e for e in entries if e["method"] == method and "xla_total_gb" in e), key=lambda e: e["length"])
        if est:
            ax_m.plot([e["length"] for e in est], [e["xla_total_gb"] for e in est], "x--", color=color,
                      label=f"{method} (XLA compiled footprint; not run above the budget)")
    for ax, ylabel in ((ax_t, "time per call [s]"), (ax_m, "memory [GB]")):
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


def loglog_slope(points: list[tuple[float, float]]) -> float | None:
    import math

    if len(points) < 2:
        return None
    xs, ys = [math.log(x) for x, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
