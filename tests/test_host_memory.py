"""Train-start from a checkpoint never holds two copies of the model: a fresh process initializes
a warm-up run from a ~290 MB model directory (scan_layers on, so the per-layer checkpoint is also
stacked while it is read), and a second one resumes that run; the peak RSS of each until its state
is built, less its RSS before the checkpoint was read, stays within 1.5x the train state's bytes
plus a constant (the restore staging is bounded, dsa_train.checkpoint.model_io.bounded_restore and
restore_in_groups). Before the bounded restores the same measurements were above 2x (init_from:
every array's read in flight at once, freed read buffers kept in the heap) and ~1.8x (resume: one
Orbax call for the whole train state). Figures at more sizes: bench/host_memory.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from dsa_train.checkpoint import model_io
from dsa_train.config import load_config
from dsa_train.model import create_model

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "host_memory.py"
CONSTANT = 128 * 2**20  # compiling the optimizer's init, metadata, the data pipeline
# A ~290 MB train state: more than one restore group (model_io.RESTORE_STAGING_BYTES), so that a
# resume read in one Orbax call (~1.8x here) fails the bound.
DEPTH = 6


def _child(*args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device: the state is one copy in host memory
    out = subprocess.run([sys.executable, str(BENCH), *args], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import host_memory
    finally:
        sys.path.remove(str(REPO / "bench"))
    path = tmp_path_factory.mktemp("host_memory") / "model"
    model_bytes = host_memory.write_random_model(host_memory.model_config(DEPTH), path)
    assert 200 * 2**20 < model_bytes < 400 * 2**20
    return path, model_bytes


def _grown(marks: dict) -> int:
    return marks["start_peak_rss"] - marks["before_read_rss"]


@pytest.mark.slow
def test_train_start_from_a_checkpoint_stays_below_one_and_a_half_copies(model_dir, tmp_path):
    """init_from (a model directory, converted to the stacked layout while it is read), one step
    and its save; then resume of that run (params and optimizer state, same layout)."""
    path, model_bytes = model_dir
    init_from = _child("--child", "train", "--src", str(path), "--dst", str(tmp_path / "run"), "--depth", str(DEPTH))
    assert init_from["state_bytes"] >= model_bytes
    assert _grown(init_from) <= 1.5 * init_from["state_bytes"] + CONSTANT, \
        (_grown(init_from) / 2**20, init_from["state_bytes"] / 2**20)
    resume = _child("--child", "resume", "--start-only", "--src", str(path), "--dst", str(tmp_path / "run"),
                    "--depth", str(DEPTH))
    assert resume["state_bytes"] >= model_bytes
    # Same layout: nothing is converted; one copy, a restore group and the constant (one Orbax
    # call for the whole state measured ~1.8x here, 1.34-1.37x in groups).
    assert _grown(resume) <= 1.25 * resume["state_bytes"] + CONSTANT, \
        (_grown(resume) / 2**20, resume["state_bytes"] / 2**20)


@pytest.mark.slow
def test_export_peak_rss_follows_the_read_budget_not_the_model(model_dir, tmp_path):
    """Exporting reads the model directory in groups of at most read_budget (here 32 MB; the
    largest tensor is 16 MiB) and writes each tensor as it goes: the process's anonymous memory
    grows by a few groups and a constant, a fraction of the model."""
    path, model_bytes = model_dir
    marks = _child("--child", "export", "--src", str(path), "--dst", str(tmp_path / "hf"), "--depth", str(DEPTH),
                   "--read-budget", "32MB")
    grown = marks["peak_anon"] - marks["before_read_anon"]  # the written files' pages are the kernel's to drop
    assert grown <= 0.5 * model_bytes, (grown / 2**20, model_bytes / 2**20)


def test_a_shard_read_larger_than_the_staging_budget_gets_a_budget_that_fits(tmp_path, monkeypatch):
    """Orbax refuses a read larger than its in-flight budget; the restore then retries with one
    that fits that read, and the weights come back exact. Reads run concurrently, so the first
    refused one may be a smaller array than the largest: each retry's budget is larger than the
    last, and a few retries may be needed."""
    model = create_model(load_config(REPO / "configs" / "tiny.yaml").model)
    model_io.save_model(tmp_path / "model", model)
    budgets = []
    staging_options = model_io._staging_options
    monkeypatch.setattr(model_io, "RESTORE_STAGING_BYTES", 1)
    monkeypatch.setattr(model_io, "_shard_bytes", lambda x: 1)
    monkeypatch.setattr(model_io, "_staging_options", lambda budget: budgets.append(budget) or staging_options(budget))
    loaded = model_io.load_model_params(tmp_path / "model")
    assert budgets[0] == 3 and 2 <= len(budgets) <= 3 and all(b < c for b, c in zip(budgets, budgets[1:])), budgets
    want = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}
    got = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(loaded))}
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
