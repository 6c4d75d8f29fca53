"""Host-side accumulation of per-row statistics into per-layer and per-position-bucket summaries.

Memory is constant in the number of evaluated rows: sums, counts, minima and, for the low
percentile of the captured mass, a fixed histogram (`bins` bins on [0, 1]; the percentile is the
centre of its bin, clamped to the observed range, so it is within 0.5 / bins of the exact value
and exact when all rows agree).

Query position buckets are ``[0, e0), [e0, e1), ..., [e_last, inf)`` over the position of the query
inside its document; only buckets that hold at least one evaluated row are reported.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from dsa_train.eval.defaults import DEFAULT_BUCKET_EDGES

PERCENTILE = 0.1
REPORTED_HIST_BINS = 32  # the captured-mass histogram in the summary (for the CDF figure)


def _tokens_label(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def bucket_labels(edges) -> list[str]:
    """(1024, 8192, 32768) -> ['0-1K', '1K-8K', '8K-32K', '32K+']."""
    bounds = [0, *edges]
    labels = [f"{_tokens_label(a)}-{_tokens_label(b)}" for a, b in zip(bounds[:-1], bounds[1:])]
    return labels + [f"{_tokens_label(bounds[-1])}+"]


def check_edges(edges) -> tuple[int, ...]:
    edges = tuple(int(e) for e in edges)
    if any(e <= 0 for e in edges) or any(b <= a for a, b in zip(edges[:-1], edges[1:])):
        raise ValueError(f"position bucket edges must be positive and increasing, got {list(edges)}")
    return edges


def _bucket_index(positions: np.ndarray, edges) -> np.ndarray:
    return np.searchsorted(np.asarray(edges), positions, side="right")


def _ratio(num: float, den: float) -> Optional[float]:
    return float(num / den) if den > 0 else None


class IndexerAccumulator:
    """Per layer and bucket: captured mass (mean, p10, min), k50/k90/k99, KL, KL captured, recent
    and sink shares of the selection, relative L2 error of the sparse attention output.

    rows: "selective" counts only query rows with more candidates than index_topk (where the
    indexer has to choose: elsewhere sparse attention is dense attention and the mass is 1);
    "all" counts every non-padding row.
    """

    SUMS = ("captured_mass", "k50", "k90", "k99", "kl", "kl_uniform", "recent_share", "sink_share",
            "out_err2", "out_norm2")

    def __init__(self, num_layers: int, topk: int, edges=DEFAULT_BUCKET_EDGES, rows: str = "selective",
                 bins: int = 4096):
        if rows not in ("selective", "all"):
            raise ValueError(f"rows must be 'selective' or 'all', got {rows!r}")
        if bins % REPORTED_HIST_BINS:
            raise ValueError(f"bins must be a multiple of {REPORTED_HIST_BINS}, got {bins}")
        self.edges, self.topk, self.rows, self.bins = check_edges(edges), topk, rows, bins
        self.num_layers = num_layers
        shape = (num_layers, len(self.edges) + 1)
        self.count = np.zeros(shape)
        self.valid = np.zeros(shape)
        self.sums = {k: np.zeros(shape) for k in self.SUMS}
        self.has_output = False
        self.minimum = np.full(shape, np.inf)
        self.maximum = np.full(shape, -np.inf)
        self.hist = np.zeros((*shape, bins), np.int64)

    def add(self, layer: int, stats: dict, positions: np.ndarray) -> None:
        """stats: name -> [B, S] (see diagnostics.layer_row_stats); positions [B, S]."""
        nb = len(self.edges) + 1
        valid = np.asarray(stats["valid"]) > 0
        chosen = valid & (np.asarray(stats["candidates"]) > self.topk) if self.rows == "selective" else valid
        bucket = _bucket_index(np.asarray(positions), self.edges)
        self.valid[layer] += np.bincount(bucket[valid], minlength=nb)
        idx = bucket[chosen]
        self.count[layer] += np.bincount(idx, minlength=nb)
        self.has_output |= "out_err2" in stats
        for name in self.SUMS:
            if name in stats:
                self.sums[name][layer] += np.bincount(idx, weights=np.asarray(stats[name], np.float64)[chosen],
                                                      minlength=nb)
        mass = np.asarray(stats["captured_mass"], np.float64)[chosen]
        np.minimum.at(self.minimum[layer], idx, mass)
        np.maximum.at(self.maximum[layer], idx, mass)
        bins = np.clip((mass * self.bins).astype(np.int64), 0, self.bins - 1)
        self.hist[layer] += np.bincount(idx * self.bins + bins, minlength=nb * self.bins).reshape(nb, self.bins)

    def _percentile(self, hist: np.ndarray, lo: float, hi: float) -> float:
        n = hist.sum()
        rank = max(math.ceil(PERCENTILE * n), 1)
        b = int(np.searchsorted(np.cumsum(hist), rank))
        return float(min(max((b + 0.5) / self.bins, lo), hi))

    def _group(self, layer: int, sl) -> dict:
        """Summary over the buckets `sl` (a slice or an index) of one layer."""
        n = float(np.sum(self.count[layer, sl]))
        total = lambda name: float(np.sum(self.sums[name][layer, sl]))  # noqa: E731
        out = {"rows": int(n), "valid_rows": int(np.sum(self.valid[layer, sl]))}
        if n == 0:
            return out
        lo, hi = float(np.min(self.minimum[layer, sl])), float(np.max(self.maximum[layer, sl]))
        hist = self.hist[layer, sl]
        out.update({
            "captured_mass": total("captured_mass") / n,
            "captured_mass_p10": self._percentile(hist.reshape(-1, self.bins).sum(0), lo, hi),
            "captured_mass_min": lo,
            # Row counts in REPORTED_HIST_BINS equal bins of [0, 1].
            "captured_mass_hist": hist.reshape(-1, REPORTED_HIST_BINS, self.bins // REPORTED_HIST_BINS)
            .sum((0, 2)).tolist(),
            "k50": total("k50") / n, "k90": total("k90") / n, "k99": total("k99") / n,
            "kl": total("kl") / n,
            # 1 - KL / KL(p || uniform): 1 when the indexer matches p, 0 when it is no better than uniform.
            "kl_captured": None if total("kl_uniform") <= 0 else 1.0 - total("kl") / total("kl_uniform"),
            "recent_share": total("recent_share") / n, "sink_share": total("sink_share") / n,
        })
        if self.has_output:
            ratio = _ratio(total("out_err2"), total("out_norm2"))
            out["attn_out_rel_l2"] = None if ratio is None else math.sqrt(ratio)
        return out

    def summary(self) -> dict:
        labels = bucket_labels(self.edges)
        layers = []
        for layer in range(self.num_layers):
            entry = {"layer": layer, **self._group(layer, slice(None)), "by_position": {}}
            for b, label in enumerate(labels):
                if self.valid[layer, b] > 0:
                    entry["by_position"][label] = self._group(layer, b)
            layers.append(entry)
        return {"rows": self.rows, "index_topk": self.topk, "bucket_edges": list(self.edges), "layers": layers}


class QualityAccumulator:
    """Next-token loss, perplexity and argmax accuracy per attention mode and position bucket.

    lm_*: targets weighted like the training loss (the batch's loss_weights: answer tokens of the
    synthetic task, every real token of prepared shards); token_*: every next-token target."""

    def __init__(self, edges=DEFAULT_BUCKET_EDGES):
        self.edges = check_edges(edges)
        self.modes: dict[str, dict[str, np.ndarray]] = {}

    def add(self, mode: str, nll: np.ndarray, correct: np.ndarray, target_weights: np.ndarray,
            loss_weights: np.ndarray, positions: np.ndarray) -> None:
        """[B, S] each: nll and correct of predicting token t + 1 at t; target_weights: 1 where that
        target exists (same document, not padding); loss_weights: the batch's loss weights."""
        nb = len(self.edges) + 1
        acc = self.modes.setdefault(mode, {k: np.zeros(nb) for k in ("lm_nll", "lm_n", "lm_correct", "tok_nll",
                                                                     "tok_n", "tok_correct")})
        bucket = _bucket_index(np.asarray(positions), self.edges).reshape(-1)
        nll, correct = np.asarray(nll, np.float64).reshape(-1), np.asarray(correct, np.float64).reshape(-1)
        tw = np.asarray(target_weights, np.float64).reshape(-1)
        lw = tw * np.asarray(loss_weights, np.float64).reshape(-1)
        for prefix, w in (("lm", lw), ("tok", tw)):
            acc[f"{prefix}_nll"] += np.bincount(bucket, weights=nll * w, minlength=nb)
            acc[f"{prefix}_n"] += np.bincount(bucket, weights=w, minlength=nb)
            acc[f"{prefix}_correct"] += np.bincount(bucket, weights=correct * w, minlength=nb)

    @staticmethod
    def _group(acc: dict, sl) -> dict:
        out = {}
        for prefix, name in (("lm", "lm"), ("tok", "token")):
            n = float(np.sum(acc[f"{prefix}_n"][sl]))
            loss = _ratio(float(np.sum(acc[f"{prefix}_nll"][sl])), n)
            out[f"{name}_loss"] = loss
            out[f"{name}_perplexity"] = None if loss is None else math.exp(min(loss, 700.0))
            out[f"{name}_accuracy"] = _ratio(float(np.sum(acc[f"{prefix}_correct"][sl])), n)
            out[f"{name}_targets"] = n
        return out

    def summary(self) -> dict:
        labels = bucket_labels(self.edges)
        out = {}
        for mode, acc in self.modes.items():
            entry = {**self._group(acc, slice(None)), "by_position": {}}
            for b, label in enumerate(labels):
                if acc["tok_n"][b] > 0 or acc["lm_n"][b] > 0:
                    entry["by_position"][label] = self._group(acc, b)
            out[mode] = entry
        return out
