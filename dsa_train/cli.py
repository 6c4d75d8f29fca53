"""`dsa-train`: the command line. Each subcommand is a thin wrapper around a library function.

User errors (bad config, missing data, mismatched checkpoint, a run directory in use) end with one
line on stderr and exit status 2, never a traceback; the exit statuses are in dsa_train/exit_codes.py.
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


def _parameter_table(title: str, by_group: dict, total: int, active_per_token: int):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("block")
    table.add_column("parameters", justify="right")
    for name, n in sorted(by_group.items(), key=lambda kv: -kv[1]):
        table.add_row(name, f"{n:,}")
    table.add_row("[bold]total", f"[bold]{total:,}")
    table.add_row("active per token (matmuls)", f"{active_per_token:,}")
    return table


def cmd_info(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from dsa_train.config import load_config
    from dsa_train.flops import count_params, forward_flops_per_token

    config = load_config(args.config, args.overrides).model
    counts = count_params(config)
    console = Console()
    console.print(_parameter_table(f"{args.config}: parameters", counts.by_group, counts.total,
                                   counts.active_per_token))
    if counts.mtp_by_group:
        console.print(_parameter_table(f"MTP ({config.num_nextn_predict_layers} depth(s), not in the total above)",
                                       counts.mtp_by_group, counts.mtp_total, counts.mtp_active_per_token))
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
    from dsa_train.config import check_for_devices, load_config
    from dsa_train.parallel.distributed import check_device_count, initialize_from_env

    config = load_config(args.recipe, args.overrides, check_paths=True)  # before the job waits for its peers
    initialize_from_env()  # multi-process jobs (launch/): before any device is touched
    import jax

    check_device_count()
    check_for_devices(config, jax.device_count(), jax.process_count())
    if args.check:
        # One write: the processes of a job share one log, and print() writes the newline apart.
        sys.stdout.write(f"ready: process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} "
                         f"local {jax.default_backend()} devices of {jax.device_count()}, local device ids "
                         f"{[d.local_hardware_id if d.local_hardware_id is not None else d.id for d in jax.local_devices()]}"
                         f", visible GPUs {jax.config.read('jax_cuda_visible_devices')!r}\n")
        sys.stdout.flush()
        return
    from dsa_train.train.trainer import train

    result = train(config)
    if result.preempted:  # the trainer said "preempted at step N"; the scheduler requeues on the code
        from dsa_train.exit_codes import PREEMPTED

        return PREEMPTED
    print(f"{config.train.stage} finished at step {result.steps}; results in {result.run_dir}")


def cmd_plot(args) -> None:
    from dsa_train.paths import run_path
    from dsa_train.train.plot import plot_runs

    out = args.out or run_path(args.run_dirs[0]) / "curves.png"
    print(f"wrote {plot_runs(args.run_dirs, out)}")


def cmd_smoke(args) -> int | None:
    from dsa_train.smoke import run_smoke

    if "preempted" in run_smoke(Path(args.out), args.overrides):
        from dsa_train.exit_codes import PREEMPTED

        return PREEMPTED


def cmd_demo(args) -> None:
    from dsa_train.demo import run_demo

    run_demo(Path(args.out), args.overrides)


def cmd_convert(args) -> None:
    from dsa_train.convert import convert_main

    return convert_main([args.action, *args.rest])


def cmd_data(args) -> None:
    from dsa_train.data.prepare import prepare_main

    return prepare_main(args.rest)


def cmd_config(args) -> None:
    from dsa_train.config import key_listing, resolved_items

    if args.keys or not args.recipe:
        rows = key_listing()
        width = max(len(k) for k, _, _ in rows)
        for key, tp, default in rows:
            print(f"{key:<{width}}  {tp}  (default: {default})")
        return
    rows = resolved_items(args.recipe, args.overrides)
    width = max(len(k) for k, _, _ in rows)
    for key, value, source in rows:
        print(f"{key:<{width}} = {value!r}  # {source}")


def _forwarding(sub, name: str, help: str, func):
    """A subcommand whose every argument, --help included, goes to its own parser."""
    p = sub.add_parser(name, help=help, add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=func)
    return p


def cmd_plan(args) -> None:
    from dsa_train.parallel.plan import plan_main

    plan_main(args.rest)


def cmd_eval(args) -> int:
    from dsa_train.eval import run_eval

    return run_eval(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsa-train", description=__doc__.splitlines()[0])
    from dsa_train import __version__

    parser.add_argument("--version", action="version", version=f"dsa-train {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts and FLOPs of a model config")
    p.add_argument("config")
    p.add_argument("--seq-len", type=int, default=131072)
    _add_overrides(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="run one training stage from a recipe",
                       epilog="every config key, with its type and default: dsa-train config --keys")
    p.add_argument("recipe")
    p.add_argument("--check", action="store_true",
                   help="start the job (distributed runtime included), run every start-up check, print this "
                        "process's devices and exit without training")
    _add_overrides(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("smoke", help="dense base -> indexer warm-up -> sparse training on the tiny config")
    p.add_argument("--out", default="runs/smoke")
    _add_overrides(p)
    p.set_defaults(func=cmd_smoke)

    p = sub.add_parser("demo", help="long-context retrieval kept by DSA: dense base -> warm-up -> sparse, with controls")
    p.add_argument("--out", default="runs/demo")
    _add_overrides(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plot", help="draw the metric curves of run directories to a PNG")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("convert", help="import/export Hugging Face checkpoints",
                       description="Convert between Hugging Face DeepSeek checkpoints and model directories.")
    actions = p.add_subparsers(dest="action", required=True, metavar="{import,export}")
    _forwarding(actions, "import", "HF DeepSeek-V3/V3.1/V3.2 checkpoint -> model directory", cmd_convert)
    _forwarding(actions, "export", "model directory or training run -> HF DeepSeek-V3.2 checkpoint", cmd_convert)

    p = sub.add_parser("data", help="prepare token shards (dsa-train data prepare ...)",
                       description="Dataset tools.")
    actions = p.add_subparsers(dest="action", required=True, metavar="{prepare}")
    _forwarding(actions, "prepare", "tokenize text/JSONL/Parquet into ArrayRecord token shards", cmd_data)

    p = sub.add_parser("config", help="the resolved config of a recipe, each value with its source; --keys: "
                                      "every key with its type and default")
    p.add_argument("recipe", nargs="?")
    p.add_argument("--keys", action="store_true", help="list every config key with its type and default")
    _add_overrides(p)
    p.set_defaults(func=cmd_config)

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
    from dsa_train.parallel.distributed import DeviceCountError
    from dsa_train.train.trainer import TrainingError

    from dsa_train import exit_codes

    try:
        status = args.func(args)
    except TrainingError as e:  # the run started and had to stop (exit_codes.RUN_FAILED)
        print(f"dsa-train {args.command}: error: {e}", file=sys.stderr)
        return exit_codes.RUN_FAILED
    except (ConfigError, DeviceCountError, *USER_ERRORS) as e:
        print(f"dsa-train {args.command}: error: {e}", file=sys.stderr)
        return exit_codes.USER_ERROR
    except KeyboardInterrupt:
        print(f"dsa-train {args.command}: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
