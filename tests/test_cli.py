"""The command line as a user meets it: info, train, plot, and one-line errors."""

import json
import subprocess
import sys

import pytest

from dsa_train.cli import main


def test_info_671b_counts(capsys):
    assert main(["info", "configs/deepseek-v3.2.yaml"]) == 0
    out = capsys.readouterr().out
    assert "total parameters: 671,877,929,216" in out
    assert "indexer parameters: 851,524,864" in out


def test_user_error_is_one_line(capsys):
    assert main(["info", "configs/tiny.yaml", "--set", "model.index_topk=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.index_topk" in err[0] and "Traceback" not in err[0]


def test_missing_recipe_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "dsa_train.cli", "train", "recipes/nope.yaml"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr


@pytest.mark.slow
def test_train_writes_metrics_tensorboard_and_plot(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "recipes/dense-base.yaml", "--set", "train.steps=4", "--set", "train.batch_size=4",
                 "--set", "train.seq_len=64", "--set", "train.log_every=2", "--set", f"train.run_dir={run}",
                 "--set", "data.num_pairs=2", "--set", "data.num_queries=2"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "lm_loss" in r] == [2, 4]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    assert "tok/s" in records[-1] and "step_time" in records[-1]
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000


@pytest.mark.slow
def test_stage_handoff_with_relative_run_dirs(tmp_path, monkeypatch):
    """The README's commands use relative run directories (runs/warmup -> runs/sparse)."""
    repo = __import__("pathlib").Path(__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)
    small = ["--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.seq_len=64"]
    assert main(["train", str(repo / "recipes/dense-base.yaml"), *small, "--set", "train.run_dir=runs/a"]) == 0
    assert main(["train", str(repo / "recipes/warmup.yaml"), *small, "--set", f"model={repo / 'configs/tiny.yaml'}",
                 "--set", "data.source=synthetic", "--set", "data.paths=[]", "--set", "train.run_dir=runs/b",
                 "--set", "checkpoint.init_from=runs/a"]) == 0
