"""Needle in a haystack: can the model still fetch one fact from anywhere in a long context?

A sweep over context lengths x needle depths (0 = right after the start, 1 = just before the
question). Every cell holds `trials` sequences; each is scored by the log-likelihood of the
needle's answer given everything before it, and counted correct when every answer token is the
argmax prediction.

Haystacks are made of the data's own tokens:
- synthetic retrieval task: exactly its document format (dsa_train/data/synthetic.py): BOS,
  filler of the task's kind (random or structured, as in training) with `num_pairs` key-value
  pairs (the needle and num_pairs - 1 distractors), one query ``Q key`` for the needle's key; the
  answer is its value (one token).
- prepared token shards: held-out text, with the needle ``key value`` (random spans of the
  haystack's own tokens, `span` tokens each) inserted at the depth, and the key repeated at the
  end; the answer is the value span (an induction / copy test, tokenizer-free).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dsa_train.data.synthetic import BOS, EOS, QUERY, FusedPairTask, RetrievalTask, make_filler


@dataclasses.dataclass(frozen=True)
class NeedleCase:
    length: int
    depth: float
    tokens: np.ndarray  # [trials, length] int32, one document per row
    answer_positions: np.ndarray  # positions t whose next-token target is an answer token


def default_lengths(seq_len: int, shortest: int) -> tuple[int, ...]:
    """seq_len / 4, seq_len / 2 and seq_len (the ones at least `shortest` long)."""
    lengths = sorted({max(seq_len // 4, shortest), max(seq_len // 2, shortest), seq_len})
    return tuple(n for n in lengths if n <= seq_len)


def synthetic_case(task: RetrievalTask, length: int, depth: float, trials: int, seed: int) -> NeedleCase:
    """Documents of the retrieval task with the asked pair at `depth` (see the module docstring)."""
    context = length - 2 - 3  # between BOS and the query ``Q key value``, then EOS
    p = task.num_pairs
    if context < 2 * p:
        raise ValueError(f"needle context length {length} is too short for {p} key-value pairs "
                         f"(needs >= {2 * p + 5} tokens)")
    # The context is a sequence of items: context - 2p filler cells and p two-cell pairs. The needle
    # is the item at `depth`; the distractor pairs take random other items.
    items = context - p
    needle_item = int(round(depth * (items - 1)))
    others = [i for i in range(items) if i != needle_item]
    rng = np.random.default_rng(np.random.SeedSequence([seed, length, int(round(depth * 1e6))]))
    rows = []
    for _ in range(trials):
        tokens = make_filler(task, length, rng)[0].astype(np.int32)
        tokens[0], tokens[-1] = BOS, EOS
        keys = rng.choice(np.arange(*task.key_range), size=p, replace=False)
        values = rng.choice(np.arange(*task.value_range), size=p, replace=False)
        pair_items = np.concatenate([[needle_item], rng.choice(others, size=p - 1, replace=False)]).astype(np.int64)
        # Cell of an item: 1 (after BOS) + its index + one extra cell per pair item before it.
        rank = np.argsort(np.argsort(pair_items))
        cells = 1 + pair_items + rank
        tokens[cells], tokens[cells + 1] = keys, values
        tokens[length - 4:length - 1] = (QUERY, keys[0], values[0])
        rows.append(tokens)
    return NeedleCase(length, depth, np.stack(rows), np.array([length - 3]))


def fused_case(task: FusedPairTask, depth: float, trials: int, seed: int) -> NeedleCase:
    """Rows of the fused-pair task exactly as in training, with the pair that the first query asks
    about at `depth` of the context; that query's answer is scored (the other queries follow it and
    ask about the distractor pairs, so the row looks like a training row)."""
    task.check()
    cell = int(round(depth * (task.context_len - 1)))
    rng = np.random.default_rng(np.random.SeedSequence([seed, task.seq_len, int(round(depth * 1e6))]))
    tokens = np.stack([task.make_document(rng, needle_cell=cell)[0] for _ in range(trials)])
    return NeedleCase(task.seq_len, depth, tokens, np.array([1 + task.context_len]))


def token_case(haystack: np.ndarray, length: int, depth: float, trials: int, seed: int, span: int = 4) -> NeedleCase:
    """Held-out token stream `haystack` (1-D) -> sequences ``hay.. key value ..hay key value``."""
    hay_len = length - 4 * span
    if hay_len < 1:
        raise ValueError(f"needle context length {length} is too short for a {span}-token key and value")
    if haystack.size < 2 * span:
        raise ValueError("not enough held-out tokens to build a needle haystack")
    rng = np.random.default_rng(np.random.SeedSequence([seed, length, int(round(depth * 1e6))]))
    rows = []
    for _ in range(trials):
        begin = int(rng.integers(0, max(haystack.size - hay_len, 0) + 1))
        hay = np.resize(haystack[begin:begin + hay_len], hay_len)  # repeats a short stream
        key, value = (haystack[rng.integers(0, haystack.size, size=span)] for _ in range(2))
        at = int(round(depth * hay_len))
        rows.append(np.concatenate([hay[:at], key, value, hay[at:], key, value]).astype(np.int32))
    answer = np.arange(length - span - 1, length - 1)  # predicting value[j] from the token before it
    return NeedleCase(length, depth, np.stack(rows), answer)


def score_case(nll: np.ndarray, correct: np.ndarray, case: NeedleCase) -> tuple[np.ndarray, np.ndarray]:
    """Per trial: answer log-likelihood (sum over answer tokens) and whether all were argmax."""
    at = case.answer_positions
    return -nll[:, at].sum(-1), correct[:, at].all(-1)


def summarize(cases: list[NeedleCase], scores: dict) -> dict:
    """scores: (length, depth) -> (loglik [trials], correct [trials]) -> the sweep's tables
    (rows: depths, columns: lengths) and totals."""
    lengths = sorted({c.length for c in cases})
    depths = sorted({c.depth for c in cases})
    loglik = [[float(np.mean(scores[(n, d)][0])) for n in lengths] for d in depths]
    accuracy = [[float(np.mean(scores[(n, d)][1])) for n in lengths] for d in depths]
    correct = int(sum(int(np.sum(v[1])) for v in scores.values()))
    needles = int(sum(len(v[1]) for v in scores.values()))
    return {"lengths": lengths, "depths": depths, "loglik": loglik, "accuracy": accuracy,
            "correct": correct, "needles": needles, "accuracy_total": correct / max(needles, 1),
            "loglik_mean": float(np.mean([v[0] for v in scores.values()]))}
