"""Multi-token prediction: the forward against a reference written from the V3 report's equations,
its targets, what each stage lets the MTP loss train, and a V3.2-shaped HF checkpoint with an MTP
layer (bf16 and FP8 block-scaled) through import, both training stages and export."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference as R
from hf_reference import torch, transformers

from flax import nnx  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from dsa_train.checkpoint import model_io  # noqa: E402
from dsa_train.config import load_config  # noqa: E402
from dsa_train.convert import export_hf_checkpoint, import_hf_checkpoint  # noqa: E402
from dsa_train.model import ForwardMode, create_model  # noqa: E402
from dsa_train.model.mtp import mtp_inputs  # noqa: E402
from dsa_train.train import step as S  # noqa: E402
from dsa_train.train.optim import make_optimizer  # noqa: E402

SEQ, BATCH, SPARSE_TOPK = 16, 2, 5
MTP = R.BASE["num_hidden_layers"]  # the MTP layer's index in the HF checkpoint
TOL = 1e-4


def _rms(x, w, eps):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _hf_with_mtp(root, seed=0):
    """A tiny DeepseekV32 checkpoint plus the released MTP layout at layer MTP: enorm, hnorm,
    eh_proj, a full MoE decoder layer (with indexer), shared_head.{norm,head}, embed_tokens.
    The MTP decoder layer and shared_head.norm are layer 0 / the final norm of a second, one-layer
    all-MoE model (`block`), so the reference can run them through transformers."""
    main = R.build_hf_model(R.hf_config("v32", index_topk=SEQ), seed=seed)
    block = R.build_hf_model(R.hf_config("v32", index_topk=SEQ, num_hidden_layers=1, first_k_dense_replace=0),
                             seed=seed + 1)
    with torch.no_grad():
        block.lm_head.weight.copy_(main.lm_head.weight)
    main.save_pretrained(root / "hf")
    block.save_pretrained(root / "block")
    tensors = load_file(root / "hf" / "model.safetensors")
    d = R.BASE["hidden_size"]
    g = torch.Generator().manual_seed(seed + 2)
    mtp = {"enorm.weight": 1.0 + 0.2 * torch.randn(d, generator=g),
           "hnorm.weight": 1.0 + 0.2 * torch.randn(d, generator=g),
           "eh_proj.weight": torch.randn(d, 2 * d, generator=g) / math.sqrt(2 * d)}
    for name, t in load_file(root / "block" / "model.safetensors").items():
        if name.startswith("model.layers.0."):
            mtp[name[len("model.layers.0."):]] = t
    mtp["shared_head.norm.weight"] = block.model.norm.weight.detach().clone()
    mtp["shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    mtp["embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors.update({f"model.layers.{MTP}.{k}": v.contiguous() for k, v in mtp.items()})
    save_file(tensors, root / "hf" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "hf" / "config.json").read_text())
    (root / "hf" / "config.json").write_text(json.dumps(dict(config, num_nextn_predict_layers=1)))
    return main, block, {k: v.float() for k, v in mtp.items()}


def _reference_mtp_logits(main, block, mtp, tokens):
    """V3 report, eq. 21-23, for depth 1: h' = M [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)] (the order
    the released weights are read in), then the decoder layer, then the shared head."""
    eps = R.BASE["rms_norm_eps"]
    t = torch.as_tensor(tokens, dtype=torch.long)
    nxt = torch.cat([t[:, 1:], torch.zeros_like(t[:, :1])], 1)
    with torch.no_grad():
        h = main.model(input_ids=t, use_cache=False).last_hidden_state  # after the final norm
        e = main.model.embed_tokens(nxt)
        x = torch.cat([_rms(e, mtp["enorm.weight"], eps), _rms(h, mtp["hnorm.weight"], eps)], -1)
        x = x @ mtp["eh_proj.weight"].T
        # block: the MTP decoder layer, then its final norm (= shared_head.norm), then the shared head.
        return block(inputs_embeds=x, use_cache=False).logits.float().numpy()


@pytest.fixture(scope="module")
def hf_mtp(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtp")
    main, block, mtp = _hf_with_mtp(root)
    report = import_hf_checkpoint(root / "hf", root / "ours", mtp=True)
    return root, main, block, mtp, report


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, R.BASE["vocab_size"], (BATCH, SEQ)).astype(np.int32)


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_mtp_logits_match_reference(hf_mtp, attention):
    root, main, block, mtp, report = hf_mtp
    assert report.config.num_nextn_predict_layers == 1
    assert any("MTP copies of embed_tokens" in s for s in report.skipped)
    topk = SEQ if attention == "dense" else SPARSE_TOPK
    for m in (main, block):
        R.set_hf_index_topk(m, topk)
    config = dataclasses.replace(model_io.load_model_config(root / "ours"), compute_dtype="float32", index_topk=topk)
    model = model_io.load_model_params(root / "ours", config)
    tokens = _tokens()
    out = model(jnp.asarray(tokens), mode=ForwardMode(attention))
    ref = _reference_mtp_logits(main, block, mtp, tokens)
    got = np.asarray(out.mtp.logits[0])
    assert np.abs(got - ref).max() <= TOL * np.abs(ref).max()
    # The main model is untouched by the MTP layer.
    main_ref = R.hf_logits(main, tokens)
    assert np.abs(np.asarray(out.logits) - main_ref).max() <= TOL * np.abs(main_ref).max()


def test_mtp_targets_stay_inside_documents():
    tokens = jnp.asarray([[5, 6, 7, 8, 9, 10]], jnp.int32)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0]], jnp.int32)
    targets = jnp.asarray([[6, 7, 8, 9, 10, 0]], jnp.int32)
    weights = jnp.asarray([[1.0, 1.0, 0.0, 1.0, 0.0, 0.0]])  # next-token weights of these documents
    out = mtp_inputs(tokens, targets, weights, depth=2)
    np.testing.assert_array_equal(out["mtp_tokens_1"], [[6, 7, 8, 9, 10, 0]])
    np.testing.assert_array_equal(out["mtp_targets_1"], [[7, 8, 9, 10, 0, 0]])
    # position 0 -> 2 stays in document 1; 1 -> 3 and 2 -> 4 cross into document 2; 3 -> 5 is padding.
    np.testing.assert_array_equal(out["mtp_weights_1"], [[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(out["mtp_targets_2"], [[8, 9, 10, 0, 0, 0]])
    np.testing.assert_array_equal(out["mtp_weights_2"], np.zeros((1, 6)))
    del seg


def _setup(stage):
    cfg = load_config("configs/tiny.yaml", [f"train.stage={stage}", f"train.batch_size={BATCH}",
                                            f"train.seq_len={SEQ}", "model.index_topk=4", "train.diagnostic_rows=0",
                                            "model.num_nextn_predict_layers=1"])
    graphdef, params, bias = S.split_model(create_model(cfg.model))
    return cfg, graphdef, params, bias


def _batch(seed=0):
    tokens = np.random.default_rng(seed).integers(4, 512, (BATCH, SEQ)).astype(np.int32)
    seg = np.ones((BATCH, SEQ), np.int32)
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg)}


def _abs_sum(tree, keep=lambda path: True):
    return sum(float(jnp.abs(v).sum()) for path, v in jax.tree_util.tree_leaves_with_path(tree)
               if keep(jax.tree_util.keystr(path)))


def test_mtp_loss_gradient_routing_sparse_stage():
    """Sparse stage: the MTP cross-entropy trains the MTP layer and the main model under it, never
    an indexer; the MTP indexer's KL trains only that indexer."""
    cfg, graphdef, params, bias = _setup("sparse")
    batch = _batch()
    mode = S.forward_mode(cfg, diagnostics=False)

    def losses(p):
        inputs = S.model_inputs(batch)
        inputs.update(mtp_inputs(inputs["tokens"], inputs["targets"], inputs["target_weights"], 1))
        out = S.merge_model(graphdef, p, bias)(inputs["tokens"], inputs["segment_ids"], mode=mode,
                                               mtp_tokens=(inputs["mtp_tokens_1"],))
        from dsa_train.model.mtp import mtp_loss_and_accuracy

        return mtp_loss_and_accuracy(out.mtp.logits, inputs)[0], out.mtp.indexer_loss.sum()

    g_ce = jax.grad(lambda p: losses(p)[0])(params)
    g_kl = jax.grad(lambda p: losses(p)[1])(params)
    assert _abs_sum(g_ce["indexer"]) == 0.0
    assert _abs_sum(g_ce["main"], lambda k: "'mtp'" in k) > 0  # the MTP layer itself
    assert _abs_sum(g_ce["main"], lambda k: "'layers'" in k and "'mtp'" not in k) > 0  # the trunk under it
    assert _abs_sum(g_kl["main"]) == 0.0
    assert _abs_sum(g_kl["indexer"], lambda k: "'mtp'" in k) > 0
    assert _abs_sum(g_kl["indexer"], lambda k: "'mtp'" not in k) == 0.0


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_mtp_train_step_per_stage(stage):
    """Warm-up: the MTP layer is frozen but its indexer trains (mtp_indexer_kl, no mtp_loss);
    sparse: the MTP layer trains on mtp_loss too."""
    cfg, graphdef, params, bias = _setup(stage)
    opt = {g: make_optimizer(getattr(cfg.train, g), cfg.train.steps) for g in S.GROUPS}
    txs, scheds = {g: o[0] for g, o in opt.items()}, {g: o[1] for g, o in opt.items()}
    state = S.init_state(cfg, params, bias, txs)
    step = jax.jit(S.make_train_step(graphdef, cfg, txs, scheds, S.forward_mode(cfg, diagnostics=False)))
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = step(state, _batch())
    changed = lambda g, sel: any(  # noqa: E731
        not np.array_equal(np.asarray(a), b) for (path, a), b in
        zip(jax.tree_util.tree_leaves_with_path(state.params[g]), jax.tree.leaves(before[g]))
        if sel(jax.tree_util.keystr(path)))
    is_mtp = lambda k: "'mtp'" in k  # noqa: E731
    assert changed("indexer", is_mtp)
    assert float(metrics["mtp_indexer_kl"][0]) > 0
    if stage == "warmup":
        assert "mtp_loss" not in metrics
        assert not changed("main", is_mtp)
    else:
        assert math.isfinite(float(metrics["mtp_loss"])) and float(metrics["mtp_loss"]) > 0
        assert 0.0 <= float(metrics["mtp_accuracy"]) <= 1.0
        assert changed("main", is_mtp)


