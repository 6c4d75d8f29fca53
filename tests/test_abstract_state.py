"""The trainer builds its state abstractly: a resumed or initialized-from run reads the checkpoint
straight into sharded arrays and never generates a random model first (at 671B that would be a
second full copy of the parameters on the devices, and minutes of random-number generation)."""

from __future__ import annotations

from pathlib import Path

import jax
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


def _count_random_weights(monkeypatch) -> list:
    """Record every concrete (not traced) jax.random.normal: a random weight materialized. The
    model's initializers draw through it (dsa_train.model.layers.param); abstract builds
    (eval_shape) and the sharded init under jit only trace it."""
    drawn = []
    original = jax.random.normal

    def normal(*args, **kwargs):
        out = original(*args, **kwargs)
        if not isinstance(out, jax.core.Tracer):
            drawn.append(tuple(out.shape))
        return out

    monkeypatch.setattr(jax.random, "normal", normal)
    return drawn


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
    drawn = _count_random_weights(monkeypatch)
    resumed = train(_config(first, "train.steps=3"), console=False)  # ... a resumed one does not
    assert resumed.steps == 3
    train(_config(tmp_path / "sparse", "train.stage=sparse", "train.steps=1", f"checkpoint.init_from={first}"),
          console=False)
    assert (tmp_path / "sparse" / "metrics.jsonl").read_text().strip()
    assert drawn == []

    # `dsa-train eval` and export read the checkpoints into abstract models: no weight is drawn.
    from dsa_train.checkpoint import model_io
    from dsa_train.convert import export_hf_checkpoint
    from dsa_train.eval.checkpoints import load_checkpoint

    loaded = load_checkpoint(tmp_path / "sparse")
    model_io.save_model(tmp_path / "model_dir", loaded.model)
    assert load_checkpoint(tmp_path / "model_dir").step is None
    export_hf_checkpoint(tmp_path / "sparse", tmp_path / "hf_from_run", dtype="float32")
    export_hf_checkpoint(tmp_path / "model_dir", tmp_path / "hf_from_dir", dtype="float32")
    assert drawn == []
