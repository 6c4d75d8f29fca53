"""Executed FLOPs and HBM bytes per (query, key) pair of the dense kernels, read from the train step
XLA compiled for TPU (no TPU needed), against the counts the kernel modules state.

Method: `dsa-train plan --target tpu-v5p ...` compiles the real step (bench/compiled_costs.py's
command); with `XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_train_step"`
XLA writes the optimized module (DIR/*jit_train_step*.after_optimizations.txt). This script walks
it with `dsa_train.parallel.hlo_costs` (every loop counted as it runs, the causal key-block loops at
their mean), charging only the instructions whose call stacks (the module's StackFrames table) pass
through a given kernel file, once for the compiled program and once with one more layer of the
scanned MoE stack: the difference is one layer's cost of that kernel on one chip. Dividing by the
visible (query, key) pairs of one chip per layer (its rows x T (T + 1) / 2 / context shards, causal,
one document per row) gives the executed cost per pair, compared with the `pair_flops` of the dense
KL's module (MQA form, the one context parallelism runs) and the attention's 2 H (576 + 512)
forward count. The dense KL is charged to whichever form the step runs: its Pallas kernels
(`dense_indexer_kl_pallas.py`; the FLOPs and bytes of a Pallas kernel are its declared
`cost_estimate`, the XLA work around it is measured) or the pure-JAX loops (`dense_indexer_kl.py`);
a file with no instructions in the program gets no row.

    python bench/compiled_pair_costs.py DIR/module_0000.jit_train_step.*.after_optimizations.txt \\
        --seq-len 131072 --context 16 --rows 1 --moe-layers 3 --out bench/results/compiled_pair_costs.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dsa_train.kernels import dense_indexer_kl, dense_indexer_kl_pallas  # noqa: E402
from dsa_train.parallel.hlo_costs import Program  # noqa: E402

# DeepSeek-V3.2: 128 heads over the 576-dim latent + rope key (MQA form) and 512-dim values, 64
# indexer heads of dim 128.
H, D_QK, D_V, HI, DI = 128, 576, 512, 64, 128
KERNELS = {
    "dense_indexer_kl_pallas.py": ("dense indexer KL, Pallas (fwd + bwd)",
                                   dense_indexer_kl_pallas.pair_flops(H, D_QK, HI, DI)),
    "dense_indexer_kl.py": ("dense indexer KL, XLA loops (fwd + bwd)", dense_indexer_kl.pair_flops(H, D_QK, HI, DI)),
    "dense_attention.py": ("dense attention (forward only)", 2 * H * (D_QK + D_V)),
}


def per_layer(text: str, source: str | None, moe_layers: int) -> dict:
    base = Program(text, causal_loops=True, source=source)
    c = base.costs()
    plus = Program(text, causal_loops=True, source=source, trip_extra={moe_layers: 1}).costs()
    return {"program_flops": c.flops, "program_bytes": c.bytes, "layer_flops": plus.flops - c.flops,
            "layer_bytes": plus.bytes - c.bytes, "dynamic_loops": len(base.dynamic_loops),
            "unknown_trip_counts": len(base.unknown_trip_counts)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("hlo", help="the optimized module XLA dumped (after_optimizations.txt)")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--context", type=int, required=True, help="context-parallel shards of a row")
    p.add_argument("--rows", type=int, default=1, help="batch rows per chip")
    p.add_argument("--moe-layers", type=int, default=3, help="length of the compiled MoE stack")
    p.add_argument("--label", default="", help="what was compiled (recorded with the figures)")
    p.add_argument("--out", default="bench/results/compiled_pair_costs.json")
    args = p.parse_args()
    text = Path(args.hlo).read_text()
    t = args.seq_len
    pairs = args.rows * t * (t + 1) / 2 / args.context
    total = per_layer(text, None, args.moe_layers)
    rows = []
    for source, (what, stated) in KERNELS.items():
        m = per_layer(text, source, args.moe_layers)
        if not (m["program_flops"] or m["program_bytes"]):
            continue
        rows.append({"kernel": source, "what": what, "stated_flops_per_pair": stated,
                     "executed_flops_per_pair": m["layer_flops"] / pairs, "bytes_per_pair": m["layer_bytes"] / pairs,
                     "ratio": m["layer_flops"] / pairs / stated, **m})
    doc = {"label": args.label, "seq_len": t, "context": args.context, "rows": args.rows,
           "pairs_per_chip_per_layer": pairs, "moe_layer": total, "kernels": rows}
    out = Path(args.out)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"One MoE layer per chip at {t:,} tokens ({args.context} context shards, {args.rows} row(s) per chip: "
             f"{pairs:.4g} visible pairs): {total['layer_flops'] / 1e12:.1f} TFLOPs, "
             f"{total['layer_bytes'] / 1e12:.2f} TB HBM.", "",
             "| kernel | stated FLOPs per pair | executed FLOPs per pair | executed / stated | HBM bytes per pair | "
             "TFLOPs per layer | HBM TB per layer |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['stated_flops_per_pair']:,} | {r['executed_flops_per_pair']:,.0f} | "
                     f"{r['ratio']:.2f} | {r['bytes_per_pair']:,.0f} | {r['layer_flops'] / 1e12:.1f} | "
                     f"{r['layer_bytes'] / 1e12:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
