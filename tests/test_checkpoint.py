"""RunCheckpointer: save / restore / keep policy / interrupted saves / resharding / compatibility."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsa_train.config import CheckpointConfig, ConfigError, load_config, to_dict
from dsa_train.checkpoint.manager import (
    CheckpointError,
    RunCheckpointer,
    abstract_tree,
    fill_states,
    from_pure_tree,
    incompatible_fields,
    load_model_for_init,
    resolve_start,
    to_pure_tree,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


class Moments(NamedTuple):
    count: jax.Array
    mu: dict


def make_state(seed: int = 0) -> dict:
    """A train-state-like pytree: model under 'model', optimizer-like named tuples, odd dtypes."""
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    model = {"layers": {0: {"w": jax.random.normal(k[0], (8, 4))}, 1: {"w": jax.random.normal(k[1], (8, 4))}},
             "bias": jax.random.normal(k[2], (5,)).astype(jnp.bfloat16)}
    return {
        "model": model,
        "opt": (Moments(jnp.int32(3), jax.tree.map(jnp.zeros_like, model)), optax.EmptyState()),
        "step": jnp.int32(7),
        "rng": jax.random.key_data(k[3]),
        "nonfinite": jnp.int32(0),
    }


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def checkpointer(tmp_path, **kw) -> RunCheckpointer:
    return RunCheckpointer(tmp_path / "run", CheckpointConfig(**kw), {"model": {"hidden_size": 8}})


def test_roundtrip_is_bitwise_with_data_and_config(tmp_path):
    state = make_state()
    with checkpointer(tmp_path) as ck:
        assert ck.latest_step() is None
        assert ck.save(7, state, {"epoch": 1, "positions": [3, 4]}, force=True)
        ck.wait()
        restored = ck.restore(abstract_train_state=abstract_tree(state))
    assert restored.step == 7
    assert_trees_equal(restored.train_state, state)
    assert isinstance(restored.train_state["opt"][0], Moments)
    assert restored.data_state == {"epoch": 1, "positions": [3, 4]}
    assert restored.config == {"model": {"hidden_size": 8}}
    assert (tmp_path / "run" / "checkpoints" / "7" / "train_state").is_dir()


def test_a_restore_in_many_groups_is_bitwise(tmp_path, monkeypatch):
    """The train state is read a bounded group of arrays at a time (here one array a group): the
    same tree, named tuples and dtypes included, bit for bit."""
    from dsa_train.checkpoint import model_io

    state = make_state()
    with checkpointer(tmp_path) as ck:
        ck.save(7, state, force=True)
        ck.wait()
        calls = []
        monkeypatch.setattr(model_io, "RESTORE_STAGING_BYTES", 1)
        monkeypatch.setattr(model_io, "bounded_restore", lambda read, abstract: calls.append(read) or read({}))
        restored = ck.restore(abstract_train_state=abstract_tree(state))
    assert len(calls) == len(jax.tree.leaves(state))
    assert_trees_equal(restored.train_state, state)
    assert isinstance(restored.train_state["opt"][0], Moments)


def test_synchronous_save_and_reopen(tmp_path):
    state = make_state()
    with checkpointer(tmp_path, async_save=False) as ck:
        ck.save(2, state, force=True)
    with checkpointer(tmp_path) as ck:  # a new process would see the same thing
        assert ck.all_steps() == [2]
        restored = ck.restore(2, abstract_tree(state))
    assert_trees_equal(restored.train_state, state)
    assert restored.data_state is None


def test_save_schedule_and_keep_policy(tmp_path):
    state = make_state()
    with checkpointer(tmp_path, save_every=2, keep=2, keep_every=4) as ck:
        started = [s for s in range(1, 12) if ck.save(s, state)]
        assert started == [2, 4, 6, 8, 10]
        assert ck.save(11, state, force=True)  # the final step
        assert not ck.save(11, state, force=True)  # already saved: a no-op, not an error
        ck.wait()
        # last 2 (10, 11) + every 4th (4, 8)
        assert ck.all_steps() == [4, 8, 10, 11]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == \
        ["10", "11", "4", "8"]


def test_async_save_snapshots_state_before_donation(tmp_path):
    state = make_state()
    expected = jax.tree.map(lambda x: np.array(x, copy=True), state)
    overwrite = jax.jit(lambda tree: jax.tree.map(lambda x: jnp.full_like(x, 7), tree), donate_argnums=0)
    with checkpointer(tmp_path) as ck:
        ck.save(1, state, force=True)
        new = overwrite(state)  # the next train step reuses the buffers while the write goes on
        ck.wait()
        restored = ck.restore(1, abstract_tree(new))
    assert_trees_equal(restored.train_state, expected)


def test_restore_errors_are_one_clear_line(tmp_path):
    state = make_state()
    with checkpointer(tmp_path) as ck:
        with pytest.raises(CheckpointError, match="no checkpoint in"):
            ck.restore()
        ck.save(3, state, force=True)
        ck.wait()
        with pytest.raises(CheckpointError, match=r"no checkpoint for step 5 .*available: \[3\]"):
            ck.restore(5)
        wrong = jax.tree.map(lambda x: x, state)
        wrong["model"]["layers"][0]["w"] = jnp.zeros((8, 6))
        with pytest.raises(CheckpointError, match=r"model/layers/0/w \(8, 4\) -> \(8, 6\)"):
            ck.restore(3, abstract_tree(wrong))
        del wrong["nonfinite"]
        with pytest.raises(CheckpointError, match="only in the checkpoint: nonfinite"):
            ck.restore(3, abstract_tree(wrong))


def test_typed_prng_keys_are_refused_with_a_hint(tmp_path):
    state = {"key": jax.random.key(0)}
    with checkpointer(tmp_path) as ck, pytest.raises(CheckpointError, match="key_data"):
        ck.save(1, state, force=True)


def test_check_compatible_names_shape_fields_and_allows_the_rest(tmp_path):
    base = load_config(TINY, ["train.steps=10"])
    with RunCheckpointer(tmp_path / "run", base.checkpoint, to_dict(base)) as ck:
        ck.save(1, make_state(), force=True)
        ck.wait()
        ck.check_compatible(to_dict(load_config(TINY, ["train.steps=20", "train.main.lr=0.5",
                                                       "checkpoint.save_every=3", "mesh.data=1"])))
        changed = load_config(TINY, ["model.hidden_size=256", "model.n_routed_experts=4", "model.n_group=1",
                                     "model.num_hidden_layers=3"])
        with pytest.raises(ConfigError) as e:
            ck.check_compatible(to_dict(changed))
    message = str(e.value)
    assert "model.hidden_size: 128 -> 256" in message
    assert "model.n_routed_experts: 8 -> 4" in message
    assert "model.num_hidden_layers: 2 -> 3" in message
    assert "n_group" not in message and "\n" not in message
    assert incompatible_fields(to_dict(base), to_dict(load_config(TINY, ["train.stage=sparse"]))) == \
        ["train.stage: warmup -> sparse"]


def test_nnx_state_helpers_roundtrip(tmp_path):
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    kernels, rest = nnx.state(model, nnx.PathContains("kernel"), ...)
    tx = optax.adam(1e-3)
    opt = tx.init(kernels)
    tree = {"model": to_pure_tree(nnx.merge_state(kernels, rest)), "opt": to_pure_tree(opt)}
    assert not any(isinstance(x, nnx.State) for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.State)))
    with checkpointer(tmp_path) as ck:
        ck.save(1, tree, force=True)
        ck.wait()
        restored = ck.restore(1, abstract_tree(tree)).train_state
    new_kernels, new_rest = fill_states(restored["model"], kernels, rest)
    assert isinstance(new_kernels, nnx.State)
    assert jax.tree.structure(new_kernels) == jax.tree.structure(kernels)
    assert_trees_equal(new_kernels, kernels)
    assert_trees_equal(new_rest, rest)
    new_opt = from_pure_tree(opt, restored["opt"])
    assert jax.tree.structure(new_opt) == jax.tree.structure(opt)
    assert_trees_equal(new_opt, opt)
    with pytest.raises(CheckpointError, match="lacks"):
        fill_states({"layers": {}}, kernels)


def test_start_precedence_resume_over_init_from_over_random(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    assert resolve_start(run, CheckpointConfig()).kind == "random"
    init = CheckpointConfig(init_from=str(other))
    start = resolve_start(run, init)
    assert (start.kind, start.path) == ("init_from", other)
    with RunCheckpointer(run, init, {}) as ck:
        ck.save(4, make_state(), force=True)
    start = resolve_start(run, init)  # the run has its own checkpoint: resume it, ignore init_from
    assert (start.kind, start.step) == ("resume", 4)
    assert "resuming" in start.describe()


def test_load_model_for_init_takes_only_the_model(tmp_path):
    state = make_state(seed=1)
    model_cfg = {"hidden_size": 8, "num_hidden_layers": 2}
    with RunCheckpointer(tmp_path / "warmup", CheckpointConfig(), {"model": model_cfg}) as ck:
        ck.save(2, make_state(seed=0), force=True)
        ck.save(5, state, force=True)
    abstract_model = abstract_tree(make_state(seed=2)["model"])
    model = load_model_for_init(tmp_path / "warmup", abstract_model, model_config_dict=model_cfg)
    assert_trees_equal(model, state["model"])  # the latest step
    older = load_model_for_init(tmp_path / "warmup" / "checkpoints" / "2", abstract_model)
    assert_trees_equal(older, make_state(seed=0)["model"])
    with pytest.raises(ConfigError, match=r"model.hidden_size: 8 -> 16"):
        load_model_for_init(tmp_path / "warmup", abstract_model, model_config_dict={**model_cfg, "hidden_size": 16})
    wrong = dict(abstract_model, bias=jax.ShapeDtypeStruct((6,), jnp.bfloat16))
    with pytest.raises(CheckpointError, match=r"bias \(5,\) -> \(6,\)"):
        load_model_for_init(tmp_path / "warmup", wrong)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_for_init(tmp_path / "nowhere", abstract_model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a run directory"):
        load_model_for_init(tmp_path / "empty", abstract_model)


# ----------------------------------------------------------------------------------------------
# Subprocess tests: a SIGKILL during a save, and several simulated devices
# ----------------------------------------------------------------------------------------------


def _python(code: str, devices: int = 1, **popen) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO, text=True, **popen)


def _run(code: str, devices: int = 1, timeout: float = 120) -> str:
    proc = _python(code, devices, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def test_sigkill_during_async_save_keeps_previous_checkpoint(tmp_path):
    # The child commits step 1, then starts an async save of step 2 (a 16 MB array) whose commit is
    # held back, so the kill lands while the save is in flight no matter how fast the disk is.
    child = _python(f"""
        import asyncio, time
        import jax.numpy as jnp
        from orbax.checkpoint._src.path import atomicity
        from dsa_train.config import CheckpointConfig
        from dsa_train.checkpoint.manager import RunCheckpointer
        ck = RunCheckpointer({str(tmp_path / "run")!r}, CheckpointConfig(), {{"model": {{}}}})
        ck.save(1, {{"w": jnp.full((2048, 2048), 1.0)}}, {{"pos": 1}}, force=True)
        ck.wait()
        async def never_commit(self):
            await asyncio.sleep(3600)
        atomicity.AtomicRenameTemporaryPath.finalize = never_commit
        ck.save(2, {{"w": jnp.full((2048, 2048), 2.0)}}, {{"pos": 2}}, force=True)
        print("SAVING", flush=True)
        time.sleep(3600)
    """, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert child.stdout.readline().strip() == "SAVING"
        checkpoints = tmp_path / "run" / "checkpoints"
        deadline = time.time() + 60
        while not any(p.name.startswith("2.") for p in checkpoints.iterdir()):  # the tmp dir of step 2
            assert time.time() < deadline, "the step-2 save never started writing"
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (checkpoints / "2").exists()
    with RunCheckpointer(tmp_path / "run", CheckpointConfig(), {"model": {}}) as ck:
        assert ck.latest_step() == 1
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = {"w": jax.ShapeDtypeStruct((2048, 2048), jnp.float32, sharding=sharding)}
        restored = ck.restore(abstract_train_state=abstract)
        assert restored.step == 1 and restored.data_state == {"pos": 1}
        assert float(restored.train_state["w"].min()) == float(restored.train_state["w"].max()) == 1.0
        # the leftover is cleaned up and step 2 can be saved again
        assert not any(p.name.startswith("2.") for p in checkpoints.iterdir())
        assert ck.save(2, {"w": jnp.full((4, 4), 2.0)}, force=True)
        ck.wait()
        assert ck.all_steps() == [1, 2]


RESHARD_SAVE = """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dsa_train.config import CheckpointConfig
    from dsa_train.checkpoint.manager import RunCheckpointer, with_sharding
    assert jax.device_count() == 8
    values = {"w": np.arange(16 * 24, dtype=np.float32).reshape(16, 24),
              "experts": np.arange(8 * 4 * 6, dtype=np.float32).reshape(8, 4, 6), "step": np.int32(9)}
    mesh = jax.make_mesh((8,), ("data",))
    specs = {"w": P("data", None), "experts": P("data"), "step": P()}
    state = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in values.items()}
    with RunCheckpointer(RUN, CheckpointConfig(), {}) as ck:
        ck.save(9, state, force=True)
    # restore on a different 8-device mesh, with other partitionings
    mesh2 = jax.make_mesh((2, 4), ("fsdp", "tensor"))
    specs2 = {"w": P("tensor", "fsdp"), "experts": P("fsdp", "tensor"), "step": P()}
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh2, specs2[k]))
                for k, v in values.items()}
    with RunCheckpointer(RUN, CheckpointConfig(), {}) as ck:
        got = ck.restore(abstract_train_state=abstract).train_state
    for k in values:
        assert got[k].sharding == abstract[k].sharding, k
        assert np.array_equal(np.asarray(got[k]), values[k]), k
    assert len(got["w"].addressable_shards) == 8 and got["w"].addressable_shards[0].data.shape == (4, 12)
    print("OK8")
