"""Real corpora for training (issue 6 item 1): data sources and mixtures, pre-tokenized token shards read memory-mapped.

Sources: `--data` entries (or `train.data` in YAML) are files, directories, globs (text, .jsonl with a `text` field,
.parquet with a `text` column) or directories written by `python -m doge_jax.data` (pre-tokenized). An entry
`PATH:WEIGHT` (YAML: `{path: PATH, weight: WEIGHT}`) makes a mixture; then every entry needs a weight.

Mixing (spec §6.4, in rows): each source is packed to seq_len rows on its own; with T = total rows of all sources,
source i contributes int(T * w_i / sum(w)) rows, its first rows in order, repeated cyclically if it has fewer
(truncated if more). The concatenation is one epoch; grain reshuffles it every epoch. Validation rows are mixed the
same way (from each source's held-out documents) and sampled with a seeded permutation.

Pre-tokenization: `python -m doge_jax.data --data ... --tokenizer TOK --out DIR` writes one shard per input file
(`NNNNN.train.bin`, `NNNNN.val.bin`: raw uint16/uint32 tokens, EOS after every document; a document is held out
for validation by a seeded hash of its text, data.held_out) in parallel over files, with a progress bar; a shard is
finished when its `NNNNN.json` exists (written last, atomically), so an interrupted run resumes where it stopped
(finished shards are found by their key, the file and the settings, and renumbered when files were added).
`corpus.json` (the manifest) is written when every shard is done; the trainer reads the shards with np.memmap.
"""

from __future__ import annotations

import argparse
import collections.abc
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from typing import Any

import numpy as np

from . import data as D

MANIFEST = "corpus.json"
FORMAT = 1
_SHARD = r"(\d{5,})\.(?:train\.bin|val\.bin|json)"  # NNNNN.train.bin, NNNNN.val.bin, NNNNN.json
_SHARD_FILE = re.compile(_SHARD)
_SIDE_FILE = re.compile(r"\d{5,}\.json")  # a finished shard's record
# what --out may hold: shards, the tokenizer files, the manifest, hidden entries, temporaries of an interrupted run
_OWN_FILE = re.compile(rf"{_SHARD}|tokenizer(_config)?\.json|corpus\.json|\..*|.*\.tmp.*")


# ---- sources ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Source:
    spec: str
    paths: list[str]  # raw document files (empty for a pre-tokenized directory)
    pretokenized: str | None = None
    weight: float | None = None


