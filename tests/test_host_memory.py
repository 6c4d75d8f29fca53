"""Train-start from a checkpoint never holds two copies of the model: a fresh process initializes
a warm-up run from a ~230 MB model directory (scan_layers on, so the per-layer checkpoint is also
stacked while it is read) and its peak RSS until the state is built, less its RSS before the
checkpoint was read, stays within 1.5x the train state's bytes plus a constant (the restore
staging is bounded, dsa_train.checkpoint.model_io.bounded_restore). Before the bounded restore the
same measurement was above 2x (every array's read in flight at once, freed read buffers kept in
the heap). Figures at more sizes: bench/host_memory.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "host_memory.py"
CONSTANT = 128 * 2**20  # compiling the optimizer's init, metadata, the data pipeline


def test_init_from_peak_rss_stays_below_one_and_a_half_copies(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import host_memory
    finally:
        sys.path.remove(str(REPO / "bench"))
    model_bytes = host_memory.write_random_model(host_memory.model_config(5), tmp_path / "model")
    assert 200 * 2**20 < model_bytes < 400 * 2**20
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device: the state is one copy in host memory
    out = subprocess.run([sys.executable, str(BENCH), "--child", "train", "--start-only", "--src",
                          str(tmp_path / "model"), "--dst", str(tmp_path / "run"), "--depth", "5"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    marks = json.loads(out.stdout.strip().splitlines()[-1])
    assert marks["state_bytes"] >= model_bytes
    grown = marks["start_peak_rss"] - marks["before_read_rss"]
    assert grown <= 1.5 * marks["state_bytes"] + CONSTANT, (grown / 2**20, marks["state_bytes"] / 2**20)
