"""`dsa-train data prepare`: tokenize text into ArrayRecord shards of token ids (see manifest.py).

Inputs (files, directories searched recursively, or glob patterns), by extension:

- ``.txt .text .md``: plain text. ``--text-documents file`` (default) makes each file one document
  (long-context continued training wants whole files); ``paragraph`` makes each block separated by
  blank lines one document. Undecodable UTF-8 bytes become U+FFFD.
- ``.jsonl .ndjson .jsonl.gz``: one JSON object per line, the document in ``--text-field``.
- ``.parquet``: one row per document, the document in column ``--text-field``.

Leading/trailing whitespace is stripped and empty documents are skipped. Each document is encoded
with the tokenizer's own special-token template (e.g. a BOS, if tokenizer.json adds one), and the
EOS id is appended unless the template already ended with it (``--no-eos``: nothing appended).

Work is split into shards of about ``--shard-mb`` of input (big JSONL files by line-aligned byte
ranges, Parquet files by row groups), tokenized in ``--workers`` processes. A shard is written
under a temporary name and renamed when complete, then its stats file is written: re-running the
same command skips the shards already done, and manifest.json appears once all are.

``--output`` (and ``--tokenizer``) may be a URI (``gs://``, any ``etils.epath`` scheme): shards are
written in a local temporary directory (one per worker at a time) and each is uploaded when
complete, under a temporary name renamed into place, then its stats file; the manifest last. The
inputs are read from local or mounted files.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np

from dsa_train.data.batch import DataError
from dsa_train.data.manifest import (DTYPE, FORMAT, MANIFEST, PLAN, VERSION, file_sha256, shard_name,
                                     shard_stats_name, tokenizer_file, write_json_atomic)
from dsa_train.paths import copy_file, is_uri, move, remove_tree, run_path

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
# Tried in order when neither --eos-token nor tokenizer_config.json names the EOS token.
COMMON_EOS = ("<｜end▁of▁sentence｜>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
ENCODE_BATCH = 64


# ----------------------------------------------------------------------------------------------
# Inputs and the work plan
# ----------------------------------------------------------------------------------------------


def input_format(path: Path, forced: str | None) -> str | None:
    if forced:
        return forced
    name = path.name.lower()
    for fmt, suffixes in (("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("text", TEXT_SUFFIXES)):
        if name.endswith(suffixes):
            return fmt
    return None


def find_inputs(specs: list[str], forced: str | None) -> list[tuple[Path, str]]:
    """(path, format) of every input file, in a stable order."""
    found: list[tuple[Path, str]] = []
    for spec in specs:
        path = Path(spec)
        if any(c in spec for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"no input file matches {spec}")
            candidates, explicit = matches, False
        elif path.is_dir():
            candidates = sorted(p for p in path.rglob("*") if p.is_file()
                                and not any(part.startswith(".") for part in p.relative_to(path).parts))
            explicit = False
        elif path.is_file():
            candidates, explicit = [path], True
        else:
            raise DataError(f"input not found: {spec}")
        kept = 0
        for p in candidates:
            fmt = input_format(p, forced)
            if fmt is None:
                if explicit:
                    raise DataError(f"{p}: unknown input format (use --format text|jsonl|parquet)")
                continue
            found.append((p, fmt))
            kept += 1
        if not kept:
            raise DataError(f"no .txt/.md/.jsonl/.parquet files in {spec}")
    seen, unique = set(), []
    for p, fmt in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append((p, fmt))
    return unique


def _pieces(path: Path, fmt: str, shard_bytes: int, text_field: str) -> list[dict]:
    """Cut one input into pieces of about shard_bytes: the unit of work is a run of pieces."""
    size = path.stat().st_size
    base = {"path": str(path.resolve()), "format": fmt}
    if fmt == "jsonl" and not path.name.endswith(".gz") and size > shard_bytes:
        return [{**base, "start": s, "end": min(s + shard_bytes, size), "size": min(shard_bytes, size - s)}
                for s in range(0, size, shard_bytes)]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid etc. with multi-line context
            raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        _check_column(parquet, path, text_field)
        meta = parquet.metadata
        pieces, group, group_bytes = [], [], 0
        for i in range(meta.num_row_groups):
            group.append(i)
            group_bytes += meta.row_group(i).total_byte_size
            if group_bytes >= shard_bytes:
                pieces.append({**base, "row_groups": group, "size": group_bytes})
                group, group_bytes = [], 0
        if group:
            pieces.append({**base, "row_groups": group, "size": group_bytes})
        return pieces
    return [{**base, "size": size}]


def _check_column(parquet, path, text_field: str) -> None:
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column '{text_field}' (columns: {', '.join(names)}; use --text-field)")


def make_plan(inputs: list[tuple[Path, str]], shard_bytes: int, text_field: str = "text") -> list[list[dict]]:
    """Consecutive pieces grouped into shards of about shard_bytes each."""
    shards, current, current_bytes = [], [], 0
    for path, fmt in inputs:
        for piece in _pieces(path, fmt, shard_bytes, text_field):
            if current and current_bytes + piece["size"] > shard_bytes:
                shards.append(current)
                current, current_bytes = [], 0
            current.append(piece)
            current_bytes += piece["size"]
    if current:
        shards.append(current)
    return shards


# ----------------------------------------------------------------------------------------------
# Reading documents
# ----------------------------------------------------------------------------------------------


def _text_of(value, where: str, field: str):
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' is a {type(value).__name__}, not a string")
    return value


def read_documents(piece: dict, text_field: str, text_documents: str) -> Iterator[str]:
    path, fmt = piece["path"], piece["format"]
    if fmt == "text":
        with open(path, "rb") as f:
            data = f.read()
        # A binary file named .txt would otherwise become one document of replacement characters.
        nul = data.find(b"\0")
        if nul >= 0:
            raise DataError(f"{path}: not a text file (NUL byte at offset {nul})")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
        yield from (re.split(r"\n[ \t\r\f\v]*\n", text) if text_documents == "paragraph" else [text])
    elif fmt == "jsonl":
        yield from _read_jsonl(piece, text_field)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        _check_column(pf, path, text_field)
        for i in piece["row_groups"]:
            column = pf.read_row_group(i, columns=[text_field]).column(0)
            for value in column.to_pylist():
                text = _text_of(value, f"{path} (row group {i})", text_field)
                if text is not None:
                    yield text
    else:
        raise DataError(f"{path}: unknown format {fmt}")


def _read_jsonl(piece: dict, text_field: str) -> Iterator[str]:
    path = piece["path"]
    opener = gzip.open if path.endswith(".gz") else open
    start, end = piece.get("start", 0), piece.get("end")
    with opener(path, "rb") as f:
        pos = start
        if start > 0:
            # A line belongs to the piece holding its first byte: skip the one that began earlier.
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())
        while end is None or pos < end:
            line = f.readline()
            if not line:
                break
            where = f"{path} (byte {pos})"
            pos += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{where}: invalid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{where}: no field '{text_field}' in the record (use --text-field)")
            text = _text_of(record[text_field], where, text_field)
            if text is not None:
                yield text


# ----------------------------------------------------------------------------------------------
# Tokenizing one shard (runs in a worker process)
# ----------------------------------------------------------------------------------------------

_TOKENIZER = None


def _load_tokenizer(tokenizer_path: str) -> None:
    global _TOKENIZER
    from tokenizers import Tokenizer

    _TOKENIZER = Tokenizer.from_file(tokenizer_path)


def _init_worker(tokenizer_path: str) -> None:
    # Parallelism comes from the processes; one Rust thread each avoids oversubscribing the CPUs.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _load_tokenizer(tokenizer_path)


def encode_documents(tokenizer, texts: list[str], eos_id: int | None, add_special_tokens: bool) -> list[np.ndarray]:
    out = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens):
        ids = enc.ids
        if eos_id is not None and (not ids or ids[-1] != eos_id):
            ids = ids + [eos_id]
        out.append(np.asarray(ids, dtype=np.int32))
    return out


def prepare_shard(index: int, pieces: list[dict], out_dir: str, options: dict) -> dict:
    """Tokenize the pieces of one shard into shard-<index>.arrayrecord; write and return its stats."""
    from array_record.python.array_record_module import ArrayRecordWriter

    out = Path(out_dir)
    final, tmp = out / shard_name(index), out / (shard_name(index) + ".tmp")
    documents = tokens = 0
    max_id = -1
    writer = ArrayRecordWriter(str(tmp), "group_size:1")  # random access: one record per chunk

    def flush(texts: list[str]) -> None:
        nonlocal documents, tokens, max_id
        for ids in encode_documents(_TOKENIZER, texts, options["eos_id"], options["add_special_tokens"]):
            if not len(ids):
                continue
            writer.write(ids.astype("<i4").tobytes())
            documents += 1
            tokens += len(ids)
            max_id = max(max_id, int(ids.max()))

    try:
        batch: list[str] = []
        for piece in pieces:
            for text in read_documents(piece, options["text_field"], options["text_documents"]):
                text = text.strip()
                if text:
                    batch.append(text)
                if len(batch) >= ENCODE_BATCH:
                    flush(batch)
                    batch = []
        if batch:
            flush(batch)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)  # a failed shard leaves nothing behind
        raise
    writer.close()
    os.replace(tmp, final)
    stats = {"path": final.name, "documents": documents, "tokens": tokens, "max_token_id": max_id,
             "tokenizer_sha256": options["tokenizer_sha256"], "input_bytes": sum(p["size"] for p in pieces),
             "bytes": final.stat().st_size, "sha256": file_sha256(final)}
    write_json_atomic(out / shard_stats_name(index), stats)
    return stats


def _run_shard(args) -> dict:
    return prepare_shard(*args)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def _tokenizer_config_token(tok_path: Path, key: str) -> str | None:
    config = tok_path.with_name("tokenizer_config.json")
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text()).get(key)
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_ids(tokenizer, tok_path: Path, eos_token: str | None, no_eos: bool) -> tuple[int | None, int | None]:
    """(eos_id, bos_id) of the tokenizer; bos_id is informational (None when unknown)."""
    bos = _tokenizer_config_token(tok_path, "bos_token")
    bos_id = tokenizer.token_to_id(bos) if bos else None
    if no_eos:
        return None, bos_id
    if eos_token is not None:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(f"--eos-token {eos_token!r} is not in the tokenizer's vocabulary ({tok_path})")
        return eos_id, bos_id
    for name in [_tokenizer_config_token(tok_path, "eos_token"), *COMMON_EOS]:
        if name and tokenizer.token_to_id(name) is not None:
            return tokenizer.token_to_id(name), bos_id
    raise DataError(f"can't tell the EOS token of {tok_path}: pass --eos-token TOKEN (or --no-eos)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsa-train data prepare",
                                description="Tokenize text/JSONL/Parquet into ArrayRecord token shards.")
    p.add_argument("inputs", nargs="+", help="input files, directories (searched recursively) or glob patterns")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (or a directory holding one); local or a URI")
    p.add_argument("--output", "-o", required=True, help="output dataset directory; local or a URI (gs://...)")
    p.add_argument("--format", choices=("text", "jsonl", "parquet"), default=None,
                   help="read every input as this format (default: by file extension)")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    p.add_argument("--text-documents", choices=("file", "paragraph"), default="file",
                   help="plain text: one document per file, or per blank-line-separated paragraph")
    p.add_argument("--eos-token", default=None, help="EOS token appended to every document (default: "
                   "tokenizer_config.json's eos_token, else a common EOS name found in the vocabulary)")
    p.add_argument("--no-eos", action="store_true", help="append no EOS token")
    p.add_argument("--no-special-tokens", action="store_true",
                   help="don't apply the tokenizer's special-token template (e.g. its BOS)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--shard-mb", type=float, default=256.0, help="input megabytes per output shard")
    p.add_argument("--overwrite", action="store_true", help="discard a previous, different preparation in --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def prepare(args: argparse.Namespace) -> dict:
    """Run a preparation described by parsed arguments; returns the manifest."""
    for path in args.inputs:
        if is_uri(path):
            raise DataError(f"{path}: `dsa-train data prepare` reads its inputs from local or mounted files only "
                            "(copy them, or mount the bucket, e.g. gcsfuse); --output may be a URI")
    if args.workers < 1:
        raise DataError(f"--workers must be >= 1, got {args.workers}")
    if args.shard_mb <= 0:
        raise DataError(f"--shard-mb must be > 0, got {args.shard_mb}")
    tok_path = tokenizer_file(args.tokenizer)
    tok_path = tok_path if is_uri(tok_path) else tok_path.resolve()
    # Local scratch: the shards of a remote --output before their upload, and a remote tokenizer
    # (the workers load it from a local file).
    scratch = Path(tempfile.mkdtemp(prefix="dsa-train-prepare-")) if is_uri(args.output) or is_uri(tok_path) else None
    try:
        return _prepare(args, tok_path, scratch)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _prepare(args: argparse.Namespace, tok_path, scratch: Path | None) -> dict:
    from tokenizers import Tokenizer

    work_dir = scratch if is_uri(args.output) else None
    local_tok = tok_path
    if is_uri(tok_path):
        local_tok = scratch / "tokenizer.json"
        copy_file(tok_path, local_tok)
    try:
        tokenizer = Tokenizer.from_file(str(local_tok))
    except Exception as e:  # tokenizers raises a bare Exception with the serde message
        raise DataError(f"{tok_path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    eos_id, bos_id = special_ids(tokenizer, tok_path, args.eos_token, args.no_eos)
    inputs = find_inputs(args.inputs, args.format)
    shards = make_plan(inputs, max(1, int(args.shard_mb * 1e6)), args.text_field)
    options = {"text_field": args.text_field, "text_documents": args.text_documents, "eos_id": eos_id,
               "add_special_tokens": not args.no_special_tokens, "tokenizer_sha256": file_sha256(tok_path)}
    plan = {"version": VERSION, "options": options,
            "inputs": [{"path": str(p.resolve()), "format": fmt, "size": p.stat().st_size,
                        "mtime_ns": p.stat().st_mtime_ns} for p, fmt in inputs],
            "shards": shards}

    out = run_path(args.output)
    created_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    before = _names(out)
    try:
        return _prepare_into(out, args, plan, shards, options, tok_path, local_tok, tokenizer, eos_id, bos_id,
                             work_dir)
    except DataError:
        # Bad input or options: nothing this command created stays (a kill, by contrast, leaves
        # the plan and finished shards so that the same command resumes).
        if created_out:
            remove_tree(out)
        else:
            for p in (out.iterdir() if out.exists() else ()):
                if p.name not in before and (p.name == PLAN or p.name.startswith("shard-")):
                    p.unlink()
        raise


def _names(out) -> set[str]:
    # An object store has no empty directories: a new --output prefix does not exist until written.
    return {p.name for p in out.iterdir()} if out.exists() else set()


def _prepare_into(out, args, plan: dict, shards, options: dict, tok_path, local_tok: Path, tokenizer, eos_id,
                  bos_id, work_dir: Path | None) -> dict:
    plan_path = out / PLAN
    if plan_path.is_file():
        previous = json.loads(plan_path.read_text())
        if previous != plan:
            if not args.overwrite:
                raise DataError(f"{out} holds a preparation from other inputs, tokenizer or options; "
                                f"use another --output or pass --overwrite")
            _clear(out)
    elif (out / MANIFEST).exists() or any(out.glob("shard-*")):
        if not args.overwrite:
            raise DataError(f"{out} holds files of an unknown preparation; use another --output or pass --overwrite")
        _clear(out)
    write_json_atomic(plan_path, plan)

    stats: dict[int, dict] = {}
    for i in range(len(shards)):
        done = out / shard_stats_name(i)
        if done.is_file() and (out / shard_name(i)).is_file():
            stats[i] = json.loads(done.read_text())
    todo = [i for i in range(len(shards)) if i not in stats]
    _run(todo, shards, out, options, str(local_tok), args, stats, work_dir)

    ordered = [stats[i] for i in range(len(shards))]
    documents = sum(s["documents"] for s in ordered)
    if documents == 0:
        raise DataError(f"no documents found in {', '.join(args.inputs)} (all empty?)")
    manifest = {
        "format": FORMAT, "version": VERSION, "dtype": DTYPE,
        "documents": documents, "tokens": sum(s["tokens"] for s in ordered),
        "max_token_id": max(s["max_token_id"] for s in ordered),
        "tokenizer_sha256": options["tokenizer_sha256"], "tokenizer_path": str(tok_path),
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "eos_id": eos_id, "bos_id": bos_id, "add_special_tokens": options["add_special_tokens"],
        "text_field": args.text_field, "text_documents": args.text_documents,
        "inputs": [i["path"] for i in plan["inputs"]],
        # bytes / sha256: absent from shards a version that did not record them wrote (resumed)
        "shards": [{k: s[k] for k in ("path", "documents", "tokens", "max_token_id", "tokenizer_sha256", "bytes",
                                      "sha256") if k in s} for s in ordered],
    }
    write_json_atomic(out / MANIFEST, manifest)
    if not args.quiet:
        print(f"{out}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens in "
              f"{len(ordered)} shard(s) ({len(todo)} written now, {len(ordered) - len(todo)} already done)")
    return manifest


def _clear(out) -> None:
    for p in [out / MANIFEST, out / PLAN, *out.glob("shard-*")]:
        if p.is_dir():
            remove_tree(p)
        elif p.exists():
            p.unlink()


def _publish(index: int, work_dir: Path, out) -> None:
    """Upload a finished shard from the local work directory: the shard under a temporary name
    renamed into place, then its stats file (which marks it done, as locally)."""
    local, remote = work_dir / shard_name(index), out / shard_name(index)
    copy_file(local, out / (shard_name(index) + ".tmp"))
    move(out / (shard_name(index) + ".tmp"), remote)
    write_json_atomic(out / shard_stats_name(index), json.loads((work_dir / shard_stats_name(index)).read_text()))
    local.unlink()
    (work_dir / shard_stats_name(index)).unlink()


def _run(todo: list[int], shards: list[list[dict]], out, options: dict, tok_path: str,
         args: argparse.Namespace, stats: dict[int, dict], work_dir: Path | None = None) -> None:
    """Tokenize the shards in ``todo`` into ``out`` (through ``work_dir`` when ``out`` is remote)."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    # Progress in input bytes: shards differ in size, and the last one is usually small.
    progress = Progress(TextColumn("[bold]tokenizing[/]"), BarColumn(), TaskProgressColumn(),
                        TimeRemainingColumn(), TextColumn("{task.description}"),
                        disable=args.quiet or not todo)
    counted = {"documents": 0, "tokens": 0}

    write_dir = str(work_dir if work_dir is not None else out)

    def finished(i: int, result: dict, task) -> None:
        if work_dir is not None:
            _publish(i, work_dir, out)
        stats[i] = result
        counted["documents"] += result["documents"]
        counted["tokens"] += result["tokens"]
        progress.update(task, advance=result["input_bytes"],
                        description=f"{counted['documents']:,} docs, {counted['tokens']:,} tokens")

    with progress:
        task = progress.add_task("", total=sum(p["size"] for i in todo for p in shards[i]) or 1)
        workers = min(args.workers, len(todo))
        if workers <= 1:
            _load_tokenizer(tok_path)
            for i in todo:
                finished(i, prepare_shard(i, shards[i], write_dir, options), task)
            return
        # spawn, not fork: the parent has already started the tokenizer's Rust thread pool.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(tok_path,)) as pool:
            pending = {pool.submit(_run_shard, (i, shards[i], write_dir, options)): i for i in todo}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        finished(pending.pop(future), future.result(), task)
            except BrokenProcessPool:
                raise DataError("a tokenizer worker process died (out of memory?); re-run the same command "
                                "to resume from the finished shards") from None
            except BaseException:
                for future in pending:
                    future.cancel()
                raise


def prepare_main(argv: list[str] | None = None) -> int:
    """Entry point of `dsa-train data prepare`; user errors print one line and return 2."""
    args = build_parser().parse_args(argv)
    try:
        prepare(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
