"""Real corpora (issue 6 item 1): parquet/jsonl documents, mixtures with weights (spec §6.4), the pre-tokenization
command (parallel, resumable, memory-mapped shards), grain per-host sharding and exact iterator state."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_train import TINY_ARGS, cache  # noqa: F401 - fixture

from doge_jax import corpora as C
from doge_jax import data as D
from doge_jax import train as T
from doge_jax.checkpoint import load_params
from doge_jax.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = [f"w{i}" for i in range(60)] + ["def", "return", "(", ")", ":", "\n"]


def _texts(seed: int, n: int, size: int = 120) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=size)) for _ in range(n)]


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """Two parquet files, one jsonl file (a `text` field) and a tokenizer trained on them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("corpora")
    for i in range(2):
        pq.write_table(pa.table({"id": list(range(30)), "text": _texts(i, 30)}), d / f"part{i}.parquet",
                       row_group_size=7)
    with open(d / "rows.jsonl", "w") as f:
        for t in _texts(9, 25):
            f.write(json.dumps({"text": t, "meta": 1}) + "\n")
    tok = D.train_bpe(D.resolve_paths([str(d)]), 320)
    tok.save(str(d / "tokenizer.json"))
    return d


def test_parquet_and_jsonl_documents(files, tmp_path):
    docs = list(D.iter_documents([str(files / "part0.parquet")]))
    assert docs == _texts(0, 30)  # every row, in order, across row groups
    assert list(D.iter_documents([str(files / "rows.jsonl")])) == _texts(9, 25)
    with pytest.raises(D.DataError, match="no column 'body'"):
        list(D.iter_documents([str(files / "part0.parquet")], "body"))
    assert str(files / "part1.parquet") in D.resolve_paths([str(files)])


def test_parse_sources(files, tmp_path):
    p0, p1, js = str(files / "part0.parquet"), str(files / "part1.parquet"), str(files / "rows.jsonl")
    (one,) = C.parse_sources([p0, js])  # no weights: one source, plain concatenation (as before)
    assert one.weight is None and one.paths == sorted([p0, js])
    a, b = C.parse_sources([f"{p0}:0.7", {"path": js, "weight": 0.3}])
    assert (a.paths, a.weight, b.paths, b.weight) == ([p0], 0.7, [js], 0.3)
    (g,) = C.parse_sources([str(files / "part*.parquet") + ":2"])
    assert g.paths == [p0, p1] and g.weight == 2.0
    with pytest.raises(D.DataError, match="has no weight"):
        C.parse_sources([f"{p0}:0.7", js])
    for specs in ([f"{p0}:0.7", f"{js}:abc"], [f"{js}:abc"]):  # a mistyped weight (was "has no weight" / "no path")
        with pytest.raises(D.DataError, match=r"the weight 'abc' is not a number \(PATH:WEIGHT"):
            C.parse_sources(specs)
    for w in (0, float("inf"), float("nan")):
        with pytest.raises(D.DataError, match="weight must be a finite number > 0"):
            C.parse_sources([{"path": p0, "weight": w}])
    # an existing path that ends in ":NUMBER" is that path (it was read as PATH:WEIGHT: "data path ... does not exist")
    odd = tmp_path / "run:2"
    odd.mkdir()
    (odd / "a.txt").write_text("some text")
    (whole,) = C.parse_sources([str(odd)])
    assert whole.weight is None and whole.paths == [str(odd / "a.txt")]


def test_packed_and_mixed_rows():
    stream = np.arange(100, dtype=np.uint16)
    parts = [stream[:13], stream[13:13], stream[13:50], stream[50:]]
    rows = C.PackedRows(parts, 8)  # rows spanning array boundaries = packing the concatenation
    assert len(rows) == 12 and np.array_equal(rows[:], D.pack(stream, 8)) and rows[-1].dtype == np.int32
    a = np.full((10, 4), 1) + np.arange(10)[:, None] * 10  # source A: 10 rows; B: 2 rows
    b = np.full((2, 4), 7) + np.arange(2)[:, None] * 100
    m = C.MixedRows([a, b], [0.75, 0.25])
    # T = 12 rows: A gives int(12 * 0.75) = 9 (its first 9: truncated), B int(12 * 0.25) = 3 (cyclic: 0, 1, 0)
    assert m.counts == [9, 3] and len(m) == 12
    assert np.array_equal(m[:], np.concatenate([a[:9], b[[0, 1, 0]]]))


