"""Logit parity with the transformers reference after importing its checkpoint.

For each config a tiny random DeepseekV32ForCausalLM (or DeepseekV3ForCausalLM) is saved with
`save_pretrained`, imported with our importer and run in fp32 on the same tokens. Dense mode is
compared with HF at index_topk >= seq_len (HF always runs the indexer; selecting every key is
dense attention), sparse mode with HF at index_topk < seq_len, where the per-layer top-k index
sets must also be identical. Criterion: max|diff| <= 1e-4 * max|logit| on real tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import hf_reference as R

from flax import nnx  # noqa: E402  (after the importorskip of torch/transformers in hf_reference)

from dsa_train.checkpoint import model_io  # noqa: E402
from dsa_train.convert import import_hf_checkpoint  # noqa: E402
from dsa_train.model import ForwardMode  # noqa: E402

SEQ, BATCH, SPARSE_TOPK = 16, 2, 5
TOL = 1e-4
REPORTED: dict[str, float] = {}

CASES = {
    # Between them: both q/kv ranks, group-limited routing with 1 of 2 and 2 of 4 groups, a dense
    # first layer and an all-MoE stack, RoPE without and with YaRN (mscale != mscale_all_dim, so
    # both the cos/sin factor and the softmax scale are exercised), unnormalized gates, two shared
    # experts, and an rms_norm_eps far from the 1e-6 that HF's latent q/kv norms always use. Other
    # RoPE settings are checked against HF's own RoPE code in test_convert.py (no compile needed).
    "v32-base": dict(kind="v32"),
    "v32-yarn-groups-allmoe": dict(kind="v32", rope=R.YARN, q_lora_rank=24, kv_lora_rank=16, n_group=4,
                                   topk_group=2, num_experts_per_tok=3, first_k_dense_replace=0,
                                   qk_nope_head_dim=8, v_head_dim=24, index_n_heads=6, index_head_dim=24,
                                   rms_norm_eps=1e-2, norm_topk_prob=False, routed_scaling_factor=1.5,
                                   n_shared_experts=2),
}


@nnx.jit(static_argnames="mode")
def _forward(model, tokens, segment_ids, mode):
    out = model(tokens, segment_ids=segment_ids, mode=ForwardMode(mode))
    return out.logits, out.indices


def _run_ours(model, tokens, segment_ids, mode: str):
    logits, indices = _forward(model, tokens, segment_ids, mode)
    return np.asarray(logits), [np.asarray(i) for i in indices]


def _rel_diff(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _import(tmp_path_factory, name, case, seed=0):
    kind = case.get("kind", "v32")
    kw = {k: v for k, v in case.items() if k != "kind"}
    hf = R.build_hf_model(R.hf_config(kind, **kw), seed=seed)
    root = tmp_path_factory.mktemp(name)
    hf.save_pretrained(root / "hf")
    report = import_hf_checkpoint(root / "hf", root / "ours")
    return hf, root / "ours", report


def _load(model_dir, index_topk):
    config = dataclasses.replace(model_io.load_model_config(model_dir), compute_dtype="float32",
                                 index_topk=index_topk)
    return model_io.load_model_params(model_dir, config)


def _inputs(seed=0):
    """Three batches of the same shape: full rows, right padding, two packed documents."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, R.BASE["vocab_size"], (BATCH, SEQ)).astype(np.int32)
    full = np.ones((BATCH, SEQ), np.int32)
    padded = full.copy()
    padded[1, 11:] = 0  # row 1: 11 real tokens, then right padding
    packed = np.ones((BATCH, SEQ), np.int32)
    packed[:, 7:] = 2  # documents [0, 7) and [7, 16) in every row
    return tokens, full, padded, packed


def _hf_sets(hf_idx, t, start, length):
    """HF's selected keys for query t of a document [start, start+length) run alone, as absolute
    positions, ignoring the slots HF fills with masked (future) keys when few candidates exist."""
    return {int(k) + start for k in hf_idx if k <= t - start}


def _check_index_sets(ours_indices, hf_indices_per_doc, docs):
    """ours_indices: per layer [B, S, K]; hf_indices_per_doc[(b, start)]: per layer [1, len, K]."""
    checked = 0
    for layer, ours in enumerate(ours_indices):
        for (b, start, length) in docs:
            hf = hf_indices_per_doc[(b, start)][layer][0]
            for q in range(length):
                t = start + q
                mine = {int(k) for k in ours[b, t] if k >= 0}
                assert mine == _hf_sets(hf[q], t, start, length), (layer, b, t)
                checked += 1
    return checked


