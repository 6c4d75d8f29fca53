"""HF checkpoint import/export: configs, FP8 dequantization, expert layouts, round trips, errors.

Nothing here compiles our model: tensors are compared directly, and round trips are judged by
transformers itself (the exported checkpoint must give the original model's logits).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import shutil

import numpy as np
import pytest

import hf_reference as R
from hf_reference import torch, transformers

from safetensors.torch import load_file, save_file  # noqa: E402

from dsa_train.checkpoint import model_io  # noqa: E402
from dsa_train.config import ConfigError, RopeScaling, load_model_config  # noqa: E402
from dsa_train.convert import (  # noqa: E402
    ConversionError, convert_main, export_hf_checkpoint, hf_config_from_model_config, import_hf_checkpoint,
    model_config_from_hf)
from dsa_train.convert import hf_import  # noqa: E402
from dsa_train.ops.rope import rope_inv_freq, softmax_scale  # noqa: E402


@pytest.fixture(scope="module")
def hf_v32(tmp_path_factory):
    """A tiny random DeepseekV32ForCausalLM saved with save_pretrained (per-expert layout)."""
    model = R.build_hf_model(R.hf_config("v32", rope=R.YARN), seed=3)
    path = tmp_path_factory.mktemp("hf_v32") / "hf"
    model.save_pretrained(path)
    return model, path


def _params(model_dir) -> dict[str, np.ndarray]:
    keys = list(model_io.tree_metadata(model_dir / model_io.PARAMS_DIR))
    return model_io.read_arrays(model_dir / model_io.PARAMS_DIR, keys)


def _tokens(seed=0, batch=2, seq=12):
    return np.random.default_rng(seed).integers(0, R.BASE["vocab_size"], (batch, seq))


def _only_entries(directory, *names):
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)


# ----------------------------------------------------------------------------------------------
# Config conversion
# ----------------------------------------------------------------------------------------------

ROPE_VARIANTS = {
    "none": None,
    "v3-release": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                   "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "mscale-differs": {"type": "yarn", "factor": 8, "original_max_position_embeddings": 512, "beta_fast": 16,
                       "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.707},
    "no-mscale": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 1024},
    "mscale-only": {"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 256, "mscale": 0.8},
    "mscale-all-dim-only": {"type": "yarn", "factor": 8, "original_max_position_embeddings": 512,
                            "mscale_all_dim": 0.8},
}


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rope_and_softmax_scale_match_transformers(variant, tmp_path):
    """Legacy (`rope_theta` + `rope_scaling`) and new (`rope_parameters`) config.json forms give
    our RoPE the exact frequencies, cos/sin factor and softmax scale of HF's own code."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import (
        DeepseekV32Attention, DeepseekV32RotaryEmbedding)

    raw = dict(R.BASE, model_type="deepseek_v32", **R.V32_EXTRA, rope_theta=50000.0, max_position_embeddings=8192)
    if ROPE_VARIANTS[variant] is not None:
        raw["rope_scaling"] = ROPE_VARIANTS[variant]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path)
    rotary = DeepseekV32RotaryEmbedding(hf_config)
    ours, _ = model_config_from_hf(raw)
    inv_freq, factor = rope_inv_freq(ours)
    np.testing.assert_allclose(inv_freq, rotary.inv_freq.numpy(), rtol=1e-6)
    assert factor == pytest.approx(rotary.attention_scaling, rel=1e-12)
    assert softmax_scale(ours) == pytest.approx(DeepseekV32Attention(hf_config, 0).scaling, rel=1e-12)
    # ... and the exported config (new rope_parameters form) reads back to the same config.
    back, _ = model_config_from_hf(hf_config_from_model_config(ours))
    assert back == dataclasses.replace(ours, initializer_range=back.initializer_range)


