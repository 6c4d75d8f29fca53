"""The training loop: build the model and state, feed batches, log, checkpoint, stop cleanly.

`train(config)` runs one stage (config.train.stage) in config.train.run_dir. The step itself lives
in `step.py`; this file is the bookkeeping around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import yaml
from flax import nnx

from dsa_train.checkpoint.manager import (CHECKPOINTS_DIR, MODEL_KEY, CheckpointError, RunCheckpointer,
                                          abstract_tree, checkpoint_failures_reported_once, fill_states,
                                          from_pure_tree, load_model_for_init, one_line, resolve_start,
                                          set_aside_uncommitted, sync_processes, to_pure_tree)
from dsa_train.checkpoint.preemption import PreemptionGuard
from dsa_train.checkpoint.run_lock import RunLock
from dsa_train.config import Config, to_dict
from dsa_train.flops import train_flops_per_token
from dsa_train.paths import AnyPath, remove_tree, run_path
from dsa_train.train import step as step_lib
from dsa_train.train.console import log_startup
from dsa_train.train.metrics import MetricsWriter, summarize
from dsa_train.train.optim import make_optimizer
from dsa_train.train.runtime import StepProfiler, enable_compile_cache

# Dense bf16 peak per device, for MFU. Devices not listed (CPUs) report achieved TFLOP/s only.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "TPU v5p": 459e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU v4": 275e12}


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite losses, bad data): reported as one clear line."""


@dataclass
class RunResult:
    run_dir: AnyPath
    steps: int
    last_metrics: dict
    stopped_early: bool = False
    preempted: bool = False  # stopped by SIGTERM / a preemption notice, after saving


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


def model_initializer(config: Config):
    """``{key: ShapeDtypeStruct with sharding} -> {key: array}``: those parameters of the model
    ('model/layers/3/self_attn/indexer/wk/weight' keys) as a random initialization of this run
    draws them, each generated in place on its devices. The whole model's initializer is traced,
    and XLA drops what is not returned: only the requested arrays are computed."""
    from dsa_train.model import create_model

    def init(abstract: dict) -> dict:
        def build():
            state = nnx.to_flat_state(nnx.state(create_model(config.model, seed=config.train.seed)))
            values = {"/".join(str(k) for k in path): variable.get_value() for path, variable in state}
            return {key: values[key].astype(x.dtype) for key, x in abstract.items()}

        return jax.jit(build, out_shardings={key: x.sharding for key, x in abstract.items()})()

    return init


class _NoWriter:
    """Metrics are written by process 0 only."""

    def write(self, step: int, record: dict) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


