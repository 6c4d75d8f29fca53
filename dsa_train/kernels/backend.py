"""The kernel backend: the ops that look across the sequence, resolved once from ``model.kernels``.

The model holds one :class:`Backend` and calls it for dense attention, the indexer top-k, sparse
MLA attention and the two indexer KL losses. Everything token-wise stays in the model; the pure
references of these five ops live in ``dsa_train.ops`` (the oracles every kernel is tested against).

Kernel names (``KERNELS``; the config's ``model.kernels`` accepts a subset):
- "reference": the pure-JAX references of ``dsa_train.ops`` (materialize [B, S, T] or [B, S, K, D]).
- "blocked" (alias "streaming"): pure JAX, query blocks + custom_vjp, no S x T buffer. The CPU path.
- "pallas": the Pallas kernels of the platform the program is lowered for (Triton on CUDA/ROCm,
  Mosaic on TPU, the GPU kernels in interpret mode anywhere else).
- "pallas_interpret": the Pallas GPU kernels run with interpret=True (CPU tests).
- "pallas_gpu" / "pallas_tpu": a specific platform's kernels; with the "_interpret" suffix, in
  interpret mode (the TPU ones through the Mosaic TPU interpreter).
- "auto": "pallas" on GPU/TPU, "blocked" on CPU (see :func:`resolve_impl`).

A backend runs on whatever arrays it is given: under context parallelism the model wraps it
(``dsa_train.parallel.context_parallel.sequence_ops``) so that each shard runs these same calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsa_train.kernels import indexer_kl, indexer_tiles
from dsa_train.kernels.dense_attention import dense_attention_flash, flash_attention
from dsa_train.kernels.dense_attention_gpu import dense_attention_gpu, flash_attention_gpu
from dsa_train.kernels.dense_attention_tpu import dense_attention_splash
from dsa_train.kernels.dense_indexer_kl import dense_kl_sum
from dsa_train.kernels.dense_indexer_kl_pallas import dense_kl_sum_pallas
from dsa_train.kernels.indexer_topk import indexer_topk_kernel
from dsa_train.kernels.sparse_attention_blocked import sparse_mla_attention_blocked
from dsa_train.kernels.sparse_attention_gpu import sparse_mla_attention_gpu
from dsa_train.kernels.sparse_attention_tpu import sparse_mla_attention_tpu
from dsa_train.ops import attention as attention_ops
from dsa_train.ops import indexer as indexer_ops
from dsa_train.ops import losses

KERNELS = ("reference", *indexer_tiles.IMPLS, "auto")


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """Turn "auto" into a concrete kernel name for ``platform`` (default: JAX's default backend)."""
    if impl not in KERNELS:
        raise ValueError(f"unknown kernel implementation {impl!r}; expected one of {', '.join(KERNELS)}")
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    return "pallas" if platform in ("gpu", "cuda", "rocm", "tpu") else "blocked"


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


@dataclass(frozen=True)
class Backend:
    """The resolved kernel choice (``impl``: a name of ``KERNELS`` other than "auto"). Hashable, so
    the model can hold it as static structure and jit traces it as a constant."""

    impl: str

    def __post_init__(self):
        if resolve_impl(self.impl) != self.impl:
            raise ValueError(f"Backend needs a resolved kernel name, not {self.impl!r}; use Backend.resolve")

    @classmethod
    def resolve(cls, impl: str, platform: str | None = None) -> "Backend":
        return cls(resolve_impl(impl, platform))

    def dense_attention(self, q, k, v, segment_ids, sm_scale: float):
        """Causal, document-masked MHA: q/k [B, S, H, Dk], v [B, S, H, Dv] -> (out, lse [B, S, H]).
        "reference": ``ops.attention.dense_attention``; the Pallas kernels run splash attention on
        TPU (``kernels/dense_attention_tpu.py``, S a multiple of 128) and the Triton kernels on
        CUDA/ROCm (``kernels/dense_attention_gpu.py``: forward and backward); everything else the flash form of
        ``kernels/dense_attention.py`` (online softmax over key blocks, causal block skipping,
        flash backward), which is also splash's backward (the GPU kernels have their own)."""
        if self.impl == "reference":
            return attention_ops.dense_attention(q, k, v, segment_ids, sm_scale)
        flash = lambda q, k, v, seg: dense_attention_flash(q, k, v, seg, sm_scale)  # noqa: E731
        gpu = lambda q, k, v, seg: dense_attention_gpu(q, k, v, seg, sm_scale)  # noqa: E731
        splash_fits = q.shape[1] % 128 == 0 and k.ndim == 4
        splash = lambda q, k, v, seg: dense_attention_splash(q, k, v, seg, sm_scale)  # noqa: E731
        if self.impl == "pallas":
            return jax.lax.platform_dependent(q, k, v, segment_ids, tpu=splash if splash_fits else flash, cuda=gpu,
                                              rocm=gpu, default=flash)
        if self.impl in ("pallas_tpu", "pallas_tpu_interpret") and splash_fits:
            return dense_attention_splash(q, k, v, segment_ids, sm_scale, interpret=self.impl.endswith("interpret"))
        if self.impl in ("pallas_gpu", "pallas_gpu_interpret"):
            return dense_attention_gpu(q, k, v, segment_ids, sm_scale, interpret=self.impl.endswith("interpret"))
        return flash(q, k, v, segment_ids)

    def dense_attention_at(self, q, k, v, q_positions, q_segment_ids, k_segment_ids, sm_scale: float):
        """Dense attention of queries at row positions ``q_positions`` [S] against the whole row's
        keys (a context shard's); k/v per head [B, T, H, D] or shared [B, T, D] (MQA form). The
        Triton kernels on CUDA/ROCm for the Pallas kernels (``kernels/dense_attention_gpu.py``),
        the flash kernel of ``kernels/dense_attention.py`` everywhere else (splash's static masks
        cannot take traced positions)."""
        args = (q, k, v, q_positions, q_segment_ids, k_segment_ids)
        flash = lambda *a: flash_attention(*a, sm_scale)  # noqa: E731
        gpu = lambda *a: flash_attention_gpu(*a, sm_scale)  # noqa: E731
        if self.impl == "pallas":
            return jax.lax.platform_dependent(*args, cuda=gpu, rocm=gpu, default=flash)
        if self.impl in ("pallas_gpu", "pallas_gpu_interpret"):
            return flash_attention_gpu(*args, sm_scale, interpret=self.impl.endswith("interpret"))
        return flash(*args)

    def indexer_kl_sum_at(self, q, kv, lse, q_idx, k_idx, w_idx, weights, q_positions, q_segment_ids,
                          k_segment_ids, sm_scale: float):
        """sum_t weights_t KL_t of the dense warm-up loss for queries at row positions ``q_positions``
        against the whole row's keys (a context shard's), ``lse`` the main attention's of these
        queries: the Pallas one-pass kernel for the Pallas impls (``kernels/dense_indexer_kl_pallas.py``),
        its pure-JAX form otherwise (``kernels/dense_indexer_kl.py``)."""
        args = (q, kv, lse, q_idx, k_idx, w_idx, weights, q_positions, q_segment_ids, k_segment_ids)
        chosen = indexer_tiles.resolve("blocked" if self.impl == "reference" else self.impl)
        if chosen.kind == "pallas":
            return dense_kl_sum_pallas(*args, sm_scale=sm_scale, variant=chosen.variant, interpret=chosen.interpret)
        return dense_kl_sum(*args, sm_scale=sm_scale)

    def indexer_topk(self, q, k, weights, topk: int, segment_ids, q_positions=None, k_segment_ids=None):
        """Lightning-indexer top-k -> indices [B, S, min(topk, T)] int32 (-1 = unused). Queries may be
        a subset of the row (a context shard): ``q_positions`` ([S] or [B, S]) are their positions
        among the T keys (default arange) and ``k_segment_ids`` [B, T] the keys' documents (default
        ``segment_ids``). The result is named for the remat policy, which saves it (no re-selection
        in the backward pass)."""
        if self.impl == "reference":
            indices = indexer_ops.indexer_topk_reference(q, k, weights, topk, segment_ids, q_positions=q_positions,
                                                         k_segment_ids=k_segment_ids)
        else:
            indices = indexer_topk_kernel(q, k, weights, topk, segment_ids, impl=self.impl, q_positions=q_positions,
                                          k_segment_ids=k_segment_ids)
        return checkpoint_name(indices, indexer_ops.TOPK_INDICES)

    def sparse_mla_attention(self, q, kv, indices, sm_scale: float, v_dim: int = 512):
        """Top-k sparse MLA attention (MQA/latent form), see ``ops.attention.sparse_mla_attention_reference``:
        q [B, S, H, D], kv [B, T, D], indices [B, S, K] -> out [B, S, H, v_dim], lse [B, S, H] (fp32)."""
        _check_attention_inputs(q, kv, indices, v_dim)
        impl = self.impl
        if impl == "reference":
            return attention_ops.sparse_mla_attention_reference(q, kv, indices, sm_scale, v_dim)
        if impl in ("blocked", "streaming"):
            return sparse_mla_attention_blocked(q, kv, indices, sm_scale, v_dim)
        gpu = lambda q, kv, idx: sparse_mla_attention_gpu(q, kv, idx, sm_scale, v_dim)  # noqa: E731
        tpu = lambda q, kv, idx: sparse_mla_attention_tpu(q, kv, idx, sm_scale, v_dim)  # noqa: E731
        interpret = lambda q, kv, idx: sparse_mla_attention_gpu(q, kv, idx, sm_scale, v_dim,  # noqa: E731
                                                                interpret=True)
        if impl == "pallas":
            # Chosen per lowering platform, not per default backend: `jax.export(..., platforms=["tpu"])`
            # from a CPU host then lowers the TPU kernel. Elsewhere (CPU) the GPU kernel is interpreted.
            return jax.lax.platform_dependent(q, kv, indices, cuda=gpu, rocm=gpu, tpu=tpu, default=interpret)
        chosen = indexer_tiles.resolve(impl)
        if chosen.variant == "tpu":
            return sparse_mla_attention_tpu(q, kv, indices, sm_scale, v_dim, interpret=chosen.interpret)
        return interpret(q, kv, indices) if chosen.interpret else gpu(q, kv, indices)

    def indexer_kl_loss(self, q, kv, sm_scale, q_idx, k_idx, w_idx, segment_ids, lse=None):
        """Dense warm-up loss, see ``ops.losses.indexer_kl_loss``; ``lse`` [B, S, H] (optional) is the
        main attention's log-sum-exp, reused by the kernels (the reference recomputes it). ``kv``:
        [B, T, D] (MQA form) or [B, T, H, D] (per-head form, q the per-head queries; the reference
        needs the MQA form)."""
        if self.impl == "reference":
            return losses.indexer_kl_loss(q, kv, sm_scale, q_idx, k_idx, w_idx, segment_ids)
        return indexer_kl.indexer_kl_loss_kernel(q, kv, sm_scale, q_idx, k_idx, w_idx, segment_ids, self.impl,
                                                 lse=lse)

    def sparse_indexer_kl_loss(self, q, kv, indices, lse, sm_scale, q_idx, k_idx, w_idx, segment_ids):
        """Sparse-stage loss over the selected keys, see ``ops.losses.sparse_indexer_kl_loss``; the
        Pallas kernels (``kernels/sparse_indexer_kl_gpu.py``, ``_tpu.py``) for the Pallas names, the
        streaming JAX form for "blocked"."""
        if self.impl == "reference":
            return losses.sparse_indexer_kl_loss(q, kv, indices, lse, sm_scale, q_idx, k_idx, w_idx, segment_ids)
        return indexer_kl.sparse_indexer_kl_loss_kernel(q, kv, indices, lse, sm_scale, q_idx, k_idx, w_idx,
                                                        segment_ids, self.impl)