def test_config_round_trip_through_transformers(tmp_path):
    """Our config -> config.json -> transformers class -> our config again."""
    ours = load_model_config("configs/tiny.yaml")
    for config, cls in ((ours, transformers.DeepseekV32Config),
                        (dataclasses.replace(ours, use_indexer=False), transformers.DeepseekV3Config),
                        (dataclasses.replace(ours, rope_scaling=RopeScaling(factor=4.0, mscale_all_dim=0.5)),
                         transformers.DeepseekV32Config)):
        hf = hf_config_from_model_config(config)
        (tmp_path / "config.json").write_text(json.dumps(hf))
        loaded = transformers.AutoConfig.from_pretrained(tmp_path)
        assert type(loaded) is cls and loaded.architectures == hf["architectures"]
        assert loaded.first_k_dense_replace == config.first_k_dense_replace
        back, _ = model_config_from_hf(json.loads((tmp_path / "config.json").read_text()),
                                       param_dtype=config.param_dtype, compute_dtype=config.compute_dtype,
                                       use_indexer=config.use_indexer)
        if not config.use_indexer:  # index_* sizes of a model without indexers are not exported
            config = dataclasses.replace(config, index_n_heads=back.index_n_heads,
                                         index_head_dim=back.index_head_dim, index_topk=back.index_topk)
        assert back == config


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"rope_interleave": False}, "rope_interleave"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear'"),
    ({"n_group": 3}, "n_group"),
    ({"hidden_size": "big"}, "unreadable value"),
])
def test_unsupported_configs_are_refused(change, message):
    raw = {**R.BASE, "model_type": "deepseek_v3", **change}
    with pytest.raises(ConfigError, match=message):
        model_config_from_hf(raw)


# ----------------------------------------------------------------------------------------------
# Expert layouts and FP8
# ----------------------------------------------------------------------------------------------


def test_fused_and_per_expert_layouts_import_identically(hf_v32, tmp_path):
    model, per_expert_dir = hf_v32
    fused_dir = tmp_path / "hf_fused"
    model.save_pretrained(fused_dir, save_original_format=False)
    assert any(k.endswith("experts.gate_up_proj") for k in load_file(fused_dir / "model.safetensors"))
    a = import_hf_checkpoint(per_expert_dir, tmp_path / "a")
    b = import_hf_checkpoint(fused_dir, tmp_path / "b")
    assert (a.expert_layout, b.expert_layout) == ("per-expert", "fused")
    pa, pb = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    # Stacking is right: slot e of the stacked gate_proj is HF expert e's gate rows.
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj.detach().numpy()
    f = R.BASE["moe_intermediate_size"]
    np.testing.assert_array_equal(pa["model/layers/1/mlp/experts/gate_proj"], gate_up[:, :f])
    np.testing.assert_array_equal(pa["model/layers/1/mlp/experts/up_proj"], gate_up[:, f:])


BLOCK = 32  # small blocks so the tiny weights span several, some partial (48 = 32 + 16)


def _quantize(w: torch.Tensor):
    """DeepSeek block FP8: per [BLOCK x BLOCK] block, scale = amax / 448, q = fp8(w / scale).
    Returns q, scale_inv [ceil(out/B), ceil(in/B)] and the expected dequantized fp32 weight."""
    *lead, out, inp = w.shape
    nbo, nbi = math.ceil(out / BLOCK), math.ceil(inp / BLOCK)
    padded = torch.zeros(*lead, nbo * BLOCK, nbi * BLOCK)
    padded[..., :out, :inp] = w
    blocks = padded.reshape(*lead, nbo, BLOCK, nbi, BLOCK)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp_min(1e-12) / 448.0  # [*, nbo, nbi]
    full = scale.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)[..., :out, :inp]
    q = (w / full).to(torch.float8_e4m3fn)
    return q, scale.float(), q.float() * full


