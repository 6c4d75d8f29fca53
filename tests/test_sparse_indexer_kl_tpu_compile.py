"""Ahead-of-time Mosaic compilation of the TPU sparse indexer KL kernels for a v5p chip, no TPU
needed (as tests/test_sparse_attention_tpu_compile.py does for the sparse attention). Skipped where
libtpu is not installed. bench/tpu_sparse_indexer_kl_compile.py records the 128K figures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("libtpu")

_SPEC = importlib.util.spec_from_file_location(
    "tpu_sparse_indexer_kl_compile", Path(__file__).resolve().parents[1] / "bench" / "tpu_sparse_indexer_kl_compile.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

KERNELS = ("sparse_indexer_kl_target", "sparse_indexer_kl_forward", "sparse_indexer_kl_backward_dq_dw",
           "sparse_indexer_kl_backward_dk")


def test_small_shapes_compile(device):
    # Real head shapes; odd sizes: L not a multiple of the query block, K < block_k, two dk tiles.
    compiled, _ = bench.compile_fwd_bwd(device, 1000, heads=16, topk=40)
    vmem = bench.kernel_vmem(compiled.as_text())
    assert sorted(vmem) == sorted(KERNELS), vmem
    assert all(0 < v < 48 * 2**20 for v in vmem.values())