"""

RESHARD_RESTORE_ONE = """
    import jax, numpy as np
    from dsa_train.config import CheckpointConfig
    from dsa_train.checkpoint.manager import RunCheckpointer, with_sharding
    assert jax.device_count() == 1
    abstract = {"w": jax.ShapeDtypeStruct((16, 24), np.float32), "experts": jax.ShapeDtypeStruct((8, 4, 6), np.float32),
                "step": jax.ShapeDtypeStruct((), np.int32)}
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with RunCheckpointer(RUN, CheckpointConfig(), {}) as ck:
        got = ck.restore(abstract_train_state=with_sharding(abstract, one)).train_state
    assert np.array_equal(np.asarray(got["w"]), np.arange(16 * 24, dtype=np.float32).reshape(16, 24))
    assert np.array_equal(np.asarray(got["experts"]), np.arange(8 * 4 * 6, dtype=np.float32).reshape(8, 4, 6))
    assert int(got["step"]) == 9 and got["w"].sharding == one
    print("OK1")
"""


def test_restore_onto_other_meshes_and_device_counts(tmp_path):
    run = f"RUN = {str(tmp_path / 'run')!r}\n"
    assert "OK8" in _run(run + textwrap.dedent(RESHARD_SAVE), devices=8)
    assert "OK1" in _run(run + textwrap.dedent(RESHARD_RESTORE_ONE), devices=1)


TWO_PROCESSES = """
    import sys, jax
    pid, port, run = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import numpy as np, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dsa_train.config import CheckpointConfig
    from dsa_train.checkpoint.manager import RunCheckpointer, abstract_tree
    mesh = jax.make_mesh((4,), ("data",))
    values = np.arange(24, dtype=np.float32).reshape(8, 3)
    w = jax.make_array_from_callback((8, 3), NamedSharding(mesh, P("data")), lambda idx: values[idx])
    state = {"w": w, "step": jax.device_put(jnp.int32(3), NamedSharding(mesh, P()))}
    with RunCheckpointer(run, CheckpointConfig(), {}) as ck:
        ck.save(3, state, {"process": pid, "position": 10 + pid}, force=True)
    with RunCheckpointer(run, CheckpointConfig(), {}) as ck:
        got = ck.restore(abstract_train_state=abstract_tree(state))
    assert got.data_state == {"process": pid, "position": 10 + pid}, got.data_state
    for shard in got.train_state["w"].addressable_shards:
        assert np.array_equal(np.asarray(shard.data), values[shard.index])
    print("OK", pid)
