"""Evaluate checkpoints: indexer diagnostics, dense-vs-sparse quality and the needle sweep.

`evaluate(checkpoint, batches, needle_cases, options)` measures one checkpoint on fixed held-out
batches (numpy, the training batch format) and returns a JSON-ready dict; the same batches and
needle cases are used for every checkpoint of a comparison.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Optional

import jax
import numpy as np

from dsa_train.config import DataConfig
from dsa_train.eval.aggregate import IndexerAccumulator, QualityAccumulator
from dsa_train.eval.checkpoints import EvalInputError, LoadedCheckpoint
from dsa_train.eval.forward import DiagnosticOptions, LayerRunner
from dsa_train.eval import needle as needle_lib
from dsa_train.eval.defaults import DEFAULT_BUCKET_EDGES, DEFAULT_HELDOUT_SEED
from dsa_train.eval.mtp import MTPAcceptance, has_mtp
from dsa_train.ops.losses import lm_targets


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    bucket_edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES
    rows: str = "selective"  # which query rows the indexer statistics count (aggregate.IndexerAccumulator)
    diagnostics: DiagnosticOptions = DiagnosticOptions()
    progress: bool = True
    # Also run the local-window control ("local" mode): sparse attention whose top-k is the first
    # `local_sinks` tokens and the most recent keys, instead of the indexer's selection.
    local_window: bool = False
    local_sinks: int = 4


def heldout_data_config(run_config: Optional[dict], data_paths: tuple[str, ...] = ()) -> tuple[DataConfig, str]:
    """The data to evaluate on, and a one-line description of it.

    `data_paths` (prepared shards; remote ones copied into the run's data.cache_dir) win; otherwise the run's own data config (synthetic: fresh
    documents from another seed; shards: the run's datasets, shuffled with another seed, which is
    only held out if those datasets were, hence the note); otherwise the built-in synthetic task."""
    raw = dict((run_config or {}).get("data") or {})
    if data_paths:  # remote ones are copied where the run keeps its copies (data.cache_dir)
        return (DataConfig(source="arrayrecord", paths=tuple(data_paths), prefetch=0, cache_dir=raw.get("cache_dir")),
                f"prepared shards {list(data_paths)}")
    known = {f.name for f in dataclasses.fields(DataConfig)}
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in known}
    fields["prefetch"] = 0
    config = DataConfig(**fields)
    if config.source == "synthetic":
        return config, (f"synthetic retrieval task (num_pairs {config.num_pairs}, num_queries {config.num_queries}, "
                        f"doc_len {config.synthetic_doc_len or 'row'}), held-out seed")
    return config, (f"the run's datasets {list(config.paths)} with another shuffle seed (NOT held out unless those "
                    "datasets were; pass --data with a held-out set)")


def load_batches(data_config: DataConfig, *, batches: int, batch_size: int, seq_len: int, vocab_size: int,
                 seed: int = DEFAULT_HELDOUT_SEED) -> list[dict]:
    from dsa_train.data.pipeline import make_train_iterator

    iterator = make_train_iterator(data_config, batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size,
                                   seed=seed)
    try:
        return [next(iterator) for _ in range(batches)]
    finally:
        iterator.close()


def needle_cases(data_config: DataConfig, batches: list[dict], *, vocab_size: int, lengths, depths, trials: int,
                 seed: int) -> list[needle_lib.NeedleCase]:
    """The needle sweep's sequences (module needle), built from the evaluation data's tokens."""
    from dsa_train.data.synthetic import FusedPairTask, RetrievalTask

    cases = []
    synthetic = data_config.source == "synthetic"
    stream = None if synthetic else np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
    for length in lengths:
        for depth in depths:
            if synthetic and data_config.synthetic_task == "fused":
                task = FusedPairTask(vocab_size=vocab_size, seq_len=length, num_pairs=data_config.num_pairs,
                                     num_queries=data_config.num_queries)
                cases.append(needle_lib.fused_case(task, depth, trials, seed))
            elif synthetic:
                task = RetrievalTask(vocab_size=vocab_size, seq_len=length, num_pairs=data_config.num_pairs,
                                     num_queries=1, filler=data_config.synthetic_filler)
                cases.append(needle_lib.synthetic_case(task, length, depth, trials, seed))
            else:
                cases.append(needle_lib.token_case(stream, length, depth, trials, seed))
    return cases


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def model_summary(ckpt: LoadedCheckpoint) -> dict:
    c = ckpt.model.config
    stage = ((ckpt.run_config or {}).get("train") or {}).get("stage")
    return {"name": ckpt.name, "path": str(ckpt.path), "step": ckpt.step, "stage": stage,
            "layers": c.num_hidden_layers, "index_topk": c.index_topk if c.use_indexer else None,
            "use_indexer": c.use_indexer, "vocab_size": c.vocab_size}


def _mode_args(mode: str, options: EvalOptions) -> dict:
    """Forward arguments of an evaluation mode: "dense", "sparse" (the indexer's top-k) or "local"
    (sparse attention over the sinks and the most recent keys, the local-window control)."""
    if mode == "local":
        return dict(attention="sparse", selection="local", sink_tokens=options.local_sinks)
    return dict(attention=mode)


def evaluate(ckpt: LoadedCheckpoint, batches: list[dict], cases: list[needle_lib.NeedleCase],
             options: EvalOptions = EvalOptions()) -> dict:
    model = ckpt.model
    config = model.config
    runner = LayerRunner(model, options.diagnostics)
    modes = ("dense", "sparse") if config.use_indexer else ("dense",)
    if options.local_window and config.use_indexer:
        modes += ("local",)
    indexer = (IndexerAccumulator(config.num_hidden_layers, config.index_topk, options.bucket_edges, options.rows)
               if config.use_indexer else None)
    quality = QualityAccumulator(options.bucket_edges)
    acceptance = MTPAcceptance() if has_mtp(model) else None
    needle_scores = {m: {} for m in modes}
    with _progress(options.progress) as progress:
        task = progress.add_task(f"{ckpt.name}: held-out batches", total=len(batches)) if progress else None
        for batch in batches:
            tokens, seg, positions = batch["tokens"], batch["segment_ids"], batch["positions"]
            target_weights = np.asarray(jax.device_get(lm_targets(tokens, seg)[1]))
            for mode in modes:
                hook = None
                if mode == "dense" and indexer is not None:
                    hook = lambda i, stats: indexer.add(i, jax.device_get(stats), positions)  # noqa: E731
                nll, correct = jax.device_get(runner.forward(tokens, seg, positions, on_layer_stats=hook,
                                                             **_mode_args(mode, options)))
                quality.add(mode, nll, correct, target_weights, batch["loss_weights"], positions)
                if acceptance is not None:
                    acceptance.add(model, batch, mode)
            if progress:
                progress.advance(task)
        if cases:
            task = progress.add_task(f"{ckpt.name}: needle sweep", total=len(cases) * len(modes)) if progress else None
            for case in cases:
                seg = np.ones_like(case.tokens)
                for mode in modes:
                    nll, correct = jax.device_get(runner.forward(case.tokens, seg, **_mode_args(mode, options)))
                    needle_scores[mode][(case.length, case.depth)] = needle_lib.score_case(
                        np.asarray(nll), np.asarray(correct), case)
                    if progress:
                        progress.advance(task)
    return {
        "checkpoint": model_summary(ckpt),
        "indexer": indexer.summary() if indexer is not None else None,
        "quality": quality.summary(),
        "needle": {m: needle_lib.summarize(cases, s) for m, s in needle_scores.items()} if cases else None,
        "mtp_acceptance": acceptance.summary() if acceptance is not None else None,
    }


def check_comparable(a: LoadedCheckpoint, b: LoadedCheckpoint) -> None:
    if a.model.config.vocab_size != b.model.config.vocab_size:
        raise EvalInputError(f"{a.name} and {b.name} have different vocabularies ({a.model.config.vocab_size} vs "
                             f"{b.model.config.vocab_size}): they cannot be scored on the same tokens")
