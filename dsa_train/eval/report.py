"""The evaluation's outputs: eval.json (everything measured), report.md and PNG figures.

With two checkpoints (A, B) the Markdown puts them side by side with B - A deltas; deltas that
matter (relative change above 2 %, or above 0.02 for quantities in [0, 1]) are bold with an arrow.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

from dsa_train.eval import plots
from dsa_train.paths import LocalStaging, is_uri, run_path

RELATIVE_NOTABLE = 0.02
ABSOLUTE_NOTABLE = 0.02  # for shares, masses and accuracies
# Metrics whose deltas are judged in absolute terms (fractions; the relative loss gap).
UNIT_INTERVAL = ("captured_mass", "share", "accuracy", "kl_captured", "needle", "relative")


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def headline(result: dict) -> dict[str, Optional[float]]:
    """The few numbers that answer "is the indexer good enough, did sparse keep quality?"."""
    h: dict[str, Optional[float]] = {}
    idx = result.get("indexer")
    if idx:
        layers = idx["layers"]
        h["captured_mass (mean over layers)"] = _mean([e.get("captured_mass") for e in layers])
        masses = [e.get("captured_mass") for e in layers if e.get("captured_mass") is not None]
        h["captured_mass (worst layer)"] = min(masses) if masses else None
        p10 = [e.get("captured_mass_p10") for e in layers if e.get("captured_mass_p10") is not None]
        h["captured_mass_p10 (worst layer)"] = min(p10) if p10 else None
        h["k90 (mean over layers)"] = _mean([e.get("k90") for e in layers])
        h["kl (mean over layers)"] = _mean([e.get("kl") for e in layers])
        h["attn_out_rel_l2 (mean over layers)"] = _mean([e.get("attn_out_rel_l2") for e in layers])
    q = result["quality"]
    for mode in ("dense", "sparse"):
        if mode in q:
            h[f"lm_loss {mode}"] = q[mode]["lm_loss"]
            h[f"accuracy {mode}"] = q[mode]["lm_accuracy"]
    if "dense" in q and "sparse" in q and q["dense"]["lm_loss"]:
        h["lm_loss sparse vs dense (relative)"] = q["sparse"]["lm_loss"] / q["dense"]["lm_loss"] - 1
    for mode, sweep in (result.get("needle") or {}).items():
        h[f"needle accuracy {mode}"] = sweep["accuracy_total"]
        h[f"needle correct {mode}"] = sweep["correct"]
    return h


def _delta(name: str, a, b) -> str:
    if a is None or b is None:
        return "–"
    d = b - a
    unit = any(u in name for u in UNIT_INTERVAL)
    notable = abs(d) > ABSOLUTE_NOTABLE if unit else (abs(d) > RELATIVE_NOTABLE * max(abs(a), 1e-12))
    text = f"{d:+.4g}" if not isinstance(d, int) else f"{d:+d}"
    if not unit and a:
        text += f" ({d / abs(a):+.1%})"
    return f"**{text} {'▲' if d > 0 else '▼'}**" if notable else text


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines + [""]


LAYER_COLUMNS = [("rows", "rows"), ("captured_mass", "captured mean"), ("captured_mass_p10", "p10"),
                 ("captured_mass_min", "min"), ("k50", "k50"), ("k90", "k90"), ("k99", "k99"), ("kl", "KL"),
                 ("kl_captured", "KL captured"), ("recent_share", "recent share"), ("sink_share", "sink share"),
                 ("attn_out_rel_l2", "attn out rel L2")]
POSITION_COLUMNS = [("rows", "rows"), ("captured_mass", "captured mean"), ("captured_mass_p10", "p10"),
                    ("captured_mass_min", "min"), ("k90", "k90"), ("kl", "KL"), ("recent_share", "recent share"),
                    ("sink_share", "sink share"), ("attn_out_rel_l2", "attn out rel L2")]


def _indexer_sections(result: dict, options: dict) -> list[str]:
    idx = result.get("indexer")
    if not idx:
        return ["The model has no lightning indexer: dense mode only.", ""]
    rows_note = ("query rows with more causal candidates than index_topk (where the indexer has to choose)"
                 if idx["rows"] == "selective" else "every non-padding query row")
    lines = [f"Counted: {rows_note}. index_topk = {idx['index_topk']}. Recent window = "
             f"{options['recent_window']} tokens, attention sink = the first {options['sink_tokens']} tokens.", ""]
    lines += _table(["layer"] + [c for _, c in LAYER_COLUMNS],
                    [[str(e["layer"])] + [e.get(k) for k, _ in LAYER_COLUMNS] for e in idx["layers"]])
    lines += ["By query position (position inside the document):", ""]
    rows = []
    for e in idx["layers"]:
        for bucket, v in e["by_position"].items():
            rows.append([str(e["layer"]), bucket] + [v.get(k) for k, _ in POSITION_COLUMNS])
    lines += _table(["layer", "positions"] + [c for _, c in POSITION_COLUMNS], rows)
    if any(e.get("rows") == 0 for e in idx["layers"]):
        lines += ["Rows marked 0: no query there has more candidates than index_topk, so sparse attention "
                  "is exactly dense attention.", ""]
    return lines


def _quality_section(result: dict) -> list[str]:
    q = result["quality"]
    lines = ["LM loss: next-token loss weighted like the training loss (answer tokens for the synthetic task, "
             "every token for prepared shards); accuracy: argmax on the same targets.", ""]
    rows = []
    buckets = list(q["dense"]["by_position"])
    for label, d_entry in [("all", q["dense"])] + [(b, q["dense"]["by_position"][b]) for b in buckets]:
        s_entry = None
        if "sparse" in q:
            s_entry = q["sparse"] if label == "all" else q["sparse"]["by_position"].get(label)
        row = [label, d_entry["lm_targets"], d_entry["lm_loss"], s_entry and s_entry["lm_loss"]]
        dl, sl = d_entry["lm_loss"], s_entry and s_entry["lm_loss"]
        row.append(f"{sl / dl - 1:+.2%}" if dl and sl is not None else "–")
        row += [d_entry["lm_perplexity"], s_entry and s_entry["lm_perplexity"], d_entry["lm_accuracy"],
                s_entry and s_entry["lm_accuracy"], d_entry["token_loss"], s_entry and s_entry["token_loss"]]
        rows.append(row)
    return lines + _table(["positions", "targets", "loss dense", "loss sparse", "sparse vs dense", "ppl dense",
                           "ppl sparse", "acc dense", "acc sparse", "all-token loss dense",
                           "all-token loss sparse"], rows)


MODE_LABELS = {"dense": "dense", "sparse": "sparse (indexer top-k)",
               "local": "local window (control: the first tokens + the most recent keys, top-k in all)"}


def _needle_section(result: dict, images: dict) -> list[str]:
    needle = result.get("needle")
    if not needle:
        return ["(needle sweep skipped)", ""]
    lines = []
    for mode, sweep in needle.items():
        lines += [f"**{MODE_LABELS.get(mode, mode)}**: {sweep['correct']}/{sweep['needles']} needles answered "
                  f"(top-1 answer accuracy {sweep['accuracy_total']:.1%}, mean answer log-likelihood "
                  f"{sweep['loglik_mean']:.3f}).", ""]
        header = ["depth \\ length"] + [str(n) for n in sweep["lengths"]]
        rows = [[f"{d:.0%}"] + [f"{a:.2f} / {ll:.2f}" for a, ll in zip(acc_row, ll_row)]
                for d, acc_row, ll_row in zip(sweep["depths"], sweep["accuracy"], sweep["loglik"])]
        lines += _table(header, rows)
        if mode in images:
            lines += [f"![needle {mode}]({images[mode]})", ""]
    return lines


def _single(result: dict, meta: dict, images: dict) -> list[str]:
    ck = result["checkpoint"]
    lines = [f"# DSA evaluation: {ck['name']}", "",
             f"- checkpoint: `{ck['path']}` (stage {ck['stage'] or '?'}, step {ck['step'] if ck['step'] is not None else '–'})",
             f"- model: {ck['layers']} layers, index_topk {ck['index_topk']}",
             f"- data: {meta['data']}; {meta['batches']} batches x {meta['batch_size']} rows x {meta['seq_len']} "
             f"tokens, seed {meta['seed']}", ""]
    lines += ["## Summary", ""] + _table(["metric", "value"], [[k, v] for k, v in headline(result).items()])
    lines += ["## Indexer diagnostics (dense pass)", ""] + _indexer_sections(result, meta["diagnostics"])
    for key in ("indexer_layers", "captured_mass_cdf", "indexer_positions"):
        if key in images.get("common", {}):
            lines += [f"![{key}]({images['common'][key]})", ""]
    lines += ["## Quality: dense vs sparse attention, same weights", ""] + _quality_section(result)
    if "quality_positions" in images.get("common", {}):
        lines += [f"![quality]({images['common']['quality_positions']})", ""]
    lines += ["## Needle in a haystack (cell: top-1 answer accuracy / mean answer log-likelihood)", ""]
    lines += _needle_section(result, images.get(ck["name"], {}))
    return lines


def _comparison(results: list[dict], meta: dict, images: dict) -> list[str]:
    a, b = results
    na, nb = a["checkpoint"]["name"], b["checkpoint"]["name"]
    lines = [f"# DSA evaluation: {na} (A) vs {nb} (B)", ""]
    for tag, r in (("A", a), ("B", b)):
        ck = r["checkpoint"]
        lines.append(f"- {tag}: `{ck['path']}` (stage {ck['stage'] or '?'}, step "
                     f"{ck['step'] if ck['step'] is not None else '–'}, index_topk {ck['index_topk']})")
    lines += [f"- data: {meta['data']}; {meta['batches']} batches x {meta['batch_size']} rows x {meta['seq_len']} "
              f"tokens, seed {meta['seed']} (the same for both)", "",
              "Deltas are B - A; bold with an arrow where the change is notable (> 2 % relative, or > 0.02 "
              "absolute for masses, shares and accuracies).", ""]
    ha, hb = headline(a), headline(b)
    rows = [[k, ha.get(k), hb.get(k), _delta(k, ha.get(k), hb.get(k))] for k in dict.fromkeys([*ha, *hb])]
    lines += ["## Side by side", ""] + _table(["metric", f"A {na}", f"B {nb}", "Δ B - A"], rows)
    qa, qb = a["quality"], b["quality"]
    if "sparse" in qb and qa["dense"]["lm_loss"] and qb["sparse"]["lm_loss"] is not None:
        rel = qb["sparse"]["lm_loss"] / qa["dense"]["lm_loss"] - 1
        lines += [f"**B sparse vs A dense** (did sparse training keep the base model's quality?): LM loss "
                  f"{qb['sparse']['lm_loss']:.4f} vs {qa['dense']['lm_loss']:.4f} ({rel:+.2%}), accuracy "
                  f"{_fmt(qb['sparse']['lm_accuracy'])} vs {_fmt(qa['dense']['lm_accuracy'])}.", ""]
    na_needle, nb_needle = a.get("needle") or {}, b.get("needle") or {}
    if "dense" in na_needle and "sparse" in nb_needle:
        lines += [f"**Needles, B sparse vs A dense**: {nb_needle['sparse']['correct']} vs "
                  f"{na_needle['dense']['correct']} of {na_needle['dense']['needles']} "
                  f"(difference {nb_needle['sparse']['correct'] - na_needle['dense']['correct']:+d}).", ""]
    if a.get("indexer") and b.get("indexer"):
        lines += ["## Indexer per layer", ""]
        rows = []
        for ea, eb in zip(a["indexer"]["layers"], b["indexer"]["layers"]):
            for key, label in LAYER_COLUMNS[1:]:
                rows.append([str(ea["layer"]), label, ea.get(key), eb.get(key), _delta(key, ea.get(key), eb.get(key))])
        lines += _table(["layer", "metric", "A", "B", "Δ B - A"], rows)
    for key in ("indexer_layers", "captured_mass_cdf", "indexer_positions", "quality_positions"):
        if key in images.get("common", {}):
            lines += [f"![{key}]({images['common'][key]})", ""]
    for tag, r in (("A", a), ("B", b)):
        name = r["checkpoint"]["name"]
        lines += [f"## {tag} {name}: indexer by position and quality", ""]
        lines += _indexer_sections(r, meta["diagnostics"])[2:] if r.get("indexer") else []
        lines += _quality_section(r)
        lines += [f"### {tag} {name}: needle in a haystack (cell: top-1 answer accuracy / mean answer "
                  "log-likelihood)", ""]
        lines += _needle_section(r, images.get(name, {}))
    return lines


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_report(results: list[dict], meta: dict, out_dir) -> dict:
    """eval.json, report.md and the PNGs into out_dir (local or a URI); returns what was written."""
    if is_uri(out_dir):  # matplotlib writes local files: write there, then copy
        remote = run_path(out_dir)
        staging = LocalStaging(remote)
        try:
            written = _write_report(results, meta, staging.local)
        finally:
            staging.close()
        return {key: remote / path.relative_to(staging.local).as_posix() for key, path in written.items()}
    return _write_report(results, meta, Path(out_dir))


def _write_report(results: list[dict], meta: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(results) == 2 and results[0]["checkpoint"]["name"] == results[1]["checkpoint"]["name"]:
        for tag, r in zip("AB", results):
            r["checkpoint"]["name"] = f"{tag}:{r['checkpoint']['name']}"
    written = {"json": out_dir / "eval.json"}
    written["json"].write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    images: dict = {"common": {}}
    for key, fn in (("indexer_layers", plots.plot_indexer_layers), ("captured_mass_cdf", plots.plot_captured_mass_cdf),
                    ("indexer_positions", plots.plot_indexer_positions),
                    ("quality_positions", plots.plot_quality_positions)):
        path = fn(results, out_dir / f"{key}.png")
        if path is not None:
            images["common"][key] = path.name
            written[key] = path
    for r in results:
        name = r["checkpoint"]["name"]
        images[name] = {}
        for mode, sweep in (r.get("needle") or {}).items():
            path = plots.plot_needle(sweep, f"{name} {mode}", out_dir / f"needle_{_slug(name)}_{mode}.png")
            images[name][mode] = path.name
            written[f"needle {name} {mode}"] = path
    lines = _single(results[0], meta, images) if len(results) == 1 else _comparison(results, meta, images)
    written["markdown"] = out_dir / "report.md"
    written["markdown"].write_text("\n".join(lines))
    return written
