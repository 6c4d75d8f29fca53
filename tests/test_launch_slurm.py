"""launch/slurm.sbatch under a simulated SLURM allocation: 2 nodes x 2 GPUs on loopback.

A stand-in `srun` starts the allocation's tasks the way SLURM does (SLURM_PROCID, SLURM_LOCALID,
SLURM_STEP_NODELIST, ... per task); `dsa-train train --check` in each task goes through JAX's own
SLURM detection, the device-count check and the config checks, then reports its devices.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm.sbatch"

FAKE_SRUN = """#!{python}
import os, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):  # srun's own options
    args.pop(0)
nodes, per_node = int(os.environ["SLURM_JOB_NUM_NODES"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
procs = []
for rank in range(nodes * per_node):
    env = dict(os.environ, SLURM_NTASKS=str(nodes * per_node), SLURM_PROCID=str(rank),
               SLURM_LOCALID=str(rank % per_node), SLURM_NODEID=str(rank // per_node),
               SLURM_STEP_NODELIST="127.0.0.1", SLURM_STEP_NUM_NODES=str(nodes))
    procs.append(subprocess.Popen(args, env=env))
sys.exit(max(p.wait() for p in procs))
"""


def directive(name: str) -> str:
    return re.search(rf"^#SBATCH --{name}=(\S+)", SBATCH.read_text(), re.M).group(1)


def free_job_id() -> int:
    """A SLURM job id whose JAX coordinator port (61440 + id % 4096) is free here."""
    for job_id in range(1000 + os.getpid() % 3000, 5096):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 61440 + job_id % 4096))
                return job_id
            except OSError:
                continue
    raise RuntimeError("no free port")


def run_sbatch(tmp_path: Path, tasks_per_node: int, gpus_per_node: int, *overrides: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN.format(python=sys.executable))
    # `dsa-train` only in the environment the README passes as DSA_VENV: the script must activate it.
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True, exist_ok=True)
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    shim = venv_bin / "dsa-train"
    shim.write_text(f'#!/bin/bash\nexec {sys.executable} -m dsa_train.cli "$@"\n')
    for f in (srun, shim):
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DSA_", "XLA_FLAGS"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               SLURM_JOB_ID=str(free_job_id()), SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE=str(tasks_per_node),
               SLURM_GPUS_ON_NODE=str(gpus_per_node), DSA_INIT_TIMEOUT="120", DSA_VENV=str(tmp_path / "venv"))
    cmd = ["bash", str(SBATCH), "configs/tiny.yaml", "--check", "--set", "train.batch_size=4", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_sbatch_starts_one_process_per_gpu(tmp_path):
    # The script asks SLURM for as many tasks per node as GPUs per node.
    assert directive("ntasks-per-node") == directive("gpus-per-node")
    proc = run_sbatch(tmp_path, tasks_per_node=2, gpus_per_node=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ready = sorted(line for line in proc.stdout.splitlines() if line.startswith("ready:"))
    assert len(ready) == 4, proc.stdout
    for rank, line in enumerate(ready):
        assert line.startswith(f"ready: process {rank}/4, 1 local cpu devices of 4"), line
        # JAX gives task SLURM_LOCALID the GPU of that number on its node.
        assert line.endswith(f"visible GPUs '{rank % 2}'"), line


def test_one_task_per_node_is_refused_with_one_line(tmp_path):
    """The old layout (one task per 2-GPU node) would train on 2 devices of 4: stopped at start-up."""
    proc = run_sbatch(tmp_path, tasks_per_node=1, gpus_per_node=2)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors and all("sees 2 devices" in e and "granted 4" in e for e in errors), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_batch_not_divisible_by_data_parallel_size(tmp_path):
    proc = run_sbatch(tmp_path, 2, 2, "--set", "train.batch_size=6")
    assert proc.returncode == 2
    assert "train.batch_size: 6 is not divisible by the data-parallel size" in proc.stderr, proc.stderr[-2000:]
