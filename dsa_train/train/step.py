"""The train step: one pure function from (state, batch) to (state, metrics), jitted by the trainer.

Stages (config.train.stage):
- dense:  all parameters but the indexers train on the LM loss with dense attention.
- warmup: only the indexers train, on KL(dense head-summed attention || softmax(indexer)); dense
          attention; no LM head, no cross-entropy. Frozen parameters are closed over, not
          differentiated, and get no optimizer state.
- sparse: everything trains with top-k attention; the LM loss reaches only the main model and the
          sparse KL only the indexers (the indexer's inputs are detached inside the model).
The MTP depths (model.num_nextn_predict_layers) follow the same rules: their parameters belong to
the main group (their indexers to the indexer group), and their cross-entropy on the token k+1
ahead, weighted by train.mtp_loss_weight, joins the LM loss wherever the LM loss is computed.
After every step the MoE selection biases move toward balance: b += gamma * sign(mean - load).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsa_train.config import Config
from dsa_train.model import CausalLM, ForwardMode
from dsa_train.model.layers import RouterBias
from dsa_train.model.mtp import mtp_inputs, mtp_loss_and_accuracy
from dsa_train.ops.losses import moe_sequence_balance_loss, token_nll, valid_queries, weighted_lm_targets
from dsa_train.ops.masks import document_positions
from dsa_train.parallel import context_parallel

GROUPS = ("main", "indexer")
TRAINABLE = {"dense": ("main",), "warmup": ("indexer",), "sparse": ("main", "indexer")}
INDEXER_PARAMS = nnx.All(nnx.Param, nnx.PathContains("indexer"))


class TrainState(NamedTuple):
    step: jnp.ndarray  # int32 scalar: optimizer steps taken in this stage
    params: dict  # group name -> nnx.State of that group's parameters (trained or frozen)
    router_bias: Any  # nnx.State of the MoE selection biases
    opt: dict  # trained group name -> optax state (frozen groups have none)
    nonfinite: jnp.ndarray  # int32: consecutive skipped (non-finite) steps


def split_model(model: CausalLM):
    """graphdef and the state parts the trainer handles separately."""
    graphdef, indexer, main, bias = nnx.split(model, INDEXER_PARAMS, nnx.Param, RouterBias)
    return graphdef, {"main": main, "indexer": indexer}, bias


def merge_model(graphdef, params: dict, router_bias) -> CausalLM:
    return nnx.merge(graphdef, params["indexer"], params["main"], router_bias)


def forward_mode(config: Config, diagnostics: bool = True) -> ForwardMode:
    stage = config.train.stage
    return ForwardMode(
        attention="sparse" if stage == "sparse" else "dense",
        indexer_loss=stage != "dense",
        logits=stage != "warmup",
        diagnostic_rows=config.train.diagnostic_rows if (diagnostics and stage != "dense") else 0,
    )


def init_state(config: Config, params: dict, router_bias, optimizers: dict) -> TrainState:
    trained = TRAINABLE[config.train.stage]
    opt = {g: optimizers[g].init(params[g]) for g in trained}
    return TrainState(jnp.zeros((), jnp.int32), params, router_bias, opt, jnp.zeros((), jnp.int32))


def model_inputs(batch: dict) -> dict:
    """The batch as the model and the LM loss read it, every entry [B, S] in the row's order:
    tokens, segment ids, RoPE positions (the batch's, else each document's), next-token targets and
    their weights (no target across a document boundary or into padding; the batch's loss_weights
    applied). Built before any reordering of the sequence: a token's target is the next token of
    the row, wherever the layout puts either."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    positions = batch.get("positions")
    targets, weights = weighted_lm_targets(tokens, seg, batch.get("loss_weights"))
    return {"tokens": tokens, "segment_ids": seg,
            "positions": document_positions(seg) if positions is None else positions,
            "targets": targets, "target_weights": weights}


def step_totals(batch: dict, depth: int = 0) -> dict:
    """The counts the token-mean losses of a (micro-)batch divide by: its weighted next-token
    targets ("targets"), valid (non-padding) queries of the indexer KL ("queries") and, per MTP
    depth, that depth's weighted targets ("mtp"). With micro-batches every one divides by the whole
    step's, so that their sums are the big batch's figures whatever the loss weights."""
    inputs = model_inputs(batch)
    totals = {"targets": inputs["target_weights"].sum(), "queries": valid_queries(inputs["segment_ids"]).sum()}
    if depth:
        mtp = mtp_inputs(inputs["tokens"], inputs["targets"], inputs["target_weights"], depth)
        totals["mtp"] = tuple(mtp[f"mtp_weights_{k}"].sum() for k in range(1, depth + 1))
    return totals


