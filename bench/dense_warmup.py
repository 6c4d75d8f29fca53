"""The warm-up's dense path on CPU: flash dense attention and the one-pass dense KL against the
versions they replaced, and the warm-up step's compiled memory against the sequence length.

1. Timing (one process, interleaved rounds: every round times each method once, ratios of medians):
   - attention: the frozen forward the warm-up runs (jit, no backward), per-head form
     q/k [1, L, H, 192], v [1, L, H, 128], one causal document. "blocked" = the query-block XLA
     version of ``--baseline`` (fp32 [H, block, T] scores, no causal skipping), "flash" =
     ``kernels/dense_attention.py``.
   - kl: jit(value_and_grad) w.r.t. the indexer inputs, the main attention's lse given. "three_pass" =
     ``--baseline``'s streaming KL (MQA form, 576-dim target formed in the forward and in both
     backward loops), "one_pass" = ``kernels/dense_indexer_kl.py`` on the per-head form (192-dim,
     target formed once). Indexer q [1, L, Hi, 128], k [1, L, 128].
   The baseline modules are read from git (``git show REV:path``) and run next to the current ones.
2. Memory: ``dsa-train plan --compile --stage warmup`` of configs/tiny.yaml (hidden 128, 2 layers)
   at L = 4K .. 32K, batch 1, one device: XLA's peak (arguments + temporaries) and its log-log slope.

CPU:  python bench/dense_warmup.py            (writes bench/results/dense_warmup_cpu.json / .md)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BASELINE = "20c3395"  # the last commit with the query-block attention and the three-pass KL


def _baseline_module(rev: str, path: str, name: str):
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True, capture_output=True,
                            text=True).stdout
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def _time(fn, args) -> float:
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def timing(rev: str, lengths: list[int], heads: int, index_heads: int, rounds: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsa_train.kernels import dense_attention, indexer_kl
    from dsa_train.ops import attention as attention_ops

    old_attention = _baseline_module(rev, "dsa_train/ops/attention.py", "baseline_attention")
    old_kl = _baseline_module(rev, "dsa_train/kernels/indexer_kl.py", "baseline_indexer_kl")
    results = []
    for length in lengths:
        rng = np.random.default_rng(0)
        normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
        q, k, v = normal(1, length, heads, 192), normal(1, length, heads, 192), normal(1, length, heads, 128)
        q_mqa, kv_mqa = normal(1, length, heads, 576), normal(1, length, 576)
        q_idx, k_idx = normal(1, length, index_heads, 128), normal(1, length, 128)
        w_idx = normal(1, length, index_heads) * index_heads ** -0.5
        seg = jnp.ones((1, length), jnp.int32)
        scale = 192 ** -0.5
        _, lse = jax.jit(attention_ops.dense_attention, static_argnums=4)(q, k, v, seg, scale)
        lse_mqa = old_kl.attention_lse_streaming(q_mqa, kv_mqa, 576 ** -0.5, seg)

        attention = {
            "blocked": (jax.jit(lambda q, k, v: old_attention.dense_attention_blocked(q, k, v, seg, scale)),
                        (q, k, v)),
            "flash": (jax.jit(lambda q, k, v: dense_attention.dense_attention_flash(q, k, v, seg, scale)),
                      (q, k, v)),
        }
        grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))  # noqa: E731
        kl = {
            "three_pass": (grad(lambda a, b, c: old_kl.dense_indexer_kl_loss(
                q_mqa, kv_mqa, 576 ** -0.5, a, b, c, seg, lse_mqa)), (q_idx, k_idx, w_idx)),
            "one_pass": (grad(lambda a, b, c: indexer_kl.dense_indexer_kl_loss(
                q, k, scale, a, b, c, seg, lse)), (q_idx, k_idx, w_idx)),
        }
        for op, methods in (("attention", attention), ("kl", kl)):
            for fn, args in methods.values():
                _time(fn, args)  # compile + warm
            times = {name: [] for name in methods}
            for _ in range(rounds):
                for name, (fn, args) in methods.items():
                    times[name].append(_time(fn, args))
            med = {name: statistics.median(t) for name, t in times.items()}
            old, new = list(med)
            entry = {"op": op, "length": length, "heads": heads, "index_heads": index_heads, "rounds": rounds,
                     "median_s": med, "speedup": med[old] / med[new]}
            print(json.dumps(entry), flush=True)
            results.append(entry)
    return results


def memory(lengths: list[int]) -> list[dict]:
    results = []
    for length in lengths:
        cmd = [sys.executable, "-m", "dsa_train.cli", "plan", str(REPO / "configs" / "tiny.yaml"), "--compile",
               "--stage", "warmup", "--seq-len", str(length), "--batch", "1",
               "--mesh", "data=1,fsdp=1,expert=1,tensor=1,context=1", "--json",
               "--set", f"model.max_position_embeddings={length}"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO,
                             env={**__import__("os").environ, "PYTHONPATH": str(REPO)}).stdout
        plan = json.loads(out.strip().splitlines()[-1])[0]
        entry = {"length": length, "xla_peak": plan["xla_peak"], "xla_temp": plan["xla_temp"],
                 "xla_argument": plan["xla_argument"]}
        print(json.dumps(entry), flush=True)
        results.append(entry)
    return results


def slope(points) -> float:
    (x0, y0), (x1, y1) = points[0], points[-1]
    return math.log(y1 / y0) / math.log(x1 / x0)


def write(results: dict, stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# Warm-up dense path on CPU (bench/dense_warmup.py)", ""]
    if results.get("timing"):
        lines += ["| op | L | H | Hi | before (s) | after (s) | speedup |", "|---|---|---|---|---|---|---|"]
        for e in results["timing"]:
            before, after = e["median_s"].values()
            lines.append(f"| {e['op']} ({' -> '.join(e['median_s'])}) | {e['length']} | {e['heads']} | "
                         f"{e['index_heads']} | {before:.3f} | {after:.3f} | {e['speedup']:.2f}x |")
        lines.append("")
    if results.get("memory"):
        lines += ["| L | XLA peak (MiB) | temp (MiB) |", "|---|---|---|"]
        for e in results["memory"]:
            lines.append(f"| {e['length']} | {e['xla_peak'] / 2**20:.1f} | {e['xla_temp'] / 2**20:.1f} |")
        pts = [(e["length"], e["xla_peak"]) for e in results["memory"]]
        lines += ["", f"log-log slope of the peak from L = {pts[0][0]} to {pts[-1][0]}: {slope(pts):.3f}"]
        results["memory_slope"] = slope(pts)
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the replaced kernels")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--index-heads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-lengths", type=int, nargs="*", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "dense_warmup_cpu"))
    args = parser.parse_args()
    results = {}
    if args.memory_lengths:
        results["memory"] = memory(args.memory_lengths)
    if not args.skip_timing:
        results["timing"] = timing(args.baseline, args.lengths, args.heads, args.index_heads, args.rounds)
    write(results, Path(args.out))


if __name__ == "__main__":
    main()
