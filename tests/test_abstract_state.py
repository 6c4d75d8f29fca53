"""The trainer builds its state abstractly: a resumed or initialized-from run reads the checkpoint
straight into sharded arrays and never generates a random model first (at 671B that would be a
second full copy of the parameters on the devices, and minutes of random-number generation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsa_train.config import load_config
from dsa_train.parallel import state as state_lib
from dsa_train.train.trainer import train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BASE = ["train.stage=warmup", "train.batch_size=2", "train.seq_len=32", "model.index_topk=8", "train.log_every=1",
        "data.source=synthetic", "data.num_pairs=4", "data.num_queries=2", "checkpoint.save_every=2"]


def _config(run_dir, *extra):
    return load_config(REPO / "configs" / "tiny.yaml", BASE + [f"train.run_dir={run_dir}", *extra])


def test_resume_and_init_from_never_build_a_random_state(tmp_path, monkeypatch):
    first = tmp_path / "warmup"
    fresh_starts = []
    original = state_lib.init_train_state
    monkeypatch.setattr(state_lib, "init_train_state",
                        lambda *a, **k: fresh_starts.append(1) or original(*a, **k))
    train(_config(first, "train.steps=2"), console=False)
    assert fresh_starts == [1]  # a fresh run does initialize (sharded) ...

    def refuse(*_args, **_kwargs):
        raise AssertionError("random initialization while a checkpoint was there to read")

    monkeypatch.setattr(state_lib, "init_train_state", refuse)
    resumed = train(_config(first, "train.steps=3"), console=False)  # ... a resumed one does not
    assert resumed.steps == 3
    train(_config(tmp_path / "sparse", "train.stage=sparse", "train.steps=1", f"checkpoint.init_from={first}"),
          console=False)
    assert (tmp_path / "sparse" / "metrics.jsonl").read_text().strip()
