"""Training data for doge_jax (design.md §4, spec §6.4): files -> tokenizer -> cached token array -> grain.

- `default_corpus()`: the embedded default corpus, the running interpreter's standard-library `.py` sources
  (non-test files, sorted), so a run needs no download.
- `resolve_paths`: files, directories and globs; a missing one is an error that names it.
- `load_tokenizer` / `train_bpe`: a given `tokenizer.json` or HF tokenizer directory, or a byte-level BPE trained
  on the corpus (special tokens <|begin_of_text|>=0, <|end_of_text|>=1, <|pad|>=2, as the published models).
- `tokenize_corpus`: documents -> one flat token array (EOS appended per document), held-out validation documents
  split off, cached on disk as .npy (memory-mapped on reload) keyed by the corpus and tokenizer.
- `pack`: "wrapped" packing (TRL `pack_dataset(strategy="wrapped")`): concatenate and cut into consecutive
  seq_len chunks. We pack the whole stream at once and drop the final partial chunk (fixed shapes), where TRL
  packs per 1000-example map batch and keeps a short last chunk per batch.
- `train_dataset`: grain MapDataset of packed rows, shuffled (per epoch), repeated and batched to one optimizer
  step [grad_accum, rows, seq_len], of which each host reads its own rows (the same global batches on any number
  of hosts); its iterator state is plain JSON (`get_state`/`set_state`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator

import numpy as np

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)  # a byte-level BPE holds every byte, plus the special tokens
_EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]")
# what a directory walk picks up (a .json file named explicitly is read as JSON Lines, as HF datasets write it)
_TEXT_EXT = (".txt", ".md", ".py", ".rst", ".jsonl", ".text", ".parquet")
_MANIFEST = "corpus.json"  # a pre-tokenized directory (doge_jax.corpora): never walked as text
_FIELD_HINT = "set train.text_field, or --text-field for python -m doge_jax.data"


NO_DOCUMENT = "the corpus holds no document"


class DataError(ValueError):
    """Bad data input (missing path, empty corpus, token ids out of range); the message names it."""


# ---- corpus ------------------------------------------------------------------------------------------------------
def default_corpus() -> list[str]:
    """The interpreter's stdlib `.py` sources without tests (test*/ directories, test_*.py, idlelib), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("test") and d not in
                             ("tests", "idlelib", "__pycache__", "site-packages", "dist-packages"))
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py") and not f.startswith("test")]
    return sorted(files)


_TORCH_CKPT = re.compile(r"checkpoint-\d+")


def _is_skipped_dir(d: str) -> bool:
    """Never documents: a pre-tokenized output (corpus.json), a doge_jax run (train_config.yaml
    next to checkpoints/), a doge_torch.train run (metrics.jsonl next to checkpoint-N/), a doge_torch /
    transformers Trainer checkpoint (trainer_state.json), an orbax checkpoint item (_CHECKPOINT_METADATA or
    commit_success.txt: a model saved by convert --to jax keeps one in params/)."""
    def has(name: str) -> bool:
        return os.path.isfile(os.path.join(d, name))

    if has(_MANIFEST) or has("trainer_state.json"):  # (corpus.json marks a pre-tokenized directory, as in corpora)
        return True
    if has("_CHECKPOINT_METADATA") or has("commit_success.txt"):
        return True
    if has("train_config.yaml") and os.path.isdir(os.path.join(d, "checkpoints")):
        return True
    if has("metrics.jsonl"):
        try:
            return any(_TORCH_CKPT.fullmatch(f) and os.path.isdir(os.path.join(d, f)) for f in os.listdir(d))
        except OSError:
            return False
    return False


_PACKED_EXT = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4", ".zip", ".tar", ".tgz", ".7z")


