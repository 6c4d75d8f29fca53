"""Multi-process training on one machine: 2 processes x 2 CPU devices over loopback (gloo), started
by launch/local.py, through `dsa-train train` — the code path of a multi-host job.

warm-up on data x fsdp -> sparse stage initialized from it on expert x context (the expert
all-to-all and the context all-gathers cross the process boundary) -> the sparse run stopped
after its step-2 checkpoint and resumed by a fresh pair of processes, whose steps 3-4 must equal
those of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMON = ["train.batch_size=4", "train.seq_len=32", "model.index_topk=8", "checkpoint.save_every=2",
          "train.log_every=1", "data.num_pairs=4", "data.num_queries=2"]
COMPARED = ("loss", "lm_loss", "indexer_kl", "grad_norm/main", "grad_norm/indexer")
# Relative tolerance per metric. Two identical launches of the sparse run over 2 processes (gloo)
# agree bitwise in everything but the indexer's gradient norm, which differed in 1 launch of 16
# (6e-5, once 4e-3 relative); one process with 4 devices reproduces it bitwise.
RTOL = {"grad_norm/indexer": 1e-2}


def launch(*overrides: str, timeout: int = 900, processes: int = 2, cpu_devices: int = 2) -> str:
    cmd = [sys.executable, str(REPO / "launch" / "local.py"), "-n", str(processes), "--cpu-devices", str(cpu_devices),
           "--timeout", str(timeout), "--", sys.executable, "-m", "dsa_train.cli", "train", "configs/tiny.yaml"]
    for item in COMMON + list(overrides):
        cmd += ["--set", item]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout + 60)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc.stdout


def metrics(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = {k: record.get(k) for k in COMPARED}
    return out


def test_launcher_runs_a_two_process_job(tmp_path):
    """The launcher itself: every process sees 4 global devices and a cross-process psum."""
    script = tmp_path / "job.py"
    script.write_text(
        "from dsa_train.parallel.distributed import initialize_from_env\n"
        "initialize_from_env()\n"
        "import jax, numpy as np\n"
        "from jax.sharding import NamedSharding, PartitionSpec as P\n"
        "from dsa_train.config import MeshConfig\n"
        "from dsa_train.parallel import make_mesh\n"
        "mesh = make_mesh(MeshConfig(data=-1))\n"
        "x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')),\n"
        "    np.full((2, 3), jax.process_index() + 1.0, np.float32), (4, 3))\n"
        "total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(x)\n"
        "print('RESULT', jax.process_index(), jax.process_count(), jax.device_count(), float(total))\n")
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "local.py"), "-n", "2", "--cpu-devices", "2",
                           "--timeout", "240", "--", sys.executable, str(script)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = sorted(line.split("RESULT ")[1] for line in proc.stdout.splitlines() if "RESULT " in line)
    assert results == ["0 2 4 18.0", "1 2 4 18.0"], proc.stdout[-3000:]


def test_launcher_reports_a_failing_process(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['DSA_PROCESS_ID'] == '1': sys.exit(3)\n"
                      "time.sleep(60)\n")
    with socket.socket() as s:  # any free port will do; the script never connects
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "local.py"), "-n", "2", "--port", str(port), "--",
                           sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3


@pytest.mark.slow
def test_two_processes_warmup_sparse_checkpoint_resume(tmp_path):
    warmup, sparse, straight = tmp_path / "warmup", tmp_path / "sparse", tmp_path / "straight"
    out = launch("train.stage=warmup", "train.steps=3", f"train.run_dir={warmup}", "mesh.data=2", "mesh.fsdp=2")
    assert "[0] warmup finished at step 3" in out and "[1] warmup finished at step 3" in out
    assert (warmup / "checkpoints" / "3").is_dir()

    sparse_mesh = ["mesh.data=1", "mesh.expert=2", "mesh.context=2", f"checkpoint.init_from={warmup}",
                   "train.stage=sparse"]
    out = launch(*sparse_mesh, "train.steps=2", f"train.run_dir={sparse}")
    assert "initializing the model from" in out and (sparse / "checkpoints" / "2").is_dir()
    # A fresh pair of processes resumes from step 2 and goes on to step 4.
    out = launch(*sparse_mesh, "train.steps=4", f"train.run_dir={sparse}")
    assert "resuming" in out and (sparse / "checkpoints" / "4").is_dir()
    # ... exactly as an uninterrupted run would have.
    launch(*sparse_mesh, "train.steps=4", f"train.run_dir={straight}")
    resumed, reference = metrics(sparse), metrics(straight)
    for step in (1, 2, 3, 4):
        for key in COMPARED:
            a, b = resumed[step][key], reference[step][key]
            assert a == pytest.approx(b, rel=RTOL.get(key, 1e-5), abs=1e-7), (step, key, a, b)


@pytest.mark.slow
def test_context_across_processes_trains_like_one_process(tmp_path):
    """mesh.context = 2 over 2 processes of 1 device each (both load the same rows; each places its
    part of the sequence, zig-zag reordered inside the step) gives the losses of 1 process with 2."""
    mesh = ["mesh.data=1", "mesh.context=2", "mesh.context_order=zigzag", "train.stage=sparse", "train.steps=2"]
    for processes, devices, run_dir in ((2, 1, tmp_path / "split"), (1, 2, tmp_path / "one")):
        launch(*mesh, f"train.run_dir={run_dir}", processes=processes, cpu_devices=devices)
    split, one = metrics(tmp_path / "split"), metrics(tmp_path / "one")
    assert sorted(split) == sorted(one) == [1, 2]
    for step in one:
        for key in COMPARED:
            assert split[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-6), (step, key)
