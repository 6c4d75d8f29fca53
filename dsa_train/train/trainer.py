"""The training loop: build the model and state, feed batches, log, checkpoint, stop cleanly.

`train(config)` runs one stage (config.train.stage) in config.train.run_dir. The step itself lives
in `step.py`; this file is the bookkeeping around it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import yaml
from flax import nnx

from dsa_train.checkpoint.manager import (MODEL_KEY, RunCheckpointer, abstract_tree, fill_states, from_pure_tree,
                                          load_model_for_init, resolve_start, to_pure_tree)
from dsa_train.checkpoint.preemption import PreemptionGuard
from dsa_train.config import Config, to_dict
from dsa_train.flops import train_flops_per_token
from dsa_train.kernels.dispatch import resolve_impl
from dsa_train.train import step as step_lib
from dsa_train.train.metrics import MetricsWriter, summarize
from dsa_train.train.optim import make_optimizer

# Dense bf16 peak per device, for MFU. Devices not listed (CPUs) report achieved TFLOP/s only.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "TPU v5p": 459e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU v4": 275e12}


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite losses, bad data): reported as one clear line."""


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    last_metrics: dict
    stopped_early: bool = False


def device_peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def _write_config(run_dir: Path, config: Config) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def checkpoint_tree(state: step_lib.TrainState) -> dict:
    """The train state as checkpoints store it: plain dicts, the whole model (parameters of both
    groups + router biases: what the next stage inherits) under MODEL_KEY."""
    model = nnx.merge_state(state.params["main"], state.params["indexer"], state.router_bias)
    return {MODEL_KEY: to_pure_tree(model), "opt": to_pure_tree(state.opt), "step": state.step,
            "nonfinite": state.nonfinite}


def model_from_tree(template: step_lib.TrainState, model_tree: dict) -> tuple[dict, object]:
    """(params by group, router biases) with `template`'s structure and `model_tree`'s values."""
    main, indexer, router_bias = fill_states(model_tree, template.params["main"], template.params["indexer"],
                                             template.router_bias)
    return {"main": main, "indexer": indexer}, router_bias


def state_from_tree(template: step_lib.TrainState, tree: dict) -> step_lib.TrainState:
    params, router_bias = model_from_tree(template, tree[MODEL_KEY])
    return step_lib.TrainState(tree["step"], params, router_bias, from_pure_tree(template.opt, tree["opt"]),
                               tree["nonfinite"])