def is_pretokenized(path: str) -> bool:
    """A finished `python -m doge_jax.data` output directory; an unfinished one raises (it would otherwise be read
    as text: its tokenizer.json and shard metadata)."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return True
    if os.path.isdir(path) and any(n.endswith((".train.bin", ".val.bin")) for n in os.listdir(path)):
        raise D.DataError(f"{path}: unfinished pre-tokenization (token shards but no {MANIFEST}); re-run "
                          "python -m doge_jax.data with the same arguments to finish it")
    return False


def split_weight(entry: Any) -> tuple[str, float | None]:
    """One `train.data` entry -> (path, mixture weight or None): "PATH:WEIGHT", {path, weight} or a plain path (an
    existing path ending in ":NUMBER" is a path)."""
    if isinstance(entry, dict):
        extra = set(entry) - {"path", "weight"}
        if "path" not in entry or extra:
            raise D.DataError(f"train.data entry {entry!r}: expected {{path: P, weight: W}}")
        path, weight = str(entry["path"]), entry.get("weight")
    else:
        path, weight = str(entry), None
        head, sep, tail = path.rpartition(":")
        if sep and head and not os.path.exists(os.path.expanduser(path)):  # (an existing "c:2" is a path)
            try:
                path, weight = head, float(tail)
            except ValueError:
                if os.path.exists(os.path.expanduser(head)):  # PATH:WEIGHT with a mistyped weight
                    raise D.DataError(f"data entry {entry!r}: the weight {tail!r} is not a number (PATH:WEIGHT, "
                                      "e.g. data/web:0.7)") from None
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < float("inf"):
            raise D.DataError(f"data entry {entry!r}: the weight must be a finite number > 0")
        weight = float(weight)
    return path, weight


def parse_sources(specs: list, exclude: list[str] | tuple[str, ...] = ()) -> list[Source]:
    """`train.data` -> sources. Without weights all raw files form one source (plain concatenation); each
    pre-tokenized directory is a source of its own. With weights every entry is one source of the mixture.
    Directory walks and globs skip the directories in `exclude` (the run's own)."""
    entries = [split_weight(e) for e in specs]
    weighted = [w is not None for _, w in entries]
    if any(weighted) and not all(weighted):
        missing = next(p for p, w in entries if w is None)
        raise D.DataError(f"data entry {missing!r} has no weight: give every entry of a mixture one (PATH:WEIGHT)")
    sources = []
    for path, w in entries:
        if os.path.isdir(os.path.expanduser(path)) and is_pretokenized(os.path.expanduser(path)):
            sources.append(Source(path, [], os.path.abspath(os.path.expanduser(path)), w))
        else:
            sources.append(Source(path, D.resolve_paths([path], exclude), None, w))
    if not any(weighted):
        raw = [s for s in sources if s.pretokenized is None]
        merged = [Source(", ".join(s.spec for s in raw), sorted(dict.fromkeys(p for s in raw for p in s.paths)))]
        pre, seen = {}, set()
        for s in sources:  # a path given twice is read once (text files are merged: so is a pre-tokenized directory)
            key = s.pretokenized or os.path.abspath(os.path.expanduser(s.spec))
            if key in seen:
                print(f"note: data path {s.spec!r} given twice: read once (a mixture, PATH:WEIGHT, reads a source "
                      "more often)", file=sys.stderr)
            seen.add(key)
            if s.pretokenized is not None:
                pre.setdefault(s.pretokenized, s)
        sources = (merged if raw else []) + list(pre.values())
    return sources


# ---- random-access rows ----------------------------------------------------------------------------------------------
class _Rows(collections.abc.Sequence):
    def __getitem__(self, i):
        if isinstance(i, slice):
            idx = range(*i.indices(len(self)))
            return np.stack([self._row(j) for j in idx]) if len(idx) else np.zeros((0, self.seq_len), np.int32)
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._row(i)


class PackedRows(_Rows):
    """Wrapped packing over a concatenation of 1-D token arrays (memory maps): row i = tokens [i*S, (i+1)*S) of
    the stream (rows may span two arrays); the last partial row dropped."""

    def __init__(self, arrays: list[np.ndarray], seq_len: int):
        self.arrays = [a for a in arrays if len(a)]
        self.seq_len = seq_len
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.n = int(self.starts[-1]) // seq_len

    def __len__(self) -> int:
        return self.n

    def _row(self, i: int) -> np.ndarray:
        lo, hi = i * self.seq_len, (i + 1) * self.seq_len
        k = int(np.searchsorted(self.starts, lo, side="right")) - 1
        parts = []
        while lo < hi:
            a0 = int(self.starts[k])
            take = min(hi, int(self.starts[k + 1])) - lo
            parts.append(self.arrays[k][lo - a0:lo - a0 + take])
            lo += take
            k += 1
        return np.concatenate(parts).astype(np.int32) if len(parts) > 1 else np.asarray(parts[0], np.int32)


class MixedRows(_Rows):
    """Source i contributes counts[i] rows: its rows 0, 1, ... cyclically (spec §6.4 mixing)."""

    def __init__(self, sources: list, weights: list[float] | None, total: int | None = None,
                 names: list[str] | None = None):
        self.sources = sources
        self.seq_len = getattr(sources[0], "seq_len", None) or np.shape(sources[0])[1]
        sizes = [len(s) for s in sources]
        if weights is None:
            counts = sizes
        else:
            total = sum(sizes) if total is None else total
            counts = [int(total * w / sum(weights)) for w in weights]
            for i, (n, c) in enumerate(zip(sizes, counts)):
                if c and not n:
                    name = names[i] if names else f"source {i}"
                    raise D.DataError(f"data source {name!r} has no packed row of {self.seq_len} tokens but weight "
                                      "> 0 (too little text for one row)")
        self.counts = counts
        self.starts = np.cumsum([0] + list(counts))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _row(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        src = self.sources[k]
        return np.asarray(src[(i - int(self.starts[k])) % len(src)], np.int32)


class TakeRows(_Rows):
    def __init__(self, rows, index: np.ndarray):
        self.rows, self.index, self.seq_len = rows, np.asarray(index), rows.seq_len

    def __len__(self) -> int:
        return len(self.index)

    def _row(self, i: int) -> np.ndarray:
        return self.rows[int(self.index[i])]


# ---- pre-tokenized directories ---------------------------------------------------------------------------------------
def tokenizer_sha(tok) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:20]


def read_manifest(path: str) -> dict:
    """A pre-tokenized directory's corpus.json; a damaged one is a DataError naming it."""
    file = os.path.join(path, MANIFEST)
    try:
        with open(file) as f:
            m = json.load(f)
        if not isinstance(m, dict) or not isinstance(m.get("shards"), list):
            raise ValueError("not a corpus manifest (no shards list)")
    except (OSError, ValueError) as e:
        raise D.DataError(f"{file}: unreadable ({e}); re-run python -m doge_jax.data into a new --out") from None
    if m.get("format") != FORMAT:
        raise D.DataError(f"{path}: unknown pre-tokenized format {m.get('format')!r} (expected {FORMAT})")
    return m


def load_pretokenized(path: str, tok=None) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """(train arrays, val arrays, manifest) of a pre-tokenized directory, memory-mapped."""
    m = read_manifest(path)
    if tok is not None and m["tokenizer_sha"] != tokenizer_sha(tok):
        raise D.DataError(f"{path}: pre-tokenized with another tokenizer than the run's (--train.tokenizer, else "
                          "the --init-from model's or the resumed run's); pre-tokenize with that one, or train with "
                          f"this directory's: --train.tokenizer {path}")
    dtype = np.dtype(m["dtype"])

    def arr(name, n):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise D.DataError(f"{file}: missing ({MANIFEST} lists it; re-run python -m doge_jax.data)")
        if os.path.getsize(file) != n * dtype.itemsize:
            raise D.DataError(f"{file}: size does not match {MANIFEST} (re-run python -m doge_jax.data)")
        return np.memmap(file, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)

    train = [arr(s["train"], s["train_tokens"]) for s in m["shards"]]
    val = [arr(s["val"], s["val_tokens"]) for s in m["shards"]]
    return train, val, m


def split_note(path: str, manifest: dict, val_fraction: float) -> str | None:
    """The note for a pre-tokenized directory whose split (made by python -m doge_jax.data) is not the run's
    train.val_fraction: that split is used, or with val_fraction 0 its held-out documents are trained on."""
    made = manifest.get("val_fraction")
    if val_fraction == made or (val_fraction == 0 and not manifest.get("val_tokens")):
        return None
    what = ("its held-out documents are trained on too" if val_fraction == 0 else
            "that split is used (for another, re-run python -m doge_jax.data --val-fraction F into a new --out)")
    return (f"note: {path} was split at pre-tokenization (--val-fraction {made}); train.val_fraction "
            f"{val_fraction:g}: {what}")


def _shard_intact(out: str, meta: dict, dtype: str) -> bool:
    """A finished shard's two files exist with the sizes its record gives (a truncated or deleted one is made
    again by a re-run, as the trainer's size error advises)."""
    size = np.dtype(dtype).itemsize
    try:
        return all(os.path.getsize(os.path.join(out, meta[k])) == meta[f"{k}_tokens"] * size for k in ("train", "val"))
    except (OSError, KeyError, TypeError):
        return False


def _write_atomic_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


_MOVING = re.compile(r"(\d{5,})\.json\.tmp-move-(\d{5,})")  # a shard's record on its way to a new number


def _renumber(out: str, done: dict[int, dict]) -> None:
    """Give the finished shards `done` ({input number: record}) their input's number, through temporary names (one
    shard's new number may be another's old one). An interruption here (the only window, just before corpus.json,
    where the previous one is not readable) is finished by the next run (_finish_moves)."""
    moves = {i: meta for i, meta in done.items() if meta["train"] != f"{i:05d}.train.bin"}
    for i, meta in moves.items():  # first every moving file to a temporary name, its record last
        for name in (meta["train"], meta["val"], meta["train"].split(".")[0] + ".json"):
            os.replace(os.path.join(out, name), os.path.join(out, f"{name}.tmp-move-{i:05d}"))
    for i, meta in moves.items():
        _finish_move(out, f"{meta['train'].split('.')[0]}.json.tmp-move-{i:05d}", i, meta)


def _finish_move(out: str, record: str, i: int, meta: dict) -> None:
    for k in ("train", "val"):
        moving = os.path.join(out, f"{meta[k]}.tmp-move-{i:05d}")
        if os.path.exists(moving):
            os.replace(moving, os.path.join(out, f"{i:05d}.{k}.bin"))
    meta.update(train=f"{i:05d}.train.bin", val=f"{i:05d}.val.bin")
    _write_atomic_json(os.path.join(out, f"{i:05d}.json"), meta)
    os.remove(os.path.join(out, record))


def _finish_moves(out: str) -> None:
    """Complete the renumbering an interrupted run left half done (its shards are then reused, not redone)."""
    for f in sorted(os.listdir(out)):
        m = _MOVING.fullmatch(f)
        if m:
            try:
                with open(os.path.join(out, f)) as fh:
                    meta = json.load(fh)
            except (OSError, ValueError):
                meta = None
            if isinstance(meta, dict) and isinstance(meta.get("train"), str) and isinstance(meta.get("val"), str):
                _finish_move(out, f, int(m.group(2)), meta)
            # (else it goes with the other temporaries: that shard is made again)


def _shard_job(job: tuple) -> dict:
    """Tokenize one file into NNNNN.{train,val}.bin + NNNNN.json (a worker process)."""
    index, path, out, text_field, val_fraction, seed, eos_id, dtype, key = job
    tok = D.load_tokenizer(os.path.join(out, "tokenizer.json"))
    name = f"{index:05d}"
    files = {k: os.path.join(out, f"{name}.{k}.bin") for k in ("train", "val")}
    tmp = {k: f"{v}.tmp-{os.getpid()}" for k, v in files.items()}
    counts = {"train": 0, "val": 0}
    docs, max_id = 0, -1
    try:
        with open(tmp["train"], "wb") as ft, open(tmp["val"], "wb") as fv:
            batch: list[str] = []

            def flush():
                nonlocal docs, max_id
                for text, enc in zip(batch, tok.encode_batch(batch)):
                    ids = enc.ids
                    if not ids or ids[-1] != eos_id:
                        ids = ids + [eos_id]
                    a = np.asarray(ids, dtype)
                    max_id = max(max_id, int(a.max()))
                    split = "val" if D.held_out(D.document_key(text, seed), val_fraction) else "train"
                    a.tofile(fv if split == "val" else ft)
                    counts[split] += len(a)
                    docs += 1
                batch.clear()

            for text in D.iter_documents([path], text_field):
                D.warn_big_document(path, text)
                batch.append(text)
                if len(batch) >= 256:
                    flush()
            flush()
    except BaseException:  # a bad row, Ctrl-C: no partial shard file stays behind
        for t in tmp.values():
            if os.path.exists(t):
                os.remove(t)
        raise
    for k in files:
        os.replace(tmp[k], files[k])
    meta = {"source": path, "key": key, "train": f"{name}.train.bin", "val": f"{name}.val.bin", "documents": docs,
            "train_tokens": counts["train"], "val_tokens": counts["val"], "max_id": max_id}
    _write_atomic_json(os.path.join(out, f"{name}.json"), meta)
    return meta


def pretokenize(specs: list[str], tokenizer: str | None, out: str, text_field: str = "text",
                val_fraction: float = 0.01, seed: int = 233, workers: int | None = None, progress: bool = True,
                vocab_size: int | None = None) -> dict:
    """Write token shards of every input file to `out` (see the module docstring); returns the manifest."""
    out_dir = os.path.abspath(out)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise D.DataError(f"--out {out}: a file, not a directory")
    weighted = [sp for sp in specs if split_weight(sp)[1] is not None]
    if weighted:  # (a mixture's weights are the trainer's: --data DIR:W there)
        print(f"note: {weighted[0]!r}: the weight is not used here (each input becomes shards of its own); give it "
              "to the trainer, --data OUT:WEIGHT", file=sys.stderr)
    # the output's own files are never inputs (an --out inside a --data directory)
    paths = [p for p in D.resolve_paths([split_weight(s)[0] for s in specs])
             if not p.startswith(out_dir + os.sep)]
    if not paths:
        raise D.DataError("no input file (outside --out)")
    if os.path.isdir(out):  # only this tool's files: never a model or tokenizer directory's files
        foreign = sorted(f for f in os.listdir(out) if not _OWN_FILE.fullmatch(f))
        tok_cfg = os.path.join(out, "tokenizer_config.json")
        if not foreign and os.path.isfile(tok_cfg):  # ours holds only the special tokens it used
            try:
                with open(tok_cfg) as f:
                    keys = set(json.load(f))
            except (OSError, ValueError):
                keys = {"?"}
            if not keys <= {"bos_token", "eos_token", "pad_token"}:
                foreign = ["tokenizer_config.json"]
        if foreign:
            raise D.DataError(f"--out {out}: holds {foreign[0]!r}, not a python -m doge_jax.data output; use an "
                              "empty or new directory")
    tok_file = os.path.join(out, "tokenizer.json")
    if tokenizer:
        if vocab_size:
            print(f"note: --vocab-size {vocab_size} is not used: --tokenizer gives the vocabulary", file=sys.stderr)
        tok = D.load_tokenizer(tokenizer)
        src_dir = tokenizer  # (a tokenizer.json file: the tokenizer_config.json next to it, as the trainers read it)
        if os.path.isfile(tok_file) and D.load_tokenizer(tok_file).to_str() != tok.to_str():
            print(f"note: {out} was tokenized with another tokenizer: every file is tokenized again", file=sys.stderr)
    elif os.path.isfile(tok_file):  # a resumed run: the special tokens it recorded next to it
        tok, src_dir = D.load_tokenizer(tok_file), out
        if vocab_size and vocab_size != tok.get_vocab_size():
            print(f"note: {out} already holds its tokenizer (vocabulary {tok.get_vocab_size()}), which a re-run "
                  "keeps: --vocab-size is not used (a new vocabulary needs a new --out)", file=sys.stderr)
    elif vocab_size:
        tok, src_dir = D.train_bpe(paths, vocab_size, text_field), None
    else:
        raise D.DataError("--tokenizer (a tokenizer.json or HF tokenizer dir) or --vocab-size (train a BPE) needed")
    ids = D.special_ids(tok, src_dir)
    if ids["eos"] is None:
        raise D.DataError("the tokenizer has no known EOS token")
    created = not os.path.isdir(out)  # only now: a command that fails its checks leaves no directory
    fresh = created or not os.listdir(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise D.DataError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    with _out_lock(out):  # (a second run on the same --out would delete the first's temporaries, renumber its shards)
        try:
            return _write_shards(paths, tok, ids, out, tok_file, text_field, val_fraction, seed, workers, progress)
        except BaseException:
            if fresh and not any(_SIDE_FILE.fullmatch(f) for f in os.listdir(out)):  # no finished shard to go on from
                if created:
                    shutil.rmtree(out, ignore_errors=True)
                else:  # an empty directory given: empty again
                    for f in os.listdir(out):
                        with contextlib.suppress(OSError):
                            os.remove(os.path.join(out, f))
            raise


@contextlib.contextmanager
def _out_lock(out: str):
    """An exclusive lock on --out for the run (hf_io.run_lock, the trainers' run-directory lock)."""
    from .config import ConfigError
    from .hf_io import run_lock

    lock = run_lock(out)
    try:
        lock.__enter__()
    except ConfigError:
        raise D.DataError(f"--out {out} is in use: another python -m doge_jax.data run is writing it; wait for it "
                          "to end, or use another --out") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _write_shards(paths: list[str], tok, ids: dict, out: str, tok_file: str, text_field: str, val_fraction: float,
                  seed: int, workers: int | None, progress: bool) -> dict:
    """pretokenize's work once its inputs and tokenizer are checked: the tokenizer files, the shards, the manifest."""
    import multiprocessing

    if not os.path.isfile(tok_file) or D.load_tokenizer(tok_file).to_str() != tok.to_str():
        tok.save(tok_file + ".tmp")
        os.replace(tok_file + ".tmp", tok_file)
    # the special tokens used here (an HF tokenizer directory's may not be guessable by name): the trainer and a
    # resumed run read them from here
    _write_atomic_json(os.path.join(out, "tokenizer_config.json"),
                       {f"{k}_token": tok.id_to_token(i) for k, i in ids.items() if i is not None})
    _finish_moves(out)
    for f in os.listdir(out):  # partial shard files of an interrupted run
        if ".tmp-" in f:
            os.remove(os.path.join(out, f))
    dtype = "uint16" if tok.get_vocab_size() <= 65536 else "uint32"
    sha = tokenizer_sha(tok)
    # finished shards by key (the file and the settings, not its place in the input list): a file added before the
    # others moves their shards to their new numbers instead of tokenizing them again
    finished, numbers = {}, {-1}
    for f in os.listdir(out):
        m = _SHARD_FILE.fullmatch(f)
        if m:
            numbers.add(int(m.group(1)))
        if _SIDE_FILE.fullmatch(f):
            try:
                with open(os.path.join(out, f)) as fh:
                    meta = json.load(fh)
            except (OSError, ValueError):  # a damaged record: the shard is made again
                continue
            if isinstance(meta, dict) and _shard_intact(out, meta, dtype):
                finished.setdefault(meta.get("key"), meta)
    # New shards are written under free numbers (their own where no file has it, else past every existing one and
    # every input's), so the previous corpus.json stays readable until this run has made every shard; they get their
    # final numbers at the end.
    jobs, done, final_of = [], {}, {}
    scratch = max(max(numbers) + 1, len(paths))
    for i, p in enumerate(paths):
        key = D.corpus_fingerprint([p], sha, text_field, f"{val_fraction}:{seed}", f"eos {ids['eos']}", dtype,
                                   "split by hash")
        if key in finished:
            done[i] = finished.pop(key)
            continue
        number = i if i not in numbers else scratch
        scratch += number != i
        final_of[number] = i
        jobs.append((number, p, out, text_field, val_fraction, seed, ids["eos"], dtype, key))
    bar = D._progress(total=len(paths), desc="pre-tokenizing", unit="file", enabled=progress)
    bar.update(len(done))
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    if jobs:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if workers == 1:
            results = map(_shard_job, jobs)
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers)
            results = pool.imap_unordered(_shard_job, jobs)
        tokens = 0
        try:
            for meta in results:
                done[final_of[int(meta["train"].split(".")[0])]] = meta  # NNNNN.train.bin (more digits past 99999)
                tokens += meta["train_tokens"] + meta["val_tokens"]
                bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
                bar.update(1)
        except BaseException:
            if workers > 1:  # the other files' workers stop too
                pool.terminate()
                pool.join()
            for f in os.listdir(out):  # their partial shard files
                if ".tmp-" in f:
                    os.remove(os.path.join(out, f))
            raise
        if workers > 1:
            pool.close()
            pool.join()
    bar.close()
    _renumber(out, done)
    shards = [done[i] for i in range(len(paths))]
    manifest = {"format": FORMAT, "dtype": dtype, "tokenizer_sha": sha, "eos_token_id": ids["eos"],
                "vocab_size": tok.get_vocab_size(), "text_field": text_field, "val_fraction": val_fraction,
                "seed": seed, "max_id": max((s["max_id"] for s in shards), default=-1),
                "train_tokens": sum(s["train_tokens"] for s in shards),
                "val_tokens": sum(s["val_tokens"] for s in shards), "shards": shards}
    _write_atomic_json(os.path.join(out, MANIFEST), manifest)
    for f in os.listdir(out):  # shards of inputs a previous run had and this one has not (after the manifest: a
        m = _SHARD_FILE.fullmatch(f)  # run killed before it leaves the previous manifest's shards readable)
        if m and int(m.group(1)) >= len(paths):
            os.remove(os.path.join(out, f))
    return manifest


# ---- what the trainer reads ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainingData:
    rows: Any  # packed training rows (np.ndarray or a random-access Sequence of [seq_len] int32 rows)
    val_rows: Any
    train_tokens: int
    val_tokens: int
    files: int


def training_data(sources: list[Source], tok, eos_id: int, vocab_size: int, seq_len: int, cache_dir: str | None,
                  text_field: str, val_fraction: float, seed: int, progress: bool) -> TrainingData:
    """Packed train/validation rows of the sources (see the module docstring for the mixing rule)."""
    trains, vals, files = [], [], 0
    for s in sources:
        if s.pretokenized:
            t, v, m = load_pretokenized(s.pretokenized, tok)
            if m["eos_token_id"] != eos_id:
                raise D.DataError(f"{s.pretokenized}: documents end with EOS id {m['eos_token_id']}, the run uses "
                                  f"{eos_id} (set --model.eos_token_id or re-tokenize)")
            if m["max_id"] >= vocab_size:
                raise D.DataError(f"{s.pretokenized}: token id {m['max_id']} >= model vocab_size={vocab_size}")
            files += len(m["shards"])
            note = split_note(s.pretokenized, m, val_fraction)
            if note:
                print(note, file=sys.stderr)
            if val_fraction == 0:  # no validation asked for: the shards' held-out documents are trained on too
                t, v = t + [a for a in v if len(a)], []
        else:
            try:
                t, v = D.tokenize_corpus(s.paths, tok, eos_id, cache_dir, text_field, val_fraction, seed, progress)
            except D.DataError as e:
                if str(e) != D.NO_DOCUMENT or len(sources) == 1:
                    raise
                raise D.DataError(f"data source {s.spec!r} holds no document (empty files, or every text null)") \
                    from None
            D.check_vocab(t, vocab_size, "training data")
            D.check_vocab(v, vocab_size, "validation data")
            t, v, files = [t], [v], files + len(s.paths)
        trains.append(t)
        vals.append(v)
    n_train = sum(len(a) for t in trains for a in t)
    n_val = sum(len(a) for v in vals for a in v)
    weights = [s.weight for s in sources]
    if len(sources) == 1 and sources[0].pretokenized is None:  # the plain path: one in-memory token array
        return TrainingData(D.pack(trains[0][0], seq_len), D.pack(vals[0][0], seq_len), n_train, n_val, files)
    if weights[0] is None:  # concatenation
        return TrainingData(PackedRows([a for t in trains for a in t], seq_len),
                            PackedRows([a for v in vals for a in v], seq_len), n_train, n_val, files)
    names = [s.spec for s in sources]
    rows = MixedRows([PackedRows(t, seq_len) for t in trains], weights, names=names)
    unused = [f"{n} (weight {w:g})" for n, w, c in zip(names, weights, rows.counts) if w > 0 and not c]
    if unused:  # its share of the epoch's rows rounds down to none: trained on never, without a word before
        print(f"warning: data source(s) {', '.join(unused)} get no row of the {len(rows):,} per epoch: the weight's "
              "share is below one row; raise it or drop the source", file=sys.stderr)
    # validation: a small source may hold out too few documents for one row; it is left out of validation only
    val_parts = [(PackedRows(v, seq_len), w, n) for v, w, n in zip(vals, weights, names)]
    short = [n for r, _, n in val_parts if not len(r)]
    if short and len(short) < len(val_parts):  # (none at all: the trainer's "no validation" warning, if asked for)
        print(f"warning: no validation row of {seq_len} tokens from {', '.join(short)}; validating on the other "
              "sources", file=sys.stderr)
    val_parts = [p for p in val_parts if len(p[0])]
    if not val_parts:
        return TrainingData(rows, np.zeros((0, seq_len), np.int32), n_train, n_val, files)
    val = MixedRows([p[0] for p in val_parts], [p[1] for p in val_parts], names=[p[2] for p in val_parts])
    val = TakeRows(val, np.random.default_rng(seed).permutation(len(val)))  # every source in the first batches
    return TrainingData(rows, val, n_train, n_val, files)


# ---- CLI -------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m doge_jax.data", description=(
        "Pre-tokenize a corpus into memory-mapped token shards for python -m doge_jax.train --data DIR. One shard "
        "per input file, written in parallel; re-running resumes (finished shards are skipped)."))
    ap.add_argument("--data", nargs="+", required=True, help="text/.jsonl/.parquet files, directories or globs")
    ap.add_argument("--tokenizer", help="tokenizer.json or HF tokenizer directory")
    ap.add_argument("--vocab-size", type=int, help="without --tokenizer: train a byte-level BPE of this size")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--text-field", default="text", help="jsonl field / parquet column (default: text)")
    ap.add_argument("--val-fraction", type=float, default=0.01,
                    help="fraction of documents held out for validation (default: 0.01)")
    ap.add_argument("--seed", type=int, default=233, help="seed of the validation split (default: 233, as "
                    "train.seed)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    bad = None  # a bad value: one error line, as doge_jax.train's (not argparse's usage block)
    if not 0.0 <= a.val_fraction < 1.0:  # as train.val_fraction (2 held out every document, -0.5 none)
        bad = f"--val-fraction {a.val_fraction}: must be in [0, 1)"
    elif not 0 <= a.seed < 2**32:  # as train.seed (a negative one was a traceback)
        bad = f"--seed {a.seed}: must be in [0, 2**32)"
    elif a.workers is not None and a.workers < 1:
        bad = f"--workers {a.workers}: must be >= 1"
    elif a.vocab_size is not None and a.vocab_size < D.MIN_BPE_VOCAB:
        bad = (f"--vocab-size {a.vocab_size}: a byte-level BPE needs at least {D.MIN_BPE_VOCAB} tokens (256 bytes + "
               f"{len(D.SPECIAL_TOKENS)} special tokens)")
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    try:
        m = pretokenize(a.data, a.tokenizer, a.out, a.text_field, a.val_fraction, a.seed, a.workers,
                        not a.no_progress, a.vocab_size)
    except D.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished shards are kept; the same command goes on from them", file=sys.stderr)
        return 130
    print(f"{a.out}: {len(m['shards'])} shards, {m['train_tokens']:,} train / {m['val_tokens']:,} val tokens "
          f"({m['dtype']})", file=sys.stderr)
    return 0
