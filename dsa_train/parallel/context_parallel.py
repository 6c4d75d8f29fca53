"""Context parallelism: the sequence is sharded over the ``context`` axis.

Every token-wise part of the model (projections, norms, MoE, the LM head) needs nothing special:
its activations are simply sharded along the sequence. The ops that look across the sequence (the
kernel backend's, dsa_train/kernels/backend.py) run in ``shard_map`` when the model calls them
through :func:`sequence_ops`; each device keeps its own queries and all-gathers only the small
per-token keys across ``context``:

- indexer top-k: the backend's kernel, local indexer queries (with their row positions) against all
  indexer keys (128-dim per token);
- sparse attention: the backend's kernel, local MQA queries against all MLA latent keys (576-dim
  per token) at the selected (global) indices; heads stay sharded over ``tensor``;
- sparse indexer KL: the backend's kernel on the same gathers; its numerator and denominator are
  summed over every token-sharding axis, so the loss is the global mean.

Dense mode (warm-up, dense stage) likewise, in MLA's MQA form: dense attention runs the flash
kernel on local queries against the gathered latent keys (heads stay sharded over ``tensor``), and
the dense KL runs the backend's one-pass kernel (the Pallas one for the Pallas impls) on the local
queries at their row positions against the gathered latent and indexer keys, with the lse of that
attention; never the per-head K/V of the whole row.

The gradient of an all-gather is a reduce-scatter, so key gradients land back on their owners.

Token layout (``mesh.context_order``, sequence_order.py): with ``zigzag`` the train step reorders
each row once (:func:`laid_out`) so that shard i holds chunks i and 2n-1-i. Every op here then
takes each local query's original position for the causal mask and puts the gathered keys back in
the original order (a reorder of whole chunks), so top-k indices stay global original positions
and every result equals the contiguous layout's. The ops below compute every (local query, key)
score and mask the non-causal ones, so their cost is the same on every shard in either layout; the
dense kernels skip the key blocks past each query block's last position, so there the layout
balances real work (bench/context_balance.py).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from dsa_train.ops.indexer import TOPK_INDICES
from dsa_train.parallel import batch_sharded
from dsa_train.parallel import scope as scope_lib
from dsa_train.parallel import sequence_order


def _layout():
    scope = scope_lib.current()
    if scope is None or scope.axis_size("sequence") <= 1:
        return None
    return scope


def active() -> bool:
    return _layout() is not None


def _entry(axes):
    axes = tuple(axes)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _specs(scope, seq_len: int):
    sizes = dict(scope.mesh.shape)
    ctx = tuple(scope.mesh_axes("sequence"))
    while ctx and seq_len % math.prod(sizes[a] for a in ctx):
        ctx = ctx[:-1]
    batch = tuple(a for a in scope.mesh_axes("batch") if a not in ctx)
    return sizes, batch, ctx


def _head_spec(scope, sizes, batch, ctx, n_heads: int):
    """Mesh axes for the head dimension: the `heads` rule minus axes already used, trimmed until
    they divide the head count."""
    heads = tuple(a for a in scope.mesh_axes("heads") if a not in batch and a not in ctx)
    while heads and n_heads % math.prod(sizes[a] for a in heads):
        heads = heads[:-1]
    return _entry(heads)


class _Sequence(NamedTuple):
    """The sequence's mesh axes inside ``shard_map``, how many shards they make and the order of
    the row's tokens over them."""

    axes: tuple
    shards: int
    order: str

    def gather(self, x):
        """All-gather along the sequence (axis 1), in the row's original order."""
        x = jax.lax.all_gather(x, _entry(self.axes), axis=1, tiled=True)
        return sequence_order.from_zigzag(x, self.shards) if self.order == "zigzag" else x

    def query_positions(self, local_len: int):
        """Original row positions of this shard's tokens ([local_len] int32)."""
        return sequence_order.local_positions(self.order, jax.lax.axis_index(_entry(self.axes)), self.shards,
                                              local_len)


def _sequence(scope, sizes, ctx) -> _Sequence:
    shards = math.prod(sizes[a] for a in ctx)
    return _Sequence(ctx, shards, scope.sequence_order if shards > 1 else "contiguous")


def _shards(scope, seq_len: int) -> int:
    sizes, _, ctx = _specs(scope, seq_len)
    return math.prod(sizes[a] for a in ctx)


@contextlib.contextmanager
def laid_out(order: str, seq_len: int):
    """Trace the model on rows laid out in ``order`` over the context shards (the train step):
    yields the function that lays one [B, S] input out. The identity (and no change of scope)
    without context parallelism or with ``contiguous``."""
    scope = _layout()
    shards = 1 if scope is None else _shards(scope, seq_len)
    if order == "contiguous" or shards == 1:
        yield lambda x: x
        return
    sequence_order.check_divisible(seq_len, shards)
    with scope_lib.laid_out(order):
        yield lambda x: scope_lib.constrain(sequence_order.to_zigzag(x, shards), ("batch", "sequence"))


