"""One command for a GPU: check the GPU kernels against their references, then measure TFLOPS.

    python bench/gpu_suite.py                 # on an H100/H200, under the machine's own JAX; installs nothing
    python bench/gpu_suite.py --cpu-smoke     # the same code path at tiny shapes, kernels interpreted (CI)

1. Checks at small shapes (values and gradients vs the pure-JAX references, -1 slots and rows
   with fewer than k candidates included): sparse MLA forward + backward and the head-summed
   probabilities (dsa_train.kernels.sparse_attention_gpu), and the indexer top-k (Pallas-scored) vs
   indexer_topk_reference.
2. Ceilings in the same run: a bf16 matmul (8192^3) and cuDNN flash attention
   (jax.nn.dot_product_attention, causal, 128 heads of 128 dims, L = 16K).
3. Sparse MLA at L = 16K and 64K, H = 128, D = 576 / 512, top-k 2048, bf16: forward alone and
   backward alone (jax.vjp's pullback with the residuals already computed), each the median of
   --repeats timed runs after --warmup runs. FLOPs: forward 2 x L x topk x H x (576 + 512)
   (FlashMLA's convention); backward 2 x L x topk x H x (576 + 512 + 512 + 576 + 576) (recomputed
   QK^T, dO V^T, dS K for dq, dS^T Q and P^T dO for dkv).

The JSON (--out) is rewritten after every result, so a run cut off by its time limit keeps what it
had; measurements that would start after --budget-s seconds are skipped and recorded as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsa_train.kernels.backend import Backend  # noqa: E402
from dsa_train.kernels.sparse_attention_gpu import (GpuKernelConfig, sparse_mla_attention_gpu,  # noqa: E402
                                                    sparse_mla_head_summed_probs_gpu)
from dsa_train.ops.attention import NEG_INF, sparse_mla_attention_reference  # noqa: E402
from dsa_train.ops.indexer import indexer_topk_reference  # noqa: E402

D, V_DIM, HEADS, TOPK = 576, 512, 128, 2048
FWD_DIMS = D + V_DIM
BWD_DIMS = D + V_DIM + V_DIM + D + D


class Report:
    """The results dict, written to disk after every entry."""

    def __init__(self, path: str, meta: dict):
        self.path, self.data, self.t0 = path, dict(meta=meta, checks={}, ceilings={}, sparse_mla={}), time.time()
        self.write()

    def add(self, section: str, key: str, value) -> None:
        self.data[section][key] = value
        self.data["meta"]["elapsed_s"] = round(time.time() - self.t0, 1)
        self.write()
        print(f"{section}/{key}: {json.dumps(value)}", flush=True)

    def write(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def timed_median_ms(fn, args, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def causal_indices(rng, s: int, t: int, k: int) -> np.ndarray:
    """[1, s, k]: up to k distinct keys among 0..i for query i (fewer early on), -1 elsewhere, shuffled."""
    idx = np.full((1, s, k), -1, np.int32)
    for i in range(s):
        cand = rng.permutation(min(i, t - 1) + 1)[:k]
        row = np.full(k, -1, np.int32)
        row[: len(cand)] = cand
        idx[0, i] = rng.permutation(row)
    return idx


def random_causal_indices(key, length: int, k: int) -> jnp.ndarray:
    """[1, L, k] on device: query i >= k gets k consecutive keys from a random start in 0..i-k+1
    (distinct, causal); query i < k gets keys 0..i and -1 in the remaining slots."""
    pos = jnp.arange(length)[:, None]
    slot = jnp.arange(k)[None, :]
    shift = jax.random.randint(key, (length, 1), 0, length)
    span = pos + 1
    base = jnp.where(span > k, shift % (span - k + 1), 0)
    idx = base + slot
    return jnp.where(idx <= pos, idx, -1).astype(jnp.int32)[None]


def kernel_blocks() -> dict:
    """The sparse MLA kernels' default block sizes, recorded with the figures they produce."""
    defaults = GpuKernelConfig(sm_scale=1.0, v_dim=V_DIM)
    return {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)
            if f.name not in ("sm_scale", "v_dim", "interpret")}


