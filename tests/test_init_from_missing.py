"""checkpoint.init_from with a source that lacks parameters: the lightning indexers and MTP depths
it lacks entirely are generated (with the model's initializers, in place), everything else is
restored exactly; any other missing parameter, a group present in part, or a present parameter
of another shape is refused with one line."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from dsa_train.checkpoint import model_io
from dsa_train.checkpoint.manager import load_model_for_init, to_pure_tree, with_sharding
from dsa_train.config import ConfigError, load_config, to_dict
from dsa_train.model import create_model
from dsa_train.train.trainer import model_initializer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _flat(tree) -> dict[str, np.ndarray]:
    return {model_io.path_key(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _state(config, seed: int) -> dict:
    return to_pure_tree(nnx.state(create_model(config, seed=seed)))


def _abstract(config, seed: int = 0) -> dict:
    """The restore target: shapes and dtypes, each on the first device."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return with_sharding(jax.eval_shape(lambda: _state(config, seed)), device)


@pytest.fixture(scope="module")
def dense_source(tmp_path_factory):
    """A model directory of a model without indexers or MTP (a dense converted V3 checkpoint)."""
    config = load_config(TINY, ["model.use_indexer=false", "train.stage=dense"]).model
    path = tmp_path_factory.mktemp("dense") / "model"
    model_io.save_model(path, create_model(config, seed=1))
    return path, _flat(_state(config, 1))


def test_indexers_and_mtp_the_source_lacks_are_generated_the_rest_restored(dense_source, caplog):
    path, saved = dense_source
    config = load_config(TINY, ["model.num_nextn_predict_layers=1", "model.scan_layers=true"])
    abstract = _abstract(config.model)
    with caplog.at_level(logging.WARNING):
        got = _flat(load_model_for_init(path, abstract, model_config_dict=to_dict(config.model),
                                        init_missing=model_initializer(config)))
    fresh = _flat(_state(config.model, config.train.seed))  # what a random start of this run draws
    generated = {k for k in got if "indexer" in k.split("/") or k.startswith("mtp/")}
    assert any("indexer" in k for k in generated) and any(k.startswith("mtp/0/eh_proj") for k in generated)
    for key in generated:  # the same draws (jitted: last-bit differences from eager fusion)
        np.testing.assert_allclose(got[key], fresh[key], rtol=1e-5, atol=1e-8, err_msg=key)
    # Stacked here, per layer in the source: every restored array is the source's, exactly.
    stacked = {k for k in got if k.startswith("model/moe_layers/") or k.startswith("model/dense_layers/")}
    assert stacked and got.keys() - generated - stacked
    for key in got.keys() - generated - stacked:
        np.testing.assert_array_equal(got[key], saved[key], err_msg=key)
    moe_layer = config.model.first_k_dense_replace
    np.testing.assert_array_equal(got["model/moe_layers/self_attn/q_a_proj/weight"][0],
                                  saved[f"model/layers/{moe_layer}/self_attn/q_a_proj/weight"])
    lines = [r.getMessage() for r in caplog.records if "lacks" in r.getMessage()]
    assert len(lines) == 1 and "self_attn/indexer" in lines[0] and "mtp/0" in lines[0], lines


def test_without_an_initializer_missing_indexers_are_refused(dense_source):
    """eval and export pass no initializer: they never draw a random weight."""
    path, _ = dense_source
    config = load_config(TINY).model
    abstract = _abstract(config)
    with pytest.raises(ConfigError, match="use_indexer"):
        load_model_for_init(path, abstract, model_config_dict=to_dict(config))
    with pytest.raises(model_io.ModelDirError, match="not in the checkpoint: .*indexer"):
        load_model_for_init(path, abstract)


def _write_without(tmp_path, config, drop) -> Path:
    state = {k: v for k, v in _flat(_state(config, 2)).items() if not drop(k)}
    model_io.save_model_state(tmp_path / "model", model_io.nest(state), config)
    return tmp_path / "model"


