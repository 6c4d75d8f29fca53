"""Exact resume through the trainer, a kill during a save, and the warm-up -> sparse handoff (tiny model).

The reference is one uninterrupted run. A run killed with SIGKILL (its step-2 save committed, its
step-4 save in flight) and started again with the same command must produce bitwise the same
metrics at every step: the same state and the same data order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from dsa_train.checkpoint.manager import MODEL_KEY, RunCheckpointer
from dsa_train.config import load_config
from dsa_train.data import pipeline
from dsa_train.train.trainer import train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
BASE = ["train.stage=warmup", f"train.steps={STEPS}", "train.batch_size=2", "train.seq_len=64",
        "train.log_every=1", "train.indexer.lr=1e-2", "data.source=synthetic", "data.num_pairs=4",
        "data.num_queries=2"]
COMPARED = ("loss", "indexer_kl", "grad_norm/indexer", "captured_mass")

# Runs `train` in a child process that stops dead while the async save of step `at` is being written
# (its commit is held back, so the timing is deterministic); the parent then SIGKILLs it. The
# previous periodic save was committed before, as in a real preemption without a grace period.
CHILD = """
    import asyncio, json, sys
    from orbax.checkpoint._src.path import atomicity
    from dsa_train.config import load_config
    from dsa_train.train.trainer import train

    overrides, at = json.loads(sys.argv[1]), int(sys.argv[2])
    finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize_unless_at(self):
        if self._final_path.name == str(at):
            print("STOPPED", at, flush=True)
            await asyncio.sleep(3600)
        return await finalize(self)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize_unless_at
    train(load_config("configs/tiny.yaml", overrides), console=False)
    print("FINISHED", flush=True)
"""


def config(run_dir: Path, *extra: str):
    return load_config(REPO / "configs" / "tiny.yaml", BASE + [f"train.run_dir={run_dir}", *extra])


def metrics_by_step(run_dir: Path) -> dict[int, dict]:
    """The last record written for each step (a killed run's records are superseded on resume)."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = {k: record.get(k) for k in COMPARED}
    return records


def run_until_killed(run_dir: Path, at: int, *extra: str) -> None:
    overrides = BASE + [f"train.run_dir={run_dir}", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), json.dumps(overrides), str(at)],
                             cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        line = ""
        while time.time() < deadline:
            line = child.stdout.readline()
            if not line or line.startswith(("STOPPED", "FINISHED")):
                break
        assert line.strip() == f"STOPPED {at}", f"child did not stop at step {at}: {line!r}"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def sigterm_at_batch(make_iterator, batch: int):
    """`make_train_iterator` whose iterator sends this process SIGTERM while producing batch `batch`."""

    class Iterator:
        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            return self

        def __next__(self):
            out = next(self.inner)
            if self.inner.get_state()["step"] == batch:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        def get_state(self):
            return self.inner.get_state()

        def set_state(self, state):
            self.inner.set_state(state)

    return lambda *args, **kwargs: Iterator(make_iterator(*args, **kwargs))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(config(run_dir, "checkpoint.save_every=3"), console=False)
    return run_dir


def test_sigkill_during_async_save_then_resume_is_bitwise_identical(reference, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_until_killed(run_dir, 4, "checkpoint.save_every=2")
    assert any(p.name.startswith("4.") for p in (run_dir / "checkpoints").iterdir())  # the unfinished save
    with RunCheckpointer(run_dir, config(run_dir).checkpoint, {}) as ck:
        assert ck.all_steps() == [2]  # the save in flight is not a checkpoint
        assert ck.restore(2).data_state["step"] == 2  # the data iterator had handed out 2 batches
    killed = metrics_by_step(run_dir)
    assert set(killed) >= {1, 2, 3, 4}  # the child got past step 2 before it was killed
    # The same command again; this time a SIGTERM arrives while step 5 runs: it finishes, is saved,
    # and the run ends cleanly. A third start does step 6.
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "make_train_iterator", sigterm_at_batch(pipeline.make_train_iterator, 5))
        result = train(config(run_dir, "checkpoint.save_every=2"), console=False)
    assert result.steps == 5
    assert "preempted at step 5: received SIGTERM" in capsys.readouterr().out
    train(config(run_dir, "checkpoint.save_every=2"), console=False)
    expected, got = metrics_by_step(reference), metrics_by_step(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # steps 3 and 4 were redone from the step-2 checkpoint
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"
    with RunCheckpointer(run_dir, config(run_dir).checkpoint, {}) as ck:
        assert ck.all_steps() == [4, 5, 6]
        assert not any("." in p.name for p in (run_dir / "checkpoints").iterdir())  # leftovers removed


def test_sparse_stage_starts_from_the_warmup_model(reference, tmp_path):
    warmup_ck = RunCheckpointer(reference, config(reference).checkpoint, {})
    warmup = warmup_ck.restore().train_state
    warmup_ck.close()
    assert warmup_ck.latest_step() == STEPS
    run_dir = tmp_path / "sparse"
    # lr 0 and no bias updates: after its one step the sparse model must still be the warm-up's,
    # bitwise, while its optimizer state and step counter start afresh.
    train(config(run_dir, "train.stage=sparse", "train.steps=1", "train.main.lr=0", "train.indexer.lr=0",
                 "train.moe_bias_update_rate=0", f"checkpoint.init_from={reference}"), console=False)
    with RunCheckpointer(run_dir, config(run_dir).checkpoint, {}) as ck:
        sparse = ck.restore().train_state
    assert jax.tree.structure(sparse[MODEL_KEY]) == jax.tree.structure(warmup[MODEL_KEY])
    leaves = jax.tree_util.tree_flatten_with_path(warmup[MODEL_KEY])[0]
    assert any("indexer" in jax.tree_util.keystr(p) for p, _ in leaves)
    assert any("e_score_correction_bias" in jax.tree_util.keystr(p) for p, _ in leaves)
    for (path, a), b in zip(leaves, jax.tree.leaves(sparse[MODEL_KEY])):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), jax.tree_util.keystr(path)
    assert int(warmup["step"]) == STEPS and int(sparse["step"]) == 1
    assert set(sparse["opt"]) == {"main", "indexer"}
