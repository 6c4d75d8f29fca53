"""Training input: one entry point for the synthetic task and for prepared token shards.

``make_train_iterator(data_config, batch_size=..., seq_len=..., vocab_size=..., seed=...)`` returns
an iterator of batches in the format of :mod:`dsa_train.data.batch` with ``get_state()`` (a
JSON-serializable dict) and ``set_state(state)`` for checkpointing.

``batch_size`` is the *global* batch: each of ``shard_count`` data shards yields
``batch_size // shard_count`` rows (:func:`dsa_train.parallel.mesh.data_shard`: the processes of one
shard, which split the sequence or the tensor axis, load the same rows). Data seeds are
``(data_config.seed, seed)``.

Token shards go through grain (per dataset: shard by data shard, shuffle, repeat forever with a new
order each epoch; then a weighted mixture, concat-then-split packing, batching, prefetching):

- data shard ``i`` of ``n`` reads documents ``i, i + n, i + 2n, ...`` of every dataset (disjoint);
- packing concatenates documents into rows of seq_len; every document is its own segment, and a
  document longer than the space left is split, its continuation starting a new segment (at
  position 0) in the next row. Rows are full: with infinite repetition there is no padding.
- the mixture interleaves datasets deterministically in proportion to ``data_config.weights``.

Everything that can be checked before the first step is checked in :func:`open_datasets` and
raised as a one-line :class:`DataError`. Remote datasets (``gs://``...) are read from a local copy
(dsa_train/data/cache.py: why, and its disk cost).
"""

from __future__ import annotations

import functools
import json
import weakref
from pathlib import Path

import numpy as np

from dsa_train.config import DataConfig
from dsa_train.data.batch import DataError
from dsa_train.data.cache import localize
from dsa_train.data.manifest import file_sha256, read_manifest, tokenizer_file
from dsa_train.data.synthetic import FusedPairTask, RetrievalTask, SyntheticIterator
from dsa_train.paths import is_uri


def make_train_iterator(data_config: DataConfig, *, batch_size: int, seq_len: int, vocab_size: int,
                        seed: int, shard_index: int = 0, shard_count: int = 1):
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    if batch_size < shard_count or batch_size % shard_count:
        raise DataError(f"global batch size {batch_size} must be a multiple of the data-shard count {shard_count}")
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    seeds = (data_config.seed, seed)
    if data_config.source == "synthetic" and data_config.synthetic_task == "fused":
        task = FusedPairTask(vocab_size=vocab_size, seq_len=seq_len, num_pairs=data_config.num_pairs,
                             num_queries=data_config.num_queries, answer_weight=data_config.synthetic_answer_weight,
                             min_pairs=data_config.synthetic_min_pairs)
        return SyntheticIterator(task, batch_size=batch_size, seeds=seeds, shard_index=shard_index,
                                 shard_count=shard_count)
    if data_config.source == "synthetic":
        task = RetrievalTask(vocab_size=vocab_size, seq_len=seq_len, num_pairs=data_config.num_pairs,
                             num_queries=data_config.num_queries, doc_len=data_config.synthetic_doc_len,
                             filler=data_config.synthetic_filler, answer_weight=data_config.synthetic_answer_weight)
        return SyntheticIterator(task, batch_size=batch_size, seeds=seeds, shard_index=shard_index,
                                 shard_count=shard_count)
    if data_config.source == "arrayrecord":
        manifests = open_datasets(data_config.paths, vocab_size=vocab_size, tokenizer=data_config.tokenizer,
                                  cache_dir=data_config.cache_dir)
        return GrainTrainIterator(manifests, data_config, batch_size=batch_size, seq_len=seq_len,
                                  seeds=seeds, shard_index=shard_index, shard_count=shard_count)
    raise DataError(f"unknown data.source {data_config.source!r}")


# ----------------------------------------------------------------------------------------------
# Checks before training
# ----------------------------------------------------------------------------------------------


def _record_count(path: Path) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    # array_record raises bare RuntimeError/ValueError with C++ context, from the constructor as
    # well as from num_records() and close() (a truncated file fails only there).
    reader = None
    try:
        reader = ArrayRecordReader(str(path))
        count = reader.num_records()
        reader, opened = None, reader
        opened.close()
        return count
    except Exception as e:
        if reader is not None:
            try:
                reader.close()
            except Exception:  # noqa: BLE001 - already failing; the first error is the one to report
                pass
        raise DataError(f"{path}: not a readable ArrayRecord file ({_first_line(e)}); re-run "
                        "`dsa-train data prepare`") from None


def _first_line(e: BaseException, limit: int = 200) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


