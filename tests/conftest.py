import os
from pathlib import Path

import pytest

# Tests run on the CPU; keep XLA from grabbing every core's worth of threads per test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The deviceless TPU compile tests load libtpu with no TPU attached; without this, a second test
# process (pytest -n, or a plan compile running beside the tests) fails on libtpu's lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Tests start scripts by path (tests/*.py, bench/*.py, launch/*.py), whose sys.path begins at
# their own folder: name this checkout first, so that they import its package, not another
# installed copy.
_REPO = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(scope="module")
def device():
    """One chip of a deviceless TPU v5p topology (libtpu, no TPU attached), for compile-only tests."""
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc("v5p:2x2x1", "tpu").devices[0]
    except Exception as err:  # noqa: BLE001 - libtpu present but unusable here (e.g. a held lockfile)
        pytest.skip(f"no deviceless v5p topology: {err}")
