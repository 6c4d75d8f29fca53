"""`dsa-train plot RUN_DIR`: the curves of one or more runs' metrics.jsonl, drawn to a PNG."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from dsa_train.paths import run_path

PANELS = [
    ("lm_loss", "LM loss"),
    ("accuracy", "accuracy (weighted targets)"),
    ("indexer_kl", "indexer KL (per layer)"),
    ("captured_mass", "captured mass (per layer)"),
    ("k90", "k90 (per layer)"),
    ("moe_max_violation", "MoE max load violation"),
    ("grad_norm/main", "grad norm (main)"),
    ("grad_norm/indexer", "grad norm (indexer)"),
]


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {path.parent}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(run_path(d).name, read_metrics(run_path(d) / "metrics.jsonl")) for d in run_dirs]
    panels = [(k, t) for k, t in PANELS if any(k in r for _, recs in runs for r in recs)]
    cols = 2
    rows = max(1, (len(panels) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
    offset = 0
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run_index, (name, records) in enumerate(runs):
        color = colors[run_index % len(colors)]  # one color per run in every panel
        for ax, (key, title) in zip(axes.flat, panels):
            pts = [(r["step"] + offset, r[key]) for r in records if r.get(key) is not None]
            if not pts:
                continue
            steps = np.array([p[0] for p in pts])
            values = np.array([np.mean(p[1]) if isinstance(p[1], list) else p[1] for p in pts], dtype=float)
            ax.plot(steps, values, label=name, color=color)
            ax.set_title(title)
        if records:
            offset += max(r["step"] for r in records)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes.flat[: len(panels)]:
        ax.set_xlabel("step (stages laid end to end)")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = run_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()  # matplotlib writes local files only: the PNG's bytes, written through `out`
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    out.write_bytes(image.getvalue())
    return out