def _drop_replayed_metrics(path: Path, start_step: int) -> None:
    """Keep the records of steps up to ``start_step`` only: a run killed after its last checkpoint
    had logged steps that the resumed run does again, and each step gets one record."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= start_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by the kill
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)  # atomic: a second kill here leaves one file or the other, whole


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def train(config: Config, console: bool = True) -> RunResult:
    """Run one stage in ``config.train.run_dir``, holding the run directory's lock throughout.

    Until the run is accepted (its start point is resolved and loaded), a failure leaves nothing
    this call created: no run directory, no ``config.yaml``, no empty ``checkpoints/``."""
    run_dir = run_path(config.train.run_dir)  # a URI stays a URI (dsa_train.paths)
    created_run_dir = not run_dir.exists()
    created_checkpoints = not (run_dir / CHECKPOINTS_DIR).exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = None
    accepted = []  # set (appended to) by _train once the run is accepted
    try:
        if jax.process_index() == 0:
            lock = RunLock(run_dir).acquire()
        with checkpoint_failures_reported_once():
            return _train(config, console, run_dir, accepted)
    except BaseException:
        # Only the lock holder cleans up: a refused second job must not touch the first one's files.
        if not accepted and lock is not None:
            if created_run_dir:
                remove_tree(run_dir)
            elif created_checkpoints and (run_dir / CHECKPOINTS_DIR).is_dir():
                with contextlib.suppress(OSError, ValueError):  # epath: ValueError if not empty
                    (run_dir / CHECKPOINTS_DIR).rmdir()  # only if empty
        raise
    finally:
        if lock is not None:
            lock.release(remove=not accepted and lock.created)


def _train(config: Config, console: bool, run_dir: Path, accepted: list) -> RunResult:
    t = config.train
    if t.compile_cache_dir:
        enable_compile_cache(t.compile_cache_dir)
    from dsa_train.data.pipeline import make_train_iterator
    from dsa_train import parallel
    from dsa_train.parallel.sharding import batch_sharding, put_batch
    from dsa_train.parallel.state import (abstract_train_state, init_train_state, jit_train_step, model_graphdef,
                                          reinit_optimizer)

    if jax.process_index() == 0:
        for line in set_aside_uncommitted(run_dir):
            _warn(line)
    sync_processes("dsa_train: uncommitted checkpoints set aside")
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
    shard_index, shard_count = parallel.data_shard(mesh)  # processes of one row group load the same rows
    data = make_train_iterator(config.data, batch_size=t.batch_size, seq_len=t.seq_len,
                               vocab_size=config.model.vocab_size, seed=t.seed,
                               shard_index=shard_index, shard_count=shard_count)
    start_step = 0
    saved_step = None  # the newest checkpoint of this run, all of whose steps were finite
    # Initial weights: resume (own run) > init_from (another run / converted HF) > random
    checkpointer = RunCheckpointer(run_dir, config.checkpoint, to_dict(config))
    try:
        start = resolve_start(run_dir, config.checkpoint)
        if start.kind == "resume":
            restored, skipped = checkpointer.restore_latest_usable(to_dict(config),
                                                                   abstract_tree(checkpoint_tree(abstract_state)))
            for line in skipped:
                _warn(line)
            state = state_from_tree(abstract_state, restored.train_state)
            if restored.data_state is not None:
                data.set_state(restored.data_state)
            start_step = saved_step = restored.step
            start = dataclasses.replace(start, step=restored.step)
        elif start.kind == "init_from":
            model_tree = load_model_for_init(start.path, abstract_tree(checkpoint_tree(abstract_state)[MODEL_KEY]),
                                             model_config_dict=to_dict(config.model),
                                             init_missing=model_initializer(config))
            params, router_bias = model_from_tree(abstract_state, model_tree)
            del model_tree  # its arrays are donated to the new state: no second copy stays alive
            state = reinit_optimizer(config, params, router_bias, optimizers, state_shardings)  # fresh optimizer, step 0
            del params, router_bias
        else:
            state = init_train_state(config, optimizers, mesh, rules)[1]
        # Accepted: from here on the run directory is this run's.
        accepted.append(True)
        if jax.process_index() == 0:
            _write_config(run_dir, config)
            _drop_replayed_metrics(run_dir / "metrics.jsonl", start_step)
        if console:
            print(f"{t.stage}: {start.describe()}")
            if jax.process_index() == 0:
                log_startup(config, mesh, state, start.describe(), run_dir)
        return _loop(config, console, run_dir, graphdef, state, state_shardings, optimizers, schedules, data,
                     checkpointer, start_step, saved_step, mesh, rules, put_batch, batch_sharding, jit_train_step)
    finally:
        checkpointer.close()  # on every exit path: waits until the last save is committed


def _loop(config, console, run_dir, graphdef, state, state_shardings, optimizers, schedules, data, checkpointer,
          start_step, saved_step, mesh, rules, put_batch, batch_sharding, jit_train_step) -> RunResult:
    from dsa_train import parallel

    t = config.train
    mode = step_lib.forward_mode(config)
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

        heldout = HeldoutIndexerEval(config)

    def healthy_checkpoint() -> str:
        if saved_step is None:
            return "this run has no healthy checkpoint"
        return f"the last healthy checkpoint is step {saved_step}"

    def saves_failed(step: int, action=None) -> None:
        """Run ``action`` (a save, the final wait) and surface a failed background save: the run
        stops at once rather than training on without checkpoints."""
        try:
            if action is not None:
                action()
            checkpointer.check_for_errors()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - Orbax / TensorStore raise ValueError, OSError, ...
            raise TrainingError(_write_failure(step, e, checkpointer.latest_step())) from None

    def save(step: int, force: bool = False) -> None:
        if int(state.nonfinite):
            # Skipped steps since the last finite one: resuming from here would restart the streak.
            newest = f"step {saved_step}" if saved_step is not None else "none yet"
            _warn(f"not saving step {step}: inside a run of non-finite steps (newest checkpoint: {newest})")
            return

        def start():
            nonlocal saved_step
            if checkpointer.save(step, checkpoint_tree(state), data.get_state(), force=force):
                saved_step = step

        saves_failed(step, start)

    writer = MetricsWriter(run_dir, t.steps, t.stage, console=console, config=to_dict(config), wandb=t.wandb,
                           wandb_project=t.wandb_project) if jax.process_index() == 0 else _NoWriter()
    last, stopped_early = {}, False
    tick, ticked_steps = None, 0
    step = start_step
    guard = PreemptionGuard().install()
    profiler = StepProfiler(t.profile_steps, run_dir / "profile")
    scope.__enter__()
    loop_start = time.perf_counter()
    try:
        for step in range(start_step + 1, t.steps + 1):
            batch = put_batch(next(data), batch_sh, t.batch_size)  # this process's rows -> global arrays
            profiler.before(step)
            state, metrics = step_fn(state, batch)
            profiler.after(step, metrics)
            if step == start_step + 1:
                jax.block_until_ready(metrics)
                writer.note(f"first step (compilation included): {time.perf_counter() - loop_start:.1f}s")
            saves_failed(step)
            # Steps that save or stop are always logged, before their checkpoint is written: the
            # metrics of a resumed run have no hole.
            stop, save_now = guard.should_stop(step), checkpointer.should_save(step)
            evaluate = heldout is not None and (step % t.eval_every == 0 or step == t.steps)
            if step % t.log_every and step != t.steps and not (stop or save_now or evaluate):
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
                # The weights saved at the step before the streak are the ones that produced it
                # (a step's loss is computed before its update): only older checkpoints are healthy.
                first_bad = step - int(state.nonfinite) + 1
                for line in checkpointer.set_aside_from(first_bad - 1, f"its weights gave a non-finite loss at "
                                                                      f"step {first_bad}"):
                    _warn(line)
                saved_step = checkpointer.latest_step()
                raise TrainingError(f"stopping at step {step}: {t.max_nonfinite_steps} consecutive steps had a "
                                    f"non-finite loss or gradient (updates were skipped); {healthy_checkpoint()}: "
                                    "lower the learning rate or check the data, and run again to resume from it")
            # Periodic save (async) and preemption check
            if save_now:
                save(step)
            if stop:
                break
            mass_key = "heldout/captured_mass" if heldout is not None else "captured_mass"
            if (t.stage == "warmup" and t.stop_at_captured_mass > 0 and record.get(mass_key)
                    and None not in record[mass_key] and min(record[mass_key]) >= t.stop_at_captured_mass):
                stopped_early = True
                writer.write(step, {"stopped_early": True, "reason": f"{mass_key} >= "
                                    f"{t.stop_at_captured_mass} in every layer"})
                break
        # Final save (also after a preemption or an early stop)
        save(step, force=True)
        saves_failed(step, checkpointer.wait)
    finally:
        profiler.stop()
        scope.__exit__(None, None, None)
        guard.uninstall()
        writer.close()
    preempted = guard.reason is not None
    if preempted:
        print(guard.message(step, saved_step) if saved_step is not None else
              f"preempted at step {step}: {guard.reason}; no checkpoint of this run was saved (its steps were "
              "non-finite): run the same command again to start it", flush=True)
    (run_dir / "summary.json").write_text(json.dumps({"stage": t.stage, "steps": step, "last": last,
                                                       "stopped_early": stopped_early, "preempted": preempted},
                                                      indent=1))
    return RunResult(run_dir, step, last, stopped_early, preempted)


def _write_failure(step: int, error: Exception, intact: int | None) -> str:
    where = f"the checkpoint of step {intact} is intact" if intact is not None else "no checkpoint was written"
    return (f"stopping at step {step}: a checkpoint could not be written ({one_line(error)}); {where}: free "
            "space or fix the run directory's permissions, then run the same command to resume")