def slot_positions(seq_len: int) -> np.ndarray:
    """Original row position of each slot of the [B, S] arrays being traced ([S] int32): arange
    unless the train step laid the rows out zig-zag."""
    scope = _layout()
    if scope is None:
        return np.arange(seq_len, dtype=np.int32)
    return sequence_order.slot_positions(scope.sequence_order, seq_len, _shards(scope, seq_len))


def _blocks(n: int, block: int) -> int:
    block = min(block, n)
    while n % block:
        block -= 1
    return block


class ContextParallelOps:
    """The kernel backend's interface (dsa_train/kernels/backend.py) with the sequence sharded over
    the context axis: each method runs in ``shard_map``, and sparse attention runs the backend's own
    kernel on every shard (local queries, gathered latent keys, global indices), and so does the
    sparse indexer KL."""

    def __init__(self, backend):
        self.backend = backend

    def dense_attention(self, q, k, v, segment_ids, sm_scale: float):
        return dense_attention(self.backend, q, k, v, segment_ids, sm_scale)

    def indexer_topk(self, q, k, weights, topk: int, segment_ids):
        return indexer_topk(self.backend, q, k, weights, topk, segment_ids)

    def sparse_mla_attention(self, q, kv, indices, sm_scale: float, v_dim: int = 512):
        return sparse_mla_attention(self.backend, q, kv, indices, sm_scale, v_dim)

    def indexer_kl_loss(self, q, kv, sm_scale, q_idx, k_idx, w_idx, segment_ids, lse=None):
        return indexer_kl_loss(self.backend, q, kv, sm_scale, q_idx, k_idx, w_idx, segment_ids, lse)

    def sparse_indexer_kl_loss(self, q, kv, indices, lse, sm_scale, q_idx, k_idx, w_idx, segment_ids):
        return sparse_indexer_kl_loss(self.backend, q, kv, indices, lse, sm_scale, q_idx, k_idx, w_idx, segment_ids)


def sequence_ops(backend):
    """What the model calls for the ops that look across the sequence: ``backend`` itself, its
    context-parallel form while tracing under a scope whose sequence is sharded, or its row-sharded
    form (batch_sharded.py) under one that shards only the batch or the heads."""
    if active():
        return ContextParallelOps(backend)
    scope = scope_lib.current()
    return batch_sharded.BatchShardedOps(backend, scope) if batch_sharded.needed(scope) else backend


def indexer_topk(backend, q, k, weights, topk: int, segment_ids):
    """Context-parallel ``backend.indexer_topk``: the backend's own kernel on each shard's queries
    (their original row positions drive its causal mask and key-block skipping) against the
    all-gathered indexer keys (128-dim per token); weights stay local. Global key indices."""
    scope = _layout()
    b, s = segment_ids.shape
    sizes, batch, ctx = _specs(scope, s)
    bspec, cspec = _entry(batch), _entry(ctx)
    seq = _sequence(scope, sizes, ctx)

    def local(q, k, w, seg):
        with scope_lib.suspended():
            return backend.indexer_topk(q, seq.gather(k), w, topk, seg, q_positions=seq.query_positions(q.shape[1]),
                                        k_segment_ids=seq.gather(seg))

    tok = P(bspec, cspec)
    # check_vma off as for sparse attention (the kernel's loops start from device-invariant carries).
    indices = jax.shard_map(local, mesh=scope.mesh, in_specs=(tok,) * 4, out_specs=tok,
                            check_vma=backend.impl == "reference")(
        jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), jax.lax.stop_gradient(weights), segment_ids)
    return checkpoint_name(indices, TOPK_INDICES)


def sparse_mla_attention(backend, q, kv, indices, sm_scale: float, v_dim: int = 512):
    """Context-parallel ``backend.sparse_mla_attention``: the backend's kernel on local queries
    against the gathered latent keys."""
    scope = _layout()
    b, s, h, _ = q.shape
    sizes, batch, ctx = _specs(scope, s)
    bspec, cspec = _entry(batch), _entry(ctx)
    hspec = _head_spec(scope, sizes, batch, ctx, h)
    seq = _sequence(scope, sizes, ctx)

    def local(q, kv, idx):
        with scope_lib.suspended():
            return backend.sparse_mla_attention(q, seq.gather(kv), idx, sm_scale, v_dim)

    # The kernels' internal loops start from unannotated (device-invariant) carries, which the
    # varying-manual-axes check rejects; without the check shard_map's transpose divides the output
    # cotangents by the replica count and psums the input cotangents, which is still exact.
    return jax.shard_map(local, mesh=scope.mesh,
                         in_specs=(P(bspec, cspec, hspec), P(bspec, cspec), P(bspec, cspec)),
                         out_specs=(P(bspec, cspec, hspec), P(bspec, cspec, hspec)),
                         check_vma=backend.impl == "reference")(q, kv, indices)