@pytest.mark.parametrize("drop, message", [
    (lambda k: k == "model/layers/1/self_attn/q_a_proj/weight",
     r"not in the checkpoint: model/layers/1/self_attn/q_a_proj/weight \(only lightning indexers and MTP"),
    (lambda k: k == "model/layers/0/self_attn/indexer/wk/weight",
     r"partly in the checkpoint: model/layers/0/self_attn/indexer lacks model/layers/0/self_attn/indexer/wk/weight"),
    (lambda k: k.startswith("mtp/0/") and k.endswith("o_proj/weight"),
     r"partly in the checkpoint: mtp/0 lacks mtp/0/self_attn/o_proj/weight"),
], ids=["attention-weight", "part-of-an-indexer", "part-of-an-mtp-layer"])
def test_a_source_missing_anything_else_is_refused_in_one_line(tmp_path, drop, message):
    config = load_config(TINY, ["model.num_nextn_predict_layers=1"])
    path = _write_without(tmp_path, config.model, drop)
    abstract = _abstract(config.model)
    with pytest.raises(model_io.ModelDirError, match=message) as e:
        load_model_for_init(path, abstract, model_config_dict=to_dict(config.model),
                            init_missing=model_initializer(config))
    assert "\n" not in str(e.value)


def test_present_parameters_of_another_shape_are_refused(tmp_path):
    config = load_config(TINY).model
    model_io.save_model(tmp_path / "model", create_model(config, seed=0))
    wider = load_config(TINY, ["model.index_head_dim=64"])
    abstract = _abstract(wider.model)
    with pytest.raises(ConfigError, match="index_head_dim 32 -> 64"):
        load_model_for_init(tmp_path / "model", abstract, model_config_dict=to_dict(wider.model),
                            init_missing=model_initializer(wider))
    with pytest.raises(model_io.ModelDirError, match="different shapes: .*indexer"):
        load_model_for_init(tmp_path / "model", abstract, init_missing=model_initializer(wider))


def test_a_run_checkpoint_without_mtp_initializes_the_mtp_layer(tmp_path):
    """The same rule for another run's checkpoint (train_state/model)."""
    from dsa_train.checkpoint.manager import RunCheckpointer
    from dsa_train.config import CheckpointConfig

    old = load_config(TINY)
    state = _state(old.model, 4)
    with RunCheckpointer(tmp_path / "run", CheckpointConfig(), to_dict(old)) as ck:
        ck.save(1, {"model": state}, force=True)
    new = load_config(TINY, ["model.num_nextn_predict_layers=1"])
    abstract = _abstract(new.model)
    got = _flat(load_model_for_init(tmp_path / "run", abstract, model_config_dict=to_dict(new.model),
                                    init_missing=model_initializer(new)))
    saved, fresh = _flat(state), _flat(_state(new.model, new.train.seed))
    assert got.keys() == fresh.keys() and got.keys() - saved.keys() == {k for k in fresh if k.startswith("mtp/")}
    for key, value in got.items():
        if key in saved:
            np.testing.assert_array_equal(value, saved[key], err_msg=key)
        else:
            np.testing.assert_allclose(value, fresh[key], rtol=1e-5, atol=1e-8, err_msg=key)


@pytest.mark.slow
def test_a_warmup_run_starts_from_a_dense_model_without_indexers(dense_source, tmp_path, caplog):
    """Through the trainer: the warm-up trains the generated indexers of a model that had none;
    the frozen main model is the source's, bitwise."""
    from dsa_train.checkpoint.manager import MODEL_KEY, RunCheckpointer
    from dsa_train.train.trainer import train

    path, saved = dense_source
    config = load_config(TINY, ["train.stage=warmup", "train.steps=1", "train.batch_size=2", "train.seq_len=32",
                                "data.source=synthetic", f"train.run_dir={tmp_path / 'run'}",
                                f"checkpoint.init_from={path}"])
    with caplog.at_level(logging.WARNING):
        train(config, console=False)
    assert any("lacks" in r.getMessage() and "self_attn/indexer" in r.getMessage() for r in caplog.records)
    with RunCheckpointer(tmp_path / "run", config.checkpoint, {}) as ck:
        model = _flat(ck.restore().train_state[MODEL_KEY])
    assert {k for k in model if "indexer" in k.split("/")} and model.keys() - {k for k in model if "indexer" in k} \
        == saved.keys()
    for key, value in saved.items():
        np.testing.assert_array_equal(model[key], value, err_msg=key)
