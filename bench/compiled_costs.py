"""Compiled costs of the 671B train steps on TPU v5p, per chip and per layer, from XLA's own program
(`dsa-train plan --target`, no TPU needed: libtpu's deviceless topologies).

For each stage (dense warm-up, sparse) and sequence length, a fresh process compiles the real train
step of recipes/{warmup,sparse}.yaml (DeepSeek-V3.2 widths, scanned layers, the docs/plan-671b.md
meshes with context parallelism) for the v5p slice of the mesh's size and reports XLA's per-chip
memory, the loop-counted FLOPs / HBM bytes / collective bytes of the program and of one layer of
each scanned stack, and the step time built from them.

    python bench/compiled_costs.py                       # both stages at 32K and 128K
    python bench/compiled_costs.py --stages warmup --lengths 32768 --set model.num_nextn_predict_layers=0 \
        --out bench/results/plan_compiled_baseline.json --no-docs

    # the costs of compiles already made, read again from the modules XLA dumped (XLA_FLAGS=
    # --xla_dump_to=DIR --xla_dump_hlo_as_text) when the walker changed: memory stays as compiled
    python bench/compiled_costs.py --rewalk old.json DIR/module_0000.jit_train_step.*.after_optimizations.txt ...

    # one (stage, length) compiled again: its entry in bench/results/plan_compiled.json replaced
    python bench/compiled_costs.py --update new.json --out bench/results/plan_compiled.json

Writes bench/results/compiled_costs.json and .md (or --out), and, unless --no-docs, the figures
between the `compiled-plan` markers of docs/plan-671b.md and README.md. On 2 CPU cores each compile
takes minutes (the JSON records lower and compile seconds); a compile that fails is recorded with
its error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RULES = ["mesh.rules.embed=[fsdp, context]", "mesh.rules.q_lora=[fsdp, context]",
         "mesh.rules.kv_lora=[fsdp, context]", "mesh.expert_capacity=1.25"]
STAGES = {
    # The docs/plan-671b.md layouts: 16 x 128K on 256 chips, 480 x 128K on 2,048 (15 micro-batches).
    "warmup": {"recipe": "recipes/warmup.yaml", "mesh": "data=1,fsdp=2,expert=8,tensor=1,context=16",
               "batch": 16, "sets": []},
    "sparse": {"recipe": "recipes/sparse.yaml", "mesh": "data=1,fsdp=4,expert=8,tensor=1,context=64",
               "batch": 480, "sets": ["train.grad_accum=15"]},
}
MARK = ("<!-- compiled-plan:begin (python bench/compiled_costs.py) -->", "<!-- compiled-plan:end -->")


def command(stage: str, seq_len: int, depth_cut: str | None, target: str, sets: list[str] = ()) -> list[str]:
    s = STAGES[stage]
    cmd = [sys.executable, "-m", "dsa_train.cli", "plan", s["recipe"], "--target", target, "--stage", stage,
           "--mesh", s["mesh"], "--batch", str(s["batch"]), "--seq-len", str(seq_len), "--remat", "full", "--json"]
    if depth_cut:
        cmd += ["--depth-cut", depth_cut]
    for item in RULES + s["sets"] + list(sets):
        cmd += ["--set", item]
    return cmd


def run_one(stage: str, seq_len: int, depth_cut: str | None, target: str, timeout: int, sets=()) -> dict:
    cmd = command(stage, seq_len, depth_cut, target, sets)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"stage": stage, "seq_len": seq_len, "error": f"timed out after {timeout} s"}
    wall = time.perf_counter() - start
    last = [line for line in proc.stdout.splitlines() if line.startswith("[{")]
    if proc.returncode or not last:
        err = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
        return {"stage": stage, "seq_len": seq_len, "error": (err[-1] if err else proc.stderr[-500:]).strip(),
                "wall_s": wall}
    result = json.loads(last[-1])[0]
    result["wall_s"] = wall
    result["command"] = "dsa-train " + " ".join(f"'{c}'" if " " in c else c for c in cmd[3:])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    if commit.returncode == 0:
        result["compiled_from_commit"] = commit.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    return result


def _layer_cell(r: dict, kind: str, key: str, scale: float) -> str:
    layer = r.get("per_layer", {}).get(kind)
    return f"{layer[key] / scale:.3g}" if layer else "-"


def markdown(results: list[dict]) -> str:
    lines = ["| stage | tokens per step | chips | per-chip peak (HBM 95 GB) | compiled TFLOPs per chip | "
             "HBM TB per chip | ICI GB per chip | one MoE layer: TFLOPs / HBM TB / ICI GB | step time (all "
             "overlapped .. none) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['stage']} | {r['batch'] if 'batch' in r else ''} x {r['seq_len']:,} | | "
                         f"does not compile: {r['error'][:120]} | | | | | |")
            continue
        w, mem = r["full_depth"] or r["walked"], r.get("full_memory") or r["memory"]
        t = r["full_time"] or r["time"]
        chips = 1
        for v in r["mesh"].values():
            chips *= v
        lines.append(
            f"| {r['stage']} | {r['batch']} x {r['seq_len']:,} | {chips:,} | {mem['peak'] / 1e9:.1f} GB"
            f"{'' if r['fits'] else ' (DOES NOT FIT)'} | {w['flops'] / 1e12:.1f} | {w['bytes_accessed'] / 1e12:.2f} | "
            f"{w['wire_bytes'] / 1e9:.0f} | {_layer_cell(r, 'moe', 'flops', 1e12)} / "
            f"{_layer_cell(r, 'moe', 'bytes_accessed', 1e12)} / {_layer_cell(r, 'moe', 'wire_bytes', 1e9)} | "
            f"{t['lower_s']:.1f} .. {t['upper_s']:.1f} s |")
    return "\n".join(lines)


def replace_block(path: Path, body: str) -> bool:
    text = path.read_text()
    pattern = re.compile(re.escape(MARK[0]) + r".*?" + re.escape(MARK[1]), re.S)
    if not pattern.search(text):
        return False
    path.write_text(pattern.sub(lambda _: f"{MARK[0]}\n{body}\n{MARK[1]}", text))
    return True


def rewalk(result_files: list[str], hlo_files: list[str]) -> list[dict]:
    """The results of ``result_files`` (one compile each) with their walked costs, per-layer costs
    and step times read again from the optimized modules XLA dumped for them."""
    sys.path.insert(0, str(REPO))
    from dsa_train.parallel import plan_tpu

    results = []
    for result_file, hlo in zip(result_files, hlo_files, strict=True):
        for r in json.loads(Path(result_file).read_text())["results"]:
            r.update(plan_tpu.walk(Path(hlo).read_text(), r["stacks"]))
            plan_tpu.add_step_times(r, plan_tpu.TPU_CHIPS["v5p"])
            r["walked_from"] = "the dumped optimized module"
            results.append(r)
    return results


def update(results: list[dict], result_files: list[str]) -> list[dict]:
    """``results`` with the entry of each (stage, seq_len) in ``result_files`` replaced by theirs."""
    key = lambda r: (r["stage"], r["seq_len"])  # noqa: E731
    newer = {key(r): r for f in result_files for r in json.loads(Path(f).read_text())["results"]}
    merged = [newer.pop(key(r), r) for r in results]
    return merged + list(newer.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--lengths", nargs="+", type=int, default=[32768, 131072])
    p.add_argument("--depth-cut", default="2+3",
                   help="DENSE+MOE layers compiled (scanned stacks of different lengths, so that each stack's "
                        "per-layer cost is read apart), extrapolated to the full 3 + 58; 'full': no cut")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every plan, e.g. model.num_nextn_predict_layers=0")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per compile")
    p.add_argument("--out", default=str(REPO / "bench/results/compiled_costs.json"))
    p.add_argument("--no-docs", action="store_true", help="do not update docs/plan-671b.md and README.md")
    p.add_argument("--rewalk", nargs="+", metavar="FILE",
                   help="no compile: result JSON files then, in the same order, the optimized HLO each was dumped as")
    p.add_argument("--update", nargs="+", metavar="FILE",
                   help="no compile: the results already in --out, each (stage, length) that a result JSON file "
                        "given here holds replaced by its entry there (new ones appended)")
    args = p.parse_args()
    results = []
    if args.rewalk:
        half = len(args.rewalk) // 2
        if len(args.rewalk) % 2:
            p.error("--rewalk: as many HLO files as result files")
        results = rewalk(args.rewalk[:half], args.rewalk[half:])
    if args.update:
        results = update(json.loads(Path(args.out).read_text())["results"], args.update)
    for seq_len in [] if args.rewalk or args.update else args.lengths:
        for stage in args.stages:
            target = "tpu-v5p"
            cut = None if args.depth_cut == "full" else args.depth_cut
            r = run_one(stage, seq_len, cut, target, args.timeout, args.sets)
            print(json.dumps({k: r.get(k) for k in ("stage", "seq_len", "error", "wall_s", "compile_s")}), flush=True)
            results.append(r)
    out = Path(args.out)
    out.write_text(json.dumps({"results": results}, indent=1) + "\n")
    md = markdown(results)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    if not args.no_docs:
        for doc in (REPO / "docs/plan-671b.md", REPO / "README.md"):
            replace_block(doc, md)


if __name__ == "__main__":
    main()
