"""The run directory under faults and bad input, as an operator meets them.

Every case asserts what the operator sees (one line on stderr naming the file / key / step, no
traceback), the exit status (dsa_train/exit_codes.py), that nothing was created or changed that
should not be, and, where a run goes on, that it resumes from the last good checkpoint with the
metrics of an uninterrupted run. Cases without training are fast; the ones that train are slow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from dsa_train import exit_codes
from dsa_train.checkpoint.manager import RunCheckpointer, set_aside_uncommitted, CheckpointError
from dsa_train.checkpoint.run_lock import RunDirLockedError, RunLock
from dsa_train.cli import main
from dsa_train.config import CheckpointConfig, load_config, to_dict
from dsa_train.data import pipeline
from dsa_train.train.trainer import _drop_replayed_metrics
from test_checkpoint_resume import sigterm_at_batch

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "dense-base.yaml")
TINY = ["train.batch_size=2", "train.seq_len=32", "train.log_every=1", "data.num_pairs=2", "data.num_queries=2"]


def sets(*overrides: str) -> list[str]:
    return [a for o in (*TINY, *overrides) for a in ("--set", o)]


def tree(run_dir: Path) -> dict[str, bytes]:
    """Every file under run_dir with its content: what 'nothing changed' compares."""
    if not run_dir.exists():
        return {}
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# The run-directory lock
# ----------------------------------------------------------------------------------------------


def test_a_held_run_dir_refuses_a_second_lock_and_a_killed_holder_does_not_block(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirLockedError, match=f"{tmp_path} is in use by another training job \\(pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # released on exit
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from dsa_train.checkpoint.run_lock import RunLock
        RunLock({str(tmp_path)!r}).acquire()
        print("LOCKED", flush=True)
        time.sleep(600)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        with pytest.raises(RunDirLockedError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunLock(tmp_path).acquire().release()  # the kernel dropped the dead holder's lock


def test_train_on_a_locked_run_dir_is_refused_at_once_with_nothing_touched(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with RunLock(run):
        before = tree(run)
        t0 = time.perf_counter()
        assert main(["train", RECIPE, *sets(f"train.run_dir={run}")]) == exit_codes.USER_ERROR
        assert time.perf_counter() - t0 < 30  # no model was built, nothing waited
        assert tree(run) == before
    line = one_line(capsys.readouterr().err)
    assert f"{run} is in use by another training job" in line


# ----------------------------------------------------------------------------------------------
# Checkpoints that are incomplete or damaged (no training: a small pytree)
# ----------------------------------------------------------------------------------------------


def small_state(scale: float) -> dict:
    return {"model": {"w": jnp.full((64, 32), scale, jnp.float32), "b": jnp.arange(16, dtype=jnp.float32)},
            "step": jnp.int32(int(scale))}


def saved_run(run_dir: Path, steps=(1, 2, 3)) -> CheckpointConfig:
    ckpt = CheckpointConfig(save_every=1, keep=5, async_save=False)
    with RunCheckpointer(run_dir, ckpt, {"model": {"hidden_size": 128}}) as ck:
        for step in steps:
            ck.save(step, small_state(step), {"step": step})
    return ckpt


def test_an_uncommitted_step_is_set_aside_and_written_again(tmp_path):
    ckpt = saved_run(tmp_path)
    (tmp_path / "checkpoints" / "3" / "commit_success.txt").unlink()
    moved = set_aside_uncommitted(tmp_path)
    assert len(moved) == 1 and "checkpoint of step 3 skipped: it was never committed" in moved[0]
    assert (tmp_path / "damaged_checkpoints" / "3" / "train_state").is_dir()  # kept for the operator
    with RunCheckpointer(tmp_path, ckpt, {}) as ck:
        assert ck.all_steps() == [1, 2]
        assert ck.save(3, small_state(30), {"step": 3})  # not skipped as "already saved"
        ck.wait()
        assert ck.all_steps() == [1, 2, 3]
        assert float(ck.restore(3).train_state["model"]["w"][0, 0]) == 30


DAMAGES = {
    "truncated data file": lambda d: [f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
                                      for f in (d / "train_state").rglob("d/*") if f.is_file()],
    "garbage data file": lambda d: [f.write_bytes(os.urandom(f.stat().st_size))
                                    for f in (d / "train_state").rglob("d/*") if f.is_file()],
    "deleted _METADATA": lambda d: (d / "train_state" / "_METADATA").unlink(),
    "garbage data_state": lambda d: (d / "data_state" / "metadata").write_text("{garbage"),
    "garbage config": lambda d: (d / "config" / "metadata").write_text("{garbage"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_readable_one(tmp_path, damage, capsys):
    ckpt = saved_run(tmp_path)
    DAMAGES[damage](tmp_path / "checkpoints" / "3")
    with RunCheckpointer(tmp_path, ckpt, {}) as ck:
        restored, skipped = ck.restore_latest_usable({"model": {"hidden_size": 128}}, small_state(0))
        assert restored.step == 2 and float(restored.train_state["model"]["w"][0, 0]) == 2
        assert restored.data_state == {"step": 2}
        assert len(skipped) == 1 and skipped[0].startswith("checkpoint of step 3 skipped: ")
        assert "\n" not in skipped[0] and len(skipped[0]) < 400
        assert ck.all_steps() == [1, 2]
        assert ck.save(3, small_state(33), {"step": 3})  # the step is written again
    assert "Traceback" not in capsys.readouterr().err  # TensorStore's stray reader tracebacks are dropped


def test_no_usable_checkpoint_is_one_line_naming_every_step(tmp_path):
    ckpt = saved_run(tmp_path, steps=(1, 2))
    for step in (1, 2):
        DAMAGES["deleted _METADATA"](tmp_path / "checkpoints" / str(step))
    with RunCheckpointer(tmp_path, ckpt, {}) as ck:
        with pytest.raises(CheckpointError) as e:
            ck.restore_latest_usable({}, small_state(0))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"no usable checkpoint in {tmp_path / 'checkpoints'}")
    assert "checkpoint of step 2 skipped" in message and "checkpoint of step 1 skipped" in message


# ----------------------------------------------------------------------------------------------
# Refusals leave the run directory as it was
# ----------------------------------------------------------------------------------------------


def test_a_refused_resume_keeps_the_recorded_config(tmp_path, capsys):
    run = tmp_path / "run"
    config = load_config(RECIPE, TINY + [f"train.run_dir={run}", "model.hidden_size=64"])
    with RunCheckpointer(run, config.checkpoint, to_dict(config)) as ck:
        ck.save(2, small_state(2), {"step": 2}, force=True)
    (run / "config.yaml").write_text("the run's recorded config\n")
    before = tree(run)
    assert main(["train", RECIPE, *sets(f"train.run_dir={run}")]) == exit_codes.USER_ERROR
    line = one_line(capsys.readouterr().err)
    assert "cannot resume" in line and "from step 2" in line and "model.hidden_size: 64 -> 128" in line
    assert tree(run) == before


@pytest.mark.parametrize("bad", ["mesh.fsdp=3", "checkpoint.init_from={tmp}/nowhere"])
def test_a_failed_check_leaves_no_run_dir(tmp_path, capsys, bad):
    run = tmp_path / "new" / "run"
    assert main(["train", RECIPE, *sets(f"train.run_dir={run}", bad.format(tmp=tmp_path))]) == exit_codes.USER_ERROR
    line = one_line(capsys.readouterr().err)
    assert ("nowhere" in line) if "init_from" in bad else ("fsdp" in line or "mesh" in line)
    assert not run.exists()


def test_a_failed_check_in_an_existing_run_dir_removes_only_what_it_created(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    assert main(["train", RECIPE, *sets(f"train.run_dir={run}",
                                        f"checkpoint.init_from={tmp_path}/nowhere")]) == exit_codes.USER_ERROR
    one_line(capsys.readouterr().err)
    assert tree(run) == {"notes.txt": b"mine\n"}


def test_missing_init_from_exits_cleanly_without_orbax_shutdown_tracebacks(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dsa_train.cli", "train", RECIPE,
                           *sets(f"train.run_dir={run}", f"checkpoint.init_from={tmp_path}/nowhere")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)))
    assert proc.returncode == exit_codes.USER_ERROR
    assert f"{tmp_path}/nowhere does not exist" in one_line(proc.stderr)
    assert not run.exists()


def test_replayed_metrics_are_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    _drop_replayed_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    _drop_replayed_metrics(tmp_path / "absent.jsonl", 2)  # a run without metrics yet
    assert not (tmp_path / "absent.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# Prepared data: damaged shards, manifests that lie, failed preparations
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from dsa_train.data.prepare import prepare_main

    root = tmp_path_factory.mktemp("data")
    words = [f"w{i}" for i in range(50)]
    docs = [" ".join(words[(i * 7 + j) % 50] for j in range(40)) for i in range(40)]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(docs, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"]))
    tok.save(str(root / "tok.json"))
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert prepare_main([str(root / "a.jsonl"), "--tokenizer", str(root / "tok.json"), "-o", str(root / "ds"),
                         "--quiet"]) == 0
    return root


def copy_dataset(prepared: Path, tmp_path: Path) -> Path:
    ds = tmp_path / "ds"
    shutil.copytree(prepared / "ds", ds)
    return ds


def read_batches(ds: Path, n: int = 30) -> None:
    from dsa_train.config import DataConfig

    it = pipeline.make_train_iterator(DataConfig(source="arrayrecord", paths=(str(ds),)), batch_size=2, seq_len=32,
                                      vocab_size=512, seed=0)
    for _ in range(n):
        next(it)


SHARD_DAMAGES = {
    "truncated": lambda b: b[: len(b) // 3],
    "garbage": lambda b: os.urandom(len(b)),
    "garbage in a record": lambda b: b[:200] + os.urandom(1000) + b[1200:],
}


@pytest.mark.parametrize("damage", sorted(SHARD_DAMAGES))
def test_a_damaged_shard_is_one_line_naming_it(prepared, tmp_path, damage):
    from dsa_train.data import DataError

    ds = copy_dataset(prepared, tmp_path)
    shard = ds / "shard-00000.arrayrecord"
    shard.write_bytes(SHARD_DAMAGES[damage](shard.read_bytes()))
    with pytest.raises(DataError) as e:
        read_batches(ds)
    message = str(e.value)
    assert message.startswith(f"{shard}: ") and "\n" not in message and "dsa-train data prepare" in message


def test_train_on_a_truncated_shard_is_one_line_and_leaves_no_run_dir(prepared, tmp_path, capsys):
    ds = copy_dataset(prepared, tmp_path)
    shard = ds / "shard-00000.arrayrecord"
    shard.write_bytes(shard.read_bytes()[:1000])
    run = tmp_path / "run"
    assert main(["train", RECIPE, *sets(f"train.run_dir={run}", "data.source=arrayrecord",
                                        f"data.paths=[{ds}]")]) == exit_codes.USER_ERROR
    assert f"{shard}: not a readable ArrayRecord file" in one_line(capsys.readouterr().err)
    assert not run.exists()


def test_a_manifest_that_lies_about_token_ids_is_caught_while_reading(prepared, tmp_path):
    from dsa_train.data import DataError

    ds = copy_dataset(prepared, tmp_path)
    manifest = json.loads((ds / "manifest.json").read_text())
    (ds / "manifest.json").write_text(json.dumps({**manifest, "max_token_id": 10}))
    with pytest.raises(DataError, match=f"^{ds / 'manifest.json'}: a document holds token id \\d+, outside "
                                        "\\[0, max_token_id 10\\]"):
        read_batches(ds)


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_prepare_leaves_nothing_it_created(prepared, tmp_path, capsys, existing):
    from dsa_train.data.prepare import prepare_main

    bad = tmp_path / "bad.jsonl"
    good = (prepared / "a.jsonl").read_text()
    bad.write_text(good + good + '{"text": "cut off\n')  # the last shard fails, after others are written
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "README").write_text("mine\n")
    assert prepare_main([str(bad), "--tokenizer", str(prepared / "tok.json"), "-o", str(out), "--quiet",
                         "--shard-mb", "0.002"]) == 2
    assert "invalid JSON" in one_line(capsys.readouterr().err)
    assert tree(out) == ({"README": b"mine\n"} if existing else {})


def test_a_binary_txt_input_is_refused(prepared, tmp_path, capsys):
    from dsa_train.data.prepare import prepare_main

    for name, content, message in [("blob.txt", b"GIF89a\x00\x01binary", "not a text file (NUL byte at offset 6)"),
                                   ("latin.txt", b"caf\xe9 au lait", "not UTF-8 text (invalid byte at offset 3)")]:
        (tmp_path / name).write_bytes(content)
        out = tmp_path / f"out-{name}"
        assert prepare_main([str(tmp_path / name), "--tokenizer", str(prepared / "tok.json"), "-o", str(out),
                             "--quiet"]) == 2
        assert f"{tmp_path / name}: {message}" in one_line(capsys.readouterr().err)
        assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Runs that train (slow): each resumes to the metrics of one uninterrupted run
# ----------------------------------------------------------------------------------------------

STEPS = 4
TIMING = ("time", "step_time", "tok/s", "tflops_per_device", "mfu")


def train_args(run: Path, *extra: str) -> list[str]:
    return ["train", RECIPE, *sets(f"train.steps={STEPS}", "checkpoint.save_every=2", f"train.run_dir={run}", *extra)]


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def committed(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir()
                  if p.name.isdigit() and (p / "commit_success.txt").is_file())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_args(run)) == exit_codes.OK
    assert [r["step"] for r in metrics(run)] == list(range(1, STEPS + 1))
    return run


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["uncommitted", "truncated data file"])
def test_a_bad_final_checkpoint_is_redone_from_the_one_before(reference, tmp_path, capsys, fault):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    final = run / "checkpoints" / str(STEPS)
    if fault == "uncommitted":
        (final / "commit_success.txt").unlink()
    else:
        DAMAGES[fault](final)
    capsys.readouterr()
    assert main(train_args(run)) == exit_codes.OK
    out, err = capsys.readouterr()
    line = one_line(err)
    assert line.startswith(f"warning: checkpoint of step {STEPS} skipped: ") and "damaged_checkpoints" in line
    assert f"resuming {run} from step 2" in out and f"finished at step {STEPS}" in out
    assert committed(run) == [2, STEPS]  # the last step is written again
    assert metrics(run) == metrics(reference)  # one record per step, equal to the uninterrupted run


@pytest.mark.slow
def test_preemption_exits_with_its_own_code_and_resumes(reference, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "make_train_iterator", sigterm_at_batch(pipeline.make_train_iterator, 3))
        assert main(train_args(run)) == exit_codes.PREEMPTED
    out, err = capsys.readouterr()
    assert "preempted at step 3: received SIGTERM; the checkpoint of step 3 is saved" in out
    assert "finished" not in out and "Traceback" not in err
    assert committed(run) == [2, 3]
    assert main(train_args(run)) == exit_codes.OK
    assert metrics(run) == metrics(reference)


@pytest.mark.slow
def test_a_non_finite_streak_saves_nothing_and_resumes_from_the_last_healthy_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    healthy = ["train.steps=3", "checkpoint.save_every=1", "checkpoint.keep=10"]
    assert main(train_args(run, *healthy)) == exit_codes.OK
    # The same run resumed with an absurd learning rate: step 4's update (its loss still finite)
    # blows the weights up, steps 5 and 6 are non-finite and the run stops.
    blow_up = ["train.steps=8", "checkpoint.save_every=1", "checkpoint.keep=10", "train.max_nonfinite_steps=2",
               "train.main.lr=1e30", "train.main.warmup_steps=0"]
    capsys.readouterr()
    assert main(train_args(run, *blow_up)) == exit_codes.RUN_FAILED
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert not any("Traceback" in line for line in lines)
    assert lines[-1].startswith("dsa-train train: error: stopping at step 6: 2 consecutive steps had a non-finite")
    assert "the last healthy checkpoint is step 3" in lines[-1]
    assert lines[:-1] == ["warning: not saving step 5: inside a run of non-finite steps (newest checkpoint: step 4)",
                          f"warning: checkpoint of step 4 skipped: its weights gave a non-finite loss at step 5; "
                          f"moved to {run / 'damaged_checkpoints' / '4'}"]
    assert committed(run) == [1, 2, 3]  # nothing saved inside the streak, and its cause set aside
    records = {r["step"]: r for r in metrics(run)}
    assert records[4]["skipped"] == 0 and records[5]["skipped"] == records[6]["skipped"] == 1
    # Run again with a sane learning rate: it resumes from step 3.
    capsys.readouterr()
    assert main(train_args(run, "train.steps=5", "checkpoint.save_every=1", "checkpoint.keep=10")) == exit_codes.OK
    assert f"resuming {run} from step 3" in capsys.readouterr().out
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5]
    assert all(r["skipped"] == 0 for r in metrics(run)[3:])


@pytest.mark.slow
def test_two_runs_on_one_run_dir_the_second_refuses_and_the_first_keeps_every_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "dsa_train.cli", *train_args(run, "train.steps=6")], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)))
    try:
        deadline = time.time() + 120
        # Until the first run holds the lock (it writes its pid once locked). Only read: taking
        # the lock here, even briefly, could refuse the first run.
        while time.time() < deadline and not ((run / ".lock").is_file()
                                              and f'"pid": {first.pid}' in (run / ".lock").read_text()):
            time.sleep(0.2)
        t0 = time.perf_counter()
        assert main(train_args(run, "train.steps=6")) == exit_codes.USER_ERROR
        assert time.perf_counter() - t0 < 30
        assert f"{run} is in use by another training job (pid {first.pid}" in one_line(capsys.readouterr().err)
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == exit_codes.OK, err
    assert committed(run) == [2, 4, 6]
    assert [r["step"] for r in metrics(run)] == list(range(1, 7))


@pytest.mark.slow
def test_a_checkpoint_write_failure_stops_the_run_at_once_and_keeps_the_previous_one(reference, tmp_path, capsys,
                                                                                  monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    run = tmp_path / "run"
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def disk_full_at_step_2(self):
        if self._final_path.name == "2":
            raise OSError(28, "No space left on device", str(self._final_path))
        return await finalize(self)

    with monkeypatch.context() as patch:
        patch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full_at_step_2)
        assert main(train_args(run, "checkpoint.save_every=1")) == exit_codes.RUN_FAILED
    line = one_line(capsys.readouterr().err)
    assert "a checkpoint could not be written" in line and "No space left on device" in line
    assert "the checkpoint of step 1 is intact" in line
    stopped = int(line.split("stopping at step ")[1].split(":")[0])
    assert stopped <= 3  # at once: not trained on to the end without checkpoints
    assert committed(run) == [1]
    assert main(train_args(run, "checkpoint.save_every=1")) == exit_codes.OK  # space freed: resume from step 1
    assert metrics(run) == metrics(reference)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_run_dir_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        assert main(["train", RECIPE, *sets(f"train.run_dir={run}")]) == exit_codes.USER_ERROR
        line = one_line(capsys.readouterr().err)
        assert "Permission denied" in line and str(run) in line
    finally:
        run.chmod(0o755)
    assert tree(run) == {}


# ----------------------------------------------------------------------------------------------
# Hugging Face import: tensors of the wrong dtype or with non-finite values
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    import hf_reference as R

    model = R.build_hf_model(R.hf_config("v32", rope=R.YARN), seed=3)
    path = tmp_path_factory.mktemp("hf") / "hf"
    model.save_pretrained(path)
    return path


def tampered(hf_dir: Path, tmp_path: Path, change) -> Path:
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    tensors = load_file(src / "model.safetensors")
    change(tensors)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("change, message", [
    (lambda t: t.__setitem__("model.layers.0.mlp.down_proj.weight",
                             t["model.layers.0.mlp.down_proj.weight"].to(__import__("torch").int32)),
     "model.layers.0.mlp.down_proj.weight in model.safetensors: dtype int32, expected a floating-point tensor"),
    (lambda t: [t[k].fill_(float("nan")) for k in ("model.layers.1.self_attn.o_proj.weight", "model.norm.weight")],
     "2 tensor(s) hold NaN or Inf: "),
    (lambda t: t["model.embed_tokens.weight"].view(-1)[7:8].fill_(float("inf")),
     "1 tensor(s) hold NaN or Inf: model.embed_tokens.weight; nothing written"),
])
def test_hf_import_refuses_bad_tensors_and_writes_nothing(hf_checkpoint, tmp_path, capsys, change, message):
    from dsa_train.convert import convert_main

    src = tampered(hf_checkpoint, tmp_path, change)
    out = tmp_path / "out"
    assert convert_main(["import", str(src), str(out)]) == exit_codes.USER_ERROR
    line = one_line(capsys.readouterr().err)
    assert message in line
    if "NaN" in message and "2 tensor" in message:
        assert "model.layers.1.self_attn.o_proj.weight" in line and "model.norm.weight" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temporary directory