def _fp8_checkpoint(src_file, out_dir, config_json, shards: int = 2):
    """Rewrite a saved fp32 checkpoint with fp8 linear weights + weight_scale_inv, in shards."""
    out_dir.mkdir()
    tensors = load_file(src_file)
    expected, quantized = {}, 0
    new = {}
    for name, w in tensors.items():
        linear = w.ndim >= 2 and not any(s in name for s in ("embed_tokens", "lm_head", "mlp.gate.weight",
                                                              "weights_proj"))
        if linear:
            q, scale, deq = _quantize(w)
            scale_name = name[:-len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") \
                else name + "_scale_inv"
            new[name], new[scale_name] = q, scale
            expected[name] = deq
            quantized += 1
        else:
            new[name] = w
    names = sorted(new)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: new[n].contiguous() for n in part}, out_dir / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(config_json, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
                                                    "dynamic", "weight_block_size": [BLOCK, BLOCK]})
    (out_dir / "config.json").write_text(json.dumps(config))
    return expected, quantized


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_fp8_block_dequantization(hf_v32, tmp_path, layout):
    model, hf_dir = hf_v32
    src = hf_dir
    if layout == "fused":
        src = tmp_path / "fused"
        model.save_pretrained(src, save_original_format=False)
    config_json = json.loads((hf_dir / "config.json").read_text())
    expected, quantized = _fp8_checkpoint(src / "model.safetensors", tmp_path / "fp8", config_json)
    report = import_hf_checkpoint(tmp_path / "fp8", tmp_path / "ours")
    assert report.fp8_dequantized == quantized > 0
    params = _params(tmp_path / "ours")
    f = R.BASE["moe_intermediate_size"]
    checked = 0
    for name, want in expected.items():
        want = want.numpy()
        m = __import__("re").fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight", name)
        if m:  # per-expert tensor -> its slot of the stacked array
            got = params[f"model/layers/{m[1]}/mlp/experts/{m[3]}"][int(m[2])]
        elif name.endswith("experts.gate_up_proj"):
            layer = name.split(".")[2]
            got = np.concatenate([params[f"model/layers/{layer}/mlp/experts/gate_proj"],
                                  params[f"model/layers/{layer}/mlp/experts/up_proj"]], axis=1)
        else:
            got = params[name.replace(".", "/")]
        np.testing.assert_array_equal(got, want, err_msg=name)
        checked += 1
    assert checked == quantized
    # Sanity: the dequantized weights are the originals up to fp8 rounding (3 mantissa bits).
    original = model.model.layers[0].self_attn.q_b_proj.weight.detach().numpy()
    got = params["model/layers/0/self_attn/q_b_proj/weight"]
    assert not np.array_equal(got, original)
    assert np.abs(got - original).max() <= 2 ** -3 * np.abs(original).max()


# ----------------------------------------------------------------------------------------------
# Round trips through transformers
# ----------------------------------------------------------------------------------------------


