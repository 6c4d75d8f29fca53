"""`dsa-train`: the command line. Each subcommand is a thin wrapper around a library function.

User errors (bad config, missing data, mismatched checkpoint) end with one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                FileExistsError, PermissionError)


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.steps=100 --set model=configs/tiny.yaml")


def cmd_info(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from dsa_train.config import load_config
    from dsa_train.flops import count_params, forward_flops_per_token

    config = load_config(args.config, args.overrides).model
    counts = count_params(config)
    console = Console()
    table = Table(title=f"{args.config}: parameters")
    table.add_column("block")
    table.add_column("parameters", justify="right")
    for name, n in sorted(counts.by_group.items(), key=lambda kv: -kv[1]):
        table.add_row(name, f"{n:,}")
    table.add_row("[bold]total", f"[bold]{counts.total:,}")
    table.add_row("active per token (matmuls)", f"{counts.active_per_token:,}")
    console.print(table)
    if counts.mtp_by_group:
        mtp = Table(title=f"MTP ({config.num_nextn_predict_layers} depth(s), not in the total above)")
        mtp.add_column("block")
        mtp.add_column("parameters", justify="right")
        for name, n in sorted(counts.mtp_by_group.items(), key=lambda kv: -kv[1]):
            mtp.add_row(name, f"{n:,}")
        mtp.add_row("[bold]total", f"[bold]{counts.mtp_total:,}")
        mtp.add_row("active per token (matmuls)", f"{counts.mtp_active_per_token:,}")
        console.print(mtp)
    print(f"total parameters: {counts.total:,}")
    print(f"indexer parameters: {counts.by_group.get('indexer', 0):,}")
    if counts.mtp_by_group:
        print(f"MTP parameters: {counts.mtp_total:,} (indexer {counts.mtp_by_group.get('indexer', 0):,})")
    ft = Table(title=f"forward FLOPs per token at sequence length {args.seq_len:,}")
    for col in ("mode", "matmul", "main attention", "indexer", "total"):
        ft.add_column(col, justify="right")
    for mode in ("dense", "sparse"):
        if mode == "sparse" and not config.use_indexer:
            continue
        f = forward_flops_per_token(config, args.seq_len, mode, with_indexer=mode == "sparse", counts=counts)
        ft.add_row(mode, f"{f.matmul:.4g}", f"{f.attention:.4g}", f"{f.indexer:.4g}", f"{f.total:.4g}")
    console.print(ft)


def cmd_train(args) -> None:
    from dsa_train.config import load_config
    from dsa_train.parallel.distributed import initialize_from_env
    from dsa_train.train.trainer import train

    initialize_from_env()  # multi-process jobs (launch/): before any device is touched
    config = load_config(args.recipe, args.overrides)
    result = train(config)
    print(f"{config.train.stage} finished at step {result.steps}; results in {result.run_dir}")


def cmd_plot(args) -> None:
    from dsa_train.train.plot import plot_runs

    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "curves.png"
    print(f"wrote {plot_runs([Path(d) for d in args.run_dirs], out)}")


def cmd_smoke(args) -> None:
    from dsa_train.smoke import run_smoke

    run_smoke(Path(args.out), args.overrides)


def cmd_convert(args) -> None:
    from dsa_train.convert import convert_main

    return convert_main(args.rest)


def cmd_data(args) -> None:
    from dsa_train.data.prepare import prepare_main

    if args.action != "prepare":
        raise ValueError(f"unknown data action {args.action!r}; try 'dsa-train data prepare --help'")
    return prepare_main(args.rest)


def cmd_plan(args) -> None:
    from dsa_train.parallel.plan import plan_main

    plan_main(args.rest)


def cmd_eval(args) -> int:
    from dsa_train.eval import run_eval

    return run_eval(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsa-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts and FLOPs of a model config")
    p.add_argument("config")
    p.add_argument("--seq-len", type=int, default=131072)
    _add_overrides(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="run one training stage from a recipe")
    p.add_argument("recipe")
    _add_overrides(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("smoke", help="dense base -> indexer warm-up -> sparse training on the tiny config")
    p.add_argument("--out", default="runs/smoke")
    _add_overrides(p)
    p.set_defaults(func=cmd_smoke)

    p = sub.add_parser("plot", help="draw the metric curves of run directories to a PNG")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("convert", help="import/export Hugging Face checkpoints", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("data", help="prepare token shards (dsa-train data prepare ...)", add_help=False)
    p.add_argument("action", nargs="?", default="prepare")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("plan", help="per-device memory, FLOPs and step time of a recipe on a mesh (--compile: XLA's)",
                       add_help=False, prefix_chars="\0")  # every argument, --help included, goes to plan_main
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_plan)

    from dsa_train.eval import DESCRIPTION, build_parser as eval_parser  # argparse only, no JAX

    p = sub.add_parser("eval", parents=[eval_parser(add_help=False)], description=DESCRIPTION,
                       help="indexer diagnostics, dense vs sparse quality and needle sweep of one or two checkpoints")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dsa_train.config import ConfigError
    from dsa_train.train.trainer import TrainingError

    try:
        status = args.func(args)
    except (ConfigError, TrainingError, *USER_ERRORS) as e:
        print(f"dsa-train {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsa-train {args.command}: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
