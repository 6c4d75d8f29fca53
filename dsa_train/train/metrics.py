"""Where metrics go: behind one small interface (``write(step, record)``, ``close()``), a JSON-lines
file, TensorBoard event files (with the run's config as hparams) and, optionally, Weights & Biases
(online or offline); plus the console: a progress bar on a terminal, plain lines otherwise.

Per-layer metrics arrive as vectors and are written as `name/layer_i` scalars in TensorBoard and
W&B and as lists in JSONL; the console shows the few numbers a user watches.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

from dsa_train.paths import LocalStaging, is_uri, run_path
from dsa_train.train.console import interactive, progress_logger, step_line

CONSOLE_KEYS = ("lm_loss", "accuracy", "indexer_kl", "captured_mass", "tok/s")
META_KEYS = ("step", "stage", "time")


def _to_python(value):
    arr = np.asarray(value)
    if arr.ndim == 0:
        v = arr.item()
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return [_to_python(x) for x in arr]


def summarize(metrics: dict) -> dict:
    """Host-side: numpy arrays -> JSON-ready values (per-layer vectors stay lists)."""
    return {k: _to_python(v) for k, v in metrics.items()}


def scalars(record: dict) -> dict[str, float]:
    """The numeric values of a record, per-layer vectors as ``name/layer_i`` and ``name/mean``."""
    out = {}
    for name, value in record.items():
        if name in META_KEYS or value is None or isinstance(value, bool):
            continue
        if isinstance(value, list):
            if any(v is None for v in value):
                continue
            flat = np.asarray(value, dtype=np.float64)
            if flat.ndim == 1:
                out.update({f"{name}/layer_{i}": float(v) for i, v in enumerate(flat)})
                out[f"{name}/mean"] = float(flat.mean())
        elif isinstance(value, (int, float)):
            out[name] = value
    return out


def flat_config(config: dict, prefix: str = "") -> dict:
    """Nested config -> ``{"train.lr": 0.001, ...}`` with values TensorBoard/W&B accept."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = "null" if value is None else str(value)
    return out


class Writer(Protocol):
    def write(self, step: int, record: dict) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class JsonlWriter:
    def __init__(self, path: Path):
        self.file = open(path, "a")

    def write(self, step: int, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardWriter:
    def __init__(self, log_dir: Path, config: Optional[dict] = None):
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(log_dir))
        if config is not None:
            from tensorboardX.summary import hparams

            import yaml

            # The config as hparams (TensorBoard's HPARAMS tab compares runs by it) and as text.
            for summary in hparams(flat_config(config), {}):
                self.tb.file_writer.add_summary(summary)
            self.tb.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def write(self, step: int, record: dict) -> None:
        for name, value in scalars(record).items():
            self.tb.add_scalar(name, value, step)

    def flush(self) -> None:
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


class WandbWriter:
    """Weights & Biases; ``mode="offline"`` writes under ``run_dir/wandb`` (``wandb sync`` later)."""

    def __init__(self, run_dir: Path, mode: str, project: str, stage: str, config: Optional[dict],
                 name: Optional[str] = None):
        try:
            import wandb
        except ImportError:
            raise ValueError("train.wandb needs the wandb package: pip install 'dsa-train[wandb]'") from None
        self.run = wandb.init(project=project, name=name or f"{Path(run_dir).name}-{stage}", dir=str(run_dir),
                              mode=mode, config=config, resume="allow", settings=wandb.Settings(silent=True))

    def write(self, step: int, record: dict) -> None:
        self.run.log(scalars(record), step=step)

    def flush(self) -> None:
        pass  # W&B writes its offline files itself, as it goes

    def close(self) -> None:
        self.run.finish()


class MetricsWriter:
    """Every configured writer, plus the console.

    A remote run directory (``gs://``...): the writers write into a local staging directory (the
    event writer and W&B only write local files; object stores cannot append), copied to the run
    directory every ``SYNC_SECONDS`` and at ``close()``; ``metrics.jsonl`` is fetched first, so a
    resumed run appends to it."""

    SYNC_SECONDS = 60.0

    def __init__(self, run_dir, total_steps: int, stage: str, console: bool = True,
                 config: Optional[dict] = None, wandb: str = "off", wandb_project: str = "dsa-train"):
        self.run_dir = run_path(run_dir)
        self.staging = LocalStaging(self.run_dir, fetch=("metrics.jsonl",)) if is_uri(self.run_dir) else None
        local_dir = self.staging.local if self.staging else self.run_dir
        self._synced_at = time.monotonic()
        self.writers: list[Writer] = [JsonlWriter(local_dir / "metrics.jsonl"),
                                      TensorBoardWriter(local_dir / "tensorboard", config)]
        if wandb != "off":
            self.writers.append(WandbWriter(local_dir, wandb, wandb_project, stage, config,
                                            name=f"{self.run_dir.name}-{stage}"))
        self.stage = stage
        self.progress = None
        self.total_steps = total_steps
        self.log = None
        if console and not interactive():  # a batch job's log: plain lines, never a progress bar
            self.log = progress_logger()
        elif console:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.task = self.progress.add_task(stage, total=total_steps, info="")
            self.progress.start()

    def write(self, step: int, record: dict) -> None:
        record = {"step": step, "stage": self.stage, "time": time.time(), **record}
        for writer in self.writers:
            writer.write(step, record)
        if self.staging is not None and time.monotonic() - self._synced_at > self.SYNC_SECONDS:
            self.sync()
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=self._console_line(record))
        if self.log is not None and ("loss" in record or "lm_loss" in record):
            self.log.info(step_line(self.stage, step, self.total_steps, record))

    def note(self, message: str) -> None:
        """One line for the user: through the progress bar's console or the plain log."""
        if self.progress is not None:
            self.progress.console.print(message)
        elif self.log is not None:
            self.log.info(message)

    @staticmethod
    def _console_line(record: dict) -> str:
        parts = []
        for key in CONSOLE_KEYS:
            value = record.get(key)
            if value is None:
                continue
            if isinstance(value, list):
                value = float(np.mean(value))
            parts.append(f"{key}={value:.4g}")
        return " ".join(parts)

    def sync(self) -> None:
        """Copy what the writers wrote so far to a remote run directory."""
        for writer in self.writers:
            writer.flush()
        self.staging.sync()
        self._synced_at = time.monotonic()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        for writer in self.writers:
            writer.close()
        if self.staging is not None:
            self.staging.close()
