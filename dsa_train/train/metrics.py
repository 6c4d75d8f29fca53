"""Where metrics go: a JSON-lines file, TensorBoard event files and a console progress bar.

Per-layer metrics arrive as vectors and are written as `name/layer_i` scalars in TensorBoard and as
lists in JSONL; the console shows the few numbers a user watches.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from dsa_train.train.console import interactive, progress_logger, step_line

CONSOLE_KEYS = ("lm_loss", "accuracy", "indexer_kl", "captured_mass", "tok/s")


def _to_python(value):
    arr = np.asarray(value)
    if arr.ndim == 0:
        v = arr.item()
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return [_to_python(x) for x in arr]


def summarize(metrics: dict) -> dict:
    """Host-side: numpy arrays -> JSON-ready values (per-layer vectors stay lists)."""
    return {k: _to_python(v) for k, v in metrics.items()}


class MetricsWriter:
    def __init__(self, run_dir: Path, total_steps: int, stage: str, console: bool = True):
        from tensorboardX import SummaryWriter

        self.run_dir = Path(run_dir)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
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
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for name, value in record.items():
            if name in ("step", "stage", "time") or value is None:
                continue
            if isinstance(value, list):
                flat = np.asarray(value, dtype=np.float64)
                if flat.ndim == 1:
                    for i, v in enumerate(flat):
                        self.tb.add_scalar(f"{name}/layer_{i}", v, step)
                    self.tb.add_scalar(f"{name}/mean", float(flat.mean()), step)
                continue
            if isinstance(value, (int, float)):
                self.tb.add_scalar(name, value, step)
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

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.tb.close()
        self.jsonl.close()