"""


def test_two_processes_save_one_checkpoint_with_each_data_state(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    code = textwrap.dedent(TWO_PROCESSES)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(pid), str(port), str(tmp_path / "run")], env=env,
                              cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for pid in (0, 1)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for pid, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {pid}" in out, out[-3000:]
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=one),
                "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=one)}
    with RunCheckpointer(tmp_path / "run", CheckpointConfig(), {}) as ck:  # a 1-process job can't take it over
        with pytest.raises(CheckpointError, match="saved by 2 process"):
            ck.restore(abstract_train_state=abstract)


def test_load_model_for_init_reads_a_converted_model_directory(tmp_path):
    from dsa_train.checkpoint import model_io
    from dsa_train.model import create_model

    config = load_config(TINY, ["model.num_hidden_layers=1", "model.first_k_dense_replace=0"]).model
    model = create_model(config, seed=3)
    model_io.save_model(tmp_path / "imported", model)
    state = to_pure_tree(nnx.state(model))  # int layer keys; the model directory stores strings
    got = load_model_for_init(tmp_path / "imported", abstract_tree(state), model_config_dict=to_dict(config))
    assert_trees_equal(got, state)
    with pytest.raises(ConfigError, match="hidden_size"):
        load_model_for_init(tmp_path / "imported", abstract_tree(state),
                            model_config_dict={**to_dict(config), "hidden_size": 64})


def test_a_save_in_flight_is_not_a_checkpoint_yet(tmp_path, monkeypatch):
    import asyncio
    import threading

    from orbax.checkpoint._src.path import atomicity

    commit = threading.Event()
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_when_allowed(self):
        while not commit.is_set():
            await asyncio.sleep(0.01)
        return await finalize(self)

    state = make_state()
    with checkpointer(tmp_path) as ck:
        ck.save(1, state, force=True)
        ck.wait()
        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize_when_allowed)
        ck.save(2, state, force=True)
        assert not ck.save(2, state, force=True)  # saving the same step again is still a no-op
        assert ck.all_steps() == [1] and ck.latest_step() == 1
        assert resolve_start(tmp_path / "run", CheckpointConfig()).step == 1
        with pytest.raises(CheckpointError, match="no checkpoint for step 2"):
            ck.restore(2)
        commit.set()
        ck.wait()
        assert ck.all_steps() == [1, 2]
        # shardings left out: arrays land on the first device, not as numpy arrays
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        restored = ck.restore(2, abstract).train_state
        assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