def _load_hf(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_round_trip_import_export_transformers(hf_v32, tmp_path):
    model, hf_dir = hf_v32
    import_hf_checkpoint(hf_dir, tmp_path / "ours")
    tokens = _tokens()
    R.set_hf_index_topk(model, 5)  # sparse: the indexer weights matter too
    reference = R.hf_logits(model, tokens)

    # fp32 export: bit-identical weights, so identical logits.
    report = export_hf_checkpoint(tmp_path / "ours", tmp_path / "hf32", dtype="float32")
    assert report.model_type == "deepseek_v32" and report.shards == 1
    exported = _load_hf(tmp_path / "hf32")
    assert type(exported).__name__ == "DeepseekV32ForCausalLM"
    R.set_hf_index_topk(exported, 5)
    np.testing.assert_array_equal(R.hf_logits(exported, tokens), reference)

    # bf16 export in several shards: transformers gets the same model with bf16-rounded weights
    # (router biases and the indexer's weights_proj stay fp32).
    report = export_hf_checkpoint(tmp_path / "ours", tmp_path / "hf16", max_shard_size="40KB")
    assert report.shards > 1
    index = json.loads((tmp_path / "hf16" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == report.shards and all((tmp_path / "hf16" / f).stat().st_size <= 40_000 + 4096
                                                or len(load_file(tmp_path / "hf16" / f)) == 1 for f in files)
    dtypes = {}
    for f in files:
        dtypes.update({k: v.dtype for k, v in load_file(tmp_path / "hf16" / f).items()})
    assert dtypes.keys() == set(index["weight_map"]) and "model.layers.1.mlp.experts.7.down_proj.weight" in dtypes
    assert {k for k, d in dtypes.items() if d == torch.float32} == {
        k for k in dtypes if k.endswith(("e_score_correction_bias", "weights_proj.weight"))}
    rounded = R.build_hf_model(R.hf_config("v32", rope=R.YARN), seed=3)
    with torch.no_grad():
        for name, t in list(rounded.named_parameters()) + list(rounded.named_buffers()):
            if "inv_freq" not in name and not name.endswith(("e_score_correction_bias", "weights_proj.weight")):
                t.copy_(t.to(torch.bfloat16).float())
    R.set_hf_index_topk(rounded, 5)
    exported = _load_hf(tmp_path / "hf16")
    R.set_hf_index_topk(exported, 5)
    np.testing.assert_array_equal(R.hf_logits(exported, tokens), R.hf_logits(rounded, tokens))


def test_export_live_model_equals_export_of_directory(hf_v32, tmp_path):
    _, hf_dir = hf_v32
    import_hf_checkpoint(hf_dir, tmp_path / "ours")
    model = model_io.load_model_params(tmp_path / "ours")
    export_hf_checkpoint(model, tmp_path / "live", dtype="float32")
    export_hf_checkpoint(tmp_path / "ours", tmp_path / "dir", dtype="float32")
    a = load_file(tmp_path / "live" / "model-00001-of-00001.safetensors")
    b = load_file(tmp_path / "dir" / "model-00001-of-00001.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_v3_checkpoint_exports_as_v32_with_its_new_indexers(tmp_path):
    hf = R.build_hf_model(R.hf_config("v3"), seed=5)
    hf.save_pretrained(tmp_path / "v3")
    import_hf_checkpoint(tmp_path / "v3", tmp_path / "ours", index_n_heads=4, index_head_dim=32, index_topk=8)
    export_hf_checkpoint(tmp_path / "ours", tmp_path / "v32", dtype="float32")
    exported = _load_hf(tmp_path / "v32")
    assert type(exported).__name__ == "DeepseekV32ForCausalLM" and exported.config.index_n_heads == 4
    tokens = _tokens(seq=8)  # index_topk 8 >= seq: dense, so exactly the V3 model
    np.testing.assert_allclose(R.hf_logits(exported, tokens), R.hf_logits(hf, tokens), rtol=0, atol=1e-5)


def test_v3_without_q_lora_and_indexer_round_trips_as_v3(tmp_path):
    hf = R.build_hf_model(R.hf_config("v3", q_lora_rank=None), seed=6)
    hf.save_pretrained(tmp_path / "v3")
    report = import_hf_checkpoint(tmp_path / "v3", tmp_path / "ours", use_indexer=False)
    assert not report.initialized and not report.notes
    export_hf_checkpoint(tmp_path / "ours", tmp_path / "back", dtype="float32")
    exported = _load_hf(tmp_path / "back")
    assert type(exported).__name__ == "DeepseekV3ForCausalLM" and exported.config.q_lora_rank is None
    tokens = _tokens()
    np.testing.assert_array_equal(R.hf_logits(exported, tokens), R.hf_logits(hf, tokens))
    # With an indexer, q_lora_rank null has no transformers (DeepseekV32) form: refused up front.
    with_indexer = dataclasses.replace(model_io.load_model_config(tmp_path / "ours"), use_indexer=True)
    with pytest.raises(ConfigError, match="q_lora_rank: null cannot be exported"):
        hf_config_from_model_config(with_indexer)


def test_mtp_layer_skipped_by_default_and_kept_on_request(hf_v32, tmp_path):
    _, hf_dir = hf_v32
    src = tmp_path / "with_mtp"
    shutil.copytree(hf_dir, src)
    tensors = load_file(src / "model.safetensors")
    mtp = {"model.layers.2.enorm.weight": torch.ones(64), "model.layers.2.eh_proj.weight": torch.randn(64, 128),
           "model.layers.2.mlp.gate.e_score_correction_bias": torch.randn(8)}
    save_file({**tensors, **mtp}, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, num_nextn_predict_layers=1)))

    report = import_hf_checkpoint(src, tmp_path / "skip")
    assert any("MTP layer(s) [2]: 3 tensors" in s for s in report.skipped)
    assert not (tmp_path / "skip" / hf_import.MTP_DIR).exists()

    report = import_hf_checkpoint(src, tmp_path / "keep", include_mtp=True, dtype="bfloat16")
    assert (tmp_path / "keep" / hf_import.MTP_DIR).is_dir()
    export_hf_checkpoint(tmp_path / "keep", tmp_path / "out", dtype="float32")
    out = load_file(tmp_path / "out" / "model-00001-of-00001.safetensors")
    for name, value in mtp.items():
        want = value if "bias" in name else value.to(torch.bfloat16).float()  # bf16 import
        assert torch.equal(out[name], want), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 1


# ----------------------------------------------------------------------------------------------
# Errors: one line naming the tensor/file, and never a partial output directory
# ----------------------------------------------------------------------------------------------


def _sharded(hf_v32, tmp_path):
    model, _ = hf_v32
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="50KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_missing_shard(hf_v32, tmp_path):
    src = _sharded(hf_v32, tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ConversionError, match=f"missing shard {shard.name}") as e:
        import_hf_checkpoint(src, tmp_path / "out")
    assert "\n" not in str(e.value)
    _only_entries(tmp_path, "sharded")


def test_shape_mismatch_names_tensor_and_file(hf_v32, tmp_path):
    _, hf_dir = hf_v32
    src = tmp_path / "bad"
    shutil.copytree(hf_dir, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, intermediate_size=80)))
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.down_proj\.weight in model\.safetensors: "
                                              r"shape \(64, 96\) does not match \(64, 80\)"):
        import_hf_checkpoint(src, tmp_path / "out")
    _only_entries(tmp_path, "bad")