# ----------------------------------------------------------------------------------------------
# The whole pipeline: import (bf16 / FP8), warm-up and sparse steps, export, transformers
# ----------------------------------------------------------------------------------------------

BLOCK = 32


def _fp8_rewrite(src_dir, out_dir):
    """The checkpoint with its linear weights (MTP layer included, eh_proj excepted as released)
    in block-scaled float8_e4m3fn."""
    out_dir.mkdir()
    new = {}
    for name, w in load_file(src_dir / "model.safetensors").items():
        linear = w.ndim == 2 and not any(s in name for s in ("embed_tokens", "lm_head", "shared_head.head",
                                                              "mlp.gate.weight", "weights_proj", "eh_proj"))
        if not linear:
            new[name] = w
            continue
        out, inp = w.shape
        nbo, nbi = math.ceil(out / BLOCK), math.ceil(inp / BLOCK)
        padded = torch.zeros(nbo * BLOCK, nbi * BLOCK)
        padded[:out, :inp] = w.float()
        scale = padded.reshape(nbo, BLOCK, nbi, BLOCK).abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
        full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:out, :inp]
        new[name], new[name + "_scale_inv"] = (w.float() / full).to(torch.float8_e4m3fn), scale.float()
    save_file(new, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [BLOCK, BLOCK]}
    (out_dir / "config.json").write_text(json.dumps(config))


