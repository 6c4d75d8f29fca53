"""One command for a GPU: check the GPU kernels against their references, then measure TFLOPS.

    python bench/gpu_suite.py                 # on an H100/H200, under the machine's own JAX; installs nothing
    python bench/gpu_suite.py --cpu-smoke     # the same code path at tiny shapes, kernels interpreted (CI)

1. Checks at small shapes (values and gradients vs the pure-JAX references, -1 slots and rows
   with fewer than k candidates included): sparse MLA forward + backward and the head-summed
   probabilities (dsa_train.kernels.sparse_attention_gpu), the indexer top-k (Pallas-scored) vs
   indexer_topk_reference, and the flash dense attention forward (dsa_train.kernels.dense_attention_gpu,
   per-head and shared-key forms, two documents, a zig-zag shard's query positions) vs
   ops.attention.dense_attention.
2. Ceilings in the same run: a bf16 matmul (8192^3) and cuDNN flash attention
   (jax.nn.dot_product_attention, causal, 128 heads of 128 dims, L = 16K).
3. Sparse MLA at L = 16K and 64K, H = 128, D = 576 / 512, top-k 2048, bf16: forward alone and
   backward alone (jax.vjp's pullback with the residuals already computed), each the median of
   --repeats timed runs after --warmup runs. FLOPs: forward 2 x L x topk x H x (576 + 512)
   (FlashMLA's convention); backward 2 x L x topk x H x (576 + 512 + 512 + 576 + 576) (recomputed
   QK^T, dO V^T, dS K for dq, dS^T Q and P^T dO for dkv).
4. Dense attention at the same lengths, H = 128, causal, one document, bf16: the Triton kernels
   against the pure-JAX flash kernel (dsa_train.kernels.dense_attention, what GPUs ran before), in
   interleaved rounds (median of each, and their ratio): the forward in the per-head form
   (192 / 128) and the shared-key form (576 / 512, the context-parallel path), the backward
   (pullback with the residuals computed) in the per-head form. FLOPs: forward
   2 x L^2 / 2 x H x (Dk + Dv); backward 2 x L^2 / 2 x H x (3 Dk + 2 Dv) (QK^T recomputed, dO V^T,
   dS K, dS^T Q, P^T dO).

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
from dsa_train.kernels.dense_attention import flash_attention  # noqa: E402
from dsa_train.kernels.dense_attention_gpu import flash_attention_gpu  # noqa: E402
from dsa_train.kernels.sparse_attention_gpu import (GpuKernelConfig, sparse_mla_attention_gpu,  # noqa: E402
                                                    sparse_mla_head_summed_probs_gpu)
from dsa_train.ops.attention import NEG_INF, dense_attention, sparse_mla_attention_reference  # noqa: E402
from dsa_train.ops.indexer import indexer_topk_reference  # noqa: E402

D, V_DIM, HEADS, TOPK = 576, 512, 128, 2048
FWD_DIMS = D + V_DIM
BWD_DIMS = D + V_DIM + V_DIM + D + D
DENSE_FORMS = {"per_head": (192, 128), "shared": (D, V_DIM)}  # (Dk, Dv)


class Report:
    """The results dict, written to disk after every entry."""

    def __init__(self, path: str, meta: dict):
        self.path, self.data, self.t0 = path, dict(meta=meta, checks={}, ceilings={}, sparse_mla={},
                                                           dense_attention={}), time.time()
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


def check_dense_attention(interpret: bool) -> dict:
    """Values and lse of the Triton forward vs the reference: the whole row (per-head form) and a
    zig-zag shard's queries (chunks 0 and 3 of 4) against the row's keys (both forms)."""
    rng = np.random.default_rng(2)
    s, h, dk, dv = 48, 4, 48, 32
    seg = jnp.asarray([[1] * 20 + [2] * 28])
    shard = jnp.asarray(np.r_[0:12, 36:48], jnp.int32)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q, k, v = normal(1, s, h, dk), normal(1, s, h, dk), normal(1, s, h, dv)
    kv = normal(1, s, dk)
    per_head = lambda x: jnp.broadcast_to(x[:, :, None], (1, s, h, x.shape[-1]))  # noqa: E731
    cases = {
        "per_head_row": ((q, k, v, jnp.arange(s), seg, seg), dense_attention(q, k, v, seg, 0.2)),
        "per_head_zigzag": ((q[:, shard], k, v, shard, seg[:, shard], seg),
                            [x[:, shard] for x in dense_attention(q, k, v, seg, 0.2)]),
        "shared_zigzag": ((q[:, shard], kv, kv[..., :dv], shard, seg[:, shard], seg),
                          [x[:, shard] for x in dense_attention(q, per_head(kv), per_head(kv[..., :dv]), seg, 0.2)]),
    }
    errors = {}
    for name, (args, (ref_out, ref_lse)) in cases.items():
        out, lse = jax.jit(lambda *a: flash_attention_gpu(*a, 0.2, interpret=interpret))(*args)
        errors[name] = max(float(jnp.max(jnp.abs(out - ref_out))), float(jnp.max(jnp.abs(lse - ref_lse))))
    tol = 1e-4 if interpret else 5e-2  # tf32 dots on a GPU
    return dict(max_abs_error=errors, tolerance=tol, ok=all(e <= tol for e in errors.values()))


def interleaved_medians_ms(fns: dict, args, warmup: int, repeats: int) -> dict:
    """Median ms of each function, timed in alternating rounds (drift hits all of them alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def measure_dense_attention(form: str, length: int, heads: int, interpret: bool, warmup: int, repeats: int) -> dict:
    dk, dv = DENSE_FORMS[form]
    kq, kk, kv_ = jax.random.split(jax.random.key(1), 3)
    kv_shape = (1, length) if form == "shared" else (1, length, heads)
    q = jax.random.normal(kq, (1, length, heads, dk), jnp.bfloat16)
    k = jax.random.normal(kk, (*kv_shape, dk), jnp.bfloat16)
    v = jax.random.normal(kv_, (*kv_shape, dv), jnp.bfloat16)
    pos, seg = jnp.arange(length), jnp.zeros((1, length), jnp.int32)
    scale = dk ** -0.5
    fns = {"triton": jax.jit(lambda q, k, v: flash_attention_gpu(q, k, v, pos, seg, seg, scale, interpret=interpret)),
           "jax_flash": jax.jit(lambda q, k, v: flash_attention(q, k, v, pos, seg, seg, scale))}
    ms = interleaved_medians_ms(fns, (q, k, v), warmup, repeats)
    pairs = length * length / 2 * heads  # causal: half the pairs
    result = dict(length=length, heads=heads, dk=dk, dv=dv, triton_ms=ms["triton"], jax_flash_ms=ms["jax_flash"],
                  triton_tflops=2 * pairs * (dk + dv) / ms["triton"] / 1e9,
                  speedup_vs_jax_flash=ms["jax_flash"] / ms["triton"])
    if form == "per_head":  # the shared-key form's backward is the JAX one on both paths
        pullbacks = {}
        for name, fn in (("triton", flash_attention_gpu), ("jax_flash", flash_attention)):
            extra = dict(interpret=interpret) if name == "triton" else {}
            attend = lambda q, k, v, fn=fn, extra=extra: fn(q, k, v, pos, seg, seg, scale, **extra)  # noqa: E731
            (out, lse), pullback = jax.jit(lambda q, k, v, attend=attend: jax.vjp(attend, q, k, v))(q, k, v)
            pullbacks[name] = jax.jit(lambda ct, pullback=pullback: pullback(ct))
        cts = ((jax.random.normal(kq, out.shape, out.dtype), jnp.zeros_like(lse)),)
        bwd = interleaved_medians_ms(pullbacks, cts, warmup, repeats)
        result |= dict(triton_bwd_ms=bwd["triton"], jax_flash_bwd_ms=bwd["jax_flash"],
                       triton_bwd_tflops=2 * pairs * (3 * dk + 2 * dv) / bwd["triton"] / 1e9,
                       bwd_speedup_vs_jax_flash=bwd["jax_flash"] / bwd["triton"])
    return result


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

    checks = [run("checks", "sparse_mla", check_sparse_mla, smoke), run("checks", "indexer_topk", check_topk, smoke),
              run("checks", "dense_attention", check_dense_attention, smoke)]
    if not smoke:
        run("ceilings", "matmul_bf16", measure_matmul, 8192, warmup, repeats)
        run("ceilings", "cudnn_flash_attention", measure_cudnn_flash, 16384, warmup, repeats)
    for length in lengths:
        run("sparse_mla", f"L{length}", measure_sparse_mla, length, heads, topk, smoke, warmup, repeats)
    for length in lengths:
        for form in DENSE_FORMS:
            run("dense_attention", f"{form}_L{length}", measure_dense_attention, form, length, heads, smoke, warmup,
                repeats)
    ceiling = report.data["ceilings"].get("matmul_bf16", {}).get("tflops")
    for entry in report.data["sparse_mla"].values():
        if ceiling and "fwd_tflops" in entry:
            entry["fwd_vs_matmul"] = entry["fwd_tflops"] / ceiling
            entry["bwd_vs_matmul"] = entry["bwd_tflops"] / ceiling
    report.write()
    failed = [c for c in checks if not (c and c.get("ok"))]
    errors = [k for s in ("ceilings", "sparse_mla", "dense_attention") for k, v in report.data[s].items()
              if "error" in v]
    print(f"wrote {out}; checks {'passed' if not failed else 'FAILED'}"
          + (f"; errors in {', '.join(errors)}" if errors else ""))
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
