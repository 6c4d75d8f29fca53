"""PNG figures of an evaluation (matplotlib, Agg backend): one or two checkpoints overlaid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

STYLES = ("-", "--")
MARKERS = ("o", "s")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _values(layers: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if e.get(key) is None else e[key] for e in layers], dtype=float)


def plot_indexer_layers(results: list[dict], out: Path) -> Path | None:
    """Per layer: captured mass (mean, p10, min), k50/k90/k99, KL."""
    runs = [(r["checkpoint"]["name"], r["indexer"]["layers"]) for r in results if r.get("indexer")]
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for i, (name, layers) in enumerate(runs):
        x = np.arange(len(layers))
        ls, mk = STYLES[i % 2], MARKERS[i % 2]
        for key, label in (("captured_mass", "mean"), ("captured_mass_p10", "p10"), ("captured_mass_min", "min")):
            axes[0].plot(x, _values(layers, key), ls, marker=mk, label=f"{name} {label}")
        for key in ("k50", "k90", "k99"):
            axes[1].plot(x, _values(layers, key), ls, marker=mk, label=f"{name} {key}")
        axes[2].plot(x, _values(layers, "kl"), ls, marker=mk, label=f"{name} KL")
    titles = ("captured mass of the dense attention", "keys holding 50/90/99% of the mass", "KL(dense || indexer)")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylim(top=1.02)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_indexer_positions(results: list[dict], out: Path) -> Path | None:
    """Captured mass (mean and p10) per query-position bucket, one line per layer."""
    runs = [(r["checkpoint"]["name"], r["indexer"]["layers"]) for r in results if r.get("indexer")]
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for i, (name, layers) in enumerate(runs):
        for e in layers:
            labels = [b for b, v in e["by_position"].items() if v.get("rows")]
            for ax, key in zip(axes, ("captured_mass", "captured_mass_p10")):
                ax.plot(labels, [e["by_position"][b][key] for b in labels], STYLES[i % 2], marker=MARKERS[i % 2],
                        label=f"{name} layer {e['layer']}")
    for ax, title in zip(axes, ("captured mass (mean) by query position", "captured mass (p10) by query position")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("query position in document")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # nothing to draw when no row had to be selected
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_captured_mass_cdf(results: list[dict], out: Path) -> Path | None:
    """Share of query rows whose captured mass is below x, one curve per layer, one panel per checkpoint."""
    runs = [(r["checkpoint"]["name"], r["indexer"]["layers"]) for r in results if r.get("indexer")]
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 3.8), squeeze=False, sharey=True)
    for ax, (name, layers) in zip(axes[0], runs):
        colors = plt.cm.viridis(np.linspace(0, 1, max(len(layers), 2)))
        for e, color in zip(layers, colors):
            hist = np.asarray(e.get("captured_mass_hist") or [], dtype=float)
            if hist.sum() == 0:
                continue
            edges = np.linspace(0, 1, len(hist) + 1)
            ax.step(edges, np.concatenate([[0], np.cumsum(hist) / hist.sum()]), where="post", color=color,
                    label=f"layer {e['layer']}" if len(layers) <= 12 else None)
        ax.set_title(f"{name}: captured mass CDF over query rows", fontsize=10)
        ax.set_xlabel("captured mass")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("share of rows below")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_quality_positions(results: list[dict], out: Path) -> Path:
    """LM loss per query-position bucket, dense and sparse mode, per checkpoint."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, r in enumerate(results):
        for mode, entry in r["quality"].items():
            labels = [b for b, v in entry["by_position"].items() if v.get("lm_loss") is not None]
            ax.plot(labels, [entry["by_position"][b]["lm_loss"] for b in labels],
                    "-" if mode == "dense" else "--", marker=MARKERS[i % 2], label=f"{r['checkpoint']['name']} {mode}")
    ax.set_title("LM loss (training-weighted targets) by position", fontsize=10)
    ax.set_xlabel("position in document")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_needle(sweep: dict, title: str, out: Path) -> Path:
    """Heat map: needle depth x context length, colour = accuracy, text = accuracy / mean log-lik."""
    plt = _plt()
    acc = np.array(sweep["accuracy"], dtype=float)
    ll = np.array(sweep["loglik"], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(sweep["lengths"]), 1.2 + 0.6 * len(sweep["depths"])))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(sweep["lengths"])), [str(n) for n in sweep["lengths"]])
    ax.set_yticks(range(len(sweep["depths"])), [f"{d:.0%}" for d in sweep["depths"]])
    ax.set_xlabel("context length")
    ax.set_ylabel("needle depth")
    for (y, x), a in np.ndenumerate(acc):
        ax.text(x, y, f"{a:.2f}\n{ll[y, x]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{title}: accuracy {sweep['correct']}/{sweep['needles']} (cell: acc / log-lik)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
