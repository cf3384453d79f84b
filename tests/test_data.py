"""Tests for doge_jax.data: paths, documents, tokenizer, EOS, validation split, cache, packing, grain state."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from doge_jax import data as D


def _corpus(tmp_path, n: int = 12) -> str:
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(n):
        words = " ".join(f"word{(i * 7 + j) % 23} token{j % 5}" for j in range(40 + 3 * i))
        (d / f"doc{i:02d}.txt").write_text(f"document {i}: {words}\n")
    with open(d / "rows.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"text": f"json row {i} " * 10, "id": i}) + "\n")
    return str(d)


@pytest.fixture
def corpus(tmp_path):
    return _corpus(tmp_path)


def test_default_corpus_is_stdlib_sources():
    files = D.default_corpus()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.endswith(".py") for f in files)
    assert not any(os.path.basename(f).startswith("test") or f"{os.sep}test" in f for f in files)


def test_resolve_paths(corpus, tmp_path):
    files = D.resolve_paths([corpus])
    assert len(files) == 13 and files == sorted(files)
    assert D.resolve_paths(os.path.join(corpus, "doc0*.txt")) == files[:10]
    assert D.resolve_paths([files[0], files[0]]) == [files[0]]
    with pytest.raises(D.DataError, match="nope.txt"):
        D.resolve_paths([str(tmp_path / "nope.txt")])
    with pytest.raises(D.DataError, match="matches no file"):
        D.resolve_paths([str(tmp_path / "*.parquet")])


def test_walks_skip_runs_checkpoints_and_the_excluded_directory(corpus, tmp_path):
    base = D.resolve_paths([corpus])
    jax_run = os.path.join(corpus, "runs", "tiny")  # a doge_jax run: train_config.yaml next to checkpoints/
    os.makedirs(os.path.join(jax_run, "checkpoints", "2"))
    for f in ("train_config.yaml", "metrics.jsonl", os.path.join("checkpoints", "2", "commit_success.txt")):
        open(os.path.join(jax_run, f), "w").write("{}\n")
    ckpt = os.path.join(corpus, "torch_out", "checkpoint-4")  # a doge_torch / HF Trainer checkpoint
    os.makedirs(ckpt)
    for f in ("trainer_state.json", "notes.txt"):
        open(os.path.join(ckpt, f), "w").write("{}\n")
    mine = os.path.join(corpus, "out")  # the run being trained, before it has any checkpoint
    os.makedirs(mine)
    open(os.path.join(mine, "metrics.jsonl"), "w").write("{}\n")
    open(os.path.join(corpus, "torch_out", "metrics.jsonl"), "w").write("{}\n")  # a doge_torch.train run's record
    pre = os.path.join(corpus, "tokens")  # a pre-tokenized output: its shards are not text, even to a glob
    os.makedirs(pre)
    for f in ("corpus.json", "tokenizer.json", "00000.json", "00000.train.bin"):
        open(os.path.join(pre, f), "w").write("{}\n")
    assert D.resolve_paths([corpus], exclude=[mine]) == base
    assert D.resolve_paths([os.path.join(corpus, "**", "*.txt")], exclude=[mine]) == [
        f for f in base if f.endswith(".txt")]
    assert D.resolve_paths([os.path.join(corpus, "**")], exclude=[mine]) == base
    # data asked for inside the excluded directory is read whole (--out . --data corpus/)
    nested = os.path.join(corpus, "sub")
    os.makedirs(os.path.join(nested, "deeper"))
    open(os.path.join(nested, "deeper", "x.txt"), "w").write("x\n")
    assert D.resolve_paths([nested], exclude=[corpus]) == [os.path.join(nested, "deeper", "x.txt")]
    assert D.resolve_paths([os.path.join(nested, "**", "*.txt")], exclude=[corpus]) == [
        os.path.join(nested, "deeper", "x.txt")]
    # the data directory is the run directory (--out . --data .): its own top-level files are not documents either
    with pytest.raises(D.DataError, match="outside the run directory"):
        D.resolve_paths([mine], exclude=[mine])

    assert os.path.join(mine, "metrics.jsonl") in D.resolve_paths([corpus])  # only when excluded
    # the user's tree above a glob's start is not judged: a corpus inside a run directory is still read
    assert D.resolve_paths([os.path.join(jax_run, "*.jsonl")]) == [os.path.join(jax_run, "metrics.jsonl")]
    with pytest.raises(D.DataError, match="outside the run directory"):
        D.resolve_paths([os.path.join(mine, "*.jsonl")], exclude=[mine])


def test_iter_documents_jsonl(corpus, tmp_path):
    docs = list(D.iter_documents([os.path.join(corpus, "rows.jsonl")]))
    assert docs == [f"json row {i} " * 10 for i in range(4)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(D.DataError, match="no field 'text'"):
        list(D.iter_documents([str(bad)]))


def test_bpe_special_ids_and_eos_per_document(corpus, tmp_path):
    files = D.resolve_paths([corpus])
    tok = D.train_bpe(files, 300)
    assert tok.get_vocab_size() <= 300
    ids = D.special_ids(tok)
    assert (ids["bos"], ids["eos"], ids["pad"]) == (0, 1, 2)
    train, val = D.tokenize_corpus(files, tok, 1, None, val_fraction=0.0, progress=False)
    assert len(val) == 0
    n_docs = len(files) - 1 + 4  # the jsonl file holds 4 documents
    assert int(np.sum(train == 1)) == n_docs and train[-1] == 1
    # every document's tokens are followed by exactly one EOS
    first = tok.encode(open(files[0]).read()).ids
    assert train[: len(first) + 1].tolist() == first + [1]
    # a config's EOS id beyond uint16 with a small tokenizer (configs/doge-40m-moe.yaml's 128001): kept exactly
    # (it was an OverflowError traceback)
    big, _ = D.tokenize_corpus(files, tok, 128001, None, val_fraction=0.0, progress=False)
    assert big.dtype == np.uint32 and int(np.sum(big == 128001)) == n_docs and big[: len(first) + 1].tolist() == (
        first + [128001])


def test_validation_split_and_cache(corpus, tmp_path):
    files = D.resolve_paths([corpus])
    tok = D.train_bpe(files, 300)
    cache = str(tmp_path / "cache")
    train, val = D.tokenize_corpus(files, tok, 1, cache, val_fraction=0.25, seed=3, progress=False)
    keys = [D.document_key(t, 3) for t in D.iter_documents(files)]  # 16 documents: those below the threshold
    n_val = sum(D.held_out(k, 0.25) for k in keys)
    assert 0 < n_val < 16 and int(np.sum(val == 1)) == n_val and int(np.sum(train == 1)) == 16 - n_val
    total, _ = D.tokenize_corpus(files, tok, 1, None, val_fraction=0.0, progress=False)
    assert len(train) + len(val) == len(total)
    # cached: the second call memory-maps the same arrays
    train2, val2 = D.tokenize_corpus(files, tok, 1, cache, val_fraction=0.25, seed=3, progress=False)
    assert isinstance(train2, np.memmap) and np.array_equal(train, train2) and np.array_equal(val, val2)
    assert len(os.listdir(cache)) == 1
    # another seed holds out other documents
    _, val3 = D.tokenize_corpus(files, tok, 1, cache, val_fraction=0.25, seed=4, progress=False)
    assert not np.array_equal(val, val3)
    def split(keys, fraction):
        return D.split_documents(np.array([int(k * 2.0**64) for k in keys], np.uint64), fraction).tolist()

    # keys as fractions of the 64-bit range: held out below val_fraction
    assert split([0.1, 0.5, 0.05, 0.3], 0.2) == [True, False, True, False]
    # none below: the smallest (and its duplicates) while n x fraction >= 0.1; never all: the largest train
    assert split([0.5] * 3 + [0.4, 0.4] + [0.9] * 5, 0.01) == [False] * 3 + [True, True] + [False] * 5
    assert split([0.5, 0.4], 0.01) == [False, False]  # two files at the default 1%: none (not half the corpus)
    assert split([0.1, 0.2], 0.9) == [True, False] and split([0.3], 0.5) == [False]
    assert split([0.3, 0.3], 0.5) == [False, False]  # identical documents share a side
    n = 10_000  # about val_fraction of them
    assert abs(sum(D.split_documents(np.random.default_rng(0).integers(0, 2**64 - 1, n, np.uint64), 0.05)) - 500) < 70


def _word_tokenizer():
    """Whitespace words "0".."999" as ids 2..1001; EOS 0, anything else 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, "<unk>": 1, **{str(i): i + 2 for i in range(1000)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return t


def test_validation_split_is_stable_when_documents_are_added(tmp_path):
    """A document's side follows a seeded hash of its text: adding documents (a file sorting first, a resumed run
    on a grown corpus) moves no document between the sides. Before, the split was a permutation of positions: one
    added file of 200 moved 14 of 20 held-out documents into training."""
    rng = np.random.default_rng(0)
    texts = [" ".join(map(str, rng.integers(0, 1000, 20))) for _ in range(1000)]
    keys = np.array([D.document_key(t, 233) for t in texts], np.uint64)
    before = {t for t, v in zip(texts, D.split_documents(keys, 0.05)) if v}
    assert 30 < len(before) < 70
    grown = [*[f"new document {i}" for i in range(200)], *texts[100:]]  # 200 more first, 100 fewer
    after = {t for t, v in zip(grown, D.split_documents(
        np.array([D.document_key(t, 233) for t in grown], np.uint64), 0.05)) if v}
    assert after & set(texts) == before & set(texts[100:])
    assert D.document_key("a", 233) != D.document_key("a", 234) and D.document_key("a", 1) == D.document_key("a", 1)
    # through tokenize_corpus: files, one added before the others
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i, t in enumerate(texts[:200]):
        (corpus / f"d{i:03d}.txt").write_text(t)
    tok = _word_tokenizer()
    _, val = D.tokenize_corpus(D.resolve_paths([str(corpus)]), tok, 0, None, val_fraction=0.1, progress=False)
    (corpus / "a_first.txt").write_text("an added document")
    train2, val2 = D.tokenize_corpus(D.resolve_paths([str(corpus)]), tok, 0, None, val_fraction=0.1, progress=False)

    def docs(a):
        return {tuple(d) for d in np.split(np.asarray(a), np.flatnonzero(np.asarray(a) == 0) + 1) if len(d)}

    assert 0 < len(docs(val)) < 200 and docs(val) <= docs(val2) and not docs(val2) & docs(train2)
    assert len(docs(val2) - docs(val)) <= 1  # (at most the added document)


def test_check_vocab():
    D.check_vocab(np.array([0, 5, 9], np.uint16), 10, "x")
    with pytest.raises(D.DataError, match="token id 10 >= model vocab_size=10"):
        D.check_vocab(np.array([0, 10], np.uint16), 10, "training data")


def test_pack_wrapped():
    rows = D.pack(np.arange(23), 5)
    assert rows.shape == (4, 5) and rows.ravel().tolist() == list(range(20))


def test_train_dataset_epochs_and_state():
    rows = np.arange(12 * 4).reshape(12, 4)
    ds = D.train_dataset(rows, grad_accum=2, rows_per_micro=3, seed=1)
    it = iter(ds)
    batches = [next(it) for _ in range(6)]
    assert batches[0].shape == (2, 3, 4) and batches[0].dtype == np.int32
    firsts = [b[:, :, 0].ravel() // 4 for b in batches]
    # each epoch (2 steps = 12 rows) is a permutation of all rows, and epochs differ
    assert sorted(np.concatenate(firsts[:2]).tolist()) == list(range(12))
    assert sorted(np.concatenate(firsts[2:4]).tolist()) == list(range(12))
    assert not np.array_equal(np.concatenate(firsts[:2]), np.concatenate(firsts[2:4]))
    # a fresh iterator restored from a saved state yields exactly the following batches
    it2 = iter(D.train_dataset(rows, 2, 3, seed=1))
    it2.set_state(json.loads(json.dumps(_state_after(ds, 3))))
    for b in batches[3:]:
        assert np.array_equal(next(it2), b)
    # same seed, same stream; other seed, other stream
    assert np.array_equal(next(iter(D.train_dataset(rows, 2, 3, seed=1))), batches[0])
    assert not np.array_equal(next(iter(D.train_dataset(rows, 2, 3, seed=2))), batches[0])
    with pytest.raises(D.DataError, match="fewer than one step"):
        D.train_dataset(rows[:5], 2, 3, seed=1)


def _state_after(ds, n: int) -> dict:
    it = iter(ds)
    for _ in range(n):
        next(it)
    return it.get_state()


def test_val_batches():
    rows = np.arange(7 * 3).reshape(7, 3)
    vb = D.val_batches(rows, 2, 10)
    assert len(vb) == 3 and np.array_equal(vb[1], rows[2:4])
    assert len(D.val_batches(rows, 2, 2)) == 2


def test_document_rows_are_checked(tmp_path):
    """A null text is skipped (as in parquet), not the document "None"; other non-text values, lines that are not
    JSON objects and broken lines name the file and line; a parquet binary column is UTF-8 text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "hello"}\n{"text": null}\n\n{"text": "bye"}\n')
    assert list(D.iter_documents([str(f)])) == ["hello", "bye"]
    for body, want in (('{"text": 5}\n', r"rows.jsonl:1: field 'text' is int, not text"),
                       ('{"text": "a"}\n"just a string"\n', r"rows.jsonl:2: expected a JSON object per line, got str"),
                       ('{"text": "a"}\n{"text": "cut\n', r"rows.jsonl:2: not a JSON line")):
        f.write_text(body)
        with pytest.raises(D.DataError, match=want):
            list(D.iter_documents([str(f)]))
    # an explicitly named .json file is JSON Lines (what HF datasets' to_json writes)
    j = tmp_path / "data.json"
    j.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert list(D.iter_documents([str(j)])) == ["one", "two"]
    p = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": pa.array([b"caf\xc3\xa9", None], pa.binary())}), p)
    assert list(D.iter_documents([str(p)])) == ["café"]


def test_directory_walk_skips_json_hidden_and_pretokenized(tmp_path):
    d = tmp_path / "corpus"
    (d / ".ipynb_checkpoints").mkdir(parents=True)
    (d / "tokens").mkdir()
    (d / "a.txt").write_text("a")
    (d / "meta.json").write_text("{}")
    (d / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("a")
    (d / "tokens" / "corpus.json").write_text("{}")
    (d / "tokens" / "notes.txt").write_text("x")
    (d / "model" / "params").mkdir(parents=True)  # an orbax model (convert --to jax): its marker is not a document
    (d / "model" / "params" / "commit_success.txt").write_text("Checkpoint commit was successful")
    (d / "model" / "params" / "_CHECKPOINT_METADATA").write_text("{}")
    assert D.resolve_paths([str(d)]) == [str(d / "a.txt")]


def test_fingerprint_sees_a_file_replaced_with_its_mtime_kept(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("a a a")
    st = os.stat(f)
    before = D.corpus_fingerprint([str(f)], "x")
    tmp = tmp_path / "new"
    tmp.write_text("b b b")
    os.replace(tmp, f)  # same size; mtime put back as cp -p / rsync -t do
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert D.corpus_fingerprint([str(f)], "x") != before
    assert D.corpus_fingerprint([str(f)], "text", "12") != D.corpus_fingerprint([str(f)], "text1", "2")


def test_binary_or_non_utf8_text_file_warns_once(tmp_path, capsys):
    """A file named as text that holds NUL bytes or bytes that are not UTF-8 (a UTF-16 file, an executable called
    x.py) is read as before (undecodable bytes replaced, universal newlines) but no longer silently: one warning
    naming it, once per process. Clean UTF-8 (a literal U+FFFD too) says nothing."""
    cases = {"utf16.txt": "two words\r\n".encode("utf-16"), "clean.txt": "héllo \ufffd\r\nworld\r".encode()}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
    for name in cases:
        path = str(tmp_path / name)
        for _ in range(2):
            (doc,) = D.iter_documents([path])
            assert doc == open(path, encoding="utf-8", errors="replace").read()
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "utf16.txt: 2 byte sequence(s) that are not UTF-8" in err
    assert "NUL byte(s)" in err and "clean.txt" not in err


def test_jsonl_surrogates_byte_order_marks_and_bad_bytes(tmp_path, capsys):
    """A .jsonl row with a lone surrogate escape (valid JSON, common in scraped text) crashed tokenization with a
    TypeError traceback naming neither file nor line: now U+FFFD and one warning naming file:line. A UTF-8 byte-order
    mark no longer fails a .jsonl at line 1 nor stays in a text file's document; bytes that are not UTF-8 in a
    .jsonl warn as in a text file (they were replaced silently)."""
    (tmp_path / "s.jsonl").write_text('{"text": "ok"}\n{"text": "bad \\ud800 pair \\ud83d\\ude00 end \\udfff"}\n')
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "bom.txt").write_bytes("\ufeffhello\r\n".encode())
    docs = list(D.iter_documents([str(tmp_path / f) for f in ("s.jsonl", "bom.jsonl", "bom.txt")]))
    assert docs == ["ok", "bad \ufffd pair \U0001f600 end \ufffd", "first", "caf\ufffd", "hello\n"]
    err = capsys.readouterr().err
    assert err.count("warning:") == 2
    assert f"{tmp_path / 's.jsonl'}:2: lone UTF-16 surrogate escape(s)" in err
    assert f"{tmp_path / 'bom.jsonl'}:2: bytes that are not UTF-8, replaced by U+FFFD" in err
    # lines ended by a lone CR (read as lines before), and both kinds of trouble in one file: both said
    (tmp_path / "cr.jsonl").write_bytes(b'{"text": "a"}\r{"text": "b\xff"}\r\n\r{"text": "\\udc00"}\r')
    assert list(D.iter_documents([str(tmp_path / "cr.jsonl")])) == ["a", "b\ufffd", "\ufffd"]
    err = capsys.readouterr().err
    assert "cr.jsonl:2: bytes that are not UTF-8" in err and "cr.jsonl:4: lone UTF-16 surrogate" in err
    tok = _word_tokenizer()
    train, _ = D.tokenize_corpus([str(tmp_path / "s.jsonl")], tok, 0, None, val_fraction=0.0, progress=False)
    assert train.tolist() == [1, 0, 1, 1, 1, 1, 1, 1, 0]  # (all unknown words: 1; EOS 0 after each document)


def test_a_huge_document_warns_once(tmp_path, capsys, monkeypatch):
    """One document long enough to need gigabytes in the tokenizer (a big one-line text file) says so, once per
    file, naming it (a 7.7 MB line peaked at 2 GB, silently); smaller ones say nothing."""
    monkeypatch.setattr(D, "BIG_DOCUMENT", 1000)
    (tmp_path / "big.txt").write_text("1 " * 600)
    (tmp_path / "small.txt").write_text("1 " * 400)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "2 " * 600}) + "\n" + json.dumps({"text": "3 " * 600}))
    paths = [str(tmp_path / f) for f in ("big.txt", "small.txt", "rows.jsonl")]
    D.tokenize_corpus(paths, _word_tokenizer(), 0, None, val_fraction=0.0, progress=False)
    err = capsys.readouterr().err
    assert err.count("warning:") == 2 and "small.txt" not in err
    assert f"warning: {paths[0]}: one document of 0M characters; tokenizing it needs roughly" in err
    assert f"warning: {paths[2]}: one document" in err and "split big text files into several files" in err