def _bf16_rewrite(src_dir, out_dir):
    out_dir.mkdir()
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() and "e_score" not in k else v
               for k, v in load_file(src_dir / "model.safetensors").items()}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text((src_dir / "config.json").read_text())


def _train(config_model, params_model, stage, steps=2):
    cfg = load_config("configs/tiny.yaml", [f"train.stage={stage}", f"train.batch_size={BATCH}",
                                            f"train.seq_len={SEQ}", "model.index_topk=4", "train.diagnostic_rows=0"])
    cfg = dataclasses.replace(cfg, model=config_model)
    graphdef, params, bias = S.split_model(params_model)
    opt = {g: make_optimizer(getattr(cfg.train, g), cfg.train.steps) for g in S.GROUPS}
    txs, scheds = {g: o[0] for g, o in opt.items()}, {g: o[1] for g, o in opt.items()}
    state = S.init_state(cfg, params, bias, txs)
    step = jax.jit(S.make_train_step(graphdef, cfg, txs, scheds, S.forward_mode(cfg, diagnostics=False)))
    tokens = _tokens(seed=7)
    batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones_like(jnp.asarray(tokens))}
    for _ in range(steps):
        state, metrics = step(state, batch)
        assert int(metrics["skipped"]) == 0
    return S.merge_model(graphdef, state.params, state.router_bias)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_mtp_checkpoint_import_train_export(hf_mtp, tmp_path, fmt):
    root = hf_mtp[0]
    src = tmp_path / fmt
    (_bf16_rewrite if fmt == "bf16" else _fp8_rewrite)(root / "hf", src)
    report = import_hf_checkpoint(src, tmp_path / "ours", mtp=True)
    assert report.config.num_nextn_predict_layers == 1
    if fmt == "fp8":
        # the MTP layer's FP8 projections were dequantized too
        assert report.fp8_dequantized > 0
    # Round trip before training: the exported MTP tensors are the source's, bit for bit.
    export_hf_checkpoint(tmp_path / "ours", tmp_path / "again", dtype="float32")
    source = load_file(src / "model.safetensors")
    again = load_file(tmp_path / "again" / "model-00001-of-00001.safetensors")
    if fmt == "bf16":
        for name, value in source.items():
            if name.startswith(f"model.layers.{MTP}."):
                np.testing.assert_array_equal(again[name].float().numpy(), value.float().numpy(), err_msg=name)

    config = dataclasses.replace(model_io.load_model_config(tmp_path / "ours"), compute_dtype="float32",
                                 index_topk=SEQ)
    model = model_io.load_model_params(tmp_path / "ours", config)
    model = _train(config, _train(config, model, "warmup"), "sparse")
    export_hf_checkpoint(model, tmp_path / "export", dtype="float32")

    exported = load_file(tmp_path / "export" / "model-00001-of-00001.safetensors")
    ours = {"/".join(str(p) for p in path): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(model))}
    mtp_keys = [k for k in ours if k.startswith("mtp/0/")]
    assert mtp_keys
    for key in mtp_keys:
        rest = key[len("mtp/0/"):]
        if rest.startswith("mlp/experts/"):
            proj = rest.split("/")[-1]
            for e in range(ours[key].shape[0]):
                np.testing.assert_array_equal(
                    exported[f"model.layers.{MTP}.mlp.experts.{e}.{proj}.weight"].numpy(), ours[key][e])
        else:
            np.testing.assert_array_equal(exported[f"model.layers.{MTP}.{rest.replace('/', '.')}"].numpy(),
                                          ours[key], err_msg=key)
    np.testing.assert_array_equal(exported[f"model.layers.{MTP}.shared_head.head.weight"].numpy(),
                                  ours["lm_head/weight"])
    np.testing.assert_array_equal(exported[f"model.layers.{MTP}.embed_tokens.weight"].numpy(),
                                  ours["model/embed_tokens/weight"])
    assert json.loads((tmp_path / "export" / "config.json").read_text())["num_nextn_predict_layers"] == 1

    # transformers loads the export (ignoring the MTP layer) and gives our logits.
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    tokens = _tokens(seed=3)
    ref = R.hf_logits(hf, tokens)
    got = np.asarray(model(jnp.asarray(tokens), mode=ForwardMode("dense")).logits)
    assert np.abs(got - ref).max() <= TOL * np.abs(ref).max()