def _loss_and_metrics(graphdef, config: Config, mode: ForwardMode, trained: dict, frozen: dict, router_bias,
                      batch: dict, totals: dict | None = None, accum: int = 1):
    """The loss of one (micro-)batch and its metrics. Every term that is a mean over tokens (LM and
    MTP cross-entropy and accuracy over weighted targets, the indexer KL over valid queries) is this
    batch's sum divided by ``totals``, the whole step's counts (:func:`step_totals`; default: this
    batch's own), so that the micro-batches of a step add up to the big batch's figure; the
    per-sequence terms (balance loss) and the diagnostics are this batch's mean divided by
    ``accum``, the number of micro-batches (see :func:`_accumulate`)."""
    t = config.train
    model = merge_model(graphdef, {**frozen, **trained}, router_bias)
    inputs = model_inputs(batch)
    depth = config.model.num_nextn_predict_layers
    if depth:  # shifted before any reordering, like the next-token targets
        inputs.update(mtp_inputs(inputs["tokens"], inputs["targets"], inputs["target_weights"], depth))
    own_queries = valid_queries(inputs["segment_ids"]).sum()
    if totals is None:
        totals = {"targets": inputs["target_weights"].sum(), "queries": own_queries}
    # The model's indexer KL is this batch's mean over its valid queries: its share of the step's.
    query_share = own_queries / jnp.maximum(totals["queries"], 1.0)
    # mesh.context_order: under context parallelism the rows may be laid out zig-zag over the
    # shards (one reorder of the [B, S] inputs here); every loss below is a sum over tokens.
    with context_parallel.laid_out(config.mesh.context_order, inputs["tokens"].shape[1]) as lay_out:
        inputs = {name: lay_out(x) for name, x in inputs.items()}
        out = model(inputs["tokens"], inputs["segment_ids"], inputs["positions"], mode,
                    mtp_tokens=tuple(inputs[f"mtp_tokens_{k}"] for k in range(1, depth + 1)) or None)
    seg, targets, weights = inputs["segment_ids"], inputs["targets"], inputs["target_weights"]
    per_batch = {}  # this batch's means, divided by accum below
    token_means = {}  # already divided by the step's counts
    per_sequence_loss = jnp.zeros((), jnp.float32)
    loss = jnp.zeros((), jnp.float32)
    if mode.logits:
        denominator = jnp.maximum(totals["targets"], 1.0)
        lm = (token_nll(out.logits, targets) * weights).sum() / denominator
        correct = (jnp.argmax(out.logits, -1) == targets).astype(jnp.float32)
        token_means.update(lm_loss=lm, accuracy=(correct * weights).sum() / denominator)
        loss = loss + lm
        if out.moe and t.moe_balance_loss_alpha > 0:
            valid = (seg != 0).astype(jnp.float32)
            balance = sum(moe_sequence_balance_loss(s.scores, s.expert_idx, valid, t.moe_balance_loss_alpha)
                          for s in out.moe)
            per_batch["balance_loss"] = balance
            per_sequence_loss = per_sequence_loss + balance
    if out.mtp is not None and mode.logits:
        mtp_loss, mtp_accuracy = mtp_loss_and_accuracy(out.mtp.logits, inputs, totals.get("mtp"))
        token_means.update(mtp_loss=mtp_loss, mtp_accuracy=mtp_accuracy)
        loss = loss + t.mtp_loss_weight * mtp_loss
    if mode.indexer_loss:
        token_means["indexer_kl"] = out.indexer_loss * query_share  # [L]
        loss = loss + t.indexer_loss_weight * token_means["indexer_kl"].sum()
        if out.mtp is not None:
            token_means["mtp_indexer_kl"] = out.mtp.indexer_loss * query_share  # [D]
            loss = loss + t.indexer_loss_weight * token_means["mtp_indexer_kl"].sum()
    per_batch.update(out.diagnostics)  # [L] each
    metrics = {name: value / accum for name, value in per_batch.items()}
    metrics.update(token_means)
    loss = loss + per_sequence_loss / accum
    counts = jnp.stack([s.expert_counts for s in out.moe]) if out.moe else jnp.zeros((0, 1))
    metrics["loss"] = loss
    return loss, (metrics, counts)