def check_sparse_mla(interpret: bool) -> dict:
    rng = np.random.default_rng(0)
    s, t, h, d, v, k = 24, 24, 16, 80, 64, 20
    q = jnp.asarray(rng.standard_normal((1, s, h, d)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((1, t, d)), jnp.float32)
    idx = causal_indices(rng, s, t, k)
    idx[0, 5] = -1  # a query without any key
    idx = jnp.asarray(idx)

    def value_and_grads(fn):
        def loss(q, kv):
            out, lse = fn(q, kv, idx, 0.2, v)
            lse_safe = jnp.where(lse > NEG_INF / 2, lse, 0.0)
            return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.sin(lse_safe)), (out, lse)
        (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(q, kv)
        return dict(out=out, lse=lse, dq=grads[0], dkv=grads[1])

    got = value_and_grads(lambda *a: sparse_mla_attention_gpu(*a, interpret=interpret, block_k=16, block_k_bwd=16))
    ref = value_and_grads(sparse_mla_attention_reference)
    got["head_summed_probs"] = jax.jit(lambda q, kv, lse: sparse_mla_head_summed_probs_gpu(
        q, kv, idx, lse, 0.2, v, interpret=interpret))(q, kv, ref["lse"])
    rows = jnp.take_along_axis(kv[:, None], jnp.maximum(idx, 0)[..., None], axis=2)
    probs = jnp.exp(jnp.einsum("bshd,bskd->bshk", q, rows) * 0.2 - ref["lse"][..., None]).sum(axis=2)
    ref["head_summed_probs"] = jnp.where(idx >= 0, probs, 0.0)
    errors = {name: float(jnp.max(jnp.abs(jnp.where(jnp.isfinite(ref[name]), got[name] - ref[name], 0.0))))
              for name in ref}
    # fp32 inputs; on a GPU the dots run as tf32, hence the loose bound there.
    tol = 1e-4 if interpret else 5e-2
    return dict(max_abs_error=errors, tolerance=tol, ok=all(e <= tol for e in errors.values()))


def check_topk(interpret: bool) -> dict:
    rng = np.random.default_rng(1)
    s, hi, di, k = 64, 4, 32, 16
    q = jnp.asarray(rng.standard_normal((1, s, hi, di)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((1, s, di)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1, s, hi)), jnp.float32)
    seg = jnp.asarray(np.repeat([[0, 1]], s // 2, axis=1))
    impl = "pallas_interpret" if interpret else "pallas"
    got = np.asarray(jax.jit(lambda *a: Backend(impl).indexer_topk(*a, k, seg))(q, keys, w))
    ref = np.asarray(jax.jit(lambda *a: indexer_topk_reference(*a, k, seg))(q, keys, w))
    same = [set(g[g >= 0]) == set(r[r >= 0]) for g, r in zip(got[0], ref[0])]
    return dict(rows_equal=int(sum(same)), rows=len(same), ok=all(same))


def measure_matmul(n: int, warmup: int, repeats: int) -> dict:
    a = jnp.ones((n, n), jnp.bfloat16)
    ms = timed_median_ms(jax.jit(lambda a, b: a @ b), (a, a), warmup, repeats)
    return dict(n=n, ms=ms, tflops=2 * n ** 3 / ms / 1e9)


def measure_cudnn_flash(length: int, warmup: int, repeats: int) -> dict:
    h, d = HEADS, 128
    x = jax.random.normal(jax.random.key(0), (1, length, h, d), jnp.bfloat16)
    fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
    ms = timed_median_ms(fn, (x, x, x), warmup, repeats)
    flops = 4 * length * length / 2 * h * d  # causal: half of QK^T and PV
    return dict(length=length, heads=h, head_dim=d, ms=ms, tflops=flops / ms / 1e9)


def measure_sparse_mla(length: int, heads: int, topk: int, interpret: bool, warmup: int, repeats: int) -> dict:
    kq, kk, ki, kd = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (1, length, heads, D), jnp.bfloat16)
    kv = jax.random.normal(kk, (1, length, D), jnp.bfloat16)
    idx = random_causal_indices(ki, length, topk)
    scale = D ** -0.5
    attend = lambda q, kv: sparse_mla_attention_gpu(q, kv, idx, scale, V_DIM, interpret=interpret)
    fwd = jax.jit(attend)
    fwd_ms = timed_median_ms(fwd, (q, kv), warmup, repeats)
    (out, lse), pullback = jax.jit(lambda q, kv: jax.vjp(attend, q, kv))(q, kv)
    d_out = jax.random.normal(kd, out.shape, out.dtype)
    bwd = jax.jit(lambda ct: pullback(ct))
    bwd_ms = timed_median_ms(bwd, ((d_out, jnp.zeros_like(lse)),), warmup, repeats)
    pairs = length * topk * heads  # every slot counted, as FlashMLA does
    return dict(length=length, heads=heads, topk=topk, fwd_ms=fwd_ms, bwd_ms=bwd_ms,
                fwd_tflops=2 * pairs * FWD_DIMS / fwd_ms / 1e9, bwd_tflops=2 * pairs * BWD_DIMS / bwd_ms / 1e9)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, kernels interpreted, no ceilings")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_suite[_cpu_smoke].json)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip measurements starting later than this")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and jax.default_backend() != "gpu":
        print(f"error: no GPU found (JAX backend {jax.default_backend()!r}); use --cpu-smoke on a CPU machine",
              file=sys.stderr)
        return 2
    lengths = args.lengths or ([32] if smoke else [16384, 65536])
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    repeats = args.repeats if args.repeats is not None else (2 if smoke else 10)
    heads, topk = (16, 16) if smoke else (HEADS, TOPK)
    here = os.path.dirname(os.path.abspath(__file__))
    out = args.out or os.path.join(here, "results", "gpu_suite_cpu_smoke.json" if smoke else "gpu_suite.json")
    device = jax.devices()[0]
    report = Report(out, dict(jax=jax.__version__, device=getattr(device, "device_kind", str(device)),
                              host=platform.node(), cpu_smoke=smoke, warmup=warmup, repeats=repeats,
                              sparse_mla_blocks=kernel_blocks()))
    start = time.time()

    def run(section, key, fn, *fn_args):
        if time.time() - start > args.budget_s:
            report.add(section, key, dict(skipped=f"time budget of {args.budget_s:.0f} s spent"))
            return None
        try:
            result = fn(*fn_args)
        except Exception as err:  # keep the rest of the run: one failing kernel must not hide the others
            result = dict(error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        report.add(section, key, result)
        return result

    checks = [run("checks", "sparse_mla", check_sparse_mla, smoke), run("checks", "indexer_topk", check_topk, smoke)]
    if not smoke:
        run("ceilings", "matmul_bf16", measure_matmul, 8192, warmup, repeats)
        run("ceilings", "cudnn_flash_attention", measure_cudnn_flash, 16384, warmup, repeats)
    for length in lengths:
        run("sparse_mla", f"L{length}", measure_sparse_mla, length, heads, topk, smoke, warmup, repeats)
    ceiling = report.data["ceilings"].get("matmul_bf16", {}).get("tflops")
    for entry in report.data["sparse_mla"].values():
        if ceiling and "fwd_tflops" in entry:
            entry["fwd_vs_matmul"] = entry["fwd_tflops"] / ceiling
            entry["bwd_vs_matmul"] = entry["bwd_tflops"] / ceiling
    report.write()
    failed = [c for c in checks if not (c and c.get("ok"))]
    errors = [k for s in ("ceilings", "sparse_mla") for k, v in report.data[s].items() if "error" in v]
    print(f"wrote {out}; checks {'passed' if not failed else 'FAILED'}"
          + (f"; errors in {', '.join(errors)}" if errors else ""))
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
