"""One short training run, its stdout a pipe as in a batch job, with W&B (offline), a profiler trace
and the compilation cache on: what it prints and writes; then `dsa-train convert export RUN_DIR OUT`
(latest or a chosen step) exports exactly as the same model loaded and exported live."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from dsa_train.cli import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # one short training run (about a minute on 2 cores)

SMALL = ["--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.seq_len=32",
         "--set", "checkpoint.save_every=1", "--set", "data.num_pairs=2", "--set", "data.num_queries=1",
         "--set", "train.stage=dense"]


def tensors(out: Path) -> dict:
    merged = {}
    for f in sorted(out.glob("*.safetensors")):
        merged.update(load_file(f))
    return merged


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    """A short run whose stdout is a pipe, as in a batch job."""
    run = tmp_path_factory.mktemp("run") / "dense"
    cache = run.parent / "compile-cache"
    tools = ["--set", "train.wandb=offline", "--set", "train.profile_steps=[2]", "--set", f"train.compile_cache_dir={cache}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run([sys.executable, "-m", "dsa_train.cli", "train", "configs/tiny.yaml", *SMALL, *tools,
                           "--set", f"train.run_dir={run}"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run, proc.stdout


@pytest.fixture(scope="module")
def run_dir(piped_run):
    return piped_run[0]


def test_piped_output_has_startup_summary_and_step_lines(piped_run):
    out = piped_run[1]
    assert "━" not in out  # no progress bar in a log file
    for expected in ("platform cpu", "1 process(es), 1 devices", "mesh data=1 fsdp=1", "trained (main)",
                     "frozen", "run dir ", "start: random initialization", "first step (compilation included)"):
        assert expected in out, (expected, out)
    steps = [line for line in out.splitlines() if " dense step " in line]
    assert [line.split(" dense step ")[1].split()[0] for line in steps] == ["1/2", "2/2"], out
    assert "lm_loss=" in steps[1] and "tok/s=" in steps[1] and "step_time=" in steps[1] and "eta=" in steps[1]


def test_wandb_offline_profile_trace_compile_cache_and_hparams(run_dir):
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), list((run_dir / "wandb").rglob("*"))
    assert list((run_dir / "profile").rglob("*.xplane.pb")), list((run_dir / "profile").rglob("*"))
    assert any((run_dir.parent / "compile-cache").iterdir())
    events = b"".join(p.read_bytes() for p in (run_dir / "tensorboard").iterdir())
    assert b"_hparams_/experiment" in events and b"train.batch_size" in events


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
    assert len(err) == 1 and "is not a model directory" in err[0]
