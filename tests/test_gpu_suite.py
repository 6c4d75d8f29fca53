"""bench/gpu_suite.py: its --cpu-smoke mode (same code path, tiny shapes, kernels interpreted) and
its refusal to measure without a GPU."""

import importlib.util
import json
import os

import jax
import pytest

SUITE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_suite.py")


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_smoke_checks_and_measures(tmp_path):
    out = tmp_path / "suite.json"
    assert load_suite().main(["--cpu-smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert all(data["checks"][name]["ok"] for name in ("sparse_mla", "indexer_topk", "dense_attention"))
    entry = data["sparse_mla"]["L32"]
    assert entry["fwd_ms"] > 0 and entry["bwd_ms"] > 0 and entry["fwd_tflops"] > 0
    for form in ("per_head", "shared"):
        entry = data["dense_attention"][f"{form}_L32"]
        assert entry["triton_ms"] > 0 and entry["jax_flash_ms"] > 0 and entry["speedup_vs_jax_flash"] > 0
    assert data["dense_attention"]["per_head_L32"]["triton_bwd_ms"] > 0


def test_budget_skips_measurements(tmp_path):
    out = tmp_path / "suite.json"
    suite = load_suite()
    assert suite.main(["--cpu-smoke", "--out", str(out), "--budget-s", "-1"]) == 1  # checks skipped: not ok
    data = json.loads(out.read_text())
    assert all("skipped" in v for v in data["checks"].values())
    assert "skipped" in data["sparse_mla"]["L32"] and "skipped" in data["dense_attention"]["per_head_L32"]


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the refusal is for machines without a GPU")
def test_refuses_without_gpu(tmp_path, capsys):
    assert load_suite().main(["--out", str(tmp_path / "suite.json")]) == 2
    assert "no GPU found" in capsys.readouterr().err