def test_grain_hosts_share_the_global_batches_and_state_exact():
    unique = np.arange(46)[:, None] * np.ones((1, 3), int)  # row r holds r
    one = iter(D.train_dataset(unique, 2, 4, seed=5))  # a single host: [2, 4, 3] per step
    hosts = [iter(D.train_dataset(unique, 2, 4, seed=5, shard_index=h, shard_count=2)) for h in range(2)]
    seen = []
    for _ in range(8):  # past an epoch boundary (5 steps of 8 rows per epoch)
        whole = next(one)
        parts = [next(it) for it in hosts]
        assert [p.shape for p in parts] == [(2, 2, 3)] * 2 and parts[0].dtype == np.int32
        # host h holds the h-th half of every micro-batch's rows: together, exactly the single host's batch
        assert np.array_equal(np.concatenate(parts, axis=1), whole)
        seen += list(whole[:, :, 0].reshape(-1))
    assert sorted(seen[:40]) == sorted(set(seen[:40])) and set(seen[:40]) <= set(range(46))  # epoch 1: no repeats
    with pytest.raises(D.DataError, match="do not split over 3 hosts"):
        D.train_dataset(unique, 2, 4, seed=5, shard_index=0, shard_count=3)
    rows = C.MixedRows([unique[:40], 1000 + unique[:6]], [0.5, 0.5])  # 23 + 23 rows, B repeated cyclically
    for host in range(2):  # exact resume: get_state after k steps, set_state on a fresh iterator
        ds = D.train_dataset(rows, 2, 4, seed=5, shard_index=host, shard_count=2)
        it = iter(ds)
        for _ in range(5):  # past an epoch boundary (46 rows, 8 per step)
            next(it)
        state = it.get_state()
        want = [next(it) for _ in range(4)]
        it2 = iter(ds)
        it2.set_state(json.loads(json.dumps(state)))
        assert all(np.array_equal(x, next(it2)) for x in want)


