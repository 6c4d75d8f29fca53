"""model.scan_layers: the stacked, scanned decoder layers compute exactly what the per-layer loop
computes (forward, gradients, train steps of every stage, remat), convert to and from the
per-layer names (HF import/export, model directories, init_from of runs), refuse a resume in the
other layout with one clear error, and shard on a mesh as the rules say."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dsa_train.checkpoint import model_io
from dsa_train.checkpoint.manager import (MODEL_KEY, CheckpointError, RunCheckpointer, abstract_tree,
                                          load_model_for_init)
from dsa_train.config import CheckpointConfig, MeshConfig, load_config, load_model_config
from dsa_train.model import create_model
from dsa_train.model.layer_layout import layer_stacks, layout_of, to_per_layer, to_stacked
from dsa_train.parallel import activate, make_mesh
from dsa_train.train import step as S
from dsa_train.train.optim import make_optimizer

# Three layers: one dense-FFN layer, then a stack of two MoE layers for the scan to walk.
LAYERS = ["model.num_hidden_layers=3", "model.index_topk=8", "model.kernels=reference", "train.diagnostic_rows=4"]
B, SEQ = 2, 32
slow = pytest.mark.slow
TOL = 1e-4  # fp32 (the scan changes XLA's fusion and summation order), relative to max |value|


def _config(stage="sparse", scan=False, *extra):
    return load_config("configs/tiny.yaml", [*LAYERS, f"train.stage={stage}", f"train.batch_size={B}",
                                              f"train.seq_len={SEQ}", f"model.scan_layers={str(scan).lower()}",
                                              "train.main.lr=1e-2", "train.indexer.lr=1e-2", *extra])


def _flat(tree) -> dict[str, np.ndarray]:
    """'model/layers/0/...' -> array, for an nnx.State (or a model) of either layout."""
    state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree
    return {"/".join(str(p) for p in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def _per_layer(flat: dict, config) -> dict:
    return to_per_layer(dict(flat), layer_stacks(config), take=lambda a, j: a[j])


def _scanned_copy(model):
    """A scanned model holding ``model``'s weights, converted through layer_layout."""
    config = dataclasses.replace(model.config, scan_layers=True)
    stacked = to_stacked(_flat(model), layer_stacks(config), stack=np.stack)
    scanned = create_model(config, seed=123)  # other weights: everything must come from the copy
    state = nnx.state(scanned)
    assert set(_flat(state)) == set(stacked)
    nnx.replace_by_pure_dict(state, model_io.nest(stacked))
    nnx.update(scanned, state)
    return scanned


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((B, SEQ), np.int32)
    seg[0, SEQ // 2:] = 2
    seg[1, -5:] = 0
    tokens = np.where(seg > 0, rng.integers(4, config.model.vocab_size, (B, SEQ)), 0).astype(np.int32)
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg),
            "loss_weights": jnp.asarray((seg > 0).astype(np.float32))}