def test_unsupported_model_type_leaves_nothing(hf_v32, tmp_path):
    _, hf_dir = hf_v32
    src = tmp_path / "llama"
    shutil.copytree(hf_dir, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        import_hf_checkpoint(src, tmp_path / "out")
    _only_entries(tmp_path, "llama")


def test_disk_full_midway_removes_temp_dir(hf_v32, tmp_path, monkeypatch):
    _, hf_dir = hf_v32
    real_stage, calls = hf_import._stage, []

    def stage(path, shape, dtype):
        calls.append(path)
        if len(calls) == 7:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_stage(path, shape, dtype)

    monkeypatch.setattr(hf_import, "_stage", stage)
    with pytest.raises(ConversionError, match=r"^model\.layers\.0\.\S+ \(model\.safetensors\): No space left"):
        import_hf_checkpoint(hf_dir, tmp_path / "out")
    _only_entries(tmp_path)  # neither out/ nor the temporary directory beside it


def test_missing_tensor_and_existing_output(hf_v32, tmp_path):
    _, hf_dir = hf_v32
    src = tmp_path / "partial"
    src.mkdir()
    shutil.copy(hf_dir / "config.json", src)
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["model.layers.1.self_attn.indexer.wk.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing tensor model\.layers\.1\.self_attn\.indexer\.wk\.weight"):
        import_hf_checkpoint(src, tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="already exists"):
        import_hf_checkpoint(hf_dir, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_model_dir_refuses_a_different_model(hf_v32, tmp_path):
    _, hf_dir = hf_v32
    import_hf_checkpoint(hf_dir, tmp_path / "ours")
    other = dataclasses.replace(model_io.load_model_config(tmp_path / "ours"), kv_lora_rank=16)
    with pytest.raises(ConfigError, match="kv_lora_rank 32 -> 16"):
        model_io.load_model_params(tmp_path / "ours", other)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def test_cli_import_export_and_errors(hf_v32, tmp_path, capsys):
    _, hf_dir = hf_v32
    assert convert_main(["import", str(hf_dir), str(tmp_path / "ours"), "--dtype", "bfloat16",
                         "--index-topk", "4"]) == 0
    out = capsys.readouterr().out
    assert "imported" in out and "params bfloat16" in out
    config = model_io.load_model_config(tmp_path / "ours")
    assert config.index_topk == 4 and config.param_dtype == "bfloat16"
    assert convert_main(["export", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert "exported deepseek_v32" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["index_topk"] == 4

    assert convert_main(["import", str(hf_dir), str(tmp_path / "ours")]) == 2  # exists: refused ...
    assert "already exists" in capsys.readouterr().err
    assert convert_main(["import", str(hf_dir), str(tmp_path / "ours"), "--overwrite"]) == 0  # ... unless asked
    assert model_io.load_model_config(tmp_path / "ours").param_dtype == "float32"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    assert convert_main(["import", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json" in err and err.count("\n") == 1
    assert convert_main(["export", str(hf_dir), str(tmp_path / "y")]) == 2
    assert "is not a model directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status RssAnon on this platform")


def test_import_memory_is_bounded_by_a_block_not_the_model(tmp_path, monkeypatch):
    """A ~130 MB (fp32) import with 1 MB conversion blocks: anonymous memory grows by a few MB,
    not by the model (tensors go through file-backed scratch memmaps into Orbax, uncopied)."""
    import threading
    import time

    import ml_dtypes

    from dsa_train.convert.hf_import import _abstract_variables
    from dsa_train.convert.safetensors_io import PlannedTensor, write_safetensors

    raw = dict(model_type="deepseek_v32", vocab_size=8192, hidden_size=1024, intermediate_size=2048,
               num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=256,
               kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=8,
               n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=512, n_group=1, topk_group=1,
               index_n_heads=8, index_head_dim=64, index_topk=64)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    config, _ = model_config_from_hf(raw)
    rng = np.random.default_rng(0)
    bf16 = np.dtype(ml_dtypes.bfloat16)

    def chunks(shape):
        n = int(np.prod(shape))
        for i in range(0, n, 1 << 20):
            yield rng.standard_normal(min(1 << 20, n - i), dtype=np.float32).astype(bf16)

    tensors = []
    for key, (shape, _) in _abstract_variables(config).items():
        name = key.replace("/", ".")
        if "/experts/" in key:
            tensors += [PlannedTensor(name.replace(".experts.", f".experts.{e}.") + ".weight", bf16, shape[1:],
                                      lambda s=shape[1:]: chunks(s)) for e in range(shape[0])]
        else:
            dtype = np.dtype(np.float32) if name.endswith("e_score_correction_bias") else bf16
            tensors.append(PlannedTensor(name, dtype, shape, lambda s=shape: chunks(s)))
    write_safetensors(tmp_path / "hf" / "model.safetensors", tensors)

    monkeypatch.setattr(hf_import, "CHUNK_ELEMENTS", 1 << 18)  # 1 MB fp32 blocks
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "warm")  # imports, eval_shape, Orbax set-up
    shutil.rmtree(tmp_path / "warm")
    base = _rss_anon_mb()
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        import_hf_checkpoint(tmp_path / "hf", tmp_path / "out")
    finally:
        done.set()
        sampler.join()
    output_mb = sum(f.stat().st_size for f in (tmp_path / "out").rglob("*") if f.is_file()) / 2**20
    assert output_mb > 120
    assert peak[0] - base < 24, f"anonymous memory grew by {peak[0] - base:.0f} MB for a {output_mb:.0f} MB model"
