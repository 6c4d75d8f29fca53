"""The kernel backend with the batch sharded but not the sequence (data / fsdp / expert > 1, context 1).

Left to the partitioner, a Pallas call is not split by rows: XLA replicates the operands of a Triton
custom call (every device would run the whole batch's kernel), and a Mosaic (TPU) call refuses to
lower at all. So each op that looks across the sequence runs in ``shard_map`` over the batch axes
(and, for the attention ops, the head axes), every device calling the very kernel one device runs on
its own rows. The two KL losses are means over valid queries: each shard returns its numerator and
count, and the global mean is their sums' quotient (computed outside ``shard_map``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsa_train.parallel import scope as scope_lib


def _entry(axes):
    axes = tuple(axes)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _dividing(axes, sizes, n: int) -> tuple:
    """``axes`` trimmed from the end until their sizes' product divides ``n``."""
    axes = tuple(axes)
    while axes and n % math.prod(sizes[a] for a in axes):
        axes = axes[:-1]
    return axes


def needed(scope) -> bool:
    """Whether the scope shards the batch or the heads (and not the sequence)."""
    return (scope is not None and scope.axis_size("sequence") <= 1
            and (scope.axis_size("batch") > 1 or scope.axis_size("heads") > 1))


class BatchShardedOps:
    """The backend's interface, each method in ``shard_map`` over the rows (see the module docstring)."""

    def __init__(self, backend, scope):
        self.backend, self.scope = backend, scope
        self.sizes = dict(scope.mesh.shape)
        # The kernels' loops start from device-invariant carries, which the varying-manual-axes
        # check rejects (as under context parallelism); the transpose without it is still exact.
        self.check_vma = backend.impl == "reference"

    def _rows(self, n_rows: int) -> tuple:
        return _dividing(self.scope.mesh_axes("batch"), self.sizes, n_rows)

    def _heads(self, rows: tuple, n_heads: int):
        heads = tuple(a for a in self.scope.mesh_axes("heads") if a not in rows)
        return _entry(_dividing(heads, self.sizes, n_heads))

    def _map(self, fn, in_specs, out_specs, *args):
        def local(*a):
            with scope_lib.suspended():
                return fn(*a)

        return jax.shard_map(local, mesh=self.scope.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=self.check_vma)(*args)

    def _mean(self, fn, *args):
        """A mean over valid queries (``args[-1]`` the segment ids): shards' numerators over counts."""
        rows = self._rows(args[-1].shape[0])
        spec = P(_entry(rows))

        def local(*a):
            count = (a[-1] != 0).sum().astype(jnp.float32)
            return (fn(*a) * jnp.maximum(count, 1.0))[None], count[None]

        total, count = self._map(local, (spec,) * len(args), (spec, spec), *args)
        return total.sum() / jnp.maximum(count.sum(), 1.0)

    def dense_attention(self, q, k, v, segment_ids, sm_scale: float):
        rows = self._rows(q.shape[0])
        head = P(_entry(rows), None, self._heads(rows, q.shape[2]))
        fn = lambda q, k, v, seg: self.backend.dense_attention(q, k, v, seg, sm_scale)  # noqa: E731
        return self._map(fn, (head, head, head, P(_entry(rows))), (head, head), q, k, v, segment_ids)

    def indexer_topk(self, q, k, weights, topk: int, segment_ids):
        spec = P(_entry(self._rows(q.shape[0])))
        fn = lambda q, k, w, seg: self.backend.indexer_topk(q, k, w, topk, seg)  # noqa: E731
        return self._map(fn, (spec,) * 4, spec, q, k, weights, segment_ids)

    def sparse_mla_attention(self, q, kv, indices, sm_scale: float, v_dim: int = 512):
        rows = self._rows(q.shape[0])
        head, row = P(_entry(rows), None, self._heads(rows, q.shape[2])), P(_entry(rows))
        fn = lambda q, kv, idx: self.backend.sparse_mla_attention(q, kv, idx, sm_scale, v_dim)  # noqa: E731
        return self._map(fn, (head, row, row), (head, head), q, kv, indices)

    def indexer_kl_loss(self, q, kv, sm_scale, q_idx, k_idx, w_idx, segment_ids, lse=None):
        sg = jax.lax.stop_gradient
        if lse is None:
            fn = lambda q, kv, qi, ki, wi, seg: self.backend.indexer_kl_loss(q, kv, sm_scale, qi, ki, wi, seg)  # noqa
            return self._mean(fn, sg(q), sg(kv), q_idx, k_idx, w_idx, segment_ids)
        fn = lambda q, kv, lse, qi, ki, wi, seg: self.backend.indexer_kl_loss(q, kv, sm_scale, qi, ki, wi, seg,  # noqa
                                                                             lse=lse)
        return self._mean(fn, sg(q), sg(kv), sg(lse), q_idx, k_idx, w_idx, segment_ids)

    def sparse_indexer_kl_loss(self, q, kv, indices, lse, sm_scale, q_idx, k_idx, w_idx, segment_ids):
        sg = jax.lax.stop_gradient
        fn = lambda q, kv, idx, lse, qi, ki, wi, seg: self.backend.sparse_indexer_kl_loss(  # noqa: E731
            q, kv, idx, lse, sm_scale, qi, ki, wi, seg)
        return self._mean(fn, sg(q), sg(kv), indices, sg(lse), q_idx, k_idx, w_idx, segment_ids)
