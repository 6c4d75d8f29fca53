"""Top-k selection before/after: the sorting merge vs the threshold-gated merge, interleaved rounds.

Both run the same query chunks x causal key chunks and the same XLA scoring (the CPU path):
- sorted_merge (before): per key chunk `lax.top_k(concat(running [Qc, K], chunk scores [Qc, C]))`,
  a (K + C)-wide sort of every chunk (the previous `indexer_topk_streaming`, kept here as baseline);
- gated_merge (after): `dsa_train.kernels.indexer_topk.indexer_topk_streaming`: scores gated by the
  running K-th, beaters merged in `candidates`-wide rounds (merge path), no sort wider than that.
One process compiles both, then times them in alternating rounds (a shared host's load hits both);
ratios are per round, before / after. Also records the widest sort of each lowered program.
Shapes: q [1, L, Hi, 128], k [1, L, 128], w [1, L, Hi], K = 2048, one causal document, fp32.

CPU:  python bench/indexer_topk_merge.py --lengths 4096 8192 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "indexer_topk_merge_cpu.json"
D_IDX = 128


def sorted_merge_topk(q, k, w, topk: int, segment_ids, q_chunk: int = 128, k_chunk: int = 2048):
    """The previous streaming top-k: a (K + k_chunk)-wide lax.top_k per key chunk."""
    import jax
    import jax.numpy as jnp

    from dsa_train.kernels import indexer_tiles as tiles

    b, s = segment_ids.shape
    k_out = min(topk, s)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))

    def one_query_chunk(qi):
        sl = lambda x, i, n: jax.lax.dynamic_slice_in_dim(x, i * n, n, 1)  # noqa: E731
        qc, wc, qpos, qseg = sl(q, qi, q_chunk), sl(w, qi, q_chunk), sl(pos, qi, q_chunk), sl(segment_ids, qi, q_chunk)

        def merge(kj, carry):
            run_v, run_i = carry
            scores = tiles.indexer_score_block(qc, sl(k, kj, k_chunk), wc)
            vis = tiles.visible(qpos, qseg, sl(pos, kj, k_chunk), sl(segment_ids, kj, k_chunk))
            scores = jnp.where(vis, scores, -jnp.inf)
            idx = kj * k_chunk + jnp.arange(k_chunk, dtype=jnp.int32)
            vals = jnp.concatenate([run_v, scores], -1)
            cand = jnp.concatenate([run_i, jnp.broadcast_to(idx, scores.shape)], -1)
            top_v, p = jax.lax.top_k(vals, k_out)
            return top_v, jnp.take_along_axis(cand, p, -1)

        init = (jnp.full((b, q_chunk, k_out), -jnp.inf), jnp.full((b, q_chunk, k_out), -1, jnp.int32))
        n_visible = tiles.causal_key_blocks(qi, q_chunk, k_chunk, s // k_chunk)
        top_v, top_i = jax.lax.fori_loop(0, n_visible, merge, init)
        return jnp.where(top_v > -jnp.inf, top_i, -1)

    out = jax.lax.map(one_query_chunk, jnp.arange(s // q_chunk))
    return jnp.moveaxis(out, 0, 1).reshape(b, s, k_out)


def widest_sort(compiled_text: str) -> int:
    shapes = dict(re.findall(r"^\s*(?:ROOT )?(%[\w.-]+) = [a-z0-9]+\[([0-9,]*)\]", compiled_text, re.M))
    widths = [int(shapes[m.group(1)].split(",")[-1])
              for m in re.finditer(r"\b(?:sort|custom-call)\((%[\w.-]+)[^\n]*", compiled_text)
              if m.group(0).startswith("sort") or 'custom_call_target="TopK"' in m.group(0)]
    return max(widths, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--index-heads", type=int, default=16)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--out", default=str(RESULTS))
    opts = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsa_train.kernels.indexer_topk import indexer_topk_streaming

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from indexer_bench_common import environment

    entries = []
    for length in opts.lengths:
        rng = np.random.default_rng(0)
        hi, topk = opts.index_heads, opts.topk
        args = (jnp.asarray(rng.standard_normal((1, length, hi, D_IDX), np.float32)),
                jnp.asarray(rng.standard_normal((1, length, D_IDX), np.float32)),
                jnp.asarray(rng.standard_normal((1, length, hi), np.float32)) * hi ** -0.5,
                jnp.ones((1, length), jnp.int32))
        fns = {"sorted_merge": lambda q, k, w, s: sorted_merge_topk(q, k, w, topk, s),
               "gated_merge": lambda q, k, w, s: indexer_topk_streaming(q, k, w, topk, s, k_chunk=2048)}
        compiled, entry = {}, {"length": length, "widest_sort": {}, "times_s": {m: [] for m in fns}}
        for name, fn in fns.items():
            compiled[name] = jax.jit(fn).lower(*args).compile()
            entry["widest_sort"][name] = widest_sort(compiled[name].as_text())
        results = {name: np.asarray(c(*args)) for name, c in compiled.items()}  # warm-up, and the check
        entry["same_indices"] = bool(np.array_equal(np.sort(results["sorted_merge"], -1),
                                                    np.sort(results["gated_merge"], -1)))
        for _ in range(opts.rounds):
            for name, c in compiled.items():
                t0 = time.perf_counter()
                jax.block_until_ready(c(*args))
                entry["times_s"][name].append(time.perf_counter() - t0)
        ratios = [b / a for b, a in zip(entry["times_s"]["sorted_merge"], entry["times_s"]["gated_merge"])]
        entry["time_ratio_before_over_after"] = {"per_round": ratios, "median": statistics.median(ratios)}
        print(json.dumps(entry), flush=True)
        entries.append(entry)
    doc = {"config": {"batch": 1, "index_heads": opts.index_heads, "index_dim": D_IDX, "topk": opts.topk,
                      "q_chunk": 128, "k_chunk": 2048, "dtype": "float32", "documents": 1, "rounds": opts.rounds},
           "environment": environment("CPU, shared host: timings indicative; ratios from alternating rounds. "
                                      f"Reduced indexer heads (Hi={opts.index_heads}; the real indexer has 64), "
                                      "so selection is a larger share of the time than at full width."),
           "entries": entries}
    Path(opts.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
