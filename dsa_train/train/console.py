"""What a run prints: the start-up summary and, when stdout is not a terminal (a batch job's log
file, ``tee``), one plain line per logged step through ``logging`` instead of a progress bar."""

from __future__ import annotations

import logging
import sys

import numpy as np

LINE_KEYS = ("loss", "lm_loss", "indexer_kl", "accuracy")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time of the record (it may be redirected later)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def progress_logger() -> logging.Logger:
    """``dsa_train.progress``: INFO lines with a timestamp on stdout (its own handler, so the
    libraries' loggers keep their levels)."""
    logger = logging.getLogger("dsa_train.progress")
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def interactive() -> bool:
    return sys.stdout.isatty()


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def step_line(stage: str, step: int, total: int, record: dict) -> str:
    """``warmup step 10/100 lm_loss=... indexer_kl=... tok/s=... step_time=0.52s eta=47s``."""
    parts = [f"{stage} step {step}/{total}"]
    for key in LINE_KEYS:
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, list):
            value = [v for v in value if v is not None]
            if not value:
                continue
            value = float(np.mean(value))
        parts.append(f"{key}={value:.4g}")
    if record.get("tok/s"):
        parts.append(f"tok/s={record['tok/s']:.4g}")
    if record.get("step_time"):
        parts.append(f"step_time={record['step_time']:.3g}s eta={_fmt_duration(record['step_time'] * (total - step))}")
    return " ".join(parts)


def _count(tree) -> int:
    import jax

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def startup_lines(config, mesh, state, start_description: str, run_dir) -> list[str]:
    """Platform, processes and devices, mesh, parameters (trained / frozen), run dir, start point."""
    import jax

    trained = {g for g in state.opt}
    n_trained = sum(_count(p) for g, p in state.params.items() if g in trained)
    n_frozen = sum(_count(p) for g, p in state.params.items() if g not in trained)
    device = jax.devices()[0]
    mesh_desc = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
    t = config.train
    return [f"platform {jax.default_backend()} ({device.device_kind}), {jax.process_count()} process(es), "
            f"{jax.device_count()} devices ({jax.local_device_count()} local)",
            f"mesh {mesh_desc}; batch {t.batch_size} x {t.seq_len} tokens, {t.steps} steps",
            f"parameters: {n_trained:,} trained ({', '.join(sorted(trained))}), {n_frozen:,} frozen",
            f"run dir {run_dir}",
            f"start: {start_description}"]


def log_startup(config, mesh, state, start_description: str, run_dir) -> None:
    logger = progress_logger()
    for line in startup_lines(config, mesh, state, start_description, run_dir):
        logger.info(line)
