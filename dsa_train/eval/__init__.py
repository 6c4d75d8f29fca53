"""`dsa-train eval CHECKPOINT [CHECKPOINT_B]`: is the indexer good enough, and did sparse training
keep the model's quality?

On held-out data (the built-in synthetic task with another seed, the run's datasets, or prepared
shards given with --data), for each checkpoint:

1. indexer diagnostics per layer and query-position bucket (dense pass): captured mass of the dense
   head-summed attention by the indexer's top-k (mean, p10, min), k50/k90/k99, KL(dense || indexer),
   share of the selection in the last 128 tokens and in the first 16 (attention sink), relative L2
   error of the sparse attention output;
2. quality with the same weights, dense vs sparse attention: LM loss, perplexity, accuracy, per
   position bucket;
3. a needle-in-a-haystack sweep (context lengths x depths), dense and sparse, with heat maps.

With --local-window, a third mode "local" is measured everywhere sparse is: sparse attention over
the first few tokens and the most recent keys, a control of what locality alone retrieves.

Two checkpoints are evaluated on the same batches and compared side by side (B - A deltas).
Writes eval.json, report.md and PNGs to --out (default: <CHECKPOINT>/eval, or
<A>/eval-vs-<B> when comparing).

Library entry points: :func:`eval_main` (the command), :mod:`dsa_train.eval.run` (``evaluate``),
:mod:`dsa_train.ops.row_stats` (pure per-row statistics, computed in the model's forward),
:mod:`dsa_train.eval.heldout` (the trainer's periodic held-out hook).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dsa_train.eval.defaults import DEFAULT_BUCKET_EDGES, DEFAULT_DEPTHS, DEFAULT_HELDOUT_SEED
from dsa_train.paths import run_path

DESCRIPTION = __doc__.split("\n\n")[0]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"needle depths must be in [0, 1], got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The command's arguments (also the `dsa-train eval` subparser's parent; imports no JAX)."""
    p = argparse.ArgumentParser(prog="dsa-train eval", description=DESCRIPTION, add_help=add_help)
    p.add_argument("checkpoint", help="run directory, <run>/checkpoints/<step>, or model directory")
    p.add_argument("checkpoint_b", nargs="?", help="a second checkpoint to compare with the first (B vs A)")
    p.add_argument("--data", action="append", default=[], metavar="DIR",
                   help="prepared dataset directory (dsa-train data prepare; local or a URI, copied into the run's "
                        "data.cache_dir) of held-out text; repeatable "
                        "(default: the run's data with another seed; the synthetic task for model directories)")
    p.add_argument("--seq-len", type=_positive, help="tokens per row (default: the run's train.seq_len, else 4096)")
    p.add_argument("--batches", type=_positive, default=4, help="held-out batches (default 4)")
    p.add_argument("--batch-size", type=_positive, default=4, help="rows per batch (default 4)")
    p.add_argument("--seed", type=int, default=DEFAULT_HELDOUT_SEED, help="held-out data seed")
    p.add_argument("--out", help="output directory")
    p.add_argument("--topk", type=_positive, help="evaluate with this index_topk instead of the checkpoint's")
    p.add_argument("--kernels", choices=("auto", "reference", "pallas"), help="kernel choice (default: the model's)")
    p.add_argument("--buckets", type=_ints, default=DEFAULT_BUCKET_EDGES,
                   help="query-position bucket edges (default 1024,8192,32768 -> 0-1K, 1K-8K, 8K-32K, 32K+)")
    p.add_argument("--rows", choices=("selective", "all"), default="selective",
                   help="query rows the indexer statistics count: only those with more candidates than "
                        "index_topk (default) or all")
    p.add_argument("--recent-window", type=_positive, default=128)
    p.add_argument("--sink-tokens", type=_positive, default=16)
    p.add_argument("--block-q", type=_positive, default=64, help="query rows per block of the dense measurement")
    p.add_argument("--no-output-error", action="store_true",
                   help="skip the sparse-vs-dense attention output error (saves one sparse attention per layer)")
    p.add_argument("--needle-lengths", type=_ints, help="context lengths (default: seq_len/4, seq_len/2, seq_len)")
    p.add_argument("--needle-depths", type=_floats, default=DEFAULT_DEPTHS)
    p.add_argument("--needle-trials", type=_positive, default=8, help="sequences per sweep cell (default 8)")
    p.add_argument("--no-needle", action="store_true", help="skip the needle sweep")
    p.add_argument("--local-window", action="store_true",
                   help="also evaluate the local-window control: sparse attention over the first --local-sinks "
                        "tokens and the most recent keys (index_topk in all) instead of the indexer's top-k")
    p.add_argument("--local-sinks", type=_positive, default=4, help="sink tokens of the local-window control (default 4)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _default_out(a: Path, b: Path | None) -> Path:
    """<A>/eval or <A>/eval-vs-<B>; for a step directory, beside the run's checkpoints (eval@<step>)."""
    suffix = "" if b is None else f"-vs-{run_path(b, absolute=True).name}"
    if a.name.isdigit() and a.parent.name == "checkpoints":
        return a.parent.parent / f"eval@{a.name}{suffix}"
    return a / f"eval{suffix}"


def eval_main(argv: list[str] | None = None) -> int:
    """The `dsa-train eval` command. User errors raise ValueError subclasses (one line)."""
    return run_eval(build_parser().parse_args(argv))


def run_eval(args: argparse.Namespace) -> int:
    """Run the command on parsed arguments (see :func:`build_parser`)."""
    import dataclasses

    from dsa_train.eval.aggregate import check_edges
    from dsa_train.eval.checkpoints import EvalInputError, load_checkpoint
    from dsa_train.eval.forward import DiagnosticOptions
    from dsa_train.eval.needle import default_lengths
    from dsa_train.eval.report import write_report
    from dsa_train.eval.run import (EvalOptions, check_comparable, evaluate, heldout_data_config, load_batches,
                                    needle_cases)

    edges = check_edges(args.buckets)
    changes = {k: v for k, v in (("index_topk", args.topk), ("kernels", args.kernels)) if v is not None}
    checkpoints = [load_checkpoint(args.checkpoint, **changes)]
    if args.checkpoint_b:
        checkpoints.append(load_checkpoint(args.checkpoint_b, **changes))
        check_comparable(*checkpoints)
    first = checkpoints[0]
    run_config = next((c.run_config for c in checkpoints if c.run_config), None)
    config = first.model.config
    seq_len = args.seq_len or ((run_config or {}).get("train") or {}).get("seq_len") or min(
        4096, config.max_position_embeddings)
    data_config, data_note = heldout_data_config(run_config, tuple(args.data))
    if run_config and data_config.source == "synthetic":
        train_seed = (run_config.get("train") or {}).get("seed")
        if train_seed == args.seed:
            raise EvalInputError(f"--seed {args.seed} is the training seed of {first.path}: pick another one")
    batches = load_batches(data_config, batches=args.batches, batch_size=args.batch_size, seq_len=seq_len,
                           vocab_size=config.vocab_size, seed=args.seed)
    cases = []
    if not args.no_needle:
        shortest = 2 * data_config.num_pairs + 5 if data_config.source == "synthetic" else 17
        if data_config.source == "synthetic" and data_config.synthetic_task == "fused":
            shortest = 2 + 2 * data_config.num_queries + data_config.num_pairs
        lengths = args.needle_lengths or default_lengths(seq_len, shortest)
        cases = needle_cases(data_config, batches, vocab_size=config.vocab_size, lengths=lengths,
                             depths=args.needle_depths, trials=args.needle_trials, seed=args.seed)
    diagnostics = DiagnosticOptions(recent_window=args.recent_window, sink_tokens=args.sink_tokens,
                                    block_q=args.block_q, output_error=not args.no_output_error)
    options = EvalOptions(bucket_edges=edges, rows=args.rows, diagnostics=diagnostics,
                          progress=not args.no_progress, local_window=args.local_window,
                          local_sinks=args.local_sinks)
    results = [evaluate(c, batches, cases, options) for c in checkpoints]
    meta = {"data": data_note, "seq_len": seq_len, "batches": args.batches, "batch_size": args.batch_size,
            "seed": args.seed, "rows": args.rows, "bucket_edges": list(edges),
            "diagnostics": dataclasses.asdict(diagnostics),
            "needle": {"lengths": sorted({c.length for c in cases}), "depths": list(args.needle_depths),
                       "trials": args.needle_trials} if cases else None}
    out = run_path(args.out) if args.out else _default_out(run_path(args.checkpoint), run_path(args.checkpoint_b)
                                                            if args.checkpoint_b else None)
    written = write_report(results, meta, out)
    print(f"wrote {written['markdown']} and {written['json']} ({len(written) - 2} figures) in {out}")
    return 0


__all__ = ["build_parser", "eval_main", "run_eval"]