def _pretokenize(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "doge_jax.data", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_pretokenize_command_parallel_resumable(files, tmp_path):
    out = tmp_path / "tok"
    args = ["--data", files / "part*.parquet", files / "rows.jsonl", "--tokenizer", files / "tokenizer.json",
            "--out", out, "--workers", "2", "--val-fraction", "0.2"]
    proc = _pretokenize(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = C.read_manifest(str(out))
    assert m["dtype"] == "uint16" and len(m["shards"]) == 3 and m["eos_token_id"] == 1
    tok = D.load_tokenizer(str(files / "tokenizer.json"))
    train, val, _ = C.load_pretokenized(str(out), tok)
    assert isinstance(train[0], np.memmap)
    # every document of a file, EOS-terminated, lands in that file's train or val shard (order kept)
    for i, path in enumerate(D.resolve_paths([str(files / "part*.parquet"), str(files / "rows.jsonl")])):
        docs = [np.asarray(e.ids + [1]) for e in tok.encode_batch(list(D.iter_documents([path])))]
        assert m["shards"][i]["documents"] == len(docs)
        assert len(train[i]) + len(val[i]) == sum(map(len, docs)) and len(val[i]) > 0
        assert np.array_equal(np.concatenate([train[i], val[i]]).max(), max(d.max() for d in docs))
    # resumable: an interrupted shard (no sidecar, a stale partial file) is redone, the finished ones skipped
    mtimes = {f: os.stat(out / f).st_mtime_ns for f in ("00000.train.bin", "00002.train.bin")}
    before = (out / "00001.train.bin").read_bytes()
    os.remove(out / "00001.json")
    (out / "00001.train.bin.tmp-999").write_bytes(b"partial")
    proc = _pretokenize(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {f: os.stat(out / f).st_mtime_ns for f in mtimes} == mtimes
    assert (out / "00001.train.bin").read_bytes() == before and not list(out.glob("*.tmp-*"))
    assert C.read_manifest(str(out)) == m
    # a finished shard damaged afterwards (the trainer's size error says: re-run) is made again by the re-run
    (out / "00002.train.bin").write_bytes(b"cut")
    with pytest.raises(D.DataError, match="00002.train.bin: size does not match corpus.json"):
        C.load_pretokenized(str(out), tok)
    proc = _pretokenize(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert C.read_manifest(str(out)) == m and len(C.load_pretokenized(str(out), tok)[0][2]) == len(train[2])


def test_pretokenize_arguments_and_a_damaged_manifest_are_named(files, cache, tmp_path, capsys):  # noqa: F811
    """--val-fraction outside [0, 1) (2 held out every document) and a --vocab-size below a byte-level BPE's 259
    (tokenizers made 259 silently) are refused; a cut corpus.json is one error naming it in both trainers (before:
    a JSONDecodeError traceback in doge_jax.train, an unnamed message in doge_torch.train)."""
    from doge_torch.train import cli as torch_cli

    for flag, value, said in (("--val-fraction", "2", "--val-fraction 2.0: must be in [0, 1)"),
                              ("--val-fraction", "-0.5", "must be in [0, 1)"),
                              ("--seed", "-1", "--seed -1: must be in [0, 2**32)"),  # (a traceback)
                              ("--vocab-size", "10", "--vocab-size 10: a byte-level BPE needs at least 259")):
        proc = _pretokenize("--data", files / "rows.jsonl", "--out", tmp_path / "x", flag, value,
                            *(["--tokenizer", files / "tokenizer.json"] if flag != "--vocab-size" else []))
        assert proc.returncode == 2 and said in proc.stderr, proc.stderr[-2000:]
        # one error line, as doge_jax.train's (argparse printed its usage block first)
        assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.split('error: ', 1)[1].strip()}"], proc.stderr
        assert not (tmp_path / "x").exists()
    with pytest.raises(D.DataError, match="needs at least 259"):
        D.train_bpe([str(files / "rows.jsonl")], 100)
    out = tmp_path / "tok"
    C.pretokenize([str(files / "rows.jsonl")], str(files / "tokenizer.json"), str(out), progress=False)
    (out / "corpus.json").write_text('{"format": 1,')
    assert T.main([*TINY_ARGS, "--data", str(out), "--out_dir", str(tmp_path / "run"),
                   "--train.cache_dir", cache]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'corpus.json'}: unreadable" in err and "Traceback" not in err
    assert torch_cli(["--config", "configs/tiny.yaml", "--data", str(out), "--max-steps", "1", "--device", "cpu"]) == 2
    assert f"error: {out / 'corpus.json'}: unreadable" in capsys.readouterr().err


def test_train_on_pretokenized_mixture_resumes_exactly(files, cache, tmp_path):  # noqa: F811
    out = tmp_path / "tok"
    assert _pretokenize("--data", files / "part*.parquet", "--tokenizer", files / "tokenizer.json", "--out", out,
                        "--workers", "1", "--val-fraction", "0.2").returncode == 0
    data = ["--data", f"{out}:0.7", f"{files / 'rows.jsonl'}:0.3", "--train.cache_dir", cache,
            "--train.checkpoint_every", "100"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert T.main([*TINY_ARGS, *data, "--out_dir", str(straight)]) == 0
    assert T.main([*TINY_ARGS, *data, "--out_dir", str(resumed), "--train.stop_after", "3"]) == 0
    assert T.main([*TINY_ARGS, *data, "--out_dir", str(resumed)]) == 0
    la = [r["loss"] for r in read_metrics(str(straight)) if "loss" in r]
    assert la == [r["loss"] for r in read_metrics(str(resumed)) if "loss" in r] and len(la) == 6
    import jax

    for a, b in zip(jax.tree.leaves(load_params(str(straight))[1]), jax.tree.leaves(load_params(str(resumed))[1])):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with open(straight / "tokenizer.json") as a, open(files / "tokenizer.json") as b:
        assert a.read() == b.read()  # the pre-tokenized data's tokenizer was used


def test_mixture_of_two_tokenizers_is_refused_by_name(files, cache, tmp_path, capsys):  # noqa: F811
    """Two pre-tokenized directories of different tokenizers: one error naming both (before: a hint to pass one
    directory's tokenizer, which cannot make the other's ids right)."""
    C.pretokenize([str(files / "rows.jsonl")], str(files / "tokenizer.json"), str(tmp_path / "a"), workers=1,
                  progress=False)
    C.pretokenize([str(files / "rows.jsonl")], None, str(tmp_path / "b"), workers=1, progress=False, vocab_size=290)
    rc = T.main([*TINY_ARGS, "--data", f"{tmp_path / 'a'}:0.5", f"{tmp_path / 'b'}:0.5", "--train.cache_dir", cache,
                 "--out_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "were tokenized with different tokenizers" in err and str(tmp_path / "b") in err, err
    # one directory against the run's own tokenizer: which tokenizer that is, and both ways out
    want = (r"b: pre-tokenized with another tokenizer than the run's \(--train.tokenizer, else the --init-from "
            r"model's or the resumed run's\); pre-tokenize with that one, or train with this directory's: "
            r"--train.tokenizer .*b$")
    with pytest.raises(D.DataError, match=want):
        C.load_pretokenized(str(tmp_path / "b"), D.load_tokenizer(str(files / "tokenizer.json")))


def test_a_path_given_twice_is_read_once(files, tmp_path, capsys):
    """Without weights a path given twice is read once, a pre-tokenized directory as text files (it was read twice,
    text once), with a note; a mixture may name a source twice."""
    out = tmp_path / "tok"
    assert _pretokenize("--data", files / "part0.parquet", "--tokenizer", files / "tokenizer.json", "--out", out,
                        "--workers", "1").returncode == 0
    js = str(files / "rows.jsonl")
    text, pre = C.parse_sources([str(out), js, str(out) + "/", js])
    assert text.paths == [js] and pre.pretokenized == str(out)
    err = capsys.readouterr().err
    assert f"note: data path {str(out) + '/'!r} given twice: read once" in err and err.count("given twice") == 2, err
    assert len(C.parse_sources([f"{js}:1", f"{js}:2"])) == 2


def test_unfinished_pretokenization_and_short_mixture_sources(files, cache, tmp_path, capsys):  # noqa: F811
    """An interrupted `python -m doge_jax.data` output (no corpus.json) is refused, not read as text (its
    tokenizer.json and shard metadata); a mixture source with too few documents for a validation row is left out
    of validation with a warning (before: the run failed with 'no packed row ... (?)')."""
    out = tmp_path / "tok"
    assert _pretokenize("--data", files / "part0.parquet", "--tokenizer", files / "tokenizer.json", "--out", out,
                        "--workers", "1").returncode == 0
    os.remove(out / C.MANIFEST)
    with pytest.raises(D.DataError, match="unfinished pre-tokenization"):
        C.parse_sources([str(out)])
    short = tmp_path / "short.jsonl"
    with open(short, "w") as f:
        for t in _texts(5, 4, size=10):  # one held-out document: under one 32-token row
            f.write(json.dumps({"text": t}) + "\n")
    data = ["--data", f"{files / 'rows.jsonl'}:0.7", f"{short}:0.3", "--train.cache_dir", cache,
            "--train.tokenizer", str(files / "tokenizer.json"), "--train.stop_after", "1",
            "--train.val_fraction", "0.3"]
    assert T.main([*TINY_ARGS, *data, "--out_dir", str(tmp_path / "mix")]) == 0
    err = capsys.readouterr().err
    assert f"warning: no validation row of 32 tokens from {short}" in err
    # and a source too small for one training row is named
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "w1 w2"}) + "\n")
    assert T.main([*TINY_ARGS, *data[:2], f"{tiny}:0.3", *data[3:], "--out_dir", str(tmp_path / "m2")]) == 2
    assert f"data source '{tiny}' has no packed row of 32 tokens" in capsys.readouterr().err


def test_pretokenize_keeps_its_output_out_and_records_special_tokens(files, tmp_path):
    """--out inside a --data directory is not read back as input on a re-run (before: the corpus grew with its own
    tokenizer.json and shard metadata each time); the special tokens used are written next to tokenizer.json, so a
    resumed run and the trainer find the same EOS (before: an HF directory's EOS was lost)."""
    import shutil

    d = tmp_path / "corpus"
    d.mkdir()
    shutil.copy(files / "rows.jsonl", d)
    out = d / "tokens"
    for _ in range(2):
        proc = _pretokenize("--data", d, "--tokenizer", files / "tokenizer.json", "--out", out, "--workers", "1")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert len(C.read_manifest(str(out))["shards"]) == 1
    cfg = json.load(open(out / "tokenizer_config.json"))
    tok = D.load_tokenizer(str(out))
    assert tok.token_to_id(cfg["eos_token"]) == C.read_manifest(str(out))["eos_token_id"]
    assert D.special_ids(tok, str(out))["eos"] == C.read_manifest(str(out))["eos_token_id"]


def test_pretokenize_out_is_its_own(files, tmp_path):
    """--out must hold only this tool's files (it replaced an HF model directory's tokenizer.json); a re-run with
    another tokenizer says it starts over and drops the shards of inputs it no longer has; --vocab-size on an
    existing output (whose tokenizer a re-run keeps) is said to be unused."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    proc = _pretokenize("--data", files / "rows.jsonl", "--tokenizer", files / "tokenizer.json", "--out", model)
    assert proc.returncode == 2 and "holds 'config.json', not a python -m doge_jax.data output" in proc.stderr
    assert sorted(os.listdir(model)) == ["config.json"]
    hftok = tmp_path / "hftok"  # an HF tokenizer directory: its tokenizer_config.json is not ours
    hftok.mkdir()
    shutil.copy(files / "tokenizer.json", hftok / "tokenizer.json")
    (hftok / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "model_max_length": 2048}))
    proc = _pretokenize("--data", files / "rows.jsonl", "--tokenizer", hftok, "--out", hftok)
    assert proc.returncode == 2 and "holds 'tokenizer_config.json'" in proc.stderr
    assert sorted(os.listdir(hftok)) == ["tokenizer.json", "tokenizer_config.json"]
    out = tmp_path / "tok"
    proc = _pretokenize("--data", files / "part*.parquet", "--vocab-size", "300", "--out", out, "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "00001.train.bin").exists()
    proc = _pretokenize("--data", files / "rows.jsonl", "--vocab-size", "400", "--out", out, "--workers", "1")
    assert proc.returncode == 0 and "--vocab-size is not used" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "00001.train.bin").exists() and not (out / "00001.json").exists()  # a shard of the old inputs
    proc = _pretokenize("--data", files / "rows.jsonl", "--tokenizer", files / "tokenizer.json", "--out", out,
                        "--workers", "1")
    assert proc.returncode == 0 and "another tokenizer: every file is tokenized again" in proc.stderr
    assert len(C.read_manifest(str(out))["shards"]) == 1


def test_failed_pretokenize_leaves_no_directory_or_partial_shards(files, tmp_path):
    """A run that fails its checks (no tokenizer) or its only file creates nothing; one that fails after finishing
    a shard keeps that shard (a re-run goes on from it) but no partial .tmp file (before: an empty directory, and
    zero-byte temporaries)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(D.DataError, match="does not exist"):
        C.pretokenize([str(files / "rows.jsonl")], str(tmp_path / "nope.json"), str(tmp_path / "a"), workers=1,
                      progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(D.DataError, match="no field 'text'"):
        C.pretokenize([str(bad)], str(files / "tokenizer.json"), str(tmp_path / "b"), workers=1, progress=False)
    assert not (tmp_path / "b").exists()
    z = tmp_path / "z.jsonl"  # sorted after rows.jsonl: its shard is written first
    shutil.copy(bad, z)
    with pytest.raises(D.DataError, match="no field 'text'"):
        C.pretokenize([str(files / "rows.jsonl"), str(z)], str(files / "tokenizer.json"), str(tmp_path / "c"),
                      workers=1, progress=False)
    left = sorted(os.listdir(tmp_path / "c"))
    assert "00000.json" in left and not any(".tmp" in f for f in left) and "corpus.json" not in left, left
    (tmp_path / "d").mkdir()  # an empty --out given: empty again (its tokenizer files were left behind)
    with pytest.raises(D.DataError, match="no field 'text'"):
        C.pretokenize([str(bad)], str(files / "tokenizer.json"), str(tmp_path / "d"), workers=1, progress=False)
    assert os.listdir(tmp_path / "d") == []


def test_pretokenize_bad_out_compressed_inputs_and_arguments_are_one_line(files, tmp_path):
    """--out that is a file or cannot be made (tracebacks, exit 1), a compressed input (its bytes were tokenized as
    text), --workers 0 and --vocab-size 0 (a misleading "--tokenizer or --vocab-size needed"): one line, exit 2."""
    import gzip

    (tmp_path / "afile").write_text("x")
    gz = tmp_path / "rows.jsonl.gz"
    gz.write_bytes(gzip.compress((files / "rows.jsonl").read_bytes()))
    tok = files / "tokenizer.json"
    for args, said in (
            (("--data", files / "rows.jsonl", "--tokenizer", tok, "--out", tmp_path / "afile"), "a file, not a dir"),
            (("--data", files / "rows.jsonl", "--tokenizer", tok, "--out", tmp_path / "afile" / "x"),
             "cannot create it"),
            (("--data", gz, "--tokenizer", tok, "--out", tmp_path / "o"), "a compressed or archive file"),
            (("--data", files / "rows.jsonl", "--tokenizer", tok, "--out", tmp_path / "o", "--workers", "0"),
             "--workers 0: must be >= 1"),
            (("--data", files / "rows.jsonl", "--out", tmp_path / "o", "--vocab-size", "0"),
             "--vocab-size 0: a byte-level BPE needs at least 259")):
        proc = _pretokenize(*args)
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # (argparse printed its usage block first)
    assert not (tmp_path / "o").exists()


def test_bpe_smaller_than_asked_says_so(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    tok = D.train_bpe([str(tmp_path / "a.txt")], 4096)
    assert tok.get_vocab_size() < 4096
    assert f"gave a BPE of {tok.get_vocab_size()} tokens, fewer than the 4096 asked for" in capsys.readouterr().err


def test_pretokenize_killed_before_its_manifest_leaves_the_old_output_readable(files, tmp_path, monkeypatch):
    """Shards of inputs no longer given are removed only after the new corpus.json is written."""
    out = str(tmp_path / "tok")
    C.pretokenize([str(files / "part*.parquet"), str(files / "rows.jsonl")], str(files / "tokenizer.json"), out,
                  workers=1, progress=False)
    real = C._write_atomic_json

    def killed(path, obj):
        if path.endswith(C.MANIFEST):
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(C, "_write_atomic_json", killed)
    with pytest.raises(KeyboardInterrupt):  # the first two inputs only (their shards are kept as they are)
        C.pretokenize([str(files / "part*.parquet")], str(files / "tokenizer.json"), out, workers=1, progress=False)
    train, _, m = C.load_pretokenized(out)  # the previous manifest and all its shards
    assert len(m["shards"]) == 3 and all(len(t) for t in train)


def _two_file_corpus(files, tmp_path, **kw) -> tuple:
    """(directory d of b0.parquet and b1.parquet, the tokenizer file, OUT): d pre-tokenized into OUT."""
    d = tmp_path / "d"
    d.mkdir()
    for i in range(2):
        shutil.copy(files / f"part{i}.parquet", d / f"b{i}.parquet")
    tok_file, out = str(files / "tokenizer.json"), str(tmp_path / "tok")
    C.pretokenize([str(d)], tok_file, out, workers=1, progress=False, **kw)
    return d, tok_file, out


def test_pretokenize_reuses_shards_when_a_file_is_added_first(files, tmp_path, monkeypatch):
    """A file added to a pre-tokenized corpus is the only one tokenized on the re-run, even when it sorts before
    the others (their shards are renumbered), and every document keeps its side of the split (a seeded hash of its
    text). Before, the shard key and the per-document coin held the file's position: every shard was made again and
    the split reshuffled (676 train / 0 val became 548 / 139)."""
    d, tok_file, out = _two_file_corpus(files, tmp_path, val_fraction=0.2)
    before = {s["source"]: s for s in C.read_manifest(out)["shards"]}
    bins = {s["source"]: [open(os.path.join(out, s[k]), "rb").read() for k in ("train", "val")]
            for s in before.values()}
    assert all(s["val_tokens"] for s in before.values())
    shutil.copy(files / "rows.jsonl", d / "a.jsonl")
    tokenized, real = [], C._shard_job
    monkeypatch.setattr(C, "_shard_job", lambda job: tokenized.append(job[1]) or real(job))
    m = C.pretokenize([str(d)], tok_file, out, workers=1, progress=False, val_fraction=0.2)
    assert tokenized == [str(d / "a.jsonl")]
    assert [os.path.basename(s["source"]) for s in m["shards"]] == ["a.jsonl", "b0.parquet", "b1.parquet"]
    for i, s in enumerate(m["shards"]):
        assert s["train"] == f"{i:05d}.train.bin"
        if s["source"] in bins:  # the same shard, renumbered: the same documents on each side
            got = [open(os.path.join(out, s[k]), "rb").read() for k in ("train", "val")]
            assert got == bins[s["source"]] and {**s, "train": "", "val": ""} == {**before[s["source"]], "train": "",
                                                                                   "val": ""}
    assert sorted(os.listdir(out)) == sorted(["corpus.json", "tokenizer.json", "tokenizer_config.json"]
                                             + [f"0000{i}.{k}" for i in range(3) for k in ("json", "train.bin",
                                                                                           "val.bin")])
    # the same output as a fresh run over all three files
    fresh = str(tmp_path / "fresh")
    assert C.pretokenize([str(d)], tok_file, fresh, workers=1, progress=False, val_fraction=0.2) == m
    for f in os.listdir(fresh):
        assert open(os.path.join(fresh, f), "rb").read() == open(os.path.join(out, f), "rb").read(), f


def test_mixture_and_split_messages(files, cache, tmp_path, capsys):  # noqa: F811
    """A weighted source whose share rounds to no row warns (it was never trained on, silently); an empty source
    is named (was "the corpus holds no document"); no "validating on the other sources" warning when nothing is
    validated (val_fraction 0); a pre-tokenized directory split at another --val-fraction says which split is used,
    and with train.val_fraction 0 its held-out documents are trained on (they were validated on anyway)."""
    tok = D.load_tokenizer(str(files / "tokenizer.json"))
    out = str(tmp_path / "tok")
    C.pretokenize([str(files / "rows.jsonl")], str(files / "tokenizer.json"), out, workers=1, progress=False,
                  val_fraction=0.2)
    m = C.read_manifest(out)
    assert m["val_tokens"] > 0

    def data(specs, val_fraction):
        return C.training_data(C.parse_sources(specs), tok, 1, 320, 32, cache, "text", val_fraction, 233, False)

    capsys.readouterr()
    d = data([out], 0.2)
    assert d.val_tokens == m["val_tokens"] and "note:" not in capsys.readouterr().err
    d = data([out], 0.01)
    assert d.val_tokens == m["val_tokens"]
    assert "was split at pre-tokenization (--val-fraction 0.2); train.val_fraction 0.01: that split is used" in \
        capsys.readouterr().err
    d = data([out], 0.0)
    assert d.val_tokens == 0 and len(d.val_rows) == 0 and d.train_tokens == m["train_tokens"] + m["val_tokens"]
    assert "train.val_fraction 0: its held-out documents are trained on too" in capsys.readouterr().err
    # a weight too small for one row of the epoch
    a, b = str(files / "part0.parquet"), str(files / "part1.parquet")
    d = data([f"{a}:1", f"{b}:100000"], 0.0)
    assert d.rows.counts[0] == 0
    err = capsys.readouterr().err
    assert f"warning: data source(s) {a} (weight 1) get no row of the" in err
    assert "validating on the other sources" not in err  # (nothing is validated)
    (tmp_path / "empty.jsonl").write_text('{"text": null}\n')
    with pytest.raises(D.DataError, match=r"data source .*empty.jsonl. holds no document \(empty files"):
        data([f"{a}:1", f"{tmp_path / 'empty.jsonl'}:1"], 0.0)


def test_failed_or_interrupted_rerun_keeps_the_previous_output_readable(files, tmp_path, monkeypatch):
    """A re-run whose added file fails (a bad row) or that is interrupted leaves the previous corpus.json and its
    shards readable (the finished shards were renumbered before the new file was tokenized: the old manifest then
    named moved files); the next run reuses what finished; a missing shard is a DataError naming it."""
    d, tok_file, out = _two_file_corpus(files, tmp_path)
    before = [np.asarray(a).copy() for a in C.load_pretokenized(out)[0]]
    (d / "a.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(D.DataError, match="a.jsonl:2: not a JSON line"):
        C.pretokenize([str(d)], tok_file, out, workers=1, progress=False)
    assert [np.asarray(a).tolist() for a in C.load_pretokenized(out)[0]] == [a.tolist() for a in before]
    # interrupted after the first new shard of two: the old output is readable, the finished one is reused
    (d / "a.jsonl").write_text('{"text": "fine"}\n')
    shutil.copy(files / "rows.jsonl", d / "c.jsonl")
    tokenized, real = [], C._shard_job

    def job(j):
        if tokenized:
            raise KeyboardInterrupt
        tokenized.append(j[1])
        return real(j)

    monkeypatch.setattr(C, "_shard_job", job)
    with pytest.raises(KeyboardInterrupt):
        C.pretokenize([str(d)], tok_file, out, workers=1, progress=False)
    assert [np.asarray(a).tolist() for a in C.load_pretokenized(out)[0]] == [a.tolist() for a in before]
    tokenized.clear()
    monkeypatch.setattr(C, "_shard_job", lambda j: tokenized.append(j[1]) or real(j))
    m = C.pretokenize([str(d)], tok_file, out, workers=1, progress=False)
    assert tokenized == [str(d / "c.jsonl")]
    assert [os.path.basename(s["source"]) for s in m["shards"]] == ["a.jsonl", "b0.parquet", "b1.parquet",
                                                                     "c.jsonl"]
    fresh = str(tmp_path / "fresh")
    assert C.pretokenize([str(d)], tok_file, fresh, workers=1, progress=False) == m
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh))
    os.remove(os.path.join(out, "00003.val.bin"))
    with pytest.raises(D.DataError, match=r"00003.val.bin: missing \(corpus.json lists it; re-run"):
        C.load_pretokenized(out)


def test_pretokenize_out_in_use_is_refused(files, tmp_path):
    """A second python -m doge_jax.data on an --out another run is writing is refused, touching nothing (it would
    delete the first run's temporaries and renumber its shards)."""
    from doge_jax.hf_io import run_lock

    out = tmp_path / "tok"
    out.mkdir()
    (out / "00000.train.bin.tmp-123").write_bytes(b"another run's")
    with run_lock(str(out)), pytest.raises(D.DataError, match="is in use: another python -m doge_jax.data run"):
        C.pretokenize([str(files / "rows.jsonl")], str(files / "tokenizer.json"), str(out), workers=1,
                      progress=False)
    assert os.listdir(out) == ["00000.train.bin.tmp-123"]


def test_an_interrupted_renumbering_is_finished_by_the_next_run(files, tmp_path, monkeypatch):
    """Killed while renumbering (a file added first moves the others' shards): the next run completes the moves and
    reuses every shard (the moved shards' temporaries were deleted and the files tokenized again)."""
    d, tok_file, out = _two_file_corpus(files, tmp_path)
    shutil.copy(files / "rows.jsonl", d / "a.jsonl")
    writes, real_write = [], C._write_atomic_json

    def write(path, obj):
        if re.fullmatch(r"\d{5}\.json", os.path.basename(path)):
            writes.append(path)
            if len(writes) == 2:  # the job's record, then the first renumbered one
                raise KeyboardInterrupt
        real_write(path, obj)

    monkeypatch.setattr(C, "_write_atomic_json", write)
    with pytest.raises(KeyboardInterrupt):
        C.pretokenize([str(d)], tok_file, out, workers=1, progress=False)
    assert any(".tmp-move-" in f for f in os.listdir(out))
    monkeypatch.setattr(C, "_write_atomic_json", real_write)
    tokenized, real_job = [], C._shard_job
    monkeypatch.setattr(C, "_shard_job", lambda j: tokenized.append(j[1]) or real_job(j))
    m = C.pretokenize([str(d)], tok_file, out, workers=1, progress=False)
    assert tokenized == [] and not any(".tmp" in f for f in os.listdir(out))
    fresh = str(tmp_path / "fresh")
    assert C.pretokenize([str(d)], tok_file, fresh, workers=1, progress=False) == m
    for f in os.listdir(fresh):
        assert open(os.path.join(fresh, f), "rb").read() == open(os.path.join(out, f), "rb").read(), f
