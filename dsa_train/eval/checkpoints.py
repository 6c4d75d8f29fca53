"""What `dsa-train eval` can read: a training run directory (its latest committed checkpoint), one
of its step directories (``<run>/checkpoints/<step>``), or a model directory (`dsa-train convert`
output, or any `model_io.save_model` directory). Loading goes through the checkpoint package's own
readers (`manager.load_model_for_init`, `model_io.load_model_params`)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import jax
import yaml
from flax import nnx

from dsa_train.checkpoint import manager, model_io
from dsa_train.config import ModelConfig, from_dict, to_dict
from dsa_train.model import CausalLM, create_model
from dsa_train.paths import run_path


class EvalInputError(ValueError):
    """A checkpoint or option `dsa-train eval` cannot use: one line."""


@dataclasses.dataclass
class LoadedCheckpoint:
    name: str  # short label for tables and plots
    path: Path
    model: CausalLM
    run_config: Optional[dict]  # the training run's resolved config (None for a model directory)
    step: Optional[int]  # the checkpoint's step (None for a model directory)


def _run_config(step_dir: Path) -> Optional[dict]:
    """The resolved config a run saved with its checkpoint (or the run's config.yaml)."""
    saved = manager._read_json_item(step_dir / manager.CONFIG)
    if saved:
        return saved
    run_yaml = step_dir.parent.parent / "config.yaml"
    if run_yaml.is_file():
        return yaml.safe_load(run_yaml.read_text())
    return None


def _model_config(raw: dict, where: str, **changes) -> ModelConfig:
    config = from_dict({"model": raw, "train": {"stage": "dense"}}, origin=where).model
    return dataclasses.replace(config, **changes)


def load_checkpoint(path: str | Path, **model_changes) -> LoadedCheckpoint:
    """Load a model for evaluation. `model_changes` replace ModelConfig fields that keep the
    parameter shapes (index_topk, kernels, compute_dtype, ...)."""
    with manager.quiet_orbax():
        return _load(run_path(path), model_changes)


def _load(path: Path, model_changes: dict) -> LoadedCheckpoint:
    if not path.exists():
        raise EvalInputError(f"{path} does not exist")
    if model_io.is_model_dir(path):
        config = _model_config(to_dict(model_io.load_model_config(path)), str(path), **model_changes)
        return LoadedCheckpoint(run_path(path, absolute=True).name, path, model_io.load_model_params(path, config),
                                None, None)
    step_dir = manager._find_run_step(path)
    if step_dir is None:
        raise EvalInputError(f"{path} is neither a run directory with a committed checkpoint nor a model "
                             "directory (model.yaml + params/)")
    run_config = _run_config(step_dir)
    if not run_config or not isinstance(run_config.get("model"), dict):
        raise EvalInputError(f"{step_dir}: no saved config with a 'model' section; cannot rebuild the model")
    config = _model_config(run_config["model"], str(step_dir), **model_changes)
    abstract = nnx.eval_shape(lambda: create_model(config))
    graphdef, state = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), model_io._pure(state))
    restored = manager.load_model_for_init(step_dir, target)
    (state,) = manager.fill_states(restored, state)
    label = f"{run_path(step_dir, absolute=True).parent.parent.name}@{step_dir.name}"
    return LoadedCheckpoint(label, step_dir, nnx.merge(graphdef, state),
                            run_config, int(step_dir.name))
