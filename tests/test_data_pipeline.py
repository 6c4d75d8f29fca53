"""`dsa-train data prepare` -> grain pipeline: documents come back intact, packed, sharded, resumable.

A WordLevel tokenizer is trained here on the test corpus, so decoding is exact: every document is a
line of space-separated words with a unique tag (``doc17``) that identifies it.
"""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from dsa_train.config import DataConfig
from dsa_train.data import DataError, check_batch, make_train_iterator
from dsa_train.data.prepare import prepare_main

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
SPECIALS = ["<pad>", "<unk>", "</s>"]
EOS = 2


def _documents(n, seed, prefix="doc"):
    rng = random.Random(seed)
    # Lengths from 1 to ~90 tokens so that packing at seq_len 32 splits many documents.
    return [" ".join([f"{prefix}{i}"] + [rng.choice(WORDS) for _ in range(rng.randint(0, 90))]) for i in range(n)]


def _train_tokenizer(path, docs, extra=()):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(list(docs) + list(extra), trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tok.save(str(path))
    return tok


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three prepared datasets (JSONL in byte ranges with 2 workers, Parquet, paragraph text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    docs = {"jsonl": _documents(60, 0, "j"), "parquet": _documents(40, 1, "p"), "text": _documents(30, 2, "t")}
    tok = _train_tokenizer(root / "tokenizer.json", [d for ds in docs.values() for d in ds])
    with open(root / "a.jsonl", "w") as f:
        for i, d in enumerate(docs["jsonl"]):
            f.write(json.dumps({"text": d, "id": i}) + "\n")
            if i % 7 == 0:
                f.write("\n")  # blank lines are ignored
    pq.write_table(pa.table({"content": docs["parquet"] + [None, "  "]}), root / "b.parquet", row_group_size=9)
    (root / "c").mkdir()
    (root / "c" / "part.txt").write_text("\n\n  \n".join(docs["text"]) + "\n")
    runs = {"jsonl": ["a.jsonl", "--shard-mb", "0.004", "--workers", "2"],
            "parquet": ["b.parquet", "--text-field", "content", "--shard-mb", "0.001"],
            "text": ["c", "--text-documents", "paragraph"]}
    for name, args in runs.items():
        code = prepare_main([str(root / args[0]), *args[1:], "--tokenizer", str(root / "tokenizer.json"),
                             "-o", str(root / name), "--quiet"])
        assert code == 0
    return root, docs, tok


def _iterator(paths, batch_size=2, seq_len=32, vocab_size=512, seed=0, **kw):
    config = DataConfig(source="arrayrecord", paths=tuple(str(p) for p in paths), **kw)
    return make_train_iterator(config, batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size, seed=seed)


def _stream_documents(iterator, count, tok, batch_size=2, seq_len=32):
    """The first `count` documents of the stream, rebuilt from the packed rows via their EOS."""
    docs, current = [], []
    while len(docs) < count:
        batch = next(iterator)
        check_batch(batch, batch_size, seq_len)
        for row in range(batch_size):
            tokens, seg = batch["tokens"][row], batch["segment_ids"][row]
            for s in np.unique(seg[seg > 0]):
                piece = tokens[seg == s]
                # Packing never mixes documents: an EOS can only be a segment's last token.
                assert EOS not in piece[:-1].tolist()
                current += piece.tolist()
                if piece[-1] == EOS:
                    docs.append(tok.decode(current[:-1]))
                    current = []
    return docs[:count]


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_manifest_describes_the_shards(corpus):
    root, docs, tok = corpus
    for name, expected in docs.items():
        m = json.loads((root / name / "manifest.json").read_text())
        assert m["documents"] == len(expected)
        assert m["tokens"] == sum(len(d.split()) + 1 for d in expected)  # + EOS
        assert m["eos_id"] == EOS and m["vocab_size"] == tok.get_vocab_size()
        assert m["max_token_id"] < tok.get_vocab_size()
        assert sum(s["documents"] for s in m["shards"]) == m["documents"]
        assert all((root / name / s["path"]).is_file() for s in m["shards"])
    assert len(json.loads((root / "jsonl" / "manifest.json").read_text())["shards"]) > 1  # byte ranges
    assert len(json.loads((root / "parquet" / "manifest.json").read_text())["shards"]) > 1  # row groups


@pytest.mark.parametrize("name", ["jsonl", "parquet", "text"])
def test_one_epoch_decodes_back_to_the_documents(corpus, name):
    root, docs, tok = corpus
    it = _iterator([root / name])
    first_epoch = _stream_documents(it, len(docs[name]), tok)
    assert sorted(first_epoch) == sorted(docs[name])
    assert first_epoch != docs[name]  # shuffled
    it.close()


def test_rows_are_packed_full_with_document_positions(corpus):
    root, _, _ = corpus
    it = _iterator([root / "jsonl"], batch_size=4, seq_len=32)
    for _ in range(5):
        batch = next(it)
        assert (batch["segment_ids"] > 0).all() and (batch["loss_weights"] == 1).all()
        for seg, pos in zip(batch["segment_ids"], batch["positions"]):
            for s in np.unique(seg):
                assert (pos[seg == s] == np.arange((seg == s).sum())).all()
    it.close()


def test_data_shards_read_disjoint_documents(corpus):
    root, docs, tok = corpus
    seen = []
    for index in range(2):
        it = make_train_iterator(DataConfig(source="arrayrecord", paths=(str(root / "jsonl"),)), batch_size=4,
                                 seq_len=32, vocab_size=512, seed=0, shard_index=index, shard_count=2)
        seen.append(_stream_documents(it, len(docs["jsonl"]) // 2, tok))
        it.close()
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(docs["jsonl"])


def test_mixture_follows_the_weights(corpus):
    root, docs, tok = corpus
    it = _iterator([root / "jsonl", root / "text"], weights=(3.0, 1.0))
    got = _stream_documents(it, 40, tok)
    from_jsonl = sum(d.startswith("j") for d in got)
    assert 26 <= from_jsonl <= 34 and all(d.startswith(("j", "t")) for d in got)
    it.close()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_state_round_trips_through_json(corpus, prefetch):
    root, _, _ = corpus
    paths = [root / "jsonl", root / "parquet"]
    it = _iterator(paths, prefetch=prefetch)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    resumed = _iterator(paths, prefetch=prefetch)
    resumed.set_state(state)
    assert all(_same(e, next(resumed)) for e in expected)
    assert not _same(expected[0], next(_iterator(paths, prefetch=prefetch)))
    with pytest.raises(DataError, match="changed: .*seq_len"):
        _iterator(paths, seq_len=64).set_state(state)
    with pytest.raises(DataError, match="source 'synthetic'"):
        resumed.set_state(make_train_iterator(DataConfig(), batch_size=2, seq_len=64, vocab_size=512,
                                              seed=0).get_state())
    it.close()
    resumed.close()


def test_same_seed_same_stream_other_seed_other_order(corpus):
    root, _, _ = corpus
    a, b, c = (_iterator([root / "jsonl"], seed=s) for s in (5, 5, 6))
    first = [next(a) for _ in range(3)]
    assert all(_same(x, next(b)) for x in first)
    assert not _same(first[0], next(c))


# ----------------------------------------------------------------------------------------------
# Errors before training: one line each
# ----------------------------------------------------------------------------------------------


def _fails(match, paths, **kw):
    with pytest.raises(DataError, match=match) as e:
        _iterator(paths, **kw)
    assert "\n" not in str(e.value)


def test_missing_dataset_manifest_or_shard(corpus, tmp_path):
    root, _, _ = corpus
    _fails("dataset not found", [tmp_path / "nope"])
    (tmp_path / "half").mkdir()
    _fails("no manifest.json", [tmp_path / "half"])
    copy = tmp_path / "copy"
    shutil.copytree(root / "parquet", copy)
    (copy / "shard-00001.arrayrecord").unlink()
    _fails("shard missing: shard-00001.arrayrecord", [copy])


def test_empty_dataset(corpus, tmp_path):
    root, _, _ = corpus
    copy = tmp_path / "empty"
    shutil.copytree(root / "text", copy)
    m = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**m, "documents": 0, "tokens": 0, "shards": []}))
    _fails("empty dataset", [copy])
    # `prepare` refuses to produce one in the first place.
    (tmp_path / "blank.txt").write_text("  \n\n ")
    assert prepare_main([str(tmp_path / "blank.txt"), "--tokenizer", str(root / "tokenizer.json"),
                         "-o", str(tmp_path / "blank"), "--quiet"]) == 2


def test_tokens_outside_the_vocabulary(corpus):
    root, _, tok = corpus
    _fails("outside the model's vocabulary", [root / "jsonl"], vocab_size=10)


def test_different_tokenizers(corpus, tmp_path):
    root, docs, _ = corpus
    other_tok = tmp_path / "other.json"
    _train_tokenizer(other_tok, docs["text"], extra=["zz yy xx"])
    (tmp_path / "t.txt").write_text("\n\n".join(docs["text"][:5]))
    assert prepare_main([str(tmp_path / "t.txt"), "--text-documents", "paragraph", "--tokenizer", str(other_tok),
                         "-o", str(tmp_path / "other"), "--quiet"]) == 0
    _fails("datasets use different tokenizers", [root / "text", tmp_path / "other"])
    _fails("prepared with a different tokenizer than data.tokenizer", [root / "text"], tokenizer=str(other_tok))
    assert _iterator([root / "text"], tokenizer=str(root / "tokenizer.json")) is not None
    # A shard (with its stats) copied in from the other preparation.
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "parquet", mixed)
    for suffix in (".arrayrecord", ".json"):
        shutil.copy(tmp_path / "other" / f"shard-00000{suffix}", mixed / f"shard-00000{suffix}")
    _fails("shard-00000.arrayrecord: written with a different tokenizer", [mixed])
    # Only the shard file replaced: its record count no longer matches the manifest.
    shutil.copy(root / "parquet" / "shard-00000.json", mixed / "shard-00000.json")
    _fails("holds 5 documents but the manifest says", [mixed])


