"""Multi-process start-up: ``jax.distributed.initialize`` from the environment, once, before any
device is touched.

Sources, in order:

1. ``DSA_COORDINATOR_ADDRESS`` + ``DSA_NUM_PROCESSES`` + ``DSA_PROCESS_ID`` (set by
   ``launch/local.py``, the Kubernetes manifest, or by hand). ``DSA_CPU_DEVICES=N`` additionally
   makes this process expose N CPU devices with gloo collectives (local multi-process testing).
2. A cluster JAX detects itself (SLURM with more than one task, Cloud TPU pods, GKE/JobSet with
   ``JAX_COORDINATOR_ADDRESS``...): ``jax.distributed.initialize()`` without arguments.
3. Otherwise: a single process, nothing to do.
"""

from __future__ import annotations

import os

_INITIALIZED = False


def _cluster_detected() -> bool:
    env = os.environ
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_PROCID" in env:
        return True
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    # Multi-host Cloud TPU: the worker list names more than one host.
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_from_env() -> bool:
    """Initialize the distributed runtime if the environment describes a multi-process job.
    Returns whether this process is part of one. Safe to call more than once."""
    global _INITIALIZED
    if _INITIALIZED:
        return True
    import jax

    env = os.environ
    if env.get("DSA_COORDINATOR_ADDRESS"):
        cpu_devices = int(env.get("DSA_CPU_DEVICES", "0") or 0)
        if cpu_devices:
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", cpu_devices)
            # Cross-process collectives on CPU go through gloo (TCP); the default has none.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=env["DSA_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["DSA_NUM_PROCESSES"]),
                                   process_id=int(env["DSA_PROCESS_ID"]),
                                   initialization_timeout=int(env.get("DSA_INIT_TIMEOUT", "300")))
        _INITIALIZED = True
    elif _cluster_detected():
        jax.distributed.initialize()
        _INITIALIZED = True
    return _INITIALIZED


def scheduler_device_count() -> int | None:
    """The accelerators the scheduler granted this job, when it says: ``DSA_EXPECTED_DEVICES``
    (set by launch/slurm.sbatch, or by hand), else SLURM's GPUs per node x nodes."""
    env = os.environ
    if env.get("DSA_EXPECTED_DEVICES"):
        return int(env["DSA_EXPECTED_DEVICES"])
    gpus, nodes = env.get("SLURM_GPUS_ON_NODE"), env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES"))
    if gpus and nodes and gpus.isdigit() and nodes.isdigit():
        return int(gpus) * int(nodes)
    return None


class DeviceCountError(RuntimeError):
    """The job sees fewer (or more) devices than the scheduler granted: one clear line."""


def check_device_count() -> None:
    """Stop before any work when the global device count differs from what the scheduler granted
    (e.g. one process per node that sees one GPU of eight)."""
    import jax

    expected = scheduler_device_count()
    if expected is not None and jax.device_count() != expected:
        raise DeviceCountError(
            f"the job sees {jax.device_count()} devices ({jax.process_count()} processes x "
            f"{jax.local_device_count()} local) but the scheduler granted {expected}; start one process per GPU "
            "(launch/slurm.sbatch: --ntasks-per-node = GPUs per node) or set DSA_EXPECTED_DEVICES")
