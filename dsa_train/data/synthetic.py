"""Built-in long-context task: key-value retrieval from far away, deterministic from a seed.

Two kinds (``data.synthetic_task``): ``pairs`` (below: key and value tokens side by side, answered
by a two-step induction circuit) and ``fused`` (:class:`FusedPairTask` at the end of this module:
one token per pair, answered in one attention hop; the task of ``dsa-train demo``).

One document (``L`` tokens)::

    BOS  f f k1 v1 f f f ... f k2 v2 f ... f  Q ka va  Q kb vb  ...  EOS
         \\______ context: pairs among filler ______/ \\____ queries ____/

- ``num_pairs`` (key, value) pairs sit at random, non-overlapping places among uniformly random
  filler tokens; keys in a document are distinct, so each query has exactly one answer.
- ``num_queries`` queries ``Q k v`` follow, each asking for the value of a different stored key.
  ``v`` is the answer: ``loss_weights`` is ``answer_weight`` (default 1) on the position of ``k``
  (whose next-token target is ``v``) and 0 everywhere else, so with random filler the trainer's
  weighted accuracy *is* retrieval accuracy.
- Answering needs one specific distant token: an induction circuit (previous-token head, then a
  head that matches the query key against earlier keys and copies what follows). The answer can't
  be guessed from local context: a model that copies any value of the document gets 1/num_pairs.

Filler (``filler``): ``random`` draws it uniformly (nothing to learn there; attention at filler
positions stays diffuse). ``structured`` lays it out as two interleaved counting sequences,
``f[t+1] = f[t-1] + 1`` (wrapping inside the filler range), and puts loss weight 1 on every filler
target that rule predicts: the model then needs a sharp attention to the token two back at every
filler position, as real text has sharp local heads, which is what the smoke run's indexer must
learn to find. The answer weights stay as above.

Token ids (vocabulary ``V``): the first :data:`NUM_RESERVED` ids are special, the rest is split
into three disjoint ranges so no filler token can be mistaken for a key or a value::

    0 PAD | 1 BOS | 2 EOS | 3 QUERY | keys: n//4 ids | values: n//4 ids | filler: the rest
    (n = V - 4)

Rows: ``doc_len = 0`` makes one document per row (``L = seq_len``). Otherwise documents of random
length in ``[max(min_len, doc_len // 2), doc_len]`` are packed into the row, each its own segment
with positions restarting at 0; the last one may be shorter (down to ``min_len``, the length of a
document without filler) and the tail too short for any document is padding (segment 0).

Row ``r`` of the global stream is generated from ``SeedSequence([seed_a, seed_b, r])`` alone, so
any process can produce any row: data shard ``p`` of ``n`` takes rows ``p*b .. p*b + b - 1`` of every
global batch of ``n*b`` rows, and the union over shards equals the single-process stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsa_train.data.batch import DataError

PAD, BOS, EOS, QUERY = 0, 1, 2, 3
NUM_RESERVED = 4


@dataclass(frozen=True)
class RetrievalTask:
    """Shape of the task; :meth:`check` raises :class:`DataError` when it can't fit."""

    vocab_size: int
    seq_len: int
    num_pairs: int = 8
    num_queries: int = 4
    doc_len: int = 0  # 0: one document fills each row
    filler: str = "random"  # "random" | "structured" (see the module docstring)
    answer_weight: float = 1.0  # loss weight of an answer target (filler targets: 1)

    @property
    def key_range(self) -> tuple[int, int]:
        n = (self.vocab_size - NUM_RESERVED) // 4
        return NUM_RESERVED, NUM_RESERVED + n

    @property
    def value_range(self) -> tuple[int, int]:
        lo = self.key_range[1]
        return lo, lo + (self.vocab_size - NUM_RESERVED) // 4

    @property
    def filler_range(self) -> tuple[int, int]:
        return self.value_range[1], self.vocab_size

    @property
    def min_doc_len(self) -> int:
        """BOS + the pairs + the queries + EOS, with no filler at all."""
        return 2 + 2 * self.num_pairs + 3 * self.num_queries

    @property
    def max_doc_len(self) -> int:
        return self.doc_len or self.seq_len

    def check(self) -> None:
        if self.num_pairs < 1:
            raise DataError(f"synthetic task: num_pairs must be >= 1, got {self.num_pairs}")
        if not 1 <= self.num_queries <= self.num_pairs:
            raise DataError(f"synthetic task: num_queries must be in [1, num_pairs={self.num_pairs}], "
                            f"got {self.num_queries}")
        lo, hi = self.key_range
        if hi - lo < self.num_pairs or self.filler_range[1] - self.filler_range[0] < 1:
            need = NUM_RESERVED + 4 * self.num_pairs + 1
            raise DataError(f"synthetic task: vocab_size {self.vocab_size} is too small for "
                            f"{self.num_pairs} distinct keys and values (needs >= {need})")
        if self.max_doc_len > self.seq_len:
            raise DataError(f"synthetic task: synthetic_doc_len {self.doc_len} exceeds seq_len {self.seq_len}")
        if self.max_doc_len < self.min_doc_len:
            what = f"synthetic_doc_len {self.doc_len}" if self.doc_len else f"seq_len {self.seq_len}"
            raise DataError(f"synthetic task: {what} is shorter than one document with {self.num_pairs} "
                            f"pairs and {self.num_queries} queries ({self.min_doc_len} tokens)")


