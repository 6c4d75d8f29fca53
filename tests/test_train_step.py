"""The train step: what each stage differentiates, what stays frozen, MoE balancing, skipped steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsa_train.config import load_config
from dsa_train.model import ForwardMode, create_model
from dsa_train.ops import moe as moe_ops
from dsa_train.ops.losses import lm_cross_entropy
from dsa_train.train import step as S
from dsa_train.train.optim import make_optimizer

B, L = 2, 48


def _setup(stage, *extra):
    cfg = load_config("configs/tiny.yaml", [f"train.stage={stage}", f"train.batch_size={B}", f"train.seq_len={L}",
                                            "model.index_topk=8", "train.diagnostic_rows=4", *extra])
    graphdef, params, bias = S.split_model(create_model(cfg.model))
    opt = {g: make_optimizer(getattr(cfg.train, g), cfg.train.steps) for g in S.GROUPS}
    txs, scheds = {g: o[0] for g, o in opt.items()}, {g: o[1] for g, o in opt.items()}
    state = S.init_state(cfg, params, bias, txs)
    step = jax.jit(S.make_train_step(graphdef, cfg, txs, scheds, S.forward_mode(cfg)))
    return cfg, graphdef, state, step


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    seg = np.array([[1] * 30 + [2] * 18, [1] * 40 + [0] * 8], np.int32)
    tokens = np.where(seg > 0, rng.integers(4, 512, size=(B, L)), 0).astype(np.int32)
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg),
            "loss_weights": jnp.asarray((seg > 0).astype(np.float32))}


def test_sparse_stage_gradient_isolation():
    cfg, graphdef, state, _ = _setup("sparse")
    batch = _batch()
    mode = ForwardMode("sparse", indexer_loss=True)

    def losses(params):
        model = S.merge_model(graphdef, params, state.router_bias)
        out = model(batch["tokens"], batch["segment_ids"], mode=mode)
        lm, n = lm_cross_entropy(out.logits, batch["tokens"], batch["segment_ids"])
        return lm / n, out.indexer_loss.sum()

    g_lm = jax.grad(lambda p: losses(p)[0])(state.params)
    g_kl = jax.grad(lambda p: losses(p)[1])(state.params)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_lm["indexer"]))
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_kl["main"]))
    # ... and each loss does reach its own side.
    assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g_lm["main"])) > 0
    assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g_kl["indexer"])) > 0


def test_warmup_trains_only_the_indexer():
    cfg, _, state, step = _setup("warmup")
    before = jax.tree.map(np.asarray, state.params["main"])
    bias_before = jax.tree.map(np.asarray, state.router_bias)
    idx_before = jax.tree.map(np.asarray, state.params["indexer"])
    assert list(state.opt) == ["indexer"]  # no moments for frozen parameters
    n_idx = len(jax.tree.leaves(state.params["indexer"]))
    mu = [x for x in jax.tree.leaves(state.opt["indexer"]) if getattr(x, "ndim", 0) > 0]
    assert len(mu) == 2 * n_idx  # Adam's mu and nu, for indexer parameters only
    for i in range(3):
        state, metrics = step(state, _batch(i))
    assert float(metrics["indexer_kl"].sum()) > 0 and "lm_loss" not in metrics
    same = jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), before, state.params["main"])
    assert all(jax.tree.leaves(same))
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), bias_before,
                                            state.router_bias)))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), idx_before, state.params["indexer"])
    assert all(jax.tree.leaves(changed))


def test_sparse_step_updates_both_groups_and_reports_metrics():
    _, _, state, step = _setup("sparse")
    state2, m = step(state, _batch())
    for key in ("lm_loss", "indexer_kl", "captured_mass", "k90", "grad_norm/main", "grad_norm/indexer",
                "lr/main", "lr/indexer", "moe_max_violation", "router_bias_norm"):
        assert key in m, key
    assert int(state2.step) == 1 and sorted(state2.opt) == ["indexer", "main"]


def test_nonfinite_loss_skips_the_update():
    _, _, state, step = _setup("dense")
    poisoned = jax.tree.map(lambda x: x, state.params)
    emb = poisoned["main"]["model"]["embed_tokens"]["weight"]
    emb[...] = emb[...].at[5].set(jnp.nan)
    state = state._replace(params=poisoned)
    batch = _batch()
    batch["tokens"] = batch["tokens"].at[0, 3].set(5)
    new, m = step(state, batch)
    assert int(m["skipped"]) == 1 and int(new.nonfinite) == 1 and int(new.step) == 0
    a = np.asarray(state.params["main"]["model"]["norm"]["weight"][...])
    b = np.asarray(new.params["main"]["model"]["norm"]["weight"][...])
    assert np.array_equal(a, b)


def test_bias_rule_balances_a_skewed_router_and_gates_ignore_bias():
    rng = np.random.default_rng(0)
    n, e, d = 512, 8, 16
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(e, d)).astype(np.float32) * 0.3
    w[0] += 0.8 * x.mean(0) / np.linalg.norm(x.mean(0))  # experts 0 and 1 attract most tokens
    w[1] += 0.6 * x.mean(0) / np.linalg.norm(x.mean(0))
    logits = jnp.asarray(x @ w.T)
    bias = jnp.zeros(e)
    violations = []
    for _ in range(200):
        gates, idx, scores = moe_ops.route(logits, bias, top_k=2, n_group=2, topk_group=2,
                                           norm_topk_prob=True, routed_scaling_factor=2.5)
        load = moe_ops.expert_counts(idx, e)
        violations.append(float(load.max() / load.mean() - 1))
        bias = bias + 0.01 * jnp.sign(load.mean() - load)
    assert violations[-1] < 0.5 * violations[0]
    # gates: the unbiased affinities of the chosen experts, normalized, times the scale
    s = jax.nn.sigmoid(logits)
    want = jnp.take_along_axis(s, idx, -1)
    want = want / want.sum(-1, keepdims=True) * 2.5
    np.testing.assert_allclose(np.asarray(gates), np.asarray(want), rtol=1e-6)


def test_router_bias_state_is_updated_by_the_rule_in_training():
    _, _, state, step = _setup("dense", "train.moe_bias_update_rate=0.01")
    new, m = step(state, _batch())
    (path, var), = nnx.to_flat_state(new.router_bias)
    load = np.asarray(m["expert_load"][0])
    np.testing.assert_allclose(np.asarray(var[...]), 0.01 * np.sign(load.mean() - load), atol=1e-7)


def test_grad_accumulation_matches_full_batch():
    _, _, state_a, step_a = _setup("dense", "train.grad_accum=2", "train.moe_bias_update_rate=0.0",
                                     "train.moe_balance_loss_alpha=0.0")
    _, _, _, step_1 = _setup("dense", "train.grad_accum=1", "train.moe_bias_update_rate=0.0",
                             "train.moe_balance_loss_alpha=0.0")
    batch = _batch()
    batch["segment_ids"] = jnp.ones_like(batch["segment_ids"])  # equal token counts per micro-batch
    batch["loss_weights"] = jnp.ones_like(batch["loss_weights"])
    _, m_a = step_a(state_a, batch)
    _, m_1 = step_1(state_a, batch)
    np.testing.assert_allclose(float(m_a["grad_norm/main"]), float(m_1["grad_norm/main"]), rtol=2e-4)


@pytest.mark.parametrize("stage", ["dense", "warmup", "sparse"])
def test_grad_accumulation_with_unequal_loss_weights_equals_one_big_batch(stage):
    """grad_accum = 4 over four rows whose weighted-target counts differ (answer-token weights, as
    the synthetic task's) and whose valid-query counts differ (padding): loss and gradients equal
    one batch of the four rows (fp32) in every stage, with the MTP loss and the indexer KL (dense in
    the warm-up, sparse in the sparse stage) normalized by the whole batch's counts."""
    rows, seq = 4, 24
    rng = np.random.default_rng(3)
    seg = np.ones((rows, seq), np.int32)
    seg[1, 10:] = 2
    seg[3, 18:] = 0
    seg[2, 12:] = 0
    weights = np.zeros((rows, seq), np.float32)
    for r, n in enumerate((2, 20, 5, 11)):  # a different number of weighted targets per row
        weights[r, rng.choice(seq - 1, n, replace=False)] = rng.uniform(0.5, 2.0, n)
    batch = {"tokens": jnp.asarray(np.where(seg > 0, rng.integers(4, 512, (rows, seq)), 0).astype(np.int32)),
             "segment_ids": jnp.asarray(seg), "loss_weights": jnp.asarray(weights * (seg > 0))}
    results = []
    for accum in (4, 1):
        cfg = load_config("configs/tiny.yaml", [f"train.stage={stage}", f"train.batch_size={rows}",
                                                f"train.seq_len={seq}", f"train.grad_accum={accum}",
                                                "model.compute_dtype=float32", "model.index_topk=8",
                                                "model.num_nextn_predict_layers=1", "train.mtp_loss_weight=0.7",
                                                "train.indexer_loss_weight=1.3", "train.moe_bias_update_rate=0.0"])
        graphdef, params, bias = S.split_model(create_model(cfg.model, seed=5))
        opt = {g: make_optimizer(getattr(cfg.train, g), cfg.train.steps) for g in S.GROUPS}
        txs, scheds = {g: o[0] for g, o in opt.items()}, {g: o[1] for g, o in opt.items()}
        step_metrics = {}
        if stage == "dense":  # the train step itself (the same code for every stage), once
            state = S.init_state(cfg, params, bias, txs)
            _, step_metrics = jax.jit(S.make_train_step(graphdef, cfg, txs, scheds, S.forward_mode(cfg)))(state,
                                                                                                         batch)
        mode = S.forward_mode(cfg)
        totals = S.step_totals(batch, cfg.model.num_nextn_predict_layers)
        trained_groups = S.TRAINABLE[stage]
        frozen = {g: p for g, p in params.items() if g not in trained_groups}
        loss_fn = lambda tr, b: S._loss_and_metrics(graphdef, cfg, mode, tr, frozen, bias, b, totals, accum)  # noqa
        (loss, (metrics, _)), grads = jax.jit(lambda tr: S._accumulate(jax.value_and_grad(loss_fn, has_aux=True),
                                                                       tr, batch, accum))(
            {g: params[g] for g in trained_groups})
        results.append((metrics, step_metrics, float(loss), jax.tree.leaves(grads)))
    (m4, step4, loss4, g4), (m1, step1, loss1, g1) = results
    compared = {"dense": ("lm_loss", "accuracy", "mtp_loss", "mtp_accuracy"), "warmup": ("indexer_kl", "mtp_indexer_kl"),
                "sparse": ("lm_loss", "mtp_loss", "indexer_kl", "mtp_indexer_kl")}[stage]
    for name in ("loss", *compared):
        np.testing.assert_allclose(np.asarray(m4[name]), np.asarray(m1[name]), rtol=2e-4, atol=1e-7, err_msg=name)
    for name in ("loss", *compared[:2], "grad_norm/main") if step1 else ():
        np.testing.assert_allclose(float(step4[name]), float(step1[name]), rtol=2e-4, err_msg=name)
    np.testing.assert_allclose(loss4, loss1, rtol=2e-4, atol=1e-7)
    for a, b in zip(g4, g1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * np.abs(np.asarray(b)).max())
