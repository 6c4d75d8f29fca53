"""Checks before expensive work: each mistake ends with one line naming the key (no traceback)."""

import pytest

from dsa_train.cli import main
from dsa_train.config import ConfigError, check_for_devices, load_config

TINY = "configs/tiny.yaml"


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_index_topk_not_below_seq_len_in_sparse_stage(capsys):
    line = one_line_error(capsys, ["train", TINY, "--set", "train.stage=sparse", "--set", "train.seq_len=64",
                                   "--set", "model.index_topk=64"])
    assert "model.index_topk" in line and "train dense" in line
    # the warm-up (dense attention) does not care
    load_config(TINY, ["train.stage=warmup", "train.seq_len=64", "model.index_topk=64"])


def test_init_from_must_exist(capsys, tmp_path):
    line = one_line_error(capsys, ["train", TINY, "--set", f"checkpoint.init_from={tmp_path / 'nope'}"])
    assert "checkpoint.init_from" in line and "does not exist" in line


def test_data_paths_must_exist(capsys, tmp_path):
    line = one_line_error(capsys, ["train", TINY, "--set", "data.source=arrayrecord",
                                   "--set", f"data.paths=[{tmp_path / 'nope'}]"])
    assert "data.paths" in line


def test_mesh_product_must_equal_device_count():
    config = load_config(TINY, ["mesh.data=3"])
    with pytest.raises(ConfigError, match=r"^mesh: .*needs 3 devices, but 8"):
        check_for_devices(config, 8, 1)


def test_batch_divisible_by_data_parallel_size_and_processes_holding_whole_row_groups():
    config = load_config(TINY, ["mesh.data=-1", "mesh.fsdp=2", "train.batch_size=6"])
    with pytest.raises(ConfigError, match=r"^train.batch_size: 6 is not divisible by the data-parallel size"):
        check_for_devices(config, 8, 1)
    check_for_devices(load_config(TINY, ["train.batch_size=8"]), 8, 1)
    # tensor across the 2 processes: both load the same 3 rows.
    check_for_devices(load_config(TINY, ["mesh.data=1", "mesh.tensor=2", "train.batch_size=3"]), 2, 2)
    # 6 devices per process, row groups of tensor x context = 4: process 0 holds one and a half.
    config = load_config(TINY, ["mesh.data=3", "mesh.context=4", "train.batch_size=3"])
    with pytest.raises(ConfigError, match=r"^mesh: .*process 0's devices hold parts of row groups .* unevenly"):
        check_for_devices(config, 12, 2)


def test_plan_warns_when_the_batch_would_be_replicated(capsys):
    main(["plan", TINY, "--mesh", "data=4", "--set", "train.batch_size=6", "--set", "train.seq_len=64"])
    assert "train.batch_size 6 is not divisible by data x fsdp x expert = 4" in capsys.readouterr().err


def test_config_command_shows_sources(capsys):
    assert main(["config", "recipes/warmup.yaml", "--set", "train.steps=7"]) == 0
    lines = {line.split("=")[0].strip(): line for line in capsys.readouterr().out.splitlines()}
    assert lines["train.steps"].endswith("= 7  # --set train.steps")
    assert lines["train.stage"].endswith("# recipes/warmup.yaml")
    assert lines["train.seed"].endswith("# default")
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    assert "train.batch_size" in out and "int  (default: 16)" in out and "model.vocab_size" in out


def _commands(parser, prefix=()):
    """Every command path of the parser: (), ("convert",), ("convert", "import"), ..."""
    import argparse

    yield list(prefix)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


def test_the_help_list_covers_every_command():
    from dsa_train.cli import build_parser

    found = {tuple(c) for c in _commands(build_parser())}
    assert {tuple(c) for c in COMMANDS} == found


COMMANDS = [[], ["convert"], ["convert", "import"], ["convert", "export"], ["data"], ["data", "prepare"], ["config"],
            ["train"], ["plan"], ["eval"], ["info"], ["smoke"], ["demo"], ["plot"]]


@pytest.mark.parametrize("argv", COMMANDS)
def test_every_help_works(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert "usage: dsa-train" in capsys.readouterr().out


def test_version(capsys):
    from dsa_train import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"dsa-train {__version__}"
