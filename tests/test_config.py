"""Configuration: loading, overrides and the errors a user sees."""

from pathlib import Path

import pytest

from dsa_train.config import ConfigError, load_config


def test_recipe_with_model_override(tmp_path):
    config = load_config("recipes/warmup.yaml", ["model=configs/tiny.yaml", "model.index_topk=16",
                                                 "train.indexer.lr=2e-3", "train.steps=5"])
    assert config.model.hidden_size == 128 and config.model.index_topk == 16
    assert config.train.indexer.lr == 2e-3 and config.train.steps == 5
    assert config.train.stage == "warmup"


def test_671b_config_fields():
    m = load_config("configs/deepseek-v3.2.yaml").model
    assert (m.hidden_size, m.num_hidden_layers, m.n_routed_experts, m.index_topk) == (7168, 61, 256, 2048)
    assert m.rope_scaling.factor == 40.0


def _bad(tmp_path, text, *overrides):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides))
    return str(err.value), str(path)


def test_unknown_key_names_key_and_file(tmp_path):
    msg, path = _bad(tmp_path, f"model: {Path('configs/tiny.yaml').resolve()}\ntrain:\n  stpes: 3\n")
    assert "train.stpes" in msg and path in msg and "steps" in msg


def test_wrong_type_names_key(tmp_path):
    msg, path = _bad(tmp_path, "model:\n  vocab_size: ten\n")
    assert "model.vocab_size" in msg and "integer" in msg and path in msg


def test_inconsistent_combination(tmp_path):
    tiny = "configs/tiny.yaml"
    with pytest.raises(ConfigError, match="mesh.tensor.*num_attention_heads"):
        load_config(tiny, ["mesh.tensor=3"])
    with pytest.raises(ConfigError, match=r"--set model.index_topk: model.index_topk: must be >= 1"):
        load_config(tiny, ["model.index_topk=0"])
    with pytest.raises(ConfigError, match="model.n_group"):
        load_config(tiny, ["model.n_group=3"])


def test_model_file_errors_name_the_model_file(tmp_path):
    model = tmp_path / "m.yaml"
    model.write_text((open("configs/tiny.yaml").read()) + "hidden_sise: 3\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert str(model) in str(err.value) and "hidden_size" in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    msg, _ = _bad(tmp_path, "model: [unclosed\n")
    assert "not valid YAML" in msg


def test_null_q_lora_rank_override():
    assert load_config("configs/tiny.yaml", ["model.q_lora_rank=null"]).model.q_lora_rank is None