def resolve_paths(specs: list[str] | str, exclude: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Expand files, directories (text-like files below them) and globs, sorted and de-duplicated. Directory walks
    take text-like files outside hidden directories; walks and globs skip pre-tokenized outputs, training runs and
    checkpoints, and the directories in `exclude` (the run being trained: `--data .` must not read its own metrics
    and checkpoints) unless the path asked for lies inside one."""
    if isinstance(specs, str):
        specs = [specs]
    excluded = [os.path.abspath(os.path.expanduser(d)) + os.sep for d in exclude]
    out: list[str] = []
    for spec in specs:
        spec = os.path.expanduser(spec)
        start = _glob_root(spec) if glob.has_magic(spec) else os.path.abspath(spec)
        # an excluded directory that holds the asked-for path itself is not excluded (--out . --data corpus/)
        skip = tuple(e for e in excluded if not (start + os.sep).startswith(e) or start + os.sep == e)

        def kept(p: str, skip: tuple[str, ...] = skip) -> bool:
            return not (os.path.abspath(p) + os.sep).startswith(skip)

        if glob.has_magic(spec):
            hits = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p) and kept(p)
                          and not any(_is_skipped_dir(d) for d in _dirs_between(start, p)))
            if not hits:
                raise DataError(f"data path {spec!r}: the glob matches no file" + (" outside the run directory"
                                                                                   if skip else ""))
            out += hits
        elif os.path.isdir(spec):
            hits = []
            for dp, dirs, fs in os.walk(spec):
                # hidden directories (.git, .ipynb_checkpoints copies), pre-tokenized outputs and runs are not documents
                dirs[:] = [d for d in dirs if not d.startswith(".") and kept(os.path.join(dp, d))
                           and not _is_skipped_dir(os.path.join(dp, d))]
                hits += [os.path.join(dp, f) for f in fs if f.endswith(_TEXT_EXT) and kept(os.path.join(dp, f))]
            hits.sort()
            if not hits:
                raise DataError(f"data path {spec!r}: directory holds no text file ({', '.join(_TEXT_EXT)})"
                                + (" outside the run directory" if skip else ""))
            out += hits
        elif os.path.isfile(spec):
            out.append(spec)
        else:
            raise DataError(f"data path {spec!r} does not exist")
    packed = next((p for p in out if p.lower().endswith(_PACKED_EXT)), None)
    if packed is not None:  # (a named or globbed file is read as text: its compressed bytes became "text")
        raise DataError(f"data path {packed!r}: a compressed or archive file, which is not read; decompress it "
                        f"(.txt, .jsonl, .json and .parquet files are read)")
    binary = next((p for p in out if not p.lower().endswith(_TEXT_EXT + (".json",)) and _is_binary(p)), None)
    if binary is not None:  # (its bytes were tokenized as one text document)
        hint = {".npy": "; .npy token arrays are read by python -m doge_torch.train; for doge_jax.train pre-tokenize "
                        "the text with python -m doge_jax.data and pass its output directory"}.get(
            os.path.splitext(binary)[1], "")
        if binary.endswith((".train.bin", ".val.bin")):  # (the shard names python -m doge_jax.data writes)
            hint = "; a python -m doge_jax.data shard: pass its directory"
        raise DataError(f"data path {binary!r}: a binary file (NUL bytes), not text{hint}")
    return sorted(dict.fromkeys(os.path.abspath(p) for p in out))


def _is_binary(path: str) -> bool:
    """Whether a file that is not named as text holds NUL bytes in its first 8 KiB (git's test for binary)."""
    try:
        with open(path, "rb") as f:
            return b"\0" in f.read(8192)
    except OSError:
        return False  # (reading it later names the error)


def _glob_root(spec: str) -> str:
    """The directory a glob starts from: its leading components without wildcards."""
    parts = []
    for part in os.path.abspath(spec).split(os.sep):
        if glob.has_magic(part):
            break
        parts.append(part)
    return os.sep.join(parts) or os.sep


def _dirs_between(root: str, path: str) -> list[str]:
    """The directories strictly below `root` that hold `path` (a glob's own matches, not the user's tree above)."""
    rel = os.path.relpath(os.path.dirname(os.path.abspath(path)), root)
    if rel == "." or rel.startswith(".."):
        return []
    parts = rel.split(os.sep)
    return [os.path.join(root, *parts[:i + 1]) for i in range(len(parts))]


def iter_documents(paths: list[str], text_field: str = "text") -> Iterator[str]:
    """One document per text file; one per line (its `text_field`) of a .jsonl file; one per row (its `text_field`
    column) of a .parquet file, read a row group at a time."""
    for path in paths:
        if path.endswith(".parquet"):
            yield from _iter_parquet(path, text_field)
        elif path.endswith((".jsonl", ".json")):
            yield from _iter_jsonl(path, text_field)
        else:
            with open(path, "rb") as f:
                yield _text_of(path, f.read())


_WARNED: set = set()


def _text_of(path: str, raw: bytes) -> str:
    """A text file's bytes as text (UTF-8, undecodable bytes replaced); a warning, once per file, where they are not
    UTF-8 or hold NUL bytes: binary data named as text (a UTF-16 file, an executable called x.py) is trained on."""
    try:
        text, bad = raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") - raw.count("\ufffd".encode())
    nul = raw.count(b"\0")
    if (bad or nul) and path not in _WARNED:
        _WARNED.add(path)
        what = [f"{bad} byte sequence(s) that are not UTF-8 (replaced by U+FFFD)"] if bad else []
        what += [f"{nul} NUL byte(s)"] if nul else []
        print(f"warning: {path}: {' and '.join(what)}: binary data or another encoding? It is read as text",
              file=sys.stderr, flush=True)
    text = text[1:] if text.startswith("\ufeff") else text  # a UTF-8 byte-order mark is not text
    return text.replace("\r\n", "\n").replace("\r", "\n")  # (text mode's universal newlines, as before)


BIG_DOCUMENT = 16_000_000  # characters: a document this long takes gigabytes to tokenize (see warn_big_document)


def warn_big_document(path: str, text: str) -> None:
    """Say once per file when one document is huge: the tokenizer keeps ~150-260 bytes per character while it
    encodes a document (measured: a 7.7 MB one-line text file peaked at 2.0 GB), so a 100 MB book dump as one
    document can run out of memory (per worker of python -m doge_jax.data)."""
    if len(text) >= BIG_DOCUMENT and f"{path}#big" not in _WARNED:
        _WARNED.add(f"{path}#big")
        print(f"warning: {path}: one document of {len(text) / 1e6:.0f}M characters; tokenizing it needs roughly "
              f"{len(text) * 200 / 2**30:.0f} GiB of memory (about 200 bytes per character); split big text files "
              "into several files or .jsonl rows (one document each)", file=sys.stderr, flush=True)


def _warn_once(path: str, where: str, what: str) -> None:
    if (path, what) not in _WARNED:  # (once per file and kind: bad bytes do not hide a surrogate after them)
        _WARNED.add((path, what))
        print(f"warning: {where}: {what} (said once per file)", file=sys.stderr, flush=True)


def _no_lone_surrogates(text: str, path: str, where: str) -> str:
    """`text` with lone UTF-16 surrogates (JSON escapes such as \\ud800 without their pair, common in scraped
    data) replaced by U+FFFD, with a warning: the tokenizer cannot take them (a TypeError traceback before)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        _warn_once(path, where, "lone UTF-16 surrogate escape(s) (\\ud800-\\udfff without their pair) replaced by "
                   "U+FFFD")
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _iter_jsonl(path: str, text_field: str) -> Iterator[str]:
    """The `text_field` of each line's JSON object; a null text is skipped (as in parquet); anything else that is
    not a string, and lines that are not JSON objects, are errors naming the file and line."""
    with open(path, "rb") as f:
        # lines end at \n, \r\n or a lone \r (text mode's universal newlines, as read before)
        for n, raw in enumerate((part for chunk in f for part in chunk.splitlines()), 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (json.loads refuses it)
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                _warn_once(path, f"{path}:{n}", "bytes that are not UTF-8, replaced by U+FFFD")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{n}: not a JSON line ({e}); JSON Lines need one object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
            if text_field not in row:
                raise DataError(f"{path}:{n}: no field {text_field!r} ({_FIELD_HINT})")
            text = row[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: field {text_field!r} is {type(text).__name__}, not text")
            yield _no_lone_surrogates(text, path, f"{path}:{n}")


def _iter_parquet(path: str, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if text_field not in f.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(f.schema_arrow.names[:10])}; "
                        f"{_FIELD_HINT})")
    for i in range(f.num_row_groups):
        for text in f.read_row_group(i, columns=[text_field]).column(0).to_pylist():
            if text is None:
                continue
            if isinstance(text, bytes):  # a binary column of UTF-8 text
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError:
                    text = text.decode("utf-8", errors="replace")
                    _warn_once(path, path, f"column {text_field!r}: bytes that are not UTF-8, replaced by U+FFFD")
            if not isinstance(text, str):
                raise DataError(f"{path}: column {text_field!r} holds {type(text).__name__}, not text")
            yield text


def corpus_fingerprint(paths: list[str], *extra: str) -> str:
    """A cache key of the files (path, size, mtime, and inode/ctime: a file replaced with its mtime kept, as
    `cp -p`/`rsync -t` do, is new) and of `extra` (separated, so no two lists of strings run together)."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}\n".encode())
    for e in extra:
        h.update(e.encode() + b"\0")
    return h.hexdigest()[:20]


# ---- tokenizer ---------------------------------------------------------------------------------------------------
def train_bpe(paths: list[str], vocab_size: int, text_field: str = "text"):
    """A byte-level BPE (tokenizers) trained on the corpus, with SPECIAL_TOKENS at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB:  # (tokenizers would silently make a bigger one)
        raise DataError(f"a byte-level BPE of {vocab_size} tokens: it needs at least {MIN_BPE_VOCAB} (256 bytes + "
                        f"{len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(iter_documents(paths, text_field), trainer)
    if tok.get_vocab_size() < vocab_size:
        print(f"note: the corpus gave a BPE of {tok.get_vocab_size()} tokens, fewer than the {vocab_size} asked for "
              "(no more merges occur in it)", file=sys.stderr)
    return tok


def load_tokenizer(path: str):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or an HF tokenizer directory."""
    from tokenizers import Tokenizer

    if not os.path.exists(path):
        raise DataError(f"tokenizer {path!r} does not exist")
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise DataError(f"tokenizer {path!r}: a directory without tokenizer.json (only the fast-tokenizer file "
                        "format is read)")
    try:
        return Tokenizer.from_file(file)
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type
        raise DataError(f"tokenizer {file!r}: not a readable tokenizer.json ({e})") from None


_OWN_TOKENIZER_KEYS = ("tokenizer_class", "model_max_length", "bos_token", "eos_token", "pad_token")


def tokenizer_extras(src: str | None) -> dict:
    """What a saved copy of the tokenizer from `src` (an HF tokenizer directory, or the directory of a tokenizer.json)
    keeps besides the tokens: its tokenizer_config.json's other fields (chat_template, padding_side, ...) and a
    chat_template.jinja as the chat_template field (a chat model lost its template going through a trainer)."""
    if not src:
        return {}
    d = src if os.path.isdir(src) else os.path.dirname(src)
    try:
        with open(os.path.join(d, "tokenizer_config.json")) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        raw = {}
    extras = {k: v for k, v in raw.items() if k not in _OWN_TOKENIZER_KEYS} if isinstance(raw, dict) else {}
    jinja = os.path.join(d, "chat_template.jinja")
    if "chat_template" not in extras and os.path.isfile(jinja):
        with open(jinja) as f:
            extras["chat_template"] = f.read()
    return extras


def save_tokenizer(tok, cfg, out_dir: str, extras: dict | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (naming the special tokens of `cfg`, plus `extras`: tokenizer_extras of
    where the tokenizer came from) in `out_dir`, so transformers' AutoTokenizer loads it. Readers (another host of
    a run) may be reading them: each file is replaced whole, and tokenizer_config.json (read once tokenizer.json
    exists) is written first."""
    from .hf_io import atomic_file

    names = {k: tok.id_to_token(getattr(cfg, f"{k}_token_id")) for k in ("bos", "pad")
             if getattr(cfg, f"{k}_token_id") is not None}
    if cfg.eos_token_ids:
        names["eos"] = tok.id_to_token(cfg.eos_token_ids[0])
    with atomic_file(os.path.join(out_dir, "tokenizer_config.json")) as tmp, open(tmp, "w") as f:
        json.dump({**(extras or {}), "tokenizer_class": "PreTrainedTokenizerFast",
                   "model_max_length": cfg.max_position_embeddings,
                   **{f"{k}_token": v for k, v in names.items() if v is not None}}, f, indent=2)
    with atomic_file(os.path.join(out_dir, "tokenizer.json")) as tmp:
        try:
            tok.save(tmp)
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises a plain Exception ("os error 28")
            raise OSError(f"writing {os.path.join(out_dir, 'tokenizer.json')} failed: {e}") from None


def special_ids(tok, tokenizer_dir: str | None = None) -> dict[str, int | None]:
    """bos/eos/pad ids of a tokenizer: from tokenizer_config.json / special_tokens_map.json in `tokenizer_dir` (or
    next to it, a tokenizer.json file) if present, else by the usual token names."""
    names: dict[str, str] = {}
    if tokenizer_dir and not os.path.isdir(tokenizer_dir):  # a tokenizer.json file: the files next to it
        tokenizer_dir = os.path.dirname(os.path.abspath(tokenizer_dir))
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        p = os.path.join(tokenizer_dir, fname) if tokenizer_dir else None
        if p and os.path.isfile(p):
            with open(p) as f:
                d = json.load(f)
            for k in ("bos", "eos", "pad"):
                v = d.get(f"{k}_token")
                v = v.get("content") if isinstance(v, dict) else v
                if isinstance(v, str):
                    names.setdefault(k, v)
    out: dict[str, int | None] = {}
    for k, cands in (("bos", _BOS_NAMES), ("eos", _EOS_NAMES), ("pad", _PAD_NAMES)):
        ids = [tok.token_to_id(n) for n in ([names[k]] if k in names else []) + list(cands)]
        out[k] = next((i for i in ids if i is not None), None)
    return out


def with_special_ids(cfg, tok, tokenizer_dir: str | None = None):
    """(cfg with its unset bos/eos/pad ids taken from the tokenizer, warnings): a config's own ids win, with a
    warning where the tokenizer's token of that name has another id."""
    ids = special_ids(tok, tokenizer_dir)
    warnings = []
    for k in ("bos", "eos", "pad"):
        mine = getattr(cfg, f"{k}_token_id")
        if mine is not None and ids[k] is not None and ids[k] not in (mine if isinstance(mine, tuple) else (mine,)):
            warnings.append(f"model.{k}_token_id={mine}, but the tokenizer's {k} token is id {ids[k]} "
                            f"({tok.id_to_token(ids[k])!r})")
    fill = {f"{k}_token_id": ids[k] for k in ("bos", "eos", "pad")
            if getattr(cfg, f"{k}_token_id") is None and ids[k] is not None}
    return cfg.replace(**fill), warnings


# ---- tokenization + cache ------------------------------------------------------------------------------------------
def document_key(text: str, seed: int) -> int:
    """A seeded 64-bit hash of a document's text, which decides its side of the validation split: a document keeps
    its side whatever other documents come or go (a split by position reshuffled when a file was added, moving
    held-out documents into training on resume), and identical documents share a side."""
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little")


def held_out(key: int, val_fraction: float) -> bool:
    """A document's validation coin from its document_key: below val_fraction of the 64-bit range."""
    return key < int(val_fraction * 2.0**64)


def split_documents(keys: np.ndarray, val_fraction: float) -> np.ndarray:
    """Bool [n_docs]: True for held-out validation documents, those whose document_key is held_out (about
    val_fraction of them; a document's side never depends on the others, and identical documents share it). At
    least one (those with the smallest key) while that is within 10x the asked fraction (1 of 10 documents at
    val_fraction 0.01), never all (those with the largest key train). Fewer documents hold out none."""
    keys = np.asarray(keys, np.uint64)
    n_docs = len(keys)
    if val_fraction <= 0 or n_docs < 2:
        return np.zeros(n_docs, bool)
    is_val = keys < np.uint64(min(int(val_fraction * 2.0**64), 2**64 - 1))
    if not is_val.any() and n_docs * val_fraction * 10 >= 1:
        is_val = keys == keys.min()
    if is_val.all():
        is_val = keys != keys.max()
    return is_val


def tokenize_corpus(paths: list[str], tok, eos_id: int, cache_dir: str | None, text_field: str = "text",
                    val_fraction: float = 0.01, seed: int = 233, progress: bool = True,
                    batch_docs: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(train tokens, validation tokens): flat arrays of all documents, EOS appended to each (unless it already
    ends with EOS), validation documents held out. Cached under cache_dir (keyed by files, tokenizer, split)."""
    key = corpus_fingerprint(paths, tok.to_str(), text_field, str(eos_id), f"{val_fraction}:{seed}",
                             "split by hash: threshold")
    cdir = os.path.join(os.path.expanduser(cache_dir), key) if cache_dir else None
    if cdir and os.path.isfile(os.path.join(cdir, "done")):
        return (np.load(os.path.join(cdir, "train.npy"), mmap_mode="r"),
                np.load(os.path.join(cdir, "val.npy"), mmap_mode="r"))
    # (the EOS id is the model config's: a large model vocabulary's id with a small tokenizer overflowed uint16)
    dtype = np.uint16 if max(tok.get_vocab_size(), eos_id + 1) <= 65536 else np.uint32
    docs: list[np.ndarray] = []
    keys: list[int] = []
    bar = _progress(total=len(paths), desc="tokenizing", unit="file", enabled=progress)
    batch: list[str] = []

    def flush():
        for text, enc in zip(batch, tok.encode_batch(batch)):
            ids = enc.ids
            if not ids or ids[-1] != eos_id:
                ids = ids + [eos_id]
            docs.append(np.asarray(ids, dtype))
            keys.append(document_key(text, seed))
        batch.clear()

    for path in paths:
        for text in iter_documents([path], text_field):
            warn_big_document(path, text)
            batch.append(text)
            if len(batch) >= batch_docs:
                flush()
        bar.update(1)
    flush()
    bar.close()
    if not docs:
        raise DataError(NO_DOCUMENT)
    is_val = split_documents(np.asarray(keys, np.uint64), val_fraction)
    if val_fraction > 0 and not is_val.any():
        print(f"warning: no validation documents: {len(docs)} document(s) x val_fraction {val_fraction} is too few "
              "to hold one out (raise val_fraction or add documents)", file=sys.stderr)
    empty = np.zeros(0, dtype)
    train = np.concatenate([d for d, v in zip(docs, is_val) if not v] or [empty])
    val = np.concatenate([d for d, v in zip(docs, is_val) if v] or [empty])
    if cdir:
        from .hf_io import temp_name

        tmp = temp_name(cdir)
        os.makedirs(tmp, exist_ok=True)
        np.save(os.path.join(tmp, "train.npy"), train)
        np.save(os.path.join(tmp, "val.npy"), val)
        open(os.path.join(tmp, "done"), "w").close()
        try:
            os.replace(tmp, cdir)
        except OSError:  # another process finished first: keep theirs
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return train, val


def check_vocab(tokens: np.ndarray, vocab_size: int, what: str) -> None:
    """Token ids must be < vocab_size: JAX would clamp the embedding gather silently."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise DataError(f"{what}: token id {int(tokens.max())} >= model vocab_size={vocab_size} (use the model's "
                        f"tokenizer or one of at most {vocab_size} tokens; a new model can take a larger "
                        "--model.vocab_size)")


# ---- packing + grain -----------------------------------------------------------------------------------------------
def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Wrapped packing: consecutive seq_len chunks [n, seq_len] of the stream; the last partial chunk dropped."""
    n = len(tokens) // seq_len
    return np.asarray(tokens[: n * seq_len]).reshape(n, seq_len)


def train_dataset(rows: np.ndarray, grad_accum: int, rows_per_micro: int, seed: int,
                  shard_index: int = 0, shard_count: int = 1):
    """grain IterDataset yielding this host's share of one optimizer step: int32 ids
    [grad_accum, rows_per_micro // shard_count, seq_len].

    Every host draws the same global batches (rows reshuffled every epoch; grain derives each epoch's permutation
    from the seed) and reads only its slice of each micro-batch's rows (host i: the i-th of `shard_count` equal
    parts, in process order as `doge_jax.sharding.shard_batch` assembles them). So a run sees the same data on any
    number of hosts, and its iterator state (a step count) resumes on any number of hosts."""
    import grain

    if rows_per_micro % shard_count:
        raise DataError(f"{rows_per_micro} rows per micro-batch do not split over {shard_count} hosts")
    per_step = grad_accum * rows_per_micro
    if len(rows) < per_step:
        raise DataError(f"training data has {len(rows)} packed rows, fewer than one step needs ({per_step}); "
                        "use more data or a smaller batch/seq_len")
    share = rows_per_micro // shard_count
    lo = shard_index * share

    def read(idx: np.ndarray) -> np.ndarray:  # this host's rows of one step's global row indices
        mine = idx.reshape(grad_accum, rows_per_micro)[:, lo:lo + share]
        return np.stack([np.asarray(rows[int(i)], np.int32) for i in mine.reshape(-1)]).reshape(grad_accum, share, -1)

    ds = grain.MapDataset.range(len(rows)).shuffle(seed=seed).repeat(None)  # a new permutation per epoch
    return ds.batch(per_step, drop_remainder=True).map(read).to_iter_dataset()


def val_batches(rows: np.ndarray, rows_per_batch: int, max_batches: int) -> list[np.ndarray]:
    """The first validation rows as fixed int32 batches [rows_per_batch, seq_len] (same every evaluation)."""
    n = min(len(rows) // rows_per_batch, max_batches)
    return [np.asarray(rows[i * rows_per_batch:(i + 1) * rows_per_batch], np.int32) for i in range(n)]


def _progress(total: int, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


if __name__ == "__main__":  # python -m doge_jax.data: pre-tokenize a corpus (doge_jax.corpora)
    import sys

    from .corpora import main

    sys.exit(main())