def test_info_counts_mtp_apart(capsys):
    from dsa_train.cli import main

    assert main(["info", "configs/deepseek-v3.2.yaml"]) == 0
    out = capsys.readouterr().out
    assert "total parameters: 671,877,929,216" in out  # transformers' count of the main model
    # One MoE decoder layer with its indexer, eh_proj [7168, 14336] and three norms. Without the
    # indexer and with the checkpoint's embedding/head copies (2 x 926,679,040) that is 13.46B:
    # 671.03B + 13.46B = the 685B the V3 report gives for the main model plus MTP.
    assert "MTP parameters: 11,624,027,392 (indexer 13,959,424)" in out


def test_eval_mtp_acceptance_proxy_counts_next_next_tokens(hf_mtp):
    """The proxy is the top-1 agreement of the MTP logits at i with t_{i+2}, over the positions
    where t_{i+2} is in the same document (two packed documents and padding here)."""
    from dsa_train.eval.mtp import MTPAcceptance

    root = hf_mtp[0]
    config = dataclasses.replace(model_io.load_model_config(root / "ours"), compute_dtype="float32")
    model = model_io.load_model_params(root / "ours", config)
    tokens = _tokens(seed=5)
    seg = np.array([[1] * 10 + [2] * 6, [1] * 12 + [0] * 4], np.int32)
    positions = np.stack([np.r_[np.arange(10), np.arange(6)], np.r_[np.arange(12), np.zeros(4, int)]]).astype(np.int32)
    acc = MTPAcceptance()
    acc.add(model, {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg),
                    "positions": jnp.asarray(positions)}, "dense")
    summary = acc.summary()["dense"]
    # By hand: positions whose t_{i+2} is in the document.
    out = model(jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(positions), ForwardMode("dense"))
    pred = np.argmax(np.asarray(out.mtp.logits[0]), -1)
    hits = total = 0
    for b in range(BATCH):
        for i in range(SEQ - 2):
            if seg[b, i] and seg[b, i] == seg[b, i + 1] == seg[b, i + 2]:
                total += 1
                hits += int(pred[b, i] == tokens[b, i + 2])
    assert summary["tokens"] == total == 8 + 4 + 10
    assert summary["top1_agreement"] == pytest.approx(hits / total)


