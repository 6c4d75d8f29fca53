"""The device mesh: five named axes, (data, fsdp, expert, tensor, context), major to minor.

Devices are laid out process-major (all devices of process 0 first), so the minor axes (context,
tensor) stay inside a host (NVLink / ICI neighbours) and each process owns a contiguous block of
batch rows, which is what :func:`dsa_train.parallel.sharding.put_batch` assumes when it assembles a
global batch from every process's local rows.
"""

from __future__ import annotations

import numpy as np
from jax.sharding import Mesh

from dsa_train.parallel.rules import MESH_AXES


class MeshError(ValueError):
    """A mesh that cannot be built on these devices: one clear line."""


def mesh_shape(mesh_config, n_devices: int) -> dict[str, int]:
    """Axis sizes with the one ``-1`` axis (if any) resolved to the remaining devices."""
    sizes = {a: int(getattr(mesh_config, a)) for a in MESH_AXES}
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    free = [a for a, v in sizes.items() if v == -1]
    if free:
        if n_devices % fixed:
            raise MeshError(f"mesh {_fmt(sizes)}: the fixed axes use {fixed} devices, which does not divide "
                            f"the {n_devices} available")
        sizes[free[0]] = n_devices // fixed
    total = int(np.prod(list(sizes.values())))
    if total != n_devices:
        raise MeshError(f"mesh {_fmt(sizes)} needs {total} devices, but {n_devices} are available")
    return sizes


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: every device of every process)."""
    import jax

    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda d: (d.process_index, d.id))
    sizes = mesh_shape(mesh_config, len(devices))
    processes = len({d.process_index for d in devices})
    batch_ways = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if processes > 1 and batch_ways % processes:
        raise MeshError(f"mesh {_fmt(sizes)}: with {processes} processes, data x fsdp x expert ({batch_ways}) must "
                        "be a multiple of the process count (each process feeds whole batch rows)")
    grid = np.array(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def describe(mesh: Mesh) -> str:
    return _fmt(dict(mesh.shape))


def _fmt(sizes: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())
