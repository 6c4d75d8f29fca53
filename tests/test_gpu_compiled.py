"""Compiled code of the Pallas Triton kernels for sm_90a, built on CPU with the `triton` wheel and
its ptxas: the sparse MLA kernels at the real shapes (H = 128, D = 576 / 512, K = 2048, bf16; about
15 s) and the dense attention kernels (H = 128; forward per head 192 / 128 and with shared keys
576 / 512, the per-head backward's dQ and dK/dV kernels; bf16; about 15 s).

Asserted for the sparse forward, both sparse backward kernels (dQ, dKV), the head-summed
probabilities, both dense forwards and both dense backward kernels: every dot is a wgmma (64-row tiles, no mma.sync), no
register spills, and registers and shared memory fit one block of num_warps warps per SM.
"""

import pytest

from dsa_train.kernels.gpu_compiled_code import (DENSE_SHAPES, REAL_SHAPES, SM90_MAX_REGISTERS,
                                                 SM90_MAX_SHARED_BYTES, dense_attention_compiled,
                                                 sparse_indexer_kl_compiled, sparse_mla_compiled)

KERNELS = ["forward", "backward_dq", "backward_dkv", "head_summed_probs", "forward_per_head", "forward_shared",
           "backward_dq_per_head", "backward_dkv_per_head"]


@pytest.fixture(scope="module")
def compiled():
    return sparse_mla_compiled(**REAL_SHAPES) | dense_attention_compiled(**DENSE_SHAPES)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fits_one_block_per_sm(compiled, kernel):
    figures = compiled[kernel]
    assert figures["registers"] <= SM90_MAX_REGISTERS
    assert figures["registers"] * figures["num_warps"] * 32 <= 65536
    assert 0 < figures["shared_bytes"] <= SM90_MAX_SHARED_BYTES


@pytest.mark.parametrize("kernel", KERNELS)
def test_dots_are_wgmma(compiled, kernel):
    assert compiled[kernel]["wgmma"] > 0 and compiled[kernel]["mma_sync"] == 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_spills(compiled, kernel):
    assert compiled[kernel]["spill_store_bytes"] == 0


@pytest.fixture(scope="module")
def compiled_kl():
    return sparse_indexer_kl_compiled(topk=REAL_SHAPES["topk"], kv_len=REAL_SHAPES["kv_len"])


@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_sparse_indexer_kl_kernels_compile_to_wgmma_without_spills(compiled_kl, kernel):
    """The sparse indexer KL's Triton kernels (Hi = 64, Di = 128, K = 2048): the same criteria."""
    figures = compiled_kl[kernel]
    assert figures["wgmma"] > 0 and figures["mma_sync"] == 0
    assert figures["spill_store_bytes"] == 0
    assert figures["registers"] * figures["num_warps"] * 32 <= 65536
    assert 0 < figures["shared_bytes"] <= SM90_MAX_SHARED_BYTES
