"""Compile time of the train step vs model depth: decoder layers in a Python loop vs scanned
(`model.scan_layers`).

For every depth and layout, a fresh process builds the real jitted train step the trainer runs
(`parallel.state.jit_train_step`, 1-device mesh, abstract state: nothing is allocated), then times
`lower` (tracing + StableHLO) and `compile` (XLA) separately. Model: configs/tiny.yaml widths,
`first_k_dense_replace` 1 (one dense-FFN layer, the rest MoE: two stacks when scanned), fp32,
stage `sparse` by default (forward + backward of LM loss and indexer KL, top-k attention).

CPU:  python bench/compile_depth.py --depths 2 4 8 16
Writes bench/results/compile_depth.json and compile_depth.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import indexer_bench_common as common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = ("loop", "scan")


def run_child(layout: str, depth: int, options: dict) -> dict:
    import jax

    from dsa_train.config import load_config
    from dsa_train.parallel import activate, make_mesh, resolve_rules
    from dsa_train.parallel.plan import abstract_train_step

    cfg = load_config(REPO / "configs/tiny.yaml", [
        f"model.num_hidden_layers={depth}", "model.first_k_dense_replace=1", "model.kernels=reference",
        f"model.scan_layers={'true' if layout == 'scan' else 'false'}", f"train.stage={options['stage']}",
        f"train.batch_size={options['batch']}", f"train.seq_len={options['seq']}", f"train.remat={options['remat']}",
        "model.index_topk=16", "train.diagnostic_rows=4", "mesh.data=1"])
    t = cfg.train
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    rules = resolve_rules(cfg.mesh.rules)
    step, abstract, batch = abstract_train_step(cfg, mesh, rules)
    with activate(mesh, rules, remat=t.remat):
        t0 = time.perf_counter()
        lowered = step.lower(abstract, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    hlo_lines = lowered.as_text().count("\n")
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0, "stablehlo_lines": hlo_lines,
            "code_bytes": compiled.memory_analysis().generated_code_size_in_bytes,
            "load_avg_1m": os.getloadavg()[0], "status": "ok"}


def table(doc: dict) -> str:
    by = {(e["method"], e["length"]): e for e in doc["entries"]}
    depths = sorted({e["length"] for e in doc["entries"]})
    lines = ["| layers | loop: lower s | loop: compile s | loop: total s | scan: lower s | scan: compile s "
             "| scan: total s | loop / scan | StableHLO lines loop / scan |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in depths:
        loop, scan = by.get(("loop", d), {}), by.get(("scan", d), {})
        cells = [str(d)]
        for e in (loop, scan):
            cells += [f"{e[k]:.1f}" if e.get("status") == "ok" else e.get("status", "-")
                      for k in ("lower_s", "compile_s", "total_s")]
        ok = loop.get("status") == scan.get("status") == "ok"
        cells.append(f"{loop['total_s'] / scan['total_s']:.2f}" if ok else "-")
        cells.append(f"{loop['stablehlo_lines']} / {scan['stablehlo_lines']}" if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if "--child" in sys.argv:
        return common.child_entry(run_child)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--stage", choices=("dense", "warmup", "sparse"), default="sparse")
    parser.add_argument("--remat", choices=("none", "full", "dots"), default="none")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    opts = parser.parse_args()
    options = {"stage": opts.stage, "remat": opts.remat, "batch": opts.batch, "seq": opts.seq}
    config = {**options, "model": "configs/tiny.yaml widths, first_k_dense_replace 1, fp32, index_topk 16",
              "timed": "jit_train_step(...).lower(abstract state, batch) and .compile(), fresh process each"}
    note = ("CPU (XLA:CPU), 2 cores shared with other jobs: absolute seconds are indicative, the growth with "
            "depth is the point. load_avg_1m is recorded per entry.")
    entries = []
    for depth in opts.depths:
        for layout in LAYOUTS:
            print(f"[{time.strftime('%H:%M:%S')}] {layout} layers={depth} ...", flush=True)
            cmd = [sys.executable, __file__, "--child", layout, str(depth), json.dumps(options)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout, cwd=REPO)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                rec = json.loads(lines[-1][7:]) if lines else {
                    "method": layout, "length": depth,
                    "status": f"crashed (rc {proc.returncode}): {proc.stderr[-300:]}"}
            except subprocess.TimeoutExpired:
                rec = {"method": layout, "length": depth, "status": f"timeout after {opts.timeout:.0f} s"}
            print(f"    -> {rec.get('status')}  lower {rec.get('lower_s')}  compile {rec.get('compile_s')}", flush=True)
            entries.append(rec)
    doc = {"config": config, "environment": common.environment(note), "entries": entries}
    ok = {(e["method"], e["length"]): e["total_s"] for e in entries if e.get("status") == "ok"}
    depths = sorted(opts.depths)
    if all((m, d) in ok for m in LAYOUTS for d in (depths[0], depths[-1])) and len(depths) > 1:
        span = depths[-1] - depths[0]
        doc["summary"] = {f"{m}_seconds_per_extra_layer": (ok[(m, depths[-1])] - ok[(m, depths[0])]) / span
                          for m in LAYOUTS}
    results = Path(opts.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / "compile_depth.json").write_text(json.dumps(doc, indent=1))
    md = [f"# Train-step compile time vs depth (stage {opts.stage}, remat {opts.remat}, B={opts.batch}, "
          f"S={opts.seq})", "", f"`python bench/compile_depth.py --depths {' '.join(map(str, opts.depths))}`. "
          + note, "", table(doc), ""]
    if "summary" in doc:
        md.append(", ".join(f"{k.replace('_', ' ')}: {v:.2f}" for k, v in doc["summary"].items()))
    (results / "compile_depth.md").write_text("\n".join(md) + "\n")
    print(table(doc))


if __name__ == "__main__":
    main()
