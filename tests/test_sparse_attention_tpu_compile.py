"""Ahead-of-time Mosaic compilation of the TPU sparse MLA attention for a v5p chip, no TPU needed.

libtpu compiles for a deviceless v5p topology: the real Mosaic passes run, so VMEM overflows and
unsupported layouts fail here as on the chip (a few seconds per compile). Skipped where libtpu is
not installed. The figures are recorded by bench/tpu_sparse_attention_compile.py (bench/results/).
"""

from __future__ import annotations

import pytest

pytest.importorskip("libtpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dsa_train.kernels.sparse_attention_tpu import sparse_mla_attention_tpu  # noqa: E402
from dsa_train.ops.attention import NEG_INF  # noqa: E402

V5P_HBM_BYTES = 95 * 2**30  # per chip


def compile_fwd_bwd(device, length, heads=128, topk=2048, d=576, v_dim=512):
    """grad(q, kv) of a loss on out and lse, compiled for one TPU device (bf16, batch 1)."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = (jax.ShapeDtypeStruct((1, length, heads, d), jnp.bfloat16, sharding=sharding),
            jax.ShapeDtypeStruct((1, length, d), jnp.bfloat16, sharding=sharding),
            jax.ShapeDtypeStruct((1, length, topk), jnp.int32, sharding=sharding))

    def loss(q, kv, idx):
        out, lse = sparse_mla_attention_tpu(q, kv, idx, d ** -0.5, v_dim)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(lse > NEG_INF / 2, lse, 0.0))

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()


def test_small_shapes_compile(device):
    # Odd sizes: T not a multiple of the dkv tile, S not a multiple of the query block, K < block_k.
    compiled = compile_fwd_bwd(device, 1000, heads=16, topk=40, d=576, v_dim=512)
    assert compiled.memory_analysis().temp_size_in_bytes > 0


@pytest.mark.slow
@pytest.mark.parametrize("length", [32768, 131072])
def test_mla_fwd_bwd_compiles_and_fits_hbm(device, length):
    # H = 128, K = 2048, 576 / 512, bf16, batch 1: the kernel layout of the 671B recipe. Before the
    # dkv tiles the backward asked for 80 MiB of VMEM at 32K (a v5p core has 64 MiB).
    compiled = compile_fwd_bwd(device, length)
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    assert 0 < total < V5P_HBM_BYTES
    text = compiled.as_text()
    for kernel in ("sparse_mla_forward", "sparse_mla_backward_dq", "sparse_mla_backward_dkv"):
        assert kernel in text