def _accumulate(grad_fn, trained, batch: dict, accum: int):
    """Sum losses, gradients and metrics over `accum` micro-batches (sequentially, to bound memory);
    each micro-batch's terms are already scaled so that the sums are the whole batch's figures."""
    if accum == 1:
        return grad_fn(trained, batch)
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def body(carry, mb):
        (loss, (metrics, counts)), grads = grad_fn(trained, mb)
        return jax.tree.map(jnp.add, carry, (loss, metrics, counts, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    rest = jax.tree.map(lambda x: x[1:], micro)
    (loss, (metrics, counts)), grads = grad_fn(trained, first)
    carry, _ = jax.lax.scan(body, (loss, metrics, counts, grads), rest)
    loss, metrics, counts, grads = carry
    return (loss, (metrics, counts)), grads


def update_router_bias(router_bias, counts: jnp.ndarray, rate: float):
    """b_i += rate * sign(mean_load - load_i), per MoE layer (counts [L_moe, E], layer order).
    A bias is one layer's [E] or, with model.scan_layers, a stack's [layers, E]: each takes its
    rows of ``counts`` in turn."""
    flat = sorted(nnx.to_flat_state(router_bias), key=lambda kv: kv[0])
    updated, row = [], 0
    for path, var in flat:
        layers = var[...].size // counts.shape[-1]
        load = counts[row:row + layers].reshape(var[...].shape)
        row += layers
        delta = rate * jnp.sign(load.mean(-1, keepdims=True) - load)
        updated.append((path, var.replace(var[...] + delta)))
    return nnx.from_flat_state(updated)


def make_train_step(graphdef, config: Config, optimizers: dict, schedules: dict, mode: ForwardMode):
    t = config.train
    trained_groups = TRAINABLE[t.stage]

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        trained = {g: state.params[g] for g in trained_groups}
        frozen = {g: p for g, p in state.params.items() if g not in trained_groups}
        # With micro-batches the token-mean losses divide by the whole batch's counts (a single
        # batch divides by its own: the same counts).
        totals = step_totals(batch, config.model.num_nextn_predict_layers) if t.grad_accum > 1 else None
        loss_fn = lambda tr, b: _loss_and_metrics(graphdef, config, mode, tr, frozen, state.router_bias, b,  # noqa
                                                  totals, t.grad_accum)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (metrics, counts)), grads = _accumulate(grad_fn, trained, batch, t.grad_accum)

        new_params, new_opt = dict(state.params), {}
        finite = jnp.isfinite(loss)
        for g in trained_groups:
            norm = optax.tree.norm(grads[g])
            metrics[f"grad_norm/{g}"] = norm
            metrics[f"lr/{g}"] = schedules[g](state.step)
            finite = finite & jnp.isfinite(norm)
        for g in trained_groups:
            updates, opt = optimizers[g].update(grads[g], state.opt[g], state.params[g])
            new_params[g] = optax.apply_updates(state.params[g], updates)
            new_opt[g] = opt
        router_bias = state.router_bias
        # The warm-up freezes the whole main model, routing included.
        if counts.shape[0] and t.moe_bias_update_rate > 0 and t.stage != "warmup":
            router_bias = update_router_bias(router_bias, counts, t.moe_bias_update_rate)
        if counts.shape[0]:
            load = counts / jnp.maximum(counts.mean(-1, keepdims=True), 1e-9)
            metrics["moe_max_violation"] = load.max(-1) - 1.0  # [L_moe]
            metrics["router_bias_norm"] = jnp.sqrt(sum(jnp.sum(v[...] ** 2) for _, v in nnx.to_flat_state(router_bias)))

        # A non-finite loss or gradient skips the update entirely (parameters, moments, biases).
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + finite.astype(jnp.int32),
            params=keep(new_params, state.params),
            router_bias=keep(router_bias, state.router_bias),
            opt=keep(new_opt, state.opt),
            nonfinite=jnp.where(finite, 0, state.nonfinite + 1),
        )
        metrics["skipped"] = (~finite).astype(jnp.int32)
        metrics["expert_load"] = counts
        return new_state, metrics

    return train_step