@pytest.mark.parametrize("name", list(CASES))
def test_parity_dense_sparse_padding_packing(name, tmp_path_factory):
    hf, model_dir, _ = _import(tmp_path_factory, name, CASES[name])
    tokens, full, padded, packed = _inputs()
    dense = _load(model_dir, R.V32_EXTRA["index_topk"])
    sparse = _load(model_dir, SPARSE_TOPK)

    for mode, model, hf_topk in (("dense", dense, SEQ), ("sparse", sparse, SPARSE_TOPK)):
        R.set_hf_index_topk(hf, hf_topk)
        # 1. full rows
        ours, ours_idx = _run_ours(model, tokens, full, mode)
        captured, remove = R.capture_hf_indices(hf)
        ref = R.hf_logits(hf, tokens)
        remove()
        d = _rel_diff(ours, ref)
        REPORTED[f"{name}/{mode}/full"] = d
        assert d <= TOL, d
        if mode == "sparse":
            per_doc = {(b, 0): [c[b:b + 1] for c in captured] for b in range(BATCH)}
            assert _check_index_sets(ours_idx, per_doc, [(b, 0, SEQ) for b in range(BATCH)]) == 2 * BATCH * SEQ

        # 2. right padding: compare real tokens only (HF: attention_mask, arange positions)
        ours, ours_idx = _run_ours(model, tokens, padded, mode)
        captured, remove = R.capture_hf_indices(hf)
        ref = R.hf_logits(hf, tokens, attention_mask=padded)
        remove()
        real = padded.astype(bool)
        d = _rel_diff(ours[real], ref[real])
        REPORTED[f"{name}/{mode}/padded"] = d
        assert d <= TOL, d
        if mode == "sparse":
            per_doc = {(b, 0): [c[b:b + 1] for c in captured] for b in range(BATCH)}
            _check_index_sets(ours_idx, per_doc, [(0, 0, SEQ), (1, 0, 11)])

        # 3. two packed documents per row vs HF on each document alone
        ours, ours_idx = _run_ours(model, tokens, packed, mode)
        per_doc, docs = {}, []
        for b in range(BATCH):
            for start, stop in ((0, 7), (7, SEQ)):
                captured, remove = R.capture_hf_indices(hf)
                ref = R.hf_logits(hf, tokens[b:b + 1, start:stop])
                remove()
                per_doc[(b, start)] = captured
                docs.append((b, start, stop - start))
                d = _rel_diff(ours[b, start:stop], ref[0])
                REPORTED[f"{name}/{mode}/packed"] = max(REPORTED.get(f"{name}/{mode}/packed", 0.0), d)
                assert d <= TOL, (b, start, d)
        if mode == "sparse":
            _check_index_sets(ours_idx, per_doc, docs)
    print({k: f"{v:.2e}" for k, v in REPORTED.items() if k.startswith(name)})


def test_parity_deepseek_v3_without_q_lora(tmp_path_factory):
    """A V3 checkpoint (no indexer, q_lora_rank null): imported with fresh indexers (and the
    report says so); dense mode must match DeepseekV3ForCausalLM."""
    hf, model_dir, report = _import(tmp_path_factory, "v3", dict(kind="v3", q_lora_rank=None, rope=R.YARN))
    assert any("freshly initialized" in n for n in report.notes)
    assert report.initialized and "indexer" in report.initialized[0]
    assert "NOTE: deepseek_v3 checkpoint has no lightning indexer" in report.summary()
    config = model_io.load_model_config(model_dir)
    assert config.use_indexer and config.q_lora_rank is None
    tokens, full, padded, _ = _inputs(1)
    model = _load(model_dir, config.index_topk)
    ours, _ = _run_ours(model, tokens, full, "dense")
    d = _rel_diff(ours, R.hf_logits(hf, tokens))
    REPORTED["v3-no-q-lora/dense/full"] = d
    assert d <= TOL, d
    ours, _ = _run_ours(model, tokens, padded, "dense")
    ref = R.hf_logits(hf, tokens, attention_mask=padded)
    real = padded.astype(bool)
    assert _rel_diff(ours[real], ref[real]) <= TOL
    # The fresh indexers come from our initializer (normal, std 0.02; k_norm ones/zeros).
    params = model_io.read_arrays(model_dir / model_io.PARAMS_DIR, [
        "model/layers/1/self_attn/indexer/wk/weight", "model/layers/1/self_attn/indexer/k_norm/weight"])
    wk = params["model/layers/1/self_attn/indexer/wk/weight"]
    assert wk.shape == (config.index_head_dim, R.BASE["hidden_size"]) and 0.015 < wk.std() < 0.025
    assert (params["model/layers/1/self_attn/indexer/k_norm/weight"] == 1).all()
    print(REPORTED)
