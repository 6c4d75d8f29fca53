"""`dsa-train eval` end to end on tiny random models saved into tmp_path: one checkpoint, two side by
side, a training run directory, the trainer's held-out hook; with index_topk >= the sequence length
sparse mode must equal dense mode everywhere."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from dsa_train.checkpoint import model_io
from dsa_train.checkpoint.manager import MODEL_KEY, RunCheckpointer, to_pure_tree
from dsa_train.cli import main as cli_main
from dsa_train.config import CheckpointConfig, load_config, load_model_config, to_dict
from dsa_train.eval import eval_main
from dsa_train.eval.checkpoints import EvalInputError, load_checkpoint
from dsa_train.eval.heldout import HeldoutIndexerEval
from dsa_train.model import create_model

SEQ = 32
# index_topk >= SEQ: every query keeps all its candidates, so sparse attention is dense attention.
ARGS = ["--seq-len", str(SEQ), "--batches", "1", "--batch-size", "2", "--needle-lengths", str(SEQ),
        "--needle-depths", "0,1", "--needle-trials", "2", "--rows", "all", "--no-progress"]


@pytest.fixture(scope="module")
def config():
    return dataclasses.replace(load_model_config("configs/tiny.yaml"), compute_dtype="float32", index_topk=SEQ)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, config):
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("base", 1), ("other", 2)):
        model_io.save_model(root / name, create_model(config, seed=seed))
    return root / "base", root / "other"


def _results(out):
    return json.loads((out / "eval.json").read_text())["results"]


def test_single_checkpoint_report_and_full_topk_invariants(model_dirs, tmp_path):
    out = tmp_path / "single"
    assert cli_main(["eval", str(model_dirs[0]), *ARGS, "--out", str(out)]) == 0  # through `dsa-train eval`
    for name in ("eval.json", "report.md", "indexer_layers.png", "indexer_positions.png", "quality_positions.png",
                 "needle_base_dense.png", "needle_base_sparse.png"):
        assert (out / name).stat().st_size > 0, name
    [result] = _results(out)
    layers = result["indexer"]["layers"]
    assert len(layers) == 2 and all(e["rows"] == 2 * SEQ for e in layers)
    for e in layers:
        assert e["captured_mass"] == pytest.approx(1.0, abs=1e-6)
        assert e["captured_mass_min"] == pytest.approx(1.0, abs=1e-6)
        assert e["captured_mass_p10"] == pytest.approx(1.0, abs=1e-6)
        assert e["attn_out_rel_l2"] < 1e-5
        assert list(e["by_position"]) == ["0-1K"]  # only the buckets that exist
    q = result["quality"]
    assert q["sparse"]["lm_loss"] == pytest.approx(q["dense"]["lm_loss"], rel=1e-5)
    assert q["sparse"]["token_loss"] == pytest.approx(q["dense"]["token_loss"], rel=1e-5)
    assert q["dense"]["lm_targets"] == 2 * 4  # synthetic task: 4 answers per row
    needle = result["needle"]
    assert needle["dense"]["needles"] == 2 * 2
    np.testing.assert_allclose(needle["sparse"]["loglik"], needle["dense"]["loglik"], rtol=1e-5)
    report = (out / "report.md").read_text()
    assert "captured mean" in report and "Needle in a haystack" in report and "needle_base_sparse.png" in report


def test_comparison_mode(model_dirs, tmp_path):
    out = tmp_path / "ab"
    assert eval_main([str(model_dirs[0]), str(model_dirs[1]), *ARGS, "--out", str(out)]) == 0
    a, b = _results(out)
    assert (a["checkpoint"]["name"], b["checkpoint"]["name"]) == ("base", "other")
    assert a["quality"]["dense"]["lm_loss"] != b["quality"]["dense"]["lm_loss"]  # different weights
    report = (out / "report.md").read_text()
    assert "A base" in report and "B other" in report and "Δ B - A" in report
    assert "B sparse vs A dense" in report
    assert any(line.count("**") >= 2 and ("▲" in line or "▼" in line) for line in report.splitlines())
    for name in ("needle_base_dense.png", "needle_other_sparse.png"):
        assert (out / name).is_file()


def test_run_directory_defaults_come_from_the_run(config, tmp_path):
    model = create_model(config, seed=3)
    run = tmp_path / "warmup"
    run_config = {"model": to_dict(config), "train": {"stage": "warmup", "seq_len": SEQ, "seed": 0},
                  "data": {"source": "synthetic", "num_pairs": 2, "num_queries": 1, "synthetic_doc_len": 0}}
    with RunCheckpointer(run, CheckpointConfig(), run_config) as ck:
        ck.save(7, {MODEL_KEY: to_pure_tree(nnx.state(model)), "step": np.int32(7)}, force=True)
    loaded = load_checkpoint(run)
    assert (loaded.name, loaded.step) == ("warmup@7", 7)
    np.testing.assert_array_equal(np.asarray(loaded.model.lm_head.weight[...]), np.asarray(model.lm_head.weight[...]))
    assert eval_main([str(run), "--batches", "1", "--batch-size", "2", "--no-needle", "--no-progress"]) == 0
    [result] = _results(run / "eval")
    assert result["checkpoint"]["stage"] == "warmup"
    assert result["quality"]["dense"]["lm_targets"] == 2  # one query per row: the run's data config
    with pytest.raises(EvalInputError, match="training seed"):
        eval_main([str(run), "--seed", "0", "--no-progress"])
    with pytest.raises(EvalInputError, match="does not exist"):
        eval_main([str(tmp_path / "nowhere")])
    assert cli_main(["eval", str(tmp_path / "nowhere")]) == 2  # one line on stderr, no traceback
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match="neither a run directory"):
        eval_main([str(tmp_path / "empty")])


def test_heldout_hook_reports_per_layer_metrics(config, tmp_path):
    cfg = load_config("configs/tiny.yaml", ["train.batch_size=2", f"train.seq_len={SEQ}", "train.eval_batches=1",
                                            "model.compute_dtype=float32", "data.num_pairs=2", "data.num_queries=1",
                                            f"train.run_dir={tmp_path}", "model.index_topk=4"])
    hook = HeldoutIndexerEval(cfg)
    record = hook(create_model(cfg.model, seed=0))
    assert set(record) == {"heldout/captured_mass", "heldout/captured_mass_p10", "heldout/k90", "heldout/indexer_kl"}
    mass = record["heldout/captured_mass"]
    assert len(mass) == 2 and all(0 < m < 1 for m in mass)
    assert hook.batches[0]["tokens"].shape == (2, SEQ)


@pytest.mark.slow
def test_trainer_stops_the_warmup_on_heldout_captured_mass(tmp_path):
    from dsa_train.train.trainer import train

    cfg = load_config("configs/tiny.yaml", [
        "train.stage=warmup", "train.steps=4", "train.batch_size=2", f"train.seq_len={SEQ}", "train.log_every=1",
        "data.num_pairs=2", "data.num_queries=1", "train.eval_every=2", "train.stop_at_captured_mass=0.01",
        "model.index_topk=8",
        f"train.run_dir={tmp_path / 'run'}", "checkpoint.save_every=100"])
    result = train(cfg, console=False)
    assert result.steps == 2 and result.stopped_early
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "heldout/captured_mass" not in records[0] and len(records[1]["heldout/captured_mass"]) == 2
    assert records[-1]["reason"].startswith("heldout/captured_mass >= 0.01")


def test_eval_on_a_scan_layers_checkpoint_matches_the_per_layer_layout(config, tmp_path):
    """The same weights (same seed in both layouts) stored as a scan_layers model and as a per-layer
    one: `dsa-train eval` runs on both (through the model's own forward) and reports the same figures."""
    small_k = dataclasses.replace(config, index_topk=8)  # selection matters: figures are not trivially 1
    figures = []
    for scan in (False, True):
        path = tmp_path / f"scan-{scan}"
        model_io.save_model(path, create_model(dataclasses.replace(small_k, scan_layers=scan), seed=3))
        assert model_io.load_model_config(path).scan_layers is scan
        out = tmp_path / f"out-{scan}"
        assert cli_main(["eval", str(path), *ARGS, "--out", str(out)]) == 0
        [result] = _results(out)
        figures.append({k: result[k] for k in ("indexer", "quality", "needle")})
    assert figures[0]["indexer"]["layers"][0]["captured_mass"] < 0.999
    _assert_same_figures(figures[1], figures[0])


def _assert_same_figures(got, want, path="results"):
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            _assert_same_figures(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same_figures(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), path
    else:
        assert got == want, path