class _ShardSource:
    """grain's ArrayRecord source, with a record that cannot be read (a shard damaged after it was
    checked) reported as one DataError naming its shard instead of a C++ traceback."""

    def __init__(self, files: list[str], counts: list[int]):
        import grain

        self._inner = grain.sources.ArrayRecordDataSource(files)
        self._files = files
        self._starts = np.cumsum([0, *counts])

    def __len__(self) -> int:
        return len(self._inner)

    def _error(self, index: int, e: BaseException) -> DataError:
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return DataError(f"{self._files[shard]}: corrupt ArrayRecord shard (document {index - self._starts[shard]}: "
                         f"{_first_line(e)}); re-run `dsa-train data prepare`")

    def __getitem__(self, index: int):
        try:
            return self._inner[index]
        except Exception as e:  # noqa: BLE001 - array_record raises bare RuntimeErrors
            raise self._error(index, e) from None

    def __getitems__(self, indices):
        try:
            return self._inner.__getitems__(indices)
        except Exception:  # noqa: BLE001
            return [self[i] for i in indices]  # find (and name) the record that fails


def _checked_decode(record: bytes, *, manifest: dict) -> dict[str, np.ndarray]:
    """Decode one document, checking the manifest's ``max_token_id`` (which `open_datasets` holds
    against the vocabulary) while the document is in memory anyway: a manifest that lies would
    otherwise index outside the embedding table silently."""
    out = _decode(record)
    tokens = out["tokens"]
    if tokens.size:
        high, low = int(tokens.max()), int(tokens.min())
        if high > manifest["max_token_id"] or low < 0:
            raise DataError(f"{manifest['_path']}: a document holds token id {high if low >= 0 else low}, outside "
                            f"[0, max_token_id {manifest['max_token_id']}] the manifest records; the manifest or "
                            "its shards were changed: re-run `dsa-train data prepare`")
    return out


def open_datasets(paths, *, vocab_size: int, tokenizer: str | None = None, cache_dir: str | None = None) -> list[dict]:
    """Read and cross-check the manifests of the datasets to mix; return them. A remote dataset
    (a URI) is read from its local copy in `cache_dir` (fetched as needed: dsa_train/data/cache.py).

    Checks: manifests and shard files exist; each shard holds the records its manifest says and was
    written with the manifest's tokenizer; no dataset is empty; all datasets (and `tokenizer`, when
    given) share one tokenizer; no token id reaches `vocab_size`."""
    if not paths:
        raise DataError("data.paths is empty: name at least one prepared dataset directory")
    manifests = [localize(p, cache_dir) if is_uri(p) else read_manifest(p) for p in paths]
    for m in manifests:
        where = m["_dir"]
        if m["documents"] < 1 or m["tokens"] < 1:
            raise DataError(f"{where}: empty dataset (0 documents)")
        for shard in m["shards"]:
            path = Path(where) / shard["path"]
            if not path.is_file():
                raise DataError(f"{where}: shard missing: {shard['path']}")
            if shard.get("tokenizer_sha256") != m["tokenizer_sha256"]:
                raise DataError(f"{path}: written with a different tokenizer than {m['_path']} records")
            stats = path.with_suffix(".json")
            if stats.is_file():
                recorded = json.loads(stats.read_text()).get("tokenizer_sha256")
                if recorded != m["tokenizer_sha256"]:
                    raise DataError(f"{path}: written with a different tokenizer (sha256 {str(recorded)[:12]}…) "
                                    f"than {m['_path']} records ({m['tokenizer_sha256'][:12]}…)")
            count = _record_count(path)
            if count != shard["documents"]:
                raise DataError(f"{path}: holds {count} documents but the manifest says {shard['documents']} "
                                f"(shard replaced or truncated; re-run `dsa-train data prepare`)")
        if m["max_token_id"] >= vocab_size:
            raise DataError(f"{where}: token id {m['max_token_id']} is outside the model's vocabulary "
                            f"(vocab_size {vocab_size}); prepared with a different tokenizer?")
    first = manifests[0]
    for m in manifests[1:]:
        if m["tokenizer_sha256"] != first["tokenizer_sha256"]:
            raise DataError(f"datasets use different tokenizers: {first['_dir']} "
                            f"({first['tokenizer_sha256'][:12]}…) vs {m['_dir']} ({m['tokenizer_sha256'][:12]}…)")
    if tokenizer is not None:
        expected = file_sha256(tokenizer_file(tokenizer))
        if expected != first["tokenizer_sha256"]:
            raise DataError(f"{first['_dir']} was prepared with a different tokenizer than data.tokenizer "
                            f"{tokenizer} (sha256 {first['tokenizer_sha256'][:12]}… vs {expected[:12]}…)")
    return manifests