def sparse_indexer_kl_loss(backend, q, kv, indices, lse, sm_scale, q_idx, k_idx, w_idx, segment_ids):
    """Context-parallel ``backend.sparse_indexer_kl_loss``: the backend's kernel on each shard's
    queries against the gathered latent and indexer keys; the global mean over valid queries is
    the shards' summed numerators over their summed counts (computed outside ``shard_map``)."""
    scope = _layout()
    b, s = segment_ids.shape
    sizes, batch, ctx = _specs(scope, s)
    bspec, cspec = _entry(batch), _entry(ctx)
    token_axes = _entry(batch + ctx)
    seq = _sequence(scope, sizes, ctx)
    sg = jax.lax.stop_gradient

    def local(q, kv, idx, lse, qi, ki, wi, seg):
        with scope_lib.suspended():
            count = (seg != 0).sum().astype(jnp.float32)
            mean = backend.sparse_indexer_kl_loss(q, seq.gather(kv), idx, lse, sm_scale, qi, seq.gather(ki), wi, seg)
            return (mean * jnp.maximum(count, 1.0))[None], count[None]

    tok = P(bspec, cspec)
    # check_vma off as for sparse attention (the kernel's loops start from device-invariant carries);
    # the per-shard outputs are summed outside, so no collective needs transposing but the gathers.
    total, count = jax.shard_map(local, mesh=scope.mesh, in_specs=(tok,) * 8,
                                 out_specs=(P(token_axes), P(token_axes)),
                                 check_vma=backend.impl == "reference")(
        sg(q), sg(kv), indices, sg(lse), q_idx, k_idx, w_idx, segment_ids)
    return total.sum() / jnp.maximum(count.sum(), 1.0)


# ---- dense mode (the warm-up and the dense stage) ----------------------------------------------------

def dense_attention(backend, q, k, v, segment_ids, sm_scale: float):
    """Context-parallel dense attention: the backend's flash kernel (``Backend.dense_attention_at``) on each
    shard's queries, at their row positions, against keys and values all-gathered across ``context``;
    the causal skip drops the key blocks past the shard's last position. Heads stay sharded over
    ``tensor``.

    The model calls it in the MQA form (k = the 576-dim latent + rope key shared by the heads,
    v = the 512-dim latent, q the absorbed queries): per token 576 + 512 values cross the shards
    instead of H x (192 + 128) per-head ones (70x fewer bytes at H = 128), at 2 H (576 + 512)
    instead of 2 H (192 + 128) FLOPs per (query, key) pair (3.4x). Per-head inputs work too (then
    their per-head K/V are gathered)."""
    scope = _layout()
    b, s, h, _ = q.shape
    sizes, batch, ctx = _specs(scope, s)
    bspec, cspec = _entry(batch), _entry(ctx)
    hspec = _head_spec(scope, sizes, batch, ctx, h)
    seq = _sequence(scope, sizes, ctx)

    def local(q, k, v, seg):
        with scope_lib.suspended():
            pos = seq.query_positions(q.shape[1])
            return backend.dense_attention_at(q, seq.gather(k), seq.gather(v), pos, seg, seq.gather(seg), sm_scale)

    tok = P(bspec, cspec, hspec)
    kv_spec = P(bspec, cspec) if k.ndim == 3 else tok
    # check_vma off: the kernel's loops start from device-invariant carries (see sparse_mla_attention).
    return jax.shard_map(local, mesh=scope.mesh, in_specs=(tok, kv_spec, kv_spec, P(bspec, cspec)),
                         out_specs=(tok, tok), check_vma=False)(q, k, v, segment_ids)


def indexer_kl_loss(backend, q, kv, sm_scale, q_idx, k_idx, w_idx, segment_ids, lse):
    """Context-parallel dense warm-up KL (global mean over valid queries): the backend's one-pass
    kernel (``Backend.indexer_kl_sum_at``, Pallas for the Pallas impls) on each shard's queries at
    their row positions (the kernel's masks and key-block skipping take them), against the
    gathered latent keys (576-dim, MQA form) and indexer keys (128-dim); the target is normalized
    with the main attention's ``lse`` [B, S, H] of the same queries. The shards' weighted sums and
    counts are summed outside ``shard_map``; key gradients return to their owners through the
    gathers' transposes."""
    if lse is None:
        raise ValueError("context-parallel dense indexer KL needs the main attention's lse")
    scope = _layout()
    b, s = segment_ids.shape
    sizes, batch, ctx = _specs(scope, s)
    bspec, cspec = _entry(batch), _entry(ctx)
    token_axes = _entry(batch + ctx)
    seq = _sequence(scope, sizes, ctx)
    sg = jax.lax.stop_gradient

    def local(q, kv, lse, qi, ki, wi, seg):
        with scope_lib.suspended():
            valid = (seg != 0).astype(jnp.float32)
            total = backend.indexer_kl_sum_at(q, seq.gather(kv), lse, qi, seq.gather(ki), wi, valid,
                                              seq.query_positions(q.shape[1]), seg, seq.gather(seg), sm_scale)
            return total[None], valid.sum()[None]

    tok = P(bspec, cspec)
    total, count = jax.shard_map(local, mesh=scope.mesh, in_specs=(tok,) * 7,
                                 out_specs=(P(token_axes), P(token_axes)), check_vma=False)(
        sg(q), sg(kv), sg(lse), q_idx, k_idx, w_idx, segment_ids)
    return total.sum() / jnp.maximum(count.sum(), 1.0)