def make_filler(task: RetrievalTask, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`length` filler tokens (int64) of the task's kind (see the module docstring), and for each
    cell the earlier cell its token is predicted from (-1: none)."""
    lo, hi = task.filler_range
    if task.filler == "structured":
        t = np.arange(length)
        starts = rng.integers(lo, hi, size=2)
        return lo + (starts[t % 2] - lo + t // 2) % (hi - lo), np.where(t >= 2, t - 2, -1)
    return rng.integers(lo, hi, size=length, dtype=np.int64), np.full(length, -1)


def _filler_weights(source: np.ndarray, is_filler: np.ndarray) -> np.ndarray:
    """1 on positions whose next token the filler's rule predicts from untouched filler cells."""
    weights = np.zeros(len(source), np.float32)
    target = np.arange(1, len(source))  # position t - 1 predicts cell t
    src = source[target]
    weights[target - 1] = (src >= 0) & is_filler[target] & is_filler[np.maximum(src, 0)]
    return weights


def make_document(task: RetrievalTask, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One document of exactly `length` tokens: (tokens int32 [length], loss_weights float32 [length])."""
    p, q = task.num_pairs, task.num_queries
    context = length - 2 - 3 * q  # tokens between BOS and the first query
    tokens, source = make_filler(task, length, rng)
    is_filler = np.ones(length, bool)
    keys = rng.choice(np.arange(*task.key_range), size=p, replace=False)
    values = rng.choice(np.arange(*task.value_range), size=p, replace=False)
    # Non-overlapping pair starts: choose p of (context - p) slots, then shift the i-th by i so
    # each pair's two tokens stay adjacent and pairs never touch each other's cells.
    starts = np.sort(rng.choice(context - p, size=p, replace=False)) + np.arange(p) + 1
    tokens[starts], tokens[starts + 1] = keys, values
    tokens[0] = BOS
    is_filler[starts] = is_filler[starts + 1] = is_filler[0] = False
    weights = np.zeros(length, np.float32)
    asked = rng.choice(p, size=q, replace=False)
    query_start = 1 + context
    for j, pair in enumerate(asked):
        at = query_start + 3 * j
        tokens[at:at + 3] = (QUERY, keys[pair], values[pair])
        weights[at + 1] = task.answer_weight  # predicting the answer from the query key
    is_filler[query_start:] = False
    tokens[-1] = EOS
    weights = np.maximum(weights, _filler_weights(source, is_filler))
    return tokens.astype(np.int32), weights


def make_row(task: RetrievalTask, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One packed row of seq_len tokens in the batch format (see dsa_train.data.batch)."""
    s = task.seq_len
    row = {"tokens": np.full(s, PAD, np.int32), "segment_ids": np.zeros(s, np.int32),
           "positions": np.zeros(s, np.int32), "loss_weights": np.zeros(s, np.float32)}
    if not task.doc_len:
        lengths = [s]
    else:
        shortest = max(task.min_doc_len, task.doc_len // 2)
        lengths, used = [], 0
        while s - used >= shortest:
            lengths.append(int(rng.integers(shortest, min(task.doc_len, s - used) + 1)))
            used += lengths[-1]
        if s - used >= task.min_doc_len:  # a shorter last document instead of a long padding tail
            lengths.append(s - used)
    at = 0
    for segment, length in enumerate(lengths, start=1):
        tokens, weights = make_document(task, length, rng)
        row["tokens"][at:at + length] = tokens
        row["loss_weights"][at:at + length] = weights
        row["segment_ids"][at:at + length] = segment
        row["positions"][at:at + length] = np.arange(length)
        at += length
    return row


def make_rows(task: RetrievalTask, seeds: tuple[int, ...], first_row: int, count: int) -> dict[str, np.ndarray]:
    """Rows ``first_row .. first_row + count - 1`` of the global stream, stacked into a batch."""
    row_fn = getattr(task, "make_row", None) or (lambda rng: make_row(task, rng))
    rows = [row_fn(np.random.default_rng(np.random.SeedSequence([*seeds, first_row + i]))) for i in range(count)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def answers(tokens: np.ndarray, segment_ids: np.ndarray) -> list[tuple[int, int]]:
    """Reference solver: for every query in a row, (position of the query key, the correct value).

    Looks each query key up among the *context* pairs of its own document, independently of the
    generator, so tests can check the answers are right by construction."""
    out = []
    for seg in np.unique(segment_ids[segment_ids > 0]):
        idx = np.flatnonzero(segment_ids == seg)
        doc = tokens[idx]
        query_at = np.flatnonzero(doc == QUERY)
        context = doc[:query_at[0]] if len(query_at) else doc
        for qa in query_at:
            key = doc[qa + 1]
            hits = np.flatnonzero(context == key)
            if len(hits) != 1:
                raise AssertionError(f"query key {key} occurs {len(hits)} times in the context")
            out.append((int(idx[qa + 1]), int(context[hits[0] + 1])))
    return out


class SyntheticIterator:
    """Infinite stream of retrieval batches; the state is the number of batches produced."""

    def __init__(self, task: RetrievalTask, *, batch_size: int, seeds: tuple[int, ...],
                 shard_index: int = 0, shard_count: int = 1):
        task.check()
        self.task, self.seeds = task, tuple(int(s) for s in seeds)
        self.global_batch, self.local_batch = batch_size, batch_size // shard_count
        self.shard_index = shard_index
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        first = self.step * self.global_batch + self.shard_index * self.local_batch
        self.step += 1
        return make_rows(self.task, self.seeds, first, self.local_batch)

    def _fingerprint(self) -> dict:
        t = self.task
        fingerprint = {"seeds": list(self.seeds), "vocab_size": t.vocab_size, "seq_len": t.seq_len,
                       "num_pairs": t.num_pairs, "num_queries": t.num_queries, "doc_len": t.doc_len,
                       "batch_size": self.global_batch,
                       "process_index": self.shard_index}  # named as when every process was its own shard
        if isinstance(t, FusedPairTask):
            fingerprint.update(task="fused", min_pairs=t.min_pairs)
        return fingerprint

    def get_state(self) -> dict:
        return {"source": "synthetic", "step": self.step, "fingerprint": self._fingerprint()}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("source") != "synthetic":
            got = state.get("source") if isinstance(state, dict) else type(state).__name__
            raise DataError(f"data iterator state is for source {got!r}, but data.source is 'synthetic'")
        if state.get("fingerprint") != self._fingerprint():
            raise DataError("data iterator state was saved for a different synthetic task, seed, "
                            "batch size or process layout; it can't be resumed with this one")
        self.step = int(state["step"])

    def close(self) -> None:
        """Nothing to release (same interface as the grain-backed iterator)."""


# ----------------------------------------------------------------------------------------------
# Fused-pair retrieval: one attention hop
# ----------------------------------------------------------------------------------------------

FUSED_NUM_VALUES = 8


@dataclass(frozen=True)
class FusedPairTask:
    """Retrieval in one attention hop: every (key, value) pair is a single token.

    One row (``L = seq_len`` tokens, one document)::

        BOS  f f P(k1,v1) f P(k2,v2) f f ... f  Q(ka) va  Q(kb) vb ...  EOS
             \\______ context: pairs among filler ______/ \\__ queries __/

    - ``num_pairs`` pair tokens ``P(k, v)`` with distinct keys sit at random cells among uniformly
      random filler; ``num_queries`` query tokens ``Q(k)`` follow, each followed by the value token
      ``v`` of the one pair whose key is ``k``. ``loss_weights`` is ``answer_weight`` on each query
      token (whose next-token target is the answer) and 0 elsewhere.
    - Why it needs the far key: the answer depends only on which value was fused with ``k`` in
      that row, and every value is equally likely for every key, so nothing local (the recent
      tokens, earlier answers, token statistics) predicts it better than chance (1 / num_values)
      unless the pair's token lies within reach. The distractors are pair tokens of the same kind
      with other keys, so the model must match the query's key against each pair token's key by
      content. It can: a single attention head whose QK matches Q(k) with P(k, *) and whose OV maps
      P(k, v) to the value v solves it; that is one hop, which a tiny model learns in minutes.

    Token ids (vocabulary ``V``, ``n = V - 4`` after the reserved ids, ``m`` values)::

        0 PAD | 1 BOS | 2 EOS | 3 (unused) | pairs: K*m ids | queries: K ids | values: m ids | filler: rest
        K = (n - m) // (m + 2)   (so the filler range has at least K ids)
    """

    vocab_size: int
    seq_len: int
    num_pairs: int = 48
    num_queries: int = 48
    num_values: int = FUSED_NUM_VALUES
    answer_weight: float = 1.0
    # > 0: each row holds a random number of pairs in [min_pairs, num_pairs] (queries may then
    # repeat a key). Rows with few pairs let the value read-out (pair token -> value) be learnt
    # before the key matching, which breaks the plateau where neither part has a gradient alone.
    min_pairs: int = 0
    doc_len: int = 0  # one document per row (the iterator's fingerprint reads it)

    @property
    def num_keys(self) -> int:
        return (self.vocab_size - NUM_RESERVED - self.num_values) // (self.num_values + 2)

    def pair_token(self, key, value):
        return NUM_RESERVED + np.asarray(key) * self.num_values + np.asarray(value)

    def query_token(self, key):
        return NUM_RESERVED + self.num_keys * self.num_values + np.asarray(key)

    def value_token(self, value):
        return NUM_RESERVED + self.num_keys * (self.num_values + 1) + np.asarray(value)

    @property
    def filler_range(self) -> tuple[int, int]:
        return int(self.value_token(self.num_values)), self.vocab_size

    @property
    def context_len(self) -> int:
        """Cells between BOS and the first query."""
        return self.seq_len - 2 - 2 * self.num_queries

    def check(self) -> None:
        if self.num_values < 2:
            raise DataError(f"fused synthetic task: needs >= 2 values, got {self.num_values}")
        if not 0 <= self.min_pairs <= self.num_pairs:
            raise DataError(f"fused synthetic task: min_pairs must be in [0, num_pairs={self.num_pairs}], "
                            f"got {self.min_pairs}")
        if not 1 <= self.num_queries <= self.num_pairs:
            raise DataError(f"fused synthetic task: num_queries must be in [1, num_pairs={self.num_pairs}], "
                            f"got {self.num_queries}")
        if self.num_keys < self.num_pairs:
            need = NUM_RESERVED + self.num_values + (self.num_values + 2) * self.num_pairs
            raise DataError(f"fused synthetic task: vocab_size {self.vocab_size} is too small for "
                            f"{self.num_pairs} distinct keys with {self.num_values} values (needs >= {need})")
        if self.context_len < self.num_pairs:
            raise DataError(f"fused synthetic task: seq_len {self.seq_len} is too short for {self.num_pairs} "
                            f"pairs and {self.num_queries} queries (needs >= {2 + 2 * self.num_queries + self.num_pairs})")

    def make_document(self, rng: np.random.Generator, needle_cell: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, int]:
        """One row's tokens and loss weights, and the context cell of the first query's pair.

        `needle_cell` (0-based within the context) pins the pair the first query asks about."""
        c, p, q = self.context_len, self.num_pairs, self.num_queries
        if self.min_pairs and needle_cell is None:
            p = int(rng.integers(self.min_pairs, self.num_pairs + 1))
        tokens = np.empty(self.seq_len, np.int64)
        tokens[1:1 + c] = rng.integers(*self.filler_range, size=c)
        tokens[0], tokens[-1] = BOS, EOS
        keys = rng.choice(self.num_keys, size=p, replace=False)
        values = rng.integers(0, self.num_values, size=p)
        if needle_cell is None:
            cells = rng.choice(c, size=p, replace=False)
        else:
            others = rng.choice(c - 1, size=p - 1, replace=False)
            cells = np.concatenate([[needle_cell], others + (others >= needle_cell)])
        tokens[1 + cells] = self.pair_token(keys, values)
        asked = np.concatenate([[0], 1 + rng.choice(p - 1, size=q - 1, replace=False)]) if needle_cell is not None \
            else rng.choice(p, size=q, replace=q > p)
        weights = np.zeros(self.seq_len, np.float32)
        at = 1 + c + 2 * np.arange(q)
        tokens[at], tokens[at + 1] = self.query_token(keys[asked]), self.value_token(values[asked])
        weights[at] = self.answer_weight
        return tokens.astype(np.int32), weights, int(cells[asked[0]])

    def make_row(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        tokens, weights, _ = self.make_document(rng)
        s = self.seq_len
        return {"tokens": tokens, "segment_ids": np.ones(s, np.int32), "positions": np.arange(s, dtype=np.int32),
                "loss_weights": weights}


def fused_answers(task: FusedPairTask, tokens: np.ndarray) -> list[tuple[int, int]]:
    """Reference solver for one fused row: (position of each query token, the correct next token),
    by looking the query's key up among the row's pair tokens (independently of the generator)."""
    first_query = int(task.query_token(0))
    pair_lo, pair_hi = int(task.pair_token(0, 0)), first_query
    out = []
    for t in np.flatnonzero((tokens >= first_query) & (tokens < first_query + task.num_keys)):
        key = int(tokens[t]) - first_query
        context = tokens[:t]
        pairs = context[(context >= pair_lo) & (context < pair_hi)] - NUM_RESERVED
        hits = pairs[pairs // task.num_values == key]
        if len(hits) != 1:
            raise AssertionError(f"query key {key} matches {len(hits)} pair tokens")
        out.append((int(t), int(task.value_token(hits[0] % task.num_values))))
    return out
