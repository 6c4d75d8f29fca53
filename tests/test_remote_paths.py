"""A run (with a profiler trace), its checkpoints and resume, the next stage started from it
(checkpoint.init_from), `dsa-train plot`, `dsa-train eval` and `convert export` / `import`, all on a
``gs://`` bucket (an offline one: tests/fake_bucket.py). Nothing may land in a local directory named
like the URI (``Path("gs://b/r")`` is ``./gs:/b/r``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from dsa_train.cli import main as cli_main
from dsa_train.config import ConfigError, load_config
from dsa_train.eval.checkpoints import load_checkpoint
from dsa_train.paths import run_path
from dsa_train.train.metrics import MetricsWriter
from dsa_train.train.trainer import train
from fake_bucket import fake_gcs

REPO = Path(__file__).resolve().parents[1]
BASE = ["train.batch_size=2", "train.seq_len=32", "model.index_topk=16", "train.log_every=1",
        "checkpoint.save_every=1", "data.source=synthetic", "data.num_pairs=2", "data.num_queries=1"]
EVAL_ARGS = ["--seq-len", "32", "--batches", "1", "--batch-size", "2", "--no-needle", "--no-progress"]


def config(run_dir: str, *extra: str):
    return load_config(REPO / "configs" / "tiny.yaml", [*BASE, f"train.run_dir={run_dir}", *extra], check_paths=True)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """``gs://bkt/...`` is ``bucket/bkt/...``; the working directory is an empty ``cwd/``."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with fake_gcs(tmp_path / "bucket", monkeypatch) as root:
        yield root / "bkt"
    assert not list(cwd.iterdir()), f"written to the working directory: {sorted(cwd.rglob('*'))}"
    assert not (REPO / "gs:").exists()


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensors(hf_dir: Path) -> dict:
    merged = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        merged.update(load_file(f))
    return merged


@pytest.mark.slow  # three tiny training stages, an eval and a round trip through HF
def test_run_resume_eval_export_import_on_a_bucket(bucket, tmp_path):
    warmup, sparse = "gs://bkt/runs/warmup", "gs://bkt/runs/sparse"
    train(config(warmup, "train.stage=warmup", "train.steps=2", "train.profile_steps=[2]"), console=False)
    resumed = train(config(warmup, "train.stage=warmup", "train.steps=3"), console=False)
    assert resumed.steps == 3 and str(resumed.run_dir) == warmup
    assert steps_logged(bucket / "runs/warmup") == [1, 2, 3]  # steps 1-2 from the first job, 3 resumed
    assert {p.name for p in (bucket / "runs/warmup/checkpoints").iterdir()} >= {"2", "3"}
    assert len(list((bucket / "runs/warmup/tensorboard").glob("events.out.tfevents.*"))) == 2
    assert (bucket / "runs/warmup/summary.json").is_file() and (bucket / "runs/warmup/config.yaml").is_file()
    assert list((bucket / "runs/warmup/profile").rglob("*.xplane.pb"))  # traced locally, then copied

    train(config(sparse, "train.stage=sparse", "train.steps=1", f"checkpoint.init_from={warmup}"), console=False)
    assert steps_logged(bucket / "runs/sparse") == [1]
    assert cli_main(["plot", warmup, sparse]) == 0
    assert (bucket / "runs/warmup/curves.png").stat().st_size > 0

    assert cli_main(["eval", sparse, *EVAL_ARGS, "--out", "gs://bkt/eval"]) == 0
    report = json.loads((bucket / "eval/eval.json").read_text())
    assert report["results"][0]["checkpoint"]["stage"] == "sparse"
    assert (bucket / "eval/report.md").is_file() and list((bucket / "eval").glob("*.png"))

    assert cli_main(["convert", "export", sparse, "gs://bkt/hf", "--dtype", "float32"]) == 0
    assert cli_main(["convert", "export", sparse, str(tmp_path / "hf_local"), "--dtype", "float32"]) == 0
    remote, local = tensors(bucket / "hf"), tensors(tmp_path / "hf_local")
    assert remote.keys() == local.keys() and remote
    for name in local:
        np.testing.assert_array_equal(remote[name], local[name], err_msg=name)

    assert cli_main(["convert", "import", "gs://bkt/hf", "gs://bkt/imported"]) == 0
    imported, trained = load_checkpoint("gs://bkt/imported").model, load_checkpoint(sparse).model
    np.testing.assert_array_equal(np.asarray(imported.lm_head.weight[...]), np.asarray(trained.lm_head.weight[...]))


def test_missing_remote_init_from_is_one_line_naming_the_key(bucket):
    with pytest.raises(ConfigError, match=r"checkpoint\.init_from: gs://bkt/nowhere does not exist"):
        config("gs://bkt/runs/x", "train.stage=sparse", "checkpoint.init_from=gs://bkt/nowhere")


def test_metrics_on_a_bucket_are_staged_locally_and_appended_across_jobs(bucket):
    run = "gs://bkt/runs/metrics"
    assert str(run_path(run)) == run and str(run_path(run) / "a") == run + "/a"
    for job, steps in enumerate(([1, 2], [3])):
        writer = MetricsWriter(run, 3, "warmup", console=False, config={"train": {"steps": 3}})
        assert not str(writer.staging.local).startswith(str(bucket))
        for step in steps:
            writer.write(step, {"loss": 1.0 / step})
        if job == 0:
            writer.sync()  # what a long run does every SYNC_SECONDS
            assert steps_logged(bucket / "runs/metrics") == [1, 2]
        writer.close()
        assert not writer.staging.local.exists()
    assert steps_logged(bucket / "runs/metrics") == [1, 2, 3]  # the second job appended
    assert list((bucket / "runs/metrics/tensorboard").glob("events.out.tfevents.*"))