# ----------------------------------------------------------------------------------------------
# prepare: resume, refusal to mix preparations, command-line errors
# ----------------------------------------------------------------------------------------------


def test_prepare_resumes_and_refuses_to_mix(corpus, tmp_path, capsys):
    root, _, _ = corpus
    out = tmp_path / "out"
    args = [str(root / "a.jsonl"), "--tokenizer", str(root / "tokenizer.json"), "-o", str(out), "--shard-mb", "0.004"]
    assert prepare_main(args) == 0
    manifest = (out / "manifest.json").read_text()
    shards = len(json.loads(manifest)["shards"])
    (out / "shard-00001.json").unlink()  # as if killed while writing shard 1's stats
    (out / "manifest.json").unlink()
    (out / "shard-00001.arrayrecord.tmp").write_bytes(b"partial")
    capsys.readouterr()
    assert prepare_main(args) == 0
    assert f"(1 written now, {shards - 1} already done)" in capsys.readouterr().out
    assert (out / "manifest.json").read_text() == manifest
    assert prepare_main(args + ["--text-field", "body"]) == 2
    assert "holds a preparation from other inputs, tokenizer or options" in capsys.readouterr().err
    assert prepare_main(args + ["--shard-mb", "1", "--overwrite", "--quiet"]) == 0
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 1
    assert not list(out.glob("shard-00001*"))


