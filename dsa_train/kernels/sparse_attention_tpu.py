"""Top-k sparse MLA attention (MQA/latent form) as Pallas kernels for TPU (Mosaic lowering).

Layout as in `sparse_attention_gpu`: q [B, S, H, D], kv [B, T, D] (value = kv[..., :v_dim]),
indices [B, S, K] (-1 = unused). One grid step owns one query and ALL its heads (H = 128 gives a
[128, 576] x [576, block_k] matmul, a good MXU shape, and each gathered key row is used by every
head), so every key row is fetched from HBM once per query.

Gather: kv stays in HBM (memory_space ANY). The query's indices arrive per grid step as a small
SMEM block (scalars that address the DMAs; scalar-prefetching the whole [B, S, K] table would not
fit SMEM at long sequence lengths) and as a VMEM block (the vector validity mask). For each block
of block_k slots the kernel issues one row DMA per slot (`pltpu.make_async_copy`, kv row -> VMEM)
and double-buffers: block j + 1 is in flight while block j is computed. Invalid slots fetch row 0
and are masked to probability 0.

Forward: online softmax over the K blocks; out [H, v_dim] and lse [H] per query.
Backward, grid (B, S) with S sequential: p is recomputed from lse; dq per query; the [T, D] fp32
dkv of the current batch row is an output block that stays resident in VMEM while the grid walks
S (its block index depends on b only) and receives each slot's row with a dynamic-row
read-modify-write. TPU has no atomics, and the sequential S axis makes this race-free. Limit: the
double-buffered [T, D] fp32 block must fit VMEM (2 x T x D x 4 bytes: T <= about 14K on 128 MiB-VMEM
chips, 7K on 64 MiB ones; a clear error is raised on a TPU beyond that). Longer sequences need T
tiles (rerunning the S sweep per tile) or a per-chunk HBM scatter: not implemented. The lse
cotangent is supported.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsa_train.kernels.recompute_vjp import attention_with_recompute
from dsa_train.ops.attention import NEG_INF

LANES = 128
VMEM_HEADROOM = 8 * 2**20


@dataclasses.dataclass(frozen=True)
class TpuKernelConfig:
    sm_scale: float
    v_dim: int
    block_k: int = 128
    interpret: bool = False


def sparse_mla_attention_tpu(q, kv, indices, sm_scale: float, v_dim: int = 512, *, interpret: bool = False,
                             block_k: int = 128):
    """q [B, S, H, D], kv [B, T, D], indices [B, S, K] -> out [B, S, H, v_dim] (q.dtype), lse [B, S, H] fp32."""
    cfg = TpuKernelConfig(sm_scale=float(sm_scale), v_dim=int(v_dim), block_k=int(block_k),
                          interpret=bool(interpret))
    return _attention(q, kv, indices.astype(jnp.int32), cfg)


def _slot_block(k: int, block_k: int) -> int:
    """Slots per DMA block: a lane-aligned block_k, or all of a short index list (rounded to 8)."""
    return block_k if k > block_k else -(-k // 8) * 8


def _pad_indices(indices: jnp.ndarray, block: int) -> jnp.ndarray:
    pad = -indices.shape[-1] % block
    return jnp.pad(indices, [(0, 0), (0, 0), (0, pad)], constant_values=-1) if pad else indices


def _interpret_arg(interpret: bool):
    # The Mosaic TPU interpreter models DMAs, semaphores and SMEM; plain interpret=True does not.
    return pltpu.InterpretParams() if interpret else False


# ----------------------------------------------------------------------------------------------
# Row gather: one DMA per slot, double-buffered by the callers.


def _row_copy(kv_hbm, buf, sem, b, row, slot, j):
    return pltpu.make_async_copy(kv_hbm.at[b, pl.ds(row, 1)], buf.at[slot, pl.ds(j, 1)], sem.at[slot])


def _start_gather(kv_hbm, buf, sem, idx_smem, b, block, slot, block_k):
    def start(j, carry):
        row = jnp.maximum(idx_smem[0, block * block_k + j], 0)
        _row_copy(kv_hbm, buf, sem, b, row, slot, j).start()
        return carry

    jax.lax.fori_loop(0, block_k, start, 0)


def _wait_gather(kv_hbm, buf, sem, b, slot, block_k):
    def wait(j, carry):
        _row_copy(kv_hbm, buf, sem, b, 0, slot, j).wait()  # same byte count as every row copy
        return carry

    jax.lax.fori_loop(0, block_k, wait, 0)


def _gathered_blocks(kv_hbm, buf, sem, idx_smem, b, num_blocks, block_k, body, carry, key_dtype):
    """Run body(block, keys [block_k, D] in key_dtype, carry) over the blocks, prefetching block + 1."""
    _start_gather(kv_hbm, buf, sem, idx_smem, b, 0, 0, block_k)

    def step(block, carry):
        slot = block % 2
        _wait_gather(kv_hbm, buf, sem, b, slot, block_k)

        @pl.when(block + 1 < num_blocks)
        def _prefetch():
            _start_gather(kv_hbm, buf, sem, idx_smem, b, block + 1, 1 - slot, block_k)

        return body(block, buf[slot].astype(key_dtype), carry)

    return jax.lax.fori_loop(0, num_blocks, step, carry)


def _valid_mask(idx_vmem, block):
    # idx_vmem is [num_blocks, block_k]: a dynamic sublane (row) index, no dynamic lane slicing.
    return idx_vmem[pl.ds(block, 1), :] >= 0  # [1, block_k]


def _dot_nt(a, b):
    """a [M, D] . b [N, D]^T -> [M, N] in fp32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a [M, N]^T . b [M, D] -> [N, D] in fp32."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------