# ----------------------------------------------------------------------------------------------
# The grain pipeline
# ----------------------------------------------------------------------------------------------


def _decode(record: bytes) -> dict[str, np.ndarray]:
    return {"tokens": np.frombuffer(record, dtype="<i4").astype(np.int32)}


def _to_batch_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = packed["tokens_segment_ids"]
    return {"tokens": packed["tokens"], "segment_ids": segment_ids, "positions": packed["tokens_positions"],
            "loss_weights": (segment_ids > 0).astype(np.float32)}


def _shuffle_seed(seeds: tuple[int, ...], dataset_index: int) -> int:
    return int(np.random.SeedSequence([*seeds, dataset_index]).generate_state(1)[0])


def build_grain_dataset(manifests: list[dict], data_config: DataConfig, *, local_batch: int, seq_len: int,
                        seeds: tuple[int, ...], shard_index: int, shard_count: int):
    """The grain IterDataset of batches for one data shard."""
    import grain

    components = []
    for i, m in enumerate(manifests):
        shards = [s for s in m["shards"] if s["documents"] > 0]
        ds = grain.MapDataset.source(_ShardSource([str(Path(m["_dir"]) / s["path"]) for s in shards],
                                                  [s["documents"] for s in shards]))
        ds = ds[shard_index::shard_count]
        if len(ds) == 0:
            raise DataError(f"{m['_dir']}: {m['documents']} document(s) can't be shared among "
                            f"{shard_count} data shards")
        if data_config.shuffle:
            ds = ds.shuffle(seed=_shuffle_seed(seeds, i))
        components.append(ds.repeat(None).map(functools.partial(_checked_decode, manifest=m)))
    if len(components) > 1:
        ds = grain.MapDataset.mix(components, list(data_config.weights) or None)
    else:
        ds = components[0]
    # Two reader threads: decoding is cheap and this must not compete with the training step.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=32))
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len})
    ds = ds.map(_to_batch_row).batch(local_batch, drop_remainder=True)
    if data_config.prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=data_config.prefetch)
    return ds


class GrainTrainIterator:
    """Batches from prepared shards; state = grain's iterator state + what it was saved for."""

    def __init__(self, manifests: list[dict], data_config: DataConfig, *, batch_size: int, seq_len: int,
                 seeds: tuple[int, ...], shard_index: int = 0, shard_count: int = 1):
        self._dataset = build_grain_dataset(manifests, data_config, local_batch=batch_size // shard_count,
                                            seq_len=seq_len, seeds=seeds, shard_index=shard_index,
                                            shard_count=shard_count)
        self._iterator = iter(self._dataset)
        # Stop the prefetch thread before interpreter shutdown tears down the modules it uses.
        self._finalizer = weakref.finalize(self, _close_iterator, self._iterator)
        self._fingerprint = {
            # Content, not paths: a resumed run may see the same datasets mounted elsewhere.
            "datasets": [{"documents": m["documents"], "tokens": m["tokens"],
                          "tokenizer_sha256": m["tokenizer_sha256"]} for m in manifests],
            "weights": list(data_config.weights), "shuffle": data_config.shuffle, "seeds": list(seeds),
            # Named as when every process was its own shard, so that those checkpoints resume.
            "batch_size": batch_size, "seq_len": seq_len, "process_index": shard_index,
            "process_count": shard_count,
        }

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict:
        state = {"source": "arrayrecord", "grain": self._iterator.get_state(), "fingerprint": self._fingerprint}
        return json.loads(json.dumps(state))  # plain lists and dicts, as it will be read back

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("source") != "arrayrecord":
            got = state.get("source") if isinstance(state, dict) else type(state).__name__
            raise DataError(f"data iterator state is for source {got!r}, but data.source is 'arrayrecord'")
        saved = state.get("fingerprint", {})
        if saved != json.loads(json.dumps(self._fingerprint)):
            changed = sorted(k for k in set(saved) | set(self._fingerprint) if saved.get(k) != self._fingerprint.get(k))
            raise DataError(f"data iterator state was saved for a different data setup (changed: "
                            f"{', '.join(changed)}); it can't be resumed with this one")
        self._iterator.set_state(state["grain"])

    def close(self) -> None:
        self._finalizer()


def _close_iterator(iterator) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
        # grain 0.2.18's thread-prefetch close() is not idempotent and its __del__ calls it again,
        # at interpreter shutdown when its module globals are gone ("Exception ignored ..."
        # noise): once closed, make further calls no-ops.
        iterator.close = lambda: None