class _NoWriter:
    """Metrics are written by process 0 only."""

    def write(self, step: int, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def train(config: Config, console: bool = True) -> RunResult:
    t = config.train
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(run_dir, config)

    from dsa_train.data.pipeline import make_train_iterator
    from dsa_train import parallel
    from dsa_train.parallel.sharding import batch_sharding, put_batch
    from dsa_train.parallel.state import (abstract_train_state, init_train_state, jit_train_step, model_graphdef,
                                          reinit_optimizer)

    # The mesh and the logical-axis rules decide where every array lives (dsa_train/parallel).
    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.resolve_rules(config.mesh.rules)
    optimizers, schedules = {}, {}
    for group in step_lib.GROUPS:
        optimizers[group], schedules[group] = make_optimizer(getattr(t, group), t.steps)
    # Built abstractly (shapes and shardings only): a resumed or initialized-from state is read
    # straight into its sharded arrays, and only a fresh start generates random weights (sharded).
    graphdef = model_graphdef(config)
    abstract_state, state_shardings = abstract_train_state(config, optimizers, mesh, rules)
    data = make_train_iterator(config.data, batch_size=t.batch_size, seq_len=t.seq_len,
                               vocab_size=config.model.vocab_size, seed=t.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
    start_step = 0
    # checkpoint integration point: resume (own run) > init_from (another run / converted HF) > random
    checkpointer = RunCheckpointer(run_dir, config.checkpoint, to_dict(config))
    start = resolve_start(run_dir, config.checkpoint)
    if start.kind == "resume":
        checkpointer.check_compatible(to_dict(config), start.step)
        restored = checkpointer.restore(start.step, abstract_tree(checkpoint_tree(abstract_state)))
        state = state_from_tree(abstract_state, restored.train_state)
        if restored.data_state is not None:
            data.set_state(restored.data_state)
        start_step = start.step
    elif start.kind == "init_from":
        model_tree = load_model_for_init(start.path, abstract_tree(checkpoint_tree(abstract_state)[MODEL_KEY]),
                                         model_config_dict=to_dict(config.model))
        params, router_bias = model_from_tree(abstract_state, model_tree)
        del model_tree  # its arrays are donated to the new state: no second copy stays alive
        state = reinit_optimizer(config, params, router_bias, optimizers, state_shardings)  # fresh optimizer, step 0
        del params, router_bias
    else:
        state = init_train_state(config, optimizers, mesh, rules)[1]
    if console:
        print(f"{t.stage}: {start.describe()}")

    mode = step_lib.forward_mode(config, kernels=resolve_impl(config.model.kernels))
    step_fn = jit_train_step(step_lib.make_train_step(graphdef, config, optimizers, schedules, mode), state_shardings,
                             mesh, rules, t.batch_size, t.seq_len)
    batch_sh = batch_sharding(mesh, rules, t.batch_size, t.seq_len)
    # Tracing happens inside this scope: remat policy, activation constraints, expert/context parallel ops.
    scope = parallel.activate(mesh, rules, remat=t.remat, expert_capacity=config.mesh.expert_capacity)
    flops_per_token = train_flops_per_token(config.model, t.seq_len, t.stage)
    peak = device_peak_flops(jax.devices()[0])
    tokens_per_step = t.batch_size * t.seq_len
    heldout = None  # every train.eval_every steps: indexer diagnostics on held-out batches
    if t.eval_every:
        from dsa_train.eval.heldout import HeldoutIndexerEval

        heldout = HeldoutIndexerEval(config, resolve_impl(config.model.kernels))

    writer = MetricsWriter(run_dir, t.steps, t.stage, console=console) if jax.process_index() == 0 else _NoWriter()
    last, stopped_early = {}, False
    tick, ticked_steps = None, 0
    step = start_step
    guard = PreemptionGuard().install()
    scope.__enter__()
    try:
        for step in range(start_step + 1, t.steps + 1):
            batch = put_batch(next(data), batch_sh, t.batch_size)  # this process's rows -> global arrays
            state, metrics = step_fn(state, batch)
            # Steps that save or stop are always logged, before their checkpoint is written: the
            # metrics of a resumed run have no hole.
            stop, save = guard.should_stop(step), checkpointer.should_save(step)
            evaluate = heldout is not None and (step % t.eval_every == 0 or step == t.steps)
            if step % t.log_every and step != t.steps and not (stop or save or evaluate):
                continue
            record = summarize(jax.device_get(metrics))
            now = time.perf_counter()
            if tick is not None:  # the first interval includes compilation: not timed
                dt = (now - tick) / (step - ticked_steps)
                record["step_time"] = dt
                record["tok/s"] = tokens_per_step / dt
                record["tflops_per_device"] = flops_per_token * tokens_per_step / dt / jax.device_count() / 1e12
                if peak:
                    record["mfu"] = record["tflops_per_device"] * 1e12 / peak
            tick, ticked_steps = now, step
            if evaluate:
                record.update(heldout(step_lib.merge_model(graphdef, state.params, state.router_bias)))
                tick = time.perf_counter()  # evaluation time is not step time
            writer.write(step, record)
            last = record
            if int(state.nonfinite) >= t.max_nonfinite_steps:
                raise TrainingError(f"stopping at step {step}: {t.max_nonfinite_steps} consecutive steps had a "
                                    "non-finite loss or gradient (updates were skipped); lower the learning rate "
                                    "or check the data")
            # checkpoint integration point: periodic save (async) and preemption check
            if save:
                checkpointer.save(step, checkpoint_tree(state), data.get_state())
            if stop:
                break
            mass_key = "heldout/captured_mass" if heldout is not None else "captured_mass"
            if (t.stage == "warmup" and t.stop_at_captured_mass > 0 and record.get(mass_key)
                    and None not in record[mass_key] and min(record[mass_key]) >= t.stop_at_captured_mass):
                stopped_early = True
                writer.write(step, {"stopped_early": True, "reason": f"{mass_key} >= "
                                    f"{t.stop_at_captured_mass} in every layer"})
                break
        # checkpoint integration point: final save (also after a preemption or an early stop)
        checkpointer.save(step, checkpoint_tree(state), data.get_state(), force=True)
    finally:
        scope.__exit__(None, None, None)
        guard.uninstall()
        checkpointer.close()  # waits until the last save is committed
        writer.close()
    if guard.reason:
        print(guard.message(step))
    (run_dir / "summary.json").write_text(json.dumps({"stage": t.stage, "steps": step, "last": last,
                                                       "stopped_early": stopped_early}, indent=1))
    return RunResult(run_dir, step, last, stopped_early)