# Kernels.


def _forward_kernel(idx_smem, idx_vmem, q_ref, kv_hbm, out_ref, lse_ref, buf, sem, *, sm_scale: float,
                    v_dim: int, block_k: int, num_blocks: int, key_dtype):
    b = pl.program_id(0)
    q = q_ref[...]
    heads = q.shape[0]

    def body(block, keys, carry):
        acc, m_prev, l_prev = carry
        valid = _valid_mask(idx_vmem, block)
        s = jnp.where(valid, _dot_nt(q, keys) * sm_scale, NEG_INF)  # [H, block_k]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.where(valid, jnp.exp(s - m_next), 0.0)
        l_next = l_prev * alpha + jnp.sum(p, axis=1, keepdims=True)
        acc = acc * alpha + _dot(p.astype(keys.dtype), keys[:, :v_dim])
        return acc, m_next, l_next

    carry = (jnp.zeros((heads, v_dim), jnp.float32), jnp.full((heads, 1), NEG_INF, jnp.float32),
             jnp.zeros((heads, 1), jnp.float32))
    acc, m, l = _gathered_blocks(kv_hbm, buf, sem, idx_smem, b, num_blocks, block_k, body, carry, key_dtype)
    has_keys = l > 0
    l_safe = jnp.where(has_keys, l, 1.0)
    out_ref[...] = (acc / l_safe).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(has_keys, m + jnp.log(l_safe), NEG_INF)


