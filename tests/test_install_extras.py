"""`pip install .[cuda13]` / `.[tpu,gcs]` (what launch/tpu_pod.sh installs) resolve to the JAX plugin wheels
(and gcsfs for gs:// paths); a dry run: nothing is installed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("extra, wheels", [("cuda13", {"jax-cuda13-plugin", "jax-cuda13-pjrt"}),
                                           ("tpu,gcs", {"libtpu", "gcsfs", "google-cloud-storage"})])
def test_extra_resolves_to_the_plugin(extra, wheels, tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                           "--report", str(report), f".[{extra}]"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {item["metadata"]["name"] for item in json.loads(report.read_text())["install"]}
    assert wheels <= names, sorted(names)