def _close(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, what
    assert np.abs(a - b).max() <= TOL * max(np.abs(b).max(), 1e-6), (what, np.abs(a - b).max(), np.abs(b).max())


def test_same_seed_gives_the_same_weights_in_both_layouts():
    config = _config().model
    loop = create_model(config, seed=4)
    scanned = create_model(dataclasses.replace(config, scan_layers=True), seed=4)
    flat = _flat(scanned)
    assert layout_of(flat) == "stacked" and layout_of(_flat(loop)) == "per-layer"
    assert flat["model/moe_layers/mlp/experts/gate_proj"].shape == (2, 8, 64, 128)
    assert flat["model/dense_layers/mlp/gate_proj/weight"].shape == (1, 256, 128)
    axes = {"/".join(map(str, p)): v.get_metadata()["axes"] for p, v in nnx.to_flat_state(nnx.state(scanned))}
    assert axes["model/moe_layers/mlp/experts/gate_proj"] == ("layers", "expert", "mlp", "embed")
    assert axes["model/moe_layers/mlp/gate/e_score_correction_bias"] == ("layers", None)
    per_layer = _per_layer(flat, config)
    reference = _flat(loop)
    assert set(per_layer) == set(reference)
    assert all(np.array_equal(per_layer[k], reference[k]) for k in reference)


# Fast by default: the sparse stage under remat full (checkpoint inside the scan body); the other
# combinations are slow (about 10 s each here; still run in CI).
@pytest.mark.parametrize("stage, remat", [
    ("sparse", "full"),
    pytest.param("sparse", "none", marks=slow), pytest.param("dense", "none", marks=slow),
    pytest.param("dense", "full", marks=slow), pytest.param("warmup", "none", marks=slow),
    pytest.param("warmup", "full", marks=slow),
])
def test_scan_matches_loop_forward_and_gradients(stage, remat):
    config = _config(stage)
    mode = S.forward_mode(config)
    loop = create_model(config.model, seed=1)
    scanned = _scanned_copy(loop)
    batch = _batch(config)
    weights = jax.random.normal(jax.random.key(0), (B, SEQ, config.model.vocab_size))

    def run(model):
        graphdef, state = nnx.split(model)

        def loss(state):
            out = nnx.merge(graphdef, state)(batch["tokens"], batch["segment_ids"], mode=mode)
            total = out.indexer_loss.sum()
            if mode.logits:
                total = total + (out.logits * weights).mean()
            if out.moe:
                total = total + sum(s.scores.mean() for s in out.moe)  # the routing statistics too
            return total, out

        with activate(make_mesh(MeshConfig(data=1), jax.devices()[:1]), remat=remat):
            (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
        return out, _flat(grads)

    out_loop, g_loop = run(loop)
    out_scan, g_scan = run(scanned)
    if mode.logits:
        _close(out_scan.logits, out_loop.logits, "logits")
    _close(out_scan.indexer_loss, out_loop.indexer_loss, "indexer_loss")
    assert out_scan.indexer_loss.shape == (3,)
    assert set(out_scan.diagnostics) == set(out_loop.diagnostics)
    for name in out_loop.diagnostics:
        _close(out_scan.diagnostics[name], out_loop.diagnostics[name], name)
    assert len(out_scan.indices) == len(out_loop.indices) == (3 if stage == "sparse" else 0)
    for a, b in zip(out_scan.indices, out_loop.indices):
        np.testing.assert_array_equal(a, b)
    assert len(out_scan.moe) == len(out_loop.moe) == 2
    for a, b in zip(out_scan.moe, out_loop.moe):
        np.testing.assert_array_equal(a.expert_counts, b.expert_counts)
        np.testing.assert_array_equal(a.expert_idx, b.expert_idx)
        _close(a.scores, b.scores, "moe scores")
    g_scan = _per_layer(g_scan, config.model)
    assert set(g_scan) == set(g_loop)
    for key in g_loop:
        _close(g_scan[key], g_loop[key], key)


def _train(config, model, steps=2):
    graphdef, params, bias = S.split_model(model)
    opt = {g: make_optimizer(getattr(config.train, g), config.train.steps) for g in S.GROUPS}
    txs, scheds = {g: o[0] for g, o in opt.items()}, {g: o[1] for g, o in opt.items()}
    state = S.init_state(config, params, bias, txs)
    step = jax.jit(S.make_train_step(graphdef, config, txs, scheds, S.forward_mode(config)))
    losses = []
    for i in range(steps):
        state, metrics = step(state, _batch(config, seed=i))
        losses.append(float(metrics["loss"]))
    model = S.merge_model(graphdef, state.params, state.router_bias)
    return losses, metrics, _flat(model)


@pytest.mark.parametrize("stage", [pytest.param("dense", marks=slow), pytest.param("warmup", marks=slow), "sparse"])
def test_train_steps_match(stage):
    loop_config, scan_config = _config(stage), _config(stage, True)
    loop = create_model(loop_config.model, seed=2)
    loop_losses, loop_metrics, loop_after = _train(loop_config, loop)
    scan_losses, scan_metrics, scan_after = _train(scan_config, _scanned_copy(loop))
    np.testing.assert_allclose(scan_losses, loop_losses, rtol=TOL)
    np.testing.assert_array_equal(scan_metrics["expert_load"], loop_metrics["expert_load"])
    scan_after = _per_layer(scan_after, scan_config.model)
    biases = [k for k in loop_after if k.endswith("e_score_correction_bias")]
    assert len(biases) == 2
    for key in biases:  # the balancing rule moved the same biases by the same amounts
        np.testing.assert_allclose(scan_after[key], loop_after[key], rtol=0, atol=1e-7)
        assert (np.abs(loop_after[key]).max() > 0) == (stage != "warmup")
    # Adam amplifies fp32 noise in near-zero gradients to a sizable part of a step (lr 1e-2): the
    # parameters agree to a small fraction of it, as in test_parallel.
    for key in loop_after:
        np.testing.assert_allclose(scan_after[key], loop_after[key], rtol=0, atol=2e-3, err_msg=key)


def _pure_abstract(model):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        nnx.to_pure_dict(nnx.state(model)))


def _flat_pure(tree) -> dict[str, np.ndarray]:
    return {model_io.path_key(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("source_scan", [False, True])
def test_init_from_across_layouts(tmp_path, source_scan):
    """A model directory and a run checkpoint written in one layout initialize a model in the other."""
    config = _config().model
    source = create_model(dataclasses.replace(config, scan_layers=source_scan), seed=5)
    target_config = dataclasses.replace(config, scan_layers=not source_scan)
    target = nnx.eval_shape(lambda: create_model(target_config, seed=0))
    want = _flat_pure(nnx.to_pure_dict(nnx.state(create_model(target_config, seed=5))))

    # Model directory: always written per layer (the converter's layout), read into either.
    model_io.save_model(tmp_path / "model", source)
    assert layout_of(model_io.tree_metadata(tmp_path / "model" / model_io.PARAMS_DIR)) == "per-layer"
    got = model_io.load_model_state(tmp_path / "model", _pure_abstract(target),
                                    model_config_dict=dataclasses.asdict(target_config))
    assert _flat_pure(got).keys() == want.keys()
    assert all(np.array_equal(_flat_pure(got)[k], want[k]) for k in want)
    loaded = model_io.load_model_params(tmp_path / "model", target_config)
    assert all(np.array_equal(v, want[k]) for k, v in _flat(loaded).items())

    # Run checkpoint: written in the source's own layout, converted while it is read.
    with RunCheckpointer(tmp_path / "run", CheckpointConfig(async_save=False), {"model": {}}) as ckpt:
        ckpt.save(1, {MODEL_KEY: nnx.to_pure_dict(nnx.state(source)), "step": jnp.ones((), jnp.int32)}, force=True)
    got = load_model_for_init(tmp_path / "run", _pure_abstract(target),
                              model_config_dict=dataclasses.asdict(target_config))
    assert _flat_pure(got).keys() == want.keys()
    assert all(np.array_equal(_flat_pure(got)[k], want[k]) for k in want)


def test_resume_in_the_other_layout_is_one_clear_error(tmp_path):
    config = _config().model
    written = create_model(config, seed=0)
    with RunCheckpointer(tmp_path / "run", CheckpointConfig(async_save=False), {"model": {}}) as ckpt:
        ckpt.save(1, {MODEL_KEY: nnx.to_pure_dict(nnx.state(written)), "step": jnp.ones((), jnp.int32)}, force=True)
    scanned = nnx.eval_shape(lambda: create_model(dataclasses.replace(config, scan_layers=True)))
    target = {MODEL_KEY: _pure_abstract(scanned),
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    with RunCheckpointer(tmp_path / "run", CheckpointConfig(), {"model": {}}) as ckpt:
        with pytest.raises(CheckpointError) as e:
            ckpt.restore(1, target)
    message = str(e.value)
    assert "\n" not in message and "model.scan_layers=false" in message and "model.scan_layers=true" in message
    assert "init_from" in message and "only in the checkpoint" not in message  # the cause, not 40 paths


def test_hf_import_scanned_model_export_round_trip(tmp_path):
    """HF -> model directory -> scanned model (same logits as transformers) -> HF again: the
    exported tensors are the imported ones, bit for bit (fp32)."""
    R = pytest.importorskip("hf_reference")
    from safetensors.numpy import load_file

    from dsa_train.convert import export_hf_checkpoint, import_hf_checkpoint

    hf = R.build_hf_model(R.hf_config("v32", num_hidden_layers=3), seed=3)
    hf.save_pretrained(tmp_path / "hf")
    report = import_hf_checkpoint(tmp_path / "hf", tmp_path / "ours")
    config = dataclasses.replace(report.config, scan_layers=True, compute_dtype="float32", index_topk=5,
                                 kernels="reference")
    model = model_io.load_model_params(tmp_path / "ours", config)
    assert layout_of(_flat(model)) == "stacked"
    tokens = np.random.default_rng(0).integers(0, R.BASE["vocab_size"], (2, 12))
    R.set_hf_index_topk(hf, 5)
    ours = model(jnp.asarray(tokens, jnp.int32), mode=S.ForwardMode("sparse")).logits
    reference = R.hf_logits(hf, tokens)
    assert np.abs(np.asarray(ours) - reference).max() <= 1e-4 * np.abs(reference).max()

    export_hf_checkpoint(model, tmp_path / "exported", dtype="float32")
    exported = load_file(tmp_path / "exported" / "model-00001-of-00001.safetensors")
    source = {}  # what save_pretrained wrote (per-expert tensors, DeepSeek's release layout)
    for f in sorted((tmp_path / "hf").glob("*.safetensors")):
        source.update({k: v for k, v in load_file(f).items() if "inv_freq" not in k})
    assert exported.keys() == source.keys()
    assert all(np.array_equal(exported[k], source[k]) for k in source)


@slow
def test_mesh_matches_one_device_and_stacked_params_shard_by_the_rules():
    """fsdp x tensor x expert = 2 x 2 x 2 simulated devices, scanned: the loss, gradients and one
    train step of the 1-device scanned run; every stacked parameter sharded as the rules say."""
    from test_parallel import assert_matches_single_device, run_checks

    results = run_checks({"devices": 8, "stage": "sparse", "overrides": ["model.scan_layers=true", *LAYERS[:1]],
                          "meshes": [{"fsdp": 2, "tensor": 2, "expert": 2}]})
    assert_matches_single_device(results)
    specs = results[0]["specs"]
    pick = lambda suffix: next(v for k, v in specs.items() if k.endswith(suffix))  # noqa: E731
    assert pick("['moe_layers']['mlp']['experts']['gate_proj']") == str(P(None, "expert", "tensor", "fsdp"))
    assert pick("['dense_layers']['self_attn']['o_proj']['weight']") == str(P(None, "fsdp", "tensor"))
    assert not any("['layers']" in k for k in specs)


@slow
def test_context_and_expert_parallel_scanned_model_matches_one_device():
    """data x expert x context = 2 x 2 x 2, scanned: the scanned stacks go through the same
    context-parallel ops (and expert all-to-all) as the per-layer model; loss, gradients and one
    train step equal the 1-device scanned run."""
    from test_parallel import assert_matches_single_device, run_checks

    results = run_checks({"devices": 8, "stage": "sparse", "overrides": ["model.scan_layers=true"],
                          "meshes": [{"data": 2, "expert": 2, "context": 2}]})
    assert_matches_single_device(results)
    specs = results[0]["specs"]
    assert next(v for k, v in specs.items() if k.endswith("['moe_layers']['mlp']['experts']['gate_proj']")) == str(
        P(None, "expert"))
