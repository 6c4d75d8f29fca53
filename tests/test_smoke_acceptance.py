"""End to end: the README's smoke run, then `dsa-train eval` on its checkpoints, checked against the
acceptance figures of the eval issue (the same run the README's report comes from)."""

import json

import pytest

from dsa_train.eval import eval_main
from dsa_train.smoke import run_smoke


def _results(out_dir):
    return json.loads((out_dir / "eval.json").read_text())["results"]


@pytest.mark.slow
def test_smoke_run_meets_the_eval_acceptance(tmp_path):
    runs = tmp_path / "smoke"
    summary = run_smoke(runs)
    assert summary["warmup"]["indexer_kl_final"] < summary["warmup"]["indexer_kl_first"] / 5

    assert eval_main([str(runs / "dense-base"), str(runs / "warmup"), "--out", str(tmp_path / "warm"),
                      "--no-needle", "--no-progress"]) == 0
    base, warm = _results(tmp_path / "warm")
    before = [layer["captured_mass"] for layer in base["indexer"]["layers"]]
    after = [layer["captured_mass"] for layer in warm["indexer"]["layers"]]
    assert min(after) >= 0.9 and max(before) < 0.9, (before, after)

    assert eval_main([str(runs / "dense-base"), str(runs / "sparse"), "--out", str(tmp_path / "sparse"),
                      "--no-progress"]) == 0
    base, sparse = _results(tmp_path / "sparse")
    base_dense = base["quality"]["dense"]["lm_loss"]
    assert abs(sparse["quality"]["sparse"]["lm_loss"] / base_dense - 1) <= 0.02
    needles = sparse["needle"]
    assert needles["dense"]["needles"] == 120
    assert abs(needles["sparse"]["correct"] - needles["dense"]["correct"]) <= 1
