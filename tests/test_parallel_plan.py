"""`dsa-train plan`: exact state memory from the sharding rules, both stages reported, clear errors,
and (slow) agreement with XLA's compiled memory figures on a reduced config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsa_train.config import load_config
from dsa_train.flops import count_params
from dsa_train.parallel import plan

REPO = Path(__file__).resolve().parents[1]


def test_state_memory_is_exact_and_divided_by_the_sharding():
    cfg = load_config(REPO / "configs/tiny.yaml", ["train.stage=sparse", "mesh.data=8"])
    total_params = count_params(cfg.model).total
    bias = 4 * cfg.model.n_routed_experts * sum(cfg.model.is_moe_layer(i) for i in range(cfg.model.num_hidden_layers))
    replicated = plan.state_memory(cfg, plan._abstract_or_real_mesh(cfg.mesh, 8, False), plan.resolve_rules())
    assert replicated["params"] == 4 * total_params + bias
    assert replicated["grads"] == 4 * total_params  # every parameter trains in the sparse stage
    assert replicated["optimizer"] >= 2 * 4 * total_params  # Adam's two moments (+ counters)
    # fsdp=2 x tensor=2: every tiny parameter dimension divides, so 4 ways for the big matrices.
    cfg4 = load_config(REPO / "configs/tiny.yaml", ["train.stage=sparse", "mesh.data=1", "mesh.fsdp=2",
                                                   "mesh.tensor=2"])
    sharded = plan.state_memory(cfg4, plan._abstract_or_real_mesh(cfg4.mesh, 4, False), plan.resolve_rules())
    assert replicated["params"] / 4 < sharded["params"] < replicated["params"] / 2


def test_plan_reports_both_stages(capsys):
    report = plan.plan_main(["configs/tiny.yaml", "--mesh", "data=2,fsdp=2,expert=2", "--device", "h100",
                             "--seq-len", "256", "--batch", "8"])
    assert "## stage warmup" in report and "## stage sparse" in report
    assert "estimated step time" in report and "fits in" in report
    warm = plan.plan_stage(load_config(REPO / "configs/tiny.yaml", ["mesh.data=8"]),
                           plan._abstract_or_real_mesh(load_config(REPO / "configs/tiny.yaml", ["mesh.data=8"]).mesh,
                                                       8, False),
                           plan.resolve_rules(), plan.DEVICES["h100"], "warmup", 8, 256)
    # Only the indexers train in the warm-up: no gradients or moments for the main model.
    assert warm["state"]["grads"] == warm["state"]["params_by_group"]["indexer"]


@pytest.mark.parametrize("args, message", [
    (["--mesh", "data=2,model=4"], "expected AXIS=SIZE"),
    (["--mesh", "data=-1"], "explicit mesh sizes"),
])
def test_plan_errors_are_one_line(args, message):
    with pytest.raises(ValueError, match=message):
        plan.plan_main(["configs/tiny.yaml", *args])


@pytest.mark.slow
def test_plan_agrees_with_xla_within_ten_percent():
    """A reduced DeepSeek-shaped config (configs/small.yaml, 2 layers, real vocabulary) on an
    fsdp x expert mesh of simulated CPU devices: the planner's per-device total against XLA's
    compiled peak (arguments + outputs - aliased + temporaries), both stages."""
    cmd = [sys.executable, "-m", "dsa_train.parallel.plan", "configs/small.yaml", "--mesh", "fsdp=2,expert=2",
           "--device", "cpu", "--seq-len", "1024", "--batch", "4", "--compile", "--set", "model.num_hidden_layers=2",
           "--json"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["stage"] for r in results] == ["warmup", "sparse"]
    for r in results:
        assert abs(r["total"] - r["xla_peak"]) <= 0.10 * r["xla_peak"], r
        # The exactly computed state agrees with XLA's arguments (state + batch) to the byte scale.
        assert abs(r["state"] - r["xla_argument"]) <= 0.02 * r["xla_argument"], r
