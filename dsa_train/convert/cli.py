"""`dsa-train convert import|export`: the command-line face of the HF converters.

``convert_main(argv)`` parses ``argv`` (without the leading ``convert``), runs the conversion,
prints its report and returns the exit status: 0 on success, 2 on a user error (printed as one
line, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from dsa_train.config import ConfigError
from dsa_train.convert.common import ConversionError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsa-train convert",
                                description="Convert between Hugging Face DeepSeek checkpoints and model directories.")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF DeepSeek-V3/V3.1/V3.2 checkpoint -> model directory")
    imp.add_argument("hf_dir", metavar="HF_DIR")
    imp.add_argument("out_dir", metavar="OUT_DIR")
    imp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype")
    imp.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    imp.add_argument("--include-mtp", action="store_true", help="keep the MTP layer (written back on export)")
    imp.add_argument("--mtp", action="store_true",
                     help="make the MTP layer part of the model: trained, exported under the released names")
    imp.add_argument("--no-indexer", action="store_true", help="import without lightning indexers")
    imp.add_argument("--index-topk", type=int)
    imp.add_argument("--index-n-heads", type=int, help="for fresh indexers (V3 / V3.1 sources)")
    imp.add_argument("--index-head-dim", type=int, help="for fresh indexers (V3 / V3.1 sources)")
    imp.add_argument("--seed", type=int, default=0, help="for freshly initialized indexers")
    imp.add_argument("--overwrite", action="store_true")
    exp = sub.add_parser("export", help="model directory or training run -> HF DeepSeek-V3.2 checkpoint")
    exp.add_argument("ckpt_dir", metavar="CKPT_DIR", help="a model directory, a run directory (latest step) or <run>/checkpoints/<step>")
    exp.add_argument("out_dir", metavar="OUT_DIR")
    exp.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    exp.add_argument("--max-shard-size", default="5GB")
    exp.add_argument("--no-mtp", action="store_true", help="do not write back a kept MTP layer")
    exp.add_argument("--overwrite", action="store_true")
    return p


def convert_main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from dsa_train.checkpoint.model_io import ModelDirError

    try:
        if args.command == "import":
            from dsa_train.convert.hf_import import import_hf_checkpoint

            report = import_hf_checkpoint(
                args.hf_dir, args.out_dir, include_mtp=args.include_mtp, dtype=args.dtype,
                compute_dtype=args.compute_dtype, use_indexer=False if args.no_indexer else None,
                index_n_heads=args.index_n_heads, index_head_dim=args.index_head_dim, index_topk=args.index_topk,
                seed=args.seed, overwrite=args.overwrite, mtp=args.mtp)
        else:
            from dsa_train.convert.hf_export import export_hf_checkpoint

            report = export_hf_checkpoint(args.ckpt_dir, args.out_dir, dtype=args.dtype,
                                          max_shard_size=args.max_shard_size, include_mtp=not args.no_mtp,
                                          overwrite=args.overwrite)
    except (ConfigError, ConversionError, ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
