"""Prepared datasets in object storage (an offline ``gs://``: tests/fake_bucket.py): `data prepare`
writes one there, training and eval read it through a verified local copy in ``data.cache_dir``
(dsa_train/data/cache.py), fetched once and fetched again when the copy is damaged."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from dsa_train.cli import main as cli_main
from dsa_train.config import ConfigError, DataConfig, load_config
from dsa_train.data import DataError, make_train_iterator
from dsa_train.data import cache as cache_lib
from dsa_train.data.prepare import prepare_main
from dsa_train.train.trainer import train
from fake_bucket import fake_gcs

REPO = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """``gs://bkt/...`` is ``root``; a local JSONL corpus and its tokenizer in ``src``; the files
    fetched into a cache listed in ``fetches``."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the default data.cache_dir
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(0)
    docs = [" ".join([f"d{i}"] + [rng.choice(WORDS) for _ in range(rng.randint(5, 60))]) for i in range(80)]
    (src / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(docs, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"]))
    tok.save(str(src / "tokenizer.json"))
    fetches = []
    real_fetch = cache_lib._fetch
    monkeypatch.setattr(cache_lib, "_fetch", lambda remote, local, expected: (fetches.append(local.name),
                                                                              real_fetch(remote, local, expected)))
    with fake_gcs(tmp_path / "bucket", monkeypatch) as root:
        (root / "bkt").mkdir()
        yield SimpleNamespace(root=root / "bkt", src=src, fetches=fetches)
    assert not list(cwd.iterdir()), f"written to the working directory: {sorted(cwd.rglob('*'))}"
    assert not (REPO / "gs:").exists()


def prepare_remote(bucket, out="gs://bkt/data", *extra) -> None:
    (bucket.root / "tok").mkdir(exist_ok=True)
    (bucket.root / "tok" / "tokenizer.json").write_bytes((bucket.src / "tokenizer.json").read_bytes())
    assert prepare_main([str(bucket.src / "a.jsonl"), "--tokenizer", "gs://bkt/tok", "-o", out, "--shard-mb",
                         "0.004", "--quiet", *extra]) == 0


def iterator(cache_dir, paths=("gs://bkt/data",)):
    config = DataConfig(source="arrayrecord", paths=tuple(paths), cache_dir=str(cache_dir), prefetch=0)
    return make_train_iterator(config, batch_size=2, seq_len=32, vocab_size=512, seed=0)


def first_batch(cache_dir) -> dict:
    it = iterator(cache_dir)
    try:
        return next(it)
    finally:
        it.close()


def test_prepare_writes_a_dataset_to_a_bucket(bucket, tmp_path):
    prepare_remote(bucket, "gs://bkt/data", "--workers", "2")  # workers write locally, the parent uploads
    manifest = json.loads((bucket.root / "data/manifest.json").read_text())
    assert len(manifest["shards"]) > 1
    for shard in manifest["shards"]:
        assert shard["bytes"] == (bucket.root / "data" / shard["path"]).stat().st_size and len(shard["sha256"]) == 64
        assert (bucket.root / "data" / shard["path"]).with_suffix(".json").is_file()
    assert not [p.name for p in (bucket.root / "data").iterdir() if p.name.endswith(".tmp")]
    assert manifest["tokenizer_path"] == "gs://bkt/tok/tokenizer.json"
    # The same command again resumes: every shard is done, nothing is rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in (bucket.root / "data").glob("shard-*")}
    prepare_remote(bucket, "gs://bkt/data", "--workers", "2")
    assert {p.name: p.stat().st_mtime_ns for p in (bucket.root / "data").glob("shard-*")} == before
    # The same dataset prepared locally holds the same shards.
    assert prepare_main([str(bucket.src / "a.jsonl"), "--tokenizer", str(bucket.src / "tokenizer.json"), "-o",
                         str(tmp_path / "local"), "--shard-mb", "0.004", "--quiet"]) == 0
    local = json.loads((tmp_path / "local/manifest.json").read_text())
    assert [s["sha256"] for s in local["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_a_failed_prepare_leaves_nothing_in_the_bucket(bucket, capsys):
    (bucket.src / "bad.jsonl").write_text('{"text": "alpha"}\n{not json\n')
    assert prepare_main([str(bucket.src / "bad.jsonl"), "--tokenizer", str(bucket.src / "tokenizer.json"), "-o",
                         "gs://bkt/bad", "--quiet"]) == 2
    assert "invalid JSON" in capsys.readouterr().err and not (bucket.root / "bad").exists()


def test_remote_inputs_are_one_line(bucket, capsys):
    assert cli_main(["data", "prepare", "gs://bkt/in.jsonl", "--tokenizer", "tok.json", "--output", "out"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "gs://bkt/in.jsonl" in line and "local or mounted files only" in line


def test_the_copy_is_fetched_once_and_again_when_damaged(bucket, tmp_path, capsys):
    prepare_remote(bucket)
    cache = tmp_path / "cache"
    names = sorted(p.name for p in (bucket.root / "data").glob("shard-*"))
    expected = first_batch(cache)
    assert sorted(bucket.fetches) == names and "data: fetched" in capsys.readouterr().err
    copy = cache_lib.copy_dir("gs://bkt/data", str(cache))
    assert sorted(p.name for p in copy.glob("shard-*")) == names

    bucket.fetches.clear()
    again = first_batch(cache)  # a restart: nothing fetched
    assert bucket.fetches == [] and "cached and verified" in capsys.readouterr().err
    assert all((again[k] == expected[k]).all() for k in expected)

    shard = copy / "shard-00000.arrayrecord"
    data = shard.read_bytes()
    shard.write_bytes(bytes(len(data)))  # same size, other bytes (mtime moves)
    (copy / "shard-00001.arrayrecord").write_bytes(data[: len(data) // 2])  # partial
    (copy / "shard-00002.arrayrecord.partial-12345").write_bytes(b"x")  # left by a killed fetch
    restored = first_batch(cache)
    assert sorted(bucket.fetches) == ["shard-00000.arrayrecord", "shard-00001.arrayrecord"]
    assert shard.read_bytes() == data and not list(copy.glob("*.partial-*"))
    assert all((restored[k] == expected[k]).all() for k in expected)


def test_a_remote_shard_unlike_its_manifest_is_one_line(bucket, tmp_path):
    prepare_remote(bucket)
    shard = bucket.root / "data/shard-00000.arrayrecord"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit: same size
    with pytest.raises(DataError, match=r"shard-00000.arrayrecord: SHA-256 .* differs from its manifest"):
        first_batch(tmp_path / "cache")
    copy = cache_lib.copy_dir("gs://bkt/data", str(tmp_path / "cache"))
    assert not (copy / "shard-00000.arrayrecord").exists() and not list(copy.glob("*.partial-*"))


def test_datasets_prepared_without_sizes_and_digests_are_read(bucket, tmp_path):
    """Manifests written before shards[].bytes / sha256 existed: checked by the stored object's size."""
    prepare_remote(bucket)
    path = bucket.root / "data/manifest.json"
    manifest = json.loads(path.read_text())
    for shard in manifest["shards"]:
        del shard["bytes"], shard["sha256"]
    path.write_text(json.dumps(manifest))
    assert first_batch(tmp_path / "cache")["tokens"].shape == (2, 32)
    bucket.fetches.clear()
    first_batch(tmp_path / "cache")
    assert bucket.fetches == []


def test_too_little_disk_for_the_copy_is_one_line(bucket, tmp_path, monkeypatch):
    prepare_remote(bucket)
    monkeypatch.setattr(cache_lib, "_free_bytes", lambda directory: 1000)
    with pytest.raises(DataError, match=r"data.cache_dir: .* has 0.00 GB free, the copy of gs://bkt/data needs"):
        first_batch(tmp_path / "cache")
    assert bucket.fetches == []


def test_cache_dir_checks_name_the_key(bucket, tmp_path):
    prepare_remote(bucket)
    base = ["data.source=arrayrecord", "data.paths=[gs://bkt/data]", f"train.run_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=r"data\.cache_dir: must be a local directory"):
        load_config(REPO / "configs/tiny.yaml", [*base, "data.cache_dir=gs://bkt/cache"])
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"data\.cache_dir: .*file/c is not a writable directory"):
        load_config(REPO / "configs/tiny.yaml", [*base, f"data.cache_dir={tmp_path / 'file' / 'c'}"], check_paths=True)
    with pytest.raises(ConfigError, match=r"data\.paths: gs://bkt/nowhere does not exist"):
        load_config(REPO / "configs/tiny.yaml", [*base, "data.paths=[gs://bkt/nowhere]"], check_paths=True)
    assert load_config(REPO / "configs/tiny.yaml", [*base, f"data.cache_dir={tmp_path / 'c'}"], check_paths=True)


@pytest.mark.slow  # two tiny training jobs (the second resumes) and an eval
def test_train_and_eval_from_a_bucket_fetch_once(bucket, tmp_path):
    prepare_remote(bucket)
    run = "gs://bkt/runs/warmup"
    overrides = ["train.batch_size=2", "train.seq_len=32", "model.index_topk=16", "train.log_every=1",
                 "checkpoint.save_every=1", "data.source=arrayrecord", "data.paths=[gs://bkt/data]",
                 f"data.cache_dir={tmp_path / 'cache'}", f"train.run_dir={run}", "train.stage=warmup"]
    tiny = REPO / "configs/tiny.yaml"
    train(load_config(tiny, [*overrides, "train.steps=2"], check_paths=True), console=False)
    fetched = len(bucket.fetches)
    assert fetched == 2 * len(list((bucket.root / "data").glob("shard-*.arrayrecord")))  # shards and their stats
    resumed = train(load_config(tiny, [*overrides, "train.steps=3"], check_paths=True), console=False)
    assert resumed.steps == 3
    # A dataset named with --data is copied where the run keeps its copies (its data.cache_dir).
    assert cli_main(["eval", run, "--seq-len", "32", "--batches", "1", "--batch-size", "2", "--no-needle",
                     "--no-progress", "--out", f"{tmp_path / 'eval'}", "--data", "gs://bkt/data"]) == 0
    assert json.loads((tmp_path / "eval/eval.json").read_text())["results"]
    assert len(bucket.fetches) == fetched
