"""Which implementation runs the sparse ops, and the entry points that route to it.

Implementation names (`impl`):
- "reference": the pure-JAX reference in `dsa_train.ops` (materializes [B, S, K, D]).
- "blocked": pure JAX, query blocks + custom_vjp; memory O(block_q K D). The CPU path.
- "pallas": the Pallas kernel of the platform the program is lowered for (Triton on CUDA/ROCm,
  Mosaic on TPU, the GPU kernel in interpret mode anywhere else).
- "pallas_interpret": the Pallas GPU kernel run with interpret=True (CPU tests).
- "pallas_gpu" / "pallas_tpu": a specific kernel; with the "_interpret" suffix, in interpret mode
  (the TPU one through the Mosaic TPU interpreter, which models DMAs and semaphores).
- "auto": "pallas" on GPU/TPU, "blocked" on CPU; see `resolve_impl`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("reference", "blocked", "pallas", "pallas_interpret", "pallas_gpu", "pallas_tpu",
         "pallas_gpu_interpret", "pallas_tpu_interpret", "auto")


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """Turn "auto" into a concrete implementation name for `backend` (default: JAX's default)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown kernel implementation {impl!r}; expected one of {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    return "pallas" if backend in ("gpu", "cuda", "rocm", "tpu") else "blocked"


def _pallas_platform(impl: str) -> tuple[str, bool]:
    """(platform, interpret) of an explicit Pallas implementation name ("pallas" itself excluded)."""
    if impl == "pallas_interpret":
        return "gpu", True
    platform = impl.split("_")[1]
    return platform, impl.endswith("_interpret")


def _check_attention_inputs(q, kv, indices, v_dim: int) -> None:
    if q.ndim != 4 or kv.ndim != 3 or indices.ndim != 3:
        raise ValueError(f"sparse_mla_attention expects q [B, S, H, D], kv [B, T, D], indices [B, S, K]; "
                         f"got {q.shape}, {kv.shape}, {indices.shape}")
    if q.shape[0] != kv.shape[0] or indices.shape[:2] != q.shape[:2] or q.shape[-1] != kv.shape[-1]:
        raise ValueError(f"sparse_mla_attention shape mismatch: q {q.shape}, kv {kv.shape}, indices {indices.shape}")
    if not 0 < v_dim <= q.shape[-1]:
        raise ValueError(f"v_dim must be in (0, {q.shape[-1]}], got {v_dim}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices must be integers, got {indices.dtype}")


def sparse_mla_attention(q, kv, indices, sm_scale: float, v_dim: int = 512, impl: str = "auto"):
    """Top-k sparse MLA attention (MQA/latent form); see `sparse_mla_attention_reference` for the math.

    q [B, S, H, D], kv [B, T, D] (value = kv[..., :v_dim]), indices [B, S, K] int (-1 = unused)
    -> out [B, S, H, v_dim] (q.dtype), lse [B, S, H] (fp32). Differentiable in q and kv (and lse).
    """
    impl = resolve_impl(impl)
    _check_attention_inputs(q, kv, indices, v_dim)
    if impl == "reference":
        from dsa_train.ops.attention import sparse_mla_attention_reference

        return sparse_mla_attention_reference(q, kv, indices, sm_scale, v_dim)
    if impl == "blocked":
        from dsa_train.kernels.sparse_attention_blocked import sparse_mla_attention_blocked

        return sparse_mla_attention_blocked(q, kv, indices, sm_scale, v_dim)
    from dsa_train.kernels.sparse_attention_gpu import sparse_mla_attention_gpu
    from dsa_train.kernels.sparse_attention_tpu import sparse_mla_attention_tpu

    gpu = lambda q, kv, idx: sparse_mla_attention_gpu(q, kv, idx, sm_scale, v_dim)
    tpu = lambda q, kv, idx: sparse_mla_attention_tpu(q, kv, idx, sm_scale, v_dim)
    interpret = lambda q, kv, idx: sparse_mla_attention_gpu(q, kv, idx, sm_scale, v_dim, interpret=True)
    if impl == "pallas":
        # Chosen per lowering platform, not per default backend: `jax.export(..., platforms=["tpu"])`
        # from a CPU host then lowers the TPU kernel. Elsewhere (CPU) the GPU kernel is interpreted.
        return jax.lax.platform_dependent(q, kv, indices, cuda=gpu, rocm=gpu, tpu=tpu, default=interpret)
    platform, interpreted = _pallas_platform(impl)
    if not interpreted:
        return (gpu if platform == "gpu" else tpu)(q, kv, indices)
    if platform == "gpu":
        return interpret(q, kv, indices)
    return sparse_mla_attention_tpu(q, kv, indices, sm_scale, v_dim, interpret=True)


def indexer_topk(q, k, weights, topk: int, segment_ids, impl: str = "auto"):
    """Lightning-indexer top-k selection -> indices [B, S, min(topk, T)] int32 (-1 = unused).

    "reference" runs `dsa_train.ops.indexer.indexer_topk_reference`; every other implementation is
    delegated to `dsa_train.kernels.indexer_topk.indexer_topk_kernel(..., impl=<resolved name>)`.
    """
    impl = resolve_impl(impl)
    if impl == "reference":
        from dsa_train.ops.indexer import indexer_topk_reference

        return indexer_topk_reference(q, k, weights, topk, segment_ids)
    try:
        from dsa_train.kernels.indexer_topk import indexer_topk_kernel
    except ModuleNotFoundError as err:
        if err.name != "dsa_train.kernels.indexer_topk":
            raise
        raise ValueError(f"indexer top-k implementation {impl!r} needs dsa_train/kernels/indexer_topk.py, "
                         "which is not installed; use impl='reference'") from None
    return indexer_topk_kernel(q, k, weights, topk, segment_ids, impl=impl)
