"""`dsa-train demo`: does DSA keep long-context retrieval? The whole recipe on a task a tiny model
really solves, with the controls that show the indexer, not locality or luck, keeps it.

The task (data.synthetic_task=fused, FusedPairTask in dsa_train/data/synthetic.py): rows of
L = 512 tokens, 48 pair tokens P(key, value) with distinct keys among random filler, then 48
queries Q(key) whose next token is that key's value (8 values: chance 12.5 %). The answer depends
only on the one far pair token with the query's key, so only attention that reaches it can answer;
top-k attention keeps k = 32 = L/16 keys per query. Why L/16 and not L/8: control (a) below picks
about k keys at random among the ~415 before the query, so it holds the needle about k / 415 of the
time and guesses the rest at 12.5 %: ~26 % expected at k = 64, too close to its 30 % bar to tell an
indexer that fails from one that half works; ~19 % at k = 32 (DSA itself keeps 2,048 of 128K, L/64).

Stages (the real recipes with the tiny-model overrides below):
1. dense-short: dense training at L = 64 with 1 to 16 pairs per row (16 queries). Retrieval has
   two parts that only pay off together: the read-out (pair token -> its value) and the key
   matching (query -> the pair with its key). With uniform attention over many pairs neither has a
   gradient alone, and training sat at chance for hundreds of steps (measured at L = 64 to 512 with
   a fixed 16 or 48 pairs); rows with one or two pairs teach the read-out directly, then the
   matching follows,
2. dense-base:  dense training at L = 512 from dense-short: the base model that retrieves,
3. warm-up:     frozen model, indexers fitted to its dense attention (recipes/warmup.yaml), 200
   steps at indexer lr 3e-3: only the indexers train here, at ~0.3 s of CPU a step, and at the
   recipe's 60 steps / lr 1e-3 the retrieving layer's KL was still falling fast (0.83) and the
   warm-up alone lost 5-19 % of the answers in sparse mode; at 200 steps / 3e-3 it is ~0.05 and the
   warm-up alone (control c) already selects the needle for every scored query,
4. sparse:      top-k training of everything (recipes/sparse.yaml).

Then one evaluation on held-out rows (another seed), answer accuracy (top-1) per needle depth:
- dense base, dense attention (the reference),
- control (a): the dense base's untrained indexers used in sparse mode,
- control (b): a local window, the first 4 tokens (sinks) + the most recent keys, k in all,
- control (c): the warm-up checkpoint in sparse mode, before sparse training,
- the sparse-trained model in sparse mode,
plus each checkpoint's indexer diagnostics (captured mass per layer on held-out rows) and, per
layer, where its dense attention looks from the scored query (retrieval_by_layer): the layers that
retrieve are those whose largest attention weight is on the needle; the captured-mass bar (0.9) is
checked there, at the scored query. In this model layer 0 retrieves (its attention puts ~0.9 on the
needle); layer 1's attention at that query is spread over the whole context (largest weight ~0.03),
so no top-32 captures much of it, and sparse mode does not need it to. Results: a run directory per
stage, eval/ (dense base vs sparse: report.md, eval.json, needle heat maps of every mode),
eval-warmup/ (control c), summary.json (every stage's figures, time and the acceptance checks).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from dsa_train.config import load_config

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CONFIGS = Path(__file__).resolve().parent.parent / "configs"

SEQ_LEN, TOPK, SINKS = 512, 32, 4
SHORT = dict(seq_len=64, pairs=16, queries=16)
LONG = dict(seq_len=SEQ_LEN, pairs=48, queries=48)
# Needle depths: 0 = the first context cell, 1 = right before the scored query. Depth 1 lies in
# the local window's recent keys (the last 60), depth 0 (position 1) in its sink tokens.
DEPTHS = tuple(i / 7 for i in range(8))
RETRIEVES = 0.5  # a layer retrieves when its top attention key is the needle for most scored queries

# One attention head: one hop needs one head; in a model this small extra heads keep a diffuse
# attention that no top-k captures (dsa_train/smoke.py measured it).
COMMON = ["model.num_attention_heads=1", f"model.index_topk={TOPK}", "data.source=synthetic", "data.paths=[]",
          "data.synthetic_task=fused", "train.log_every=10"]


def _task(shape: dict) -> list[str]:
    return [f"train.seq_len={shape['seq_len']}", f"data.num_pairs={shape['pairs']}",
            f"data.num_queries={shape['queries']}"]


def stage_plan(out: Path, steps: dict) -> list[tuple[str, Path, list[str]]]:
    tiny = f"model={CONFIGS / 'tiny.yaml'}"
    return [
        ("dense-short", RECIPES / "dense-base.yaml",
         [tiny, *COMMON, *_task(SHORT), "data.synthetic_min_pairs=1", f"train.steps={steps['dense-short']}",
          "train.batch_size=64", "train.main.lr=3.0e-3", "train.main.schedule=constant", f"checkpoint.save_every={steps['dense-short']}",
          f"train.run_dir={out / 'dense-short'}"]),
        ("dense-base", RECIPES / "dense-base.yaml",
         [tiny, *COMMON, *_task(LONG), f"train.steps={steps['dense-base']}", "train.batch_size=16",
          "train.main.lr=1.0e-3", "train.main.warmup_steps=10", f"checkpoint.save_every={steps['dense-base']}",
          f"checkpoint.init_from={out / 'dense-short'}", f"train.run_dir={out / 'dense-base'}"]),
        ("warmup", RECIPES / "warmup.yaml",
         [tiny, *COMMON, *_task(LONG), f"train.steps={steps['warmup']}", "train.batch_size=8",
          "train.indexer.lr=3.0e-3", "train.diagnostic_rows=32", f"checkpoint.save_every={steps['warmup']}",
          f"checkpoint.init_from={out / 'dense-base'}", f"train.run_dir={out / 'warmup'}"]),
        ("sparse", RECIPES / "sparse.yaml",
         [tiny, *COMMON, *_task(LONG), f"train.steps={steps['sparse']}", "train.batch_size=16",
          "train.main.lr=3.0e-4", "train.indexer.lr=1.0e-3", "train.diagnostic_rows=32",
          "checkpoint.keep_every=null", f"checkpoint.save_every={steps['sparse']}",
          f"checkpoint.init_from={out / 'warmup'}", f"train.run_dir={out / 'sparse'}"]),
    ]


DEFAULT_STEPS = {"dense-short": 220, "dense-base": 100, "warmup": 200, "sparse": 60}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _last(run_dir: Path, key: str):
    values = [r[key] for r in _records(run_dir) if key in r]
    return values[-1] if values else None


def depth_accuracy(sweep: dict) -> list[float]:
    """Answer accuracy (top-1) per needle depth at the training length (the sweep's one column)."""
    column = sweep["lengths"].index(SEQ_LEN)
    return [row[column] for row in sweep["accuracy"]]


def beyond_window(context_len: int) -> list[bool]:
    """Per depth: the local window does not reach the needle: further from its query than the
    TOPK - SINKS most recent keys, and not one of the SINKS first tokens (depth 0 is position 1)."""
    query_at = 1 + context_len
    cells = [1 + int(round(d * (context_len - 1))) for d in DEPTHS]
    return [query_at - at >= TOPK - SINKS and at >= SINKS for at in cells]


def retrieval_by_layer(ckpt, cases, context_len: int, diagnostics) -> list[dict]:
    """Where each layer's dense attention looks from the scored query, over every needle case:
    top_key_is_needle, the share of queries whose largest attention weight is on the needle's pair
    token; top_share, the mean of that largest weight; captured_mass_at_query, the mean share of the
    query's dense attention that the layer's indexer selects (top-k). A layer retrieves when its
    top key is the needle for most queries (RETRIEVES): the captured-mass bar applies there, not to
    layers whose attention at that query is spread over the context (which no top-k captures)."""
    from dsa_train.eval.forward import LayerRunner

    runner = LayerRunner(ckpt.model, diagnostics)
    sums = {}
    for case in cases:
        needle_at = 1 + int(round(case.depth * (context_len - 1)))
        query = case.answer_positions[0]

        def add(layer, stats, needle_at=needle_at, query=query):
            s = {k: np.asarray(v)[:, query] for k, v in stats.items()}
            row = sums.setdefault(layer, np.zeros(4))
            row += (len(s["top_key"]), (s["top_key"] == needle_at).sum(), s["top_share"].sum(), s["captured_mass"].sum())

        runner.forward(case.tokens, np.ones_like(case.tokens), on_layer_stats=add, head=False)
    return [{"top_key_is_needle": float(n_needle / n), "top_share": float(share / n),
             "captured_mass_at_query": float(mass / n)} for _, (n, n_needle, share, mass) in sorted(sums.items())]


def evaluate_demo(out: Path, trials: int) -> dict:
    from dsa_train.data.synthetic import FusedPairTask
    from dsa_train.eval.checkpoints import load_checkpoint
    from dsa_train.eval.defaults import DEFAULT_HELDOUT_SEED
    from dsa_train.eval.forward import DiagnosticOptions
    from dsa_train.eval.report import write_report
    from dsa_train.eval.run import EvalOptions, evaluate, heldout_data_config, load_batches, needle_cases

    base, warm, sparse = (load_checkpoint(out / name) for name in ("dense-base", "warmup", "sparse"))
    data_config, note = heldout_data_config(sparse.run_config)
    vocab = sparse.model.config.vocab_size
    batches = load_batches(data_config, batches=2, batch_size=8, seq_len=SEQ_LEN, vocab_size=vocab,
                           seed=DEFAULT_HELDOUT_SEED)
    cases = needle_cases(data_config, batches, vocab_size=vocab, lengths=(SEQ_LEN,), depths=DEPTHS, trials=trials,
                         seed=DEFAULT_HELDOUT_SEED)
    diagnostics = DiagnosticOptions(recent_window=TOPK, sink_tokens=SINKS)
    options = EvalOptions(bucket_edges=(128, 384), diagnostics=diagnostics, progress=False, local_window=True,
                          local_sinks=SINKS)
    checkpoints = (("dense-base", base), ("warmup", warm), ("sparse", sparse))
    results = {name: evaluate(c, batches, cases, options) for name, c in checkpoints}
    meta = {"data": note, "seq_len": SEQ_LEN, "batches": 2, "batch_size": 8, "seed": DEFAULT_HELDOUT_SEED,
            "rows": options.rows, "bucket_edges": list(options.bucket_edges),
            "diagnostics": {"recent_window": TOPK, "sink_tokens": SINKS},
            "needle": {"lengths": [SEQ_LEN], "depths": list(DEPTHS), "trials": trials}}
    write_report([results["dense-base"], results["sparse"]], meta, out / "eval")
    write_report([results["warmup"]], meta, out / "eval-warmup")

    context_len = FusedPairTask(vocab_size=vocab, seq_len=SEQ_LEN, num_pairs=LONG["pairs"],
                                num_queries=LONG["queries"]).context_len
    needle = {name: r["needle"] for name, r in results.items()}
    by_layer = {name: retrieval_by_layer(c, cases, context_len, diagnostics) for name, c in checkpoints}
    by_depth = {
        "dense base (dense)": depth_accuracy(needle["dense-base"]["dense"]),
        "sparse (sparse)": depth_accuracy(needle["sparse"]["sparse"]),
        "control a: untrained indexer (dense base, sparse)": depth_accuracy(needle["dense-base"]["sparse"]),
        "control b: local window (dense base)": depth_accuracy(needle["dense-base"]["local"]),
        "control c: warm-up (sparse)": depth_accuracy(needle["warmup"]["sparse"]),
        "sparse, local window": depth_accuracy(needle["sparse"]["local"]),
    }
    far = beyond_window(context_len)
    dense, sp = by_depth["dense base (dense)"], by_depth["sparse (sparse)"]
    retrieving = [i for i, layer in enumerate(by_layer["sparse"]) if layer["top_key_is_needle"] >= RETRIEVES]
    return {
        "depths": list(DEPTHS), "beyond_window": far, "trials_per_depth": trials, "answer_accuracy_by_depth": by_depth,
        "captured_mass_by_layer": {name: [layer.get("captured_mass") for layer in r["indexer"]["layers"]]
                                   for name, r in results.items()},
        "retrieval_by_layer": by_layer, "retrieving_layers": retrieving,
        "acceptance": {
            "dense_base_min_accuracy": min(dense),
            "sparse_max_drop_vs_dense": max(d - s for d, s in zip(dense, sp)),
            "sparse_captured_mass_min_retrieving_layer": min(
                (by_layer["sparse"][i]["captured_mass_at_query"] for i in retrieving), default=None),
            "control_a_max_accuracy_beyond_window": max(a for a, f in zip(by_depth[
                "control a: untrained indexer (dense base, sparse)"], far) if f),
            "control_b_max_accuracy_beyond_window": max(a for a, f in zip(by_depth[
                "control b: local window (dense base)"], far) if f),
            "control_c_min_accuracy": min(by_depth["control c: warm-up (sparse)"]),
        },
    }


def run_demo(out: Path, extra_overrides: list[str] = (), steps: dict | None = None, trials: int = 64) -> dict:
    from dsa_train.train.trainer import train

    steps = {**DEFAULT_STEPS, **(steps or {})}
    out.mkdir(parents=True, exist_ok=True)
    timing = {}
    for name, recipe, overrides in stage_plan(out, steps):
        config = load_config(recipe, [*overrides, *extra_overrides])
        print(f"== stage {name}: {recipe.name} -> {config.train.run_dir}", flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        train(config)
        timing[name] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    print("== evaluation: dense base, controls, warm-up, sparse", flush=True)
    wall, cpu = time.perf_counter(), time.process_time()
    evaluation = evaluate_demo(out, trials)
    timing["eval"] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    summary = {
        "steps": steps,
        "stages": {name: {"lm_loss_final": _last(out / name, "lm_loss"), "accuracy_final": _last(out / name, "accuracy"),
                          "captured_mass_final": _last(out / name, "captured_mass"),
                          "indexer_kl_final": _last(out / name, "indexer_kl")}
                   for name in steps},
        "time": timing,
        **evaluation,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_table(summary))
    print(f"results: {out} (a run directory per stage, eval/ and eval-warmup/ reports, summary.json)")
    return summary


def format_table(summary: dict) -> str:
    """The README's table: answer accuracy per needle depth, one row per model / control."""
    far = summary["beyond_window"]
    header = "| model / control | " + " | ".join(f"{d:.0%}{'' if f else ' (local window reaches it)'}"
                                                  for d, f in zip(summary["depths"], far)) + " |"
    lines = [header, "|---|" + "---|" * len(far)]
    for name, accs in summary["answer_accuracy_by_depth"].items():
        lines.append(f"| {name} | " + " | ".join(f"{a:.2f}" for a in accs) + " |")
    return "\n".join(lines)
