"""The device mesh: five named axes, (data, fsdp, expert, tensor, context), major to minor.

Devices are laid out process-major (all devices of process 0 first), so the minor axes (context,
tensor) stay inside a host (NVLink / ICI neighbours) as far as they fit.

A *row group* is one position along the batch axes (data, fsdp, expert): its devices, along tensor
and context, hold the same batch rows. A process holds either whole row groups or a part of one
(when tensor x context spans processes); processes with the same row groups form one *data shard*
and load the same rows, from which :func:`dsa_train.parallel.sharding.put_batch` places each
device's part. :func:`data_shards` computes the shards and refuses layouts where a process holds
row groups unevenly (no rows a process could load would fit).
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
    grid = np.array(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    mesh = Mesh(grid, MESH_AXES)
    data_shards(process_grid(mesh))  # refuses layouts no process could feed
    return mesh


def process_grid(mesh: Mesh) -> np.ndarray:
    """The process index of each mesh position (an int array shaped like the mesh)."""
    return np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)


def data_shard(mesh: Mesh) -> tuple[int, int]:
    """(index, count) of this process's data shard: which block of the global batch's rows it loads."""
    import jax

    return data_shards(process_grid(mesh))[jax.process_index()]


def data_shards(processes: np.ndarray) -> dict[int, tuple[int, int]]:
    """process -> (data-shard index, data-shard count), from the process of each mesh position.

    Shard ``i`` of ``n`` is rows ``[i * B / n, (i + 1) * B / n)`` of a global batch of ``B`` rows."""
    shape = dict(zip(MESH_AXES, processes.shape))
    groups = processes.reshape(shape["data"] * shape["fsdp"] * shape["expert"], -1)  # row group x (tensor, context)
    rows_of = {}
    for p in np.unique(groups):
        mine = groups == p
        rows, columns = np.flatnonzero(mine.any(1)), np.flatnonzero(mine.any(0))
        # A rectangle: the same (tensor, context) positions in each of a run of consecutive row groups.
        if mine.sum() != len(rows) * len(columns) or rows[-1] - rows[0] + 1 != len(rows):
            raise MeshError(f"mesh {_fmt(shape)}: process {p}'s devices hold parts of row groups (positions along "
                            f"data x fsdp x expert) unevenly; each process must hold whole row groups, or one part of "
                            f"one, of tensor x context = {groups.shape[1]} devices")
        rows_of[int(p)] = (int(rows[0]), len(rows))
    blocks = sorted(set(rows_of.values()))
    if len({n for _, n in blocks}) > 1 or sum(n for _, n in blocks) != len(groups):
        raise MeshError(f"mesh {_fmt(shape)}: processes hold overlapping or unequal blocks of row groups (positions "
                        "along data x fsdp x expert), so they can't load whole rows each")
    return {p: (blocks.index(block), len(blocks)) for p, block in rows_of.items()}


def describe(mesh: Mesh) -> str:
    return _fmt(dict(mesh.shape))


def _fmt(sizes: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())
