"""The README's quick-start for a GPU cluster and a TPU pod, line by line as far as this machine allows:
each launch line's recipe and overrides pass the start-up checks for the job size it names, and
launch/tpu_pod.sh hands every worker the same `dsa-train train` command (quoting intact) after
installing the TPU build (a stand-in `gcloud` runs the worker command here)."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from dsa_train.config import ConfigError, check_for_devices, load_config

REPO = Path(__file__).resolve().parents[1]


def cluster_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Running on a cluster")
    return text[start:text.index("\n## ", start + 1)]


def launch_lines(script: str) -> list[list[str]]:
    """The shell words of each README command (continuation lines joined) that runs ``script``."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", cluster_section(), re.S):
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if script in words:
                lines.append(words)
    assert lines, f"no README line runs {script}"
    return lines


def sets_after(words: list[str], recipe_at: int) -> list[str]:
    rest, sets = words[recipe_at + 1:], []
    for i, word in enumerate(rest):
        if word == "--set":
            sets.append(rest[i + 1])
    return sets


def test_slurm_lines_pass_the_start_up_checks():
    gpus_per_node = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)", (REPO / "launch/slurm.sbatch").read_text(),
                                  re.M).group(1))
    for words in launch_lines("launch/slurm.sbatch"):
        nodes = int(next(w for w in words if w.startswith("--nodes=")).split("=")[1])
        at = words.index("launch/slurm.sbatch") + 1
        config = load_config(REPO / words[at], sets_after(words, at))
        check_for_devices(config, nodes * gpus_per_node, nodes * gpus_per_node)  # one process per GPU


def test_tpu_pod_line_passes_the_start_up_checks():
    chips, hosts = map(int, re.search(r"(\d+) chips on (\d+) hosts", cluster_section()).groups())
    [words] = launch_lines("launch/tpu_pod.sh")
    at = words.index("launch/tpu_pod.sh") + 3  # TPU_NAME ZONE RECIPE
    sets = sets_after(words, at)
    assert "data.paths=[gs://BUCKET/data/prepared]" in sets
    check_for_devices(load_config(REPO / words[at], sets), chips, hosts)  # one process per host


def test_context_across_processes_is_accepted_and_an_uneven_split_is_one_line_naming_the_mesh():
    config = load_config(REPO / "recipes/sparse.yaml", ["mesh.expert=8", "mesh.context=2"])  # data 15 on 240
    check_for_devices(config, 240, 240)  # one process per GPU: pairs of processes share rows
    check_for_devices(config, 240, 30)  # one process per 8-GPU node: context stays inside it
    config = load_config(REPO / "recipes/sparse.yaml", ["mesh.expert=8", "mesh.context=16"])  # data 2 on 256
    check_for_devices(config, 256, 64)  # one process per 4-chip TPU host: 4 of them per row group
    # 24 devices per process, row groups of 16: process 0 holds one and a half.
    with pytest.raises(ConfigError, match=r"^mesh: mesh data=3,.*: process 0's devices hold parts of row groups"):
        check_for_devices(config, 384, 16)


STUB = "#!/bin/bash\necho \"$(basename \"$0\") $*\" >> {log}\n"
FAKE_GCLOUD = """#!/bin/bash
# gcloud compute tpus tpu-vm ssh NAME --zone=Z --worker=all --command=CMD: run CMD here, as one worker.
echo "gcloud $1 $2 $3 $4 $5 $6 $7" >> {log}
for arg in "$@"; do case "$arg" in --command=*) exec bash -c "${{arg#--command=}}";; esac; done
exit 3
"""


def test_tpu_pod_script_installs_the_tpu_build_and_passes_the_arguments(tmp_path):
    log, bin_dir, repo = tmp_path / "log", tmp_path / "bin", tmp_path / "home" / "dsa-train"
    (repo / ".venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    for path, text in ((bin_dir / "gcloud", FAKE_GCLOUD.format(log=log)), (bin_dir / "python3", STUB.format(log=log)),
                       (bin_dir / "dsa-train", STUB.format(log=log)), (repo / ".venv/bin/pip", STUB.format(log=log))):
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    (repo / ".venv/bin/activate").write_text("")
    [words] = launch_lines("launch/tpu_pod.sh")
    args = words[words.index("launch/tpu_pod.sh") + 1:]
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(tmp_path / "home"), DSA_SETUP="1")
    proc = subprocess.run(["bash", str(REPO / "launch/tpu_pod.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all"
    assert "python3 -m venv .venv" in calls and "pip install -q -e .[tpu,gcs]" in calls
    assert calls[-1] == "dsa-train train " + " ".join(args[2:])  # every --set word arrives as written
    assert list((tmp_path / "home").glob("dsa-train-*.log"))  # the worker's own log


def test_jobset_matches_the_dockerfile_and_passes_the_start_up_checks():
    import yaml

    jobset = yaml.safe_load((REPO / "launch/jobset.yaml").read_text())
    [workers] = jobset["spec"]["replicatedJobs"]
    job = workers["template"]["spec"]
    [container] = job["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    hosts, gpus = job["parallelism"], int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert job["completions"] == hosts == int(env["DSA_NUM_PROCESSES"]) and job["completionMode"] == "Indexed"
    assert int(env["DSA_EXPECTED_DEVICES"]) == hosts * gpus
    # Pod 0 of the JobSet's headless service: <jobset>-<job>-<job index>-<pod index>.<jobset>.
    host, port = env["DSA_COORDINATOR_ADDRESS"].split(":")
    assert host == f"{jobset['metadata']['name']}-{workers['name']}-0-0.{jobset['metadata']['name']}"
    assert {"containerPort": int(port)} in container["ports"]
    assert re.search(rf"docker build -t {re.escape(container['image'])} \.", (REPO / "Dockerfile").read_text())
    words = shlex.split(container["args"][0])
    at = words.index("train") + 1
    assert words[:3] == ["export", "DSA_PROCESS_ID=$JOB_COMPLETION_INDEX", "&&"] and words[at - 2] == "dsa-train"
    check_for_devices(load_config(REPO / words[at], sets_after(words, at)), hosts * gpus, hosts)