def _backward_kernel(idx_smem, idx_vmem, q_ref, kv_hbm, do_ref, lse_ref, delta_ref, dq_ref, dkv_ref,
                     buf, sem, dk_buf, *, sm_scale: float, v_dim: int, block_k: int, num_blocks: int,
                     key_dtype):
    b, s_idx = pl.program_id(0), pl.program_id(1)

    @pl.when(s_idx == 0)
    def _init():
        dkv_ref[...] = jnp.zeros_like(dkv_ref)

    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]  # [H, 1]
    delta = delta_ref[...]  # [H, 1]

    def body(block, keys, dq):
        valid = _valid_mask(idx_vmem, block)
        s = _dot_nt(q, keys) * sm_scale
        p = jnp.where(valid, jnp.exp(s - lse), 0.0)  # [H, block_k]
        dp = _dot_nt(do, keys[:, :v_dim])
        ds = p * (dp - delta) * sm_scale
        dq = dq + _dot(ds.astype(keys.dtype), keys)
        dk_buf[...] = _dot_tn(ds.astype(q.dtype), q)
        dk_buf[:, :v_dim] += _dot_tn(p.astype(do.dtype), do)

        # Scatter-add each valid slot's row into the resident fp32 dkv (no two slots of one query
        # share a row, and grid steps run one after another, so plain read-modify-write is safe).
        def scatter(j, carry):
            row = idx_smem[0, block * block_k + j]

            @pl.when(row >= 0)
            def _add():
                dkv_ref[pl.ds(row, 1), :] += dk_buf[pl.ds(j, 1), :]

            return carry

        jax.lax.fori_loop(0, block_k, scatter, 0)
        return dq

    dq = _gathered_blocks(kv_hbm, buf, sem, idx_smem, b, num_blocks, block_k, body,
                          jnp.zeros(q.shape, jnp.float32), key_dtype)
    dq_ref[...] = dq.astype(dq_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers and the custom VJP.


def _index_specs(kp: int, block_k: int):
    """The query's indices twice: [1, Kp] scalars in SMEM (DMA addresses) and [Kp / block_k, block_k]
    vectors in VMEM (validity masks)."""
    return [
        pl.BlockSpec((None, None, 1, kp), lambda b, s: (b, s, 0, 0), memory_space=pltpu.SMEM),
        pl.BlockSpec((None, None, kp // block_k, block_k), lambda b, s: (b, s, 0, 0)),
    ]


def _index_operands(idxp: jnp.ndarray, block_k: int):
    b, s, kp = idxp.shape
    return idxp.reshape(b, s, 1, kp), idxp.reshape(b, s, kp // block_k, block_k)


def _gather_source(kv: jnp.ndarray) -> jnp.ndarray:
    """kv as the DMAs read it: 16-bit rows are widened to fp32 first, because one bf16 row is half
    of a packed 32-bit sublane and a single-row DMA at a dynamic row offset into a (16, 128)-tiled
    bf16 buffer is not a pattern Mosaic is known to accept. Costs 2x gather bytes; the kernels cast
    the rows back to kv.dtype before the matmuls, so the math is unchanged."""
    return kv if kv.dtype.itemsize >= 4 else kv.astype(jnp.float32)


def _vmem_limit(nbytes: int) -> int | None:
    """Raise the scoped VMEM limit only when the kernel needs more than the default (16 MiB)."""
    need = nbytes + VMEM_HEADROOM
    if jax.default_backend() == "tpu":
        capacity = pltpu.get_tpu_info().vmem_capacity_bytes
        if need > capacity:
            raise ValueError(f"sparse attention backward on TPU keeps dkv [T, D] in VMEM: needs {need / 2**20:.0f} "
                             f"MiB, this TPU core has {capacity / 2**20:.0f} MiB; use shorter sequences or impl='blocked'")
    return need if need > 16 * 2**20 else None


def _forward(q, kv, indices, cfg: TpuKernelConfig):
    b, s, h, d = q.shape
    block_k = _slot_block(indices.shape[-1], cfg.block_k)
    idxp = _pad_indices(indices, block_k)
    kp = idxp.shape[-1]
    kernel = functools.partial(_forward_kernel, sm_scale=cfg.sm_scale, v_dim=cfg.v_dim, block_k=block_k,
                               num_blocks=kp // block_k, key_dtype=kv.dtype)
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, s),
        in_specs=_index_specs(kp, block_k) + [
            pl.BlockSpec((None, None, h, d), lambda b, s: (b, s, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=[
            pl.BlockSpec((None, None, h, cfg.v_dim), lambda b, s: (b, s, 0, 0)),
            pl.BlockSpec((None, None, h, 1), lambda b, s: (b, s, 0, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, s, h, cfg.v_dim), q.dtype),
                   jax.ShapeDtypeStruct((b, s, h, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((2, block_k, d), _gather_source(kv).dtype), pltpu.SemaphoreType.DMA((2,))],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=_interpret_arg(cfg.interpret),
        name="sparse_mla_forward",
    )(*_index_operands(idxp, block_k), q, _gather_source(kv))
    return out, lse[..., 0]


def _backward(q, kv, indices, out, lse, d_out, d_lse, cfg: TpuKernelConfig):
    b, s, h, d = q.shape
    t = kv.shape[1]
    block_k = _slot_block(indices.shape[-1], cfg.block_k)
    idxp = _pad_indices(indices, block_k)
    kp = idxp.shape[-1]
    delta = jnp.einsum("bshd,bshd->bsh", out.astype(jnp.float32), d_out.astype(jnp.float32))
    delta = delta - d_lse.astype(jnp.float32)
    kernel = functools.partial(_backward_kernel, sm_scale=cfg.sm_scale, v_dim=cfg.v_dim, block_k=block_k,
                               num_blocks=kp // block_k, key_dtype=kv.dtype)
    per_query = lambda width: pl.BlockSpec((None, None, h, width), lambda b, s: (b, s, 0, 0))
    dkv_bytes = t * max(d, LANES) * 4
    dq, dkv = pl.pallas_call(
        kernel,
        grid=(b, s),
        in_specs=_index_specs(kp, block_k) + [
            per_query(d),
            pl.BlockSpec(memory_space=pl.ANY),
            per_query(cfg.v_dim),
            per_query(1),
            per_query(1),
        ],
        out_specs=[per_query(d), pl.BlockSpec((None, t, d), lambda b, s: (b, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, t, d), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((2, block_k, d), _gather_source(kv).dtype), pltpu.SemaphoreType.DMA((2,)),
                        pltpu.VMEM((block_k, d), jnp.float32)],
        # S must run in order on one core: dkv is accumulated in place across it.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=_vmem_limit(2 * dkv_bytes)),
        interpret=_interpret_arg(cfg.interpret),
        name="sparse_mla_backward",
    )(*_index_operands(idxp, block_k), q, _gather_source(kv), d_out, lse[..., None], delta[..., None])
    return dq, dkv.astype(kv.dtype)


_attention = attention_with_recompute(_forward, _backward)
