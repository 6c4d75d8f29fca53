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
import jax.numpy as jnp
import numpy as np
import yaml

from dsa_train.config import Config, to_dict
from dsa_train.flops import train_flops_per_token
from dsa_train.model import create_model
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


def train(config: Config, console: bool = True) -> RunResult:
    t = config.train
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(run_dir, config)

    from dsa_train.data.pipeline import make_train_iterator
    from dsa_train.kernels_select import resolve_kernels

    model = create_model(config.model, seed=t.seed)
    graphdef, params, router_bias = step_lib.split_model(model)
    del model
    optimizers, schedules = {}, {}
    for group in step_lib.GROUPS:
        optimizers[group], schedules[group] = make_optimizer(getattr(t, group), t.steps)
    state = step_lib.init_state(config, params, router_bias, optimizers)
    data = make_train_iterator(config.data, batch_size=t.batch_size, seq_len=t.seq_len,
                               vocab_size=config.model.vocab_size, seed=t.seed)
    start_step = 0
    # checkpoint integration point: resume (own run) > init_from (another run / converted HF) > random

    mode = step_lib.forward_mode(config, kernels=resolve_kernels(config.model.kernels))
    step_fn = jax.jit(step_lib.make_train_step(graphdef, config, optimizers, schedules, mode), donate_argnums=0)
    flops_per_token = train_flops_per_token(config.model, t.seq_len, t.stage)
    peak = device_peak_flops(jax.devices()[0])
    tokens_per_step = t.batch_size * t.seq_len

    writer = MetricsWriter(run_dir, t.steps, t.stage, console=console)
    last, stopped_early = {}, False
    tick, ticked_steps = None, 0
    try:
        for step in range(start_step + 1, t.steps + 1):
            batch = {k: jnp.asarray(v) for k, v in next(data).items()}
            state, metrics = step_fn(state, batch)
            if step % t.log_every and step != t.steps:
                continue
            record = summarize(jax.device_get(metrics))
            record.pop("expert_load", None)
            now = time.perf_counter()
            if tick is not None:  # the first interval includes compilation: not timed
                dt = (now - tick) / (step - ticked_steps)
                record["step_time"] = dt
                record["tok/s"] = tokens_per_step / dt
                record["tflops_per_device"] = flops_per_token * tokens_per_step / dt / jax.device_count() / 1e12
                if peak:
                    record["mfu"] = record["tflops_per_device"] * 1e12 / peak
            tick, ticked_steps = now, step
            writer.write(step, record)
            last = record
            if int(state.nonfinite) >= t.max_nonfinite_steps:
                raise TrainingError(f"stopping at step {step}: {t.max_nonfinite_steps} consecutive steps had a "
                                    "non-finite loss or gradient (updates were skipped); lower the learning rate "
                                    "or check the data")
            # checkpoint integration point: periodic save and preemption check
            if (t.stage == "warmup" and t.stop_at_captured_mass > 0 and "captured_mass" in record
                    and min(record["captured_mass"]) >= t.stop_at_captured_mass):
                stopped_early = True
                writer.write(step, {"stopped_early": True, "reason": "captured_mass >= "
                                    f"{t.stop_at_captured_mass} in every layer"})
                break
    finally:
        writer.close()
    # checkpoint integration point: final save
    (run_dir / "summary.json").write_text(json.dumps({"stage": t.stage, "steps": step, "last": last,
                                                       "stopped_early": stopped_early}, indent=1))
    return RunResult(run_dir, step, last, stopped_early)