@pytest.mark.parametrize("make_input, extra, message", [
    (None, [], "input not found"),
    (lambda d: (d / "x.jsonl").write_text('{"body": "a"}\n'), [], "no field 'text' in the record"),
    (lambda d: (d / "x.jsonl").write_text('{"text": "a"\n'), [], "invalid JSON"),
    (lambda d: (d / "x.jsonl").write_text('{"text": 3}\n'), [], "field 'text' is a int, not a string"),
    (lambda d: (d / "x.csv").write_text("a"), [], "unknown input format"),
    (lambda d: (d / "x.txt").write_text("alpha"), ["--eos-token", "<nope>"], "not in the tokenizer's vocabulary"),
])
def test_prepare_errors_are_one_line(corpus, tmp_path, capsys, make_input, extra, message):
    root, _, _ = corpus
    name = "x"
    if make_input is not None:
        make_input(tmp_path)
        name = next(p.name for p in tmp_path.iterdir())
    code = prepare_main([str(tmp_path / name), "--tokenizer", str(root / "tokenizer.json"),
                         "-o", str(tmp_path / "out"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_prepare_needs_an_eos_it_can_find(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(tmp_path / "tok.json"))
    (tmp_path / "x.txt").write_text("a a")
    base = [str(tmp_path / "x.txt"), "--tokenizer", str(tmp_path / "tok.json"), "--quiet"]
    assert prepare_main(base + ["-o", str(tmp_path / "o1")]) == 2
    assert "can't tell the EOS token" in capsys.readouterr().err
    assert prepare_main(base + ["-o", str(tmp_path / "o2"), "--no-eos"]) == 0
    assert json.loads((tmp_path / "o2" / "manifest.json").read_text())["eos_id"] is None
