"""`dsa-train convert export RUN_DIR OUT`: a training run (latest or a chosen step) exports exactly as
the same model loaded and exported live."""

from pathlib import Path

import pytest
from safetensors.numpy import load_file

from dsa_train.cli import main

SMALL = ["--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.seq_len=32",
         "--set", "checkpoint.save_every=1", "--set", "data.num_pairs=2", "--set", "data.num_queries=1",
         "--set", "train.stage=dense"]


def tensors(out: Path) -> dict:
    merged = {}
    for f in sorted(out.glob("*.safetensors")):
        merged.update(load_file(f))
    return merged


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "dense"
    assert main(["train", "configs/tiny.yaml", *SMALL, "--set", f"train.run_dir={run}"]) == 0
    return run


def test_export_run_dir_equals_live_export(run_dir, tmp_path):
    from dsa_train.convert import export_hf_checkpoint
    from dsa_train.eval.checkpoints import load_checkpoint

    assert main(["convert", "export", str(run_dir), str(tmp_path / "from_run"), "--dtype", "float32"]) == 0
    loaded = load_checkpoint(run_dir)
    assert loaded.step == 2
    export_hf_checkpoint(loaded.model, tmp_path / "live", dtype="float32")
    a, b = tensors(tmp_path / "from_run"), tensors(tmp_path / "live")
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert (a[name] == b[name]).all(), name
    assert (tmp_path / "from_run" / "config.json").is_file()


def test_export_chosen_step_and_refusal(run_dir, tmp_path, capsys):
    assert main(["convert", "export", str(run_dir / "checkpoints" / "1"), str(tmp_path / "s1"),
                 "--dtype", "float32"]) == 0
    step1, latest = tensors(tmp_path / "s1"), None
    main(["convert", "export", str(run_dir), str(tmp_path / "s2"), "--dtype", "float32"])
    latest = tensors(tmp_path / "s2")
    assert any((step1[k] != latest[k]).any() for k in step1)  # a different step, different weights
    capsys.readouterr()
    assert main(["convert", "export", str(tmp_path), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a model directory" in err[0]