@pytest.mark.parametrize("stage", [pytest.param("warmup", marks=pytest.mark.slow), "sparse"])
def test_mtp_same_with_and_without_scan_layers(stage):
    """The same weights give the same MTP logits, MTP loss, MTP indexer KL and MTP gradients
    whether the decoder layers under the MTP layer are scanned or looped."""
    from test_scan_layers import _scanned_copy

    cfg = load_config("configs/tiny.yaml", [f"train.stage={stage}", f"train.batch_size={BATCH}",
                                            f"train.seq_len={SEQ}", "model.index_topk=4", "train.diagnostic_rows=0",
                                            "model.num_nextn_predict_layers=1", "model.num_hidden_layers=3",
                                            "model.kernels=reference"])
    loop = create_model(cfg.model, seed=1)
    scanned = _scanned_copy(loop)
    batch = {**_batch(), "loss_weights": jnp.ones((BATCH, SEQ), jnp.float32)}
    mode = S.forward_mode(cfg, diagnostics=False)
    trained_groups = S.TRAINABLE[stage]
    outs = []
    for model in (loop, scanned):
        graphdef, params, bias = S.split_model(model)
        trained = {g: params[g] for g in trained_groups}
        frozen = {g: p for g, p in params.items() if g not in trained_groups}
        fn = lambda tr: S._loss_and_metrics(graphdef, cfg, mode, tr, frozen, bias, batch)  # noqa: B023, E731
        (loss, (metrics, _)), grads = jax.value_and_grad(fn, has_aux=True)(trained)
        inputs = S.model_inputs(batch)
        inputs.update(mtp_inputs(inputs["tokens"], inputs["targets"], inputs["target_weights"], 1))
        logits_mode = ForwardMode("dense" if stage == "warmup" else "sparse")  # the warm-up computes no logits
        out = S.merge_model(graphdef, params, bias)(inputs["tokens"], inputs["segment_ids"], mode=logits_mode,
                                                     mtp_tokens=(inputs["mtp_tokens_1"],))
        mtp_grads = {jax.tree_util.keystr(p): np.asarray(g) for p, g in jax.tree_util.tree_leaves_with_path(grads)
                     if "'mtp'" in jax.tree_util.keystr(p)}
        outs.append((float(loss), metrics, np.asarray(out.mtp.logits[0]), mtp_grads))
    (loss_a, m_a, logits_a, g_a), (loss_b, m_b, logits_b, g_b) = outs
    assert np.abs(logits_a - logits_b).max() <= TOL * np.abs(logits_a).max()
    assert abs(loss_a - loss_b) <= TOL * abs(loss_a)
    keys = ["mtp_indexer_kl"] + (["mtp_loss", "mtp_accuracy"] if stage == "sparse" else [])
    for key in keys:
        np.testing.assert_allclose(np.asarray(m_a[key]), np.asarray(m_b[key]), rtol=TOL, atol=1e-6, err_msg=key)
    assert g_a and set(g_a) == set(g_b)
    for key in g_a:
        scale = max(np.abs(g_a[key]).max(), 1e-6)
        assert np.abs(g_a[key] - g_b[key]).max() <= 1e-3 * scale, key
