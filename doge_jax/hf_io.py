"""Reading and writing Hugging Face checkpoint directories, for both packages and the converters.

Framework-neutral: tensors are numpy arrays (`framework="np"`, bfloat16 via ml_dtypes) or torch tensors
(`framework="pt"`). Writes are atomic: everything goes to a temporary sibling directory that is renamed into
place at the end, so a failed or killed save leaves no partial output (issue 2, item 6).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no stale-directory cleanup
    fcntl = None

from .config import GENERATION_DEFAULTS, SPECIAL_IDS, ConfigError, DogeConfig, GenerationConfig, read_json
from .hf_names import CheckpointError, detect_variant, rename_legacy

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
DEFAULT_SHARD_SIZE = "5GB"
# Files other than weights that a checkpoint directory may carry and that we copy along.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count (> 0) -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ValueError(f"bad size {size!r}: use e.g. 5GB, 500MB or a byte count")
        unit = (m.group(2) or "B").upper()
        mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        n = int(float(m.group(1)) * mult)
    if n < 1:
        raise ValueError(f"bad size {size!r}: a shard must hold at least one byte (use e.g. 5GB or 500MB)")
    return n


def _owner() -> str:
    """host.pid, the part of a temporary directory's name that says who made it."""
    return f"{socket.gethostname().replace(os.sep, '_')}.{os.getpid()}"


def temp_name(path: str | os.PathLike) -> str:
    """A temporary sibling of `path` no other process uses, also on a filesystem shared by hosts."""
    return f"{os.fspath(path)}.tmp-{_owner()}"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path to write `path`'s new content to, renamed over `path` when the block succeeds: readers (the
    other hosts of a run) see the old file or the whole new one, never half of it."""
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _lock(path: str) -> int | None:
    """Hold an exclusive flock on the directory `path` for as long as the returned descriptor is open. The kernel
    drops it when the process dies, even by SIGKILL, and it is seen across PID namespaces (containers): how a
    writer tells a live temporary directory from a stale one. None where there is no flock (Windows)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


@contextlib.contextmanager
def run_lock(path: str) -> Iterator[None]:
    """Hold an exclusive flock on the run directory `path` for the block: a second trainer on the same run is
    refused at once (ConfigError; two would delete each other's checkpoint writes and interleave metrics.jsonl).
    No lock where flock is not available (Windows, some network filesystems)."""
    fd = None
    if fcntl is not None:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"{path} is in use: another trainer holds its lock (it is training this run now); "
                              "wait for it to end, or use another run directory") from None
        except OSError:
            os.close(fd)
            fd = None
    try:
        yield
    finally:
        _unlock(fd)


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _held(path: str) -> bool:
    """Whether a live process holds `path`'s lock (probe: take it without waiting, then let go)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True  # gone or unreadable: not ours to remove
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(parent: str, base: str) -> None:
    """Clear what killed writers (SIGKILL, power loss) left next to `base`: temporary directories made on this host
    whose writer is gone (its pid is not alive here and nobody holds the directory's lock). A writer killed between
    its two renames left `base` missing and the previous output in `.old-*/x`: that output is put back. Directories
    of live writers, or of other hosts on a shared disk, stay."""
    if fcntl is None:
        return
    host = _owner().rsplit(".", 1)[0]
    path = os.path.join(parent, base)
    for name in sorted(os.listdir(parent)):
        m = re.fullmatch(rf"\.{re.escape(base)}\.(tmp|old)-(.+)\.(\d+)-[^-]*", name)
        if not m or m.group(2) != host:
            continue
        full = os.path.join(parent, name)
        if _pid_alive(int(m.group(3))) or _held(full):
            continue
        if m.group(1) == "old" and not os.path.lexists(path) and os.path.isdir(os.path.join(full, "x")):
            os.rename(os.path.join(full, "x"), path)
        shutil.rmtree(full, ignore_errors=True)


# Files a model save produces: when a save replaces a directory, these are the ones it does not carry over from
# the old directory (stale shards of another shard count would confuse loaders); everything else is kept.
MODEL_FILES = re.compile(r"(config\.json|generation_config\.json|params|model(-\d+-of-\d+)?\.safetensors|"
                         r"model\.safetensors\.index\.json|pytorch_model(-\d+-of-\d+)?\.bin|"
                         r"pytorch_model\.bin\.index\.json)")


def _not_model_file(name: str) -> bool:
    """Entries a model save carries over from the directory it replaces: all but the model's own files."""
    return MODEL_FILES.fullmatch(name) is None


def run_holding(path: str | os.PathLike) -> str | None:
    """The doge_jax training run whose checkpoints/ is `path` or holds it, else None. A run: checkpoints/ beside a
    config.json, with train_config.yaml there or step directories (digits) in it (a project folder's own
    checkpoints/my-model is not one)."""
    p = pathlib.Path(os.path.realpath(path))
    for below, anc in zip((None, p, *p.parents), (p, *p.parents)):
        if anc.name != "checkpoints" or not (anc.parent / "config.json").is_file():
            continue
        steps = anc.is_dir() and any(n.isdigit() for n in os.listdir(anc))
        if (anc.parent / "train_config.yaml").is_file() or steps or (below is not None and below.name.isdigit()):
            return str(anc.parent)
    return None


@contextlib.contextmanager
def model_output_dir(path: str | os.PathLike, overwrite: bool = True, replace_side_files: bool = False
                     ) -> Iterator[str]:
    """atomic_output_dir for model saves (HF or orbax), as transformers' save_pretrained behaves: the directory's
    other files (tokenizer, README) stay, its old weight files go; replace_side_files: its tokenizer files and
    generation_config.json go too (convert: they belong to the old model). A training run directory is refused: its
    checkpoints/ would win over the saved weights in from_pretrained (and replacing it would delete the run)."""
    if os.path.isdir(os.path.join(os.fspath(path), "checkpoints")):
        raise FileExistsError(f"{os.fspath(path)} holds a training run (checkpoints/); save the model to another "
                              "directory (a run's step converts with python -m convert RUN DST --to hf)")
    run = run_holding(path)
    if run is not None:
        raise FileExistsError(f"{os.fspath(path)} is inside the training run's checkpoints/ ({run}): a model saved "
                              "there would replace one of its steps or pass for one; save it to another directory")
    keep = (lambda name: _not_model_file(name) and name not in SIDE_FILES) if replace_side_files else _not_model_file
    with atomic_output_dir(path, overwrite=overwrite, keep=keep) as tmp:
        yield tmp


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: str, new: str, keep) -> None:
    """Hard-link (or copy) the entries of `old` that `keep` accepts and the writer did not produce into `new`."""
    for name in os.listdir(old):
        if not keep(name) or os.path.lexists(os.path.join(new, name)):
            continue
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _not_a_dir(path: str) -> str:
    if os.path.islink(path) and not os.path.exists(path):
        return f"a broken symbolic link (to {os.readlink(path)}), not a directory"
    return "a file, not a directory"


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = True, keep=None) -> Iterator[str]:
    """Yield a temporary directory that replaces `path` only if the block finishes without an exception.

    overwrite=False: `path` must not exist, also at the end (a writer that finished meanwhile is not replaced).
    keep: a predicate on the names in an existing `path`; the entries it accepts and the block did not write are
    carried into the new directory (hard links), as transformers' save_pretrained leaves a tokenizer in place.
    A `path` that is a symbolic link to a directory stays a link: the directory it points to is replaced."""
    path = os.path.abspath(os.fspath(path))
    if os.path.islink(path) and os.path.isdir(path):  # replace the linked directory, not the link (which would
        path = os.path.realpath(path)  # become a real folder and leave the old weights behind it)
    parent = os.path.dirname(path)
    try:
        above = parent
        while not os.path.lexists(above) and os.path.dirname(above) != above:
            above = os.path.dirname(above)
        if os.path.lexists(above) and not os.path.isdir(above):  # (makedirs says "File exists")
            raise NotADirectoryError(f"{path}: cannot write there ({above} is {_not_a_dir(above)})")
        os.makedirs(parent, exist_ok=True)
        remove_stale(parent, os.path.basename(path))  # first: it may put a killed writer's previous output back
        if os.path.lexists(path) and not os.path.isdir(path):  # (transformers refuses a file too)
            raise NotADirectoryError(f"{path} is {_not_a_dir(path)}; nothing replaced (a model is a directory)")
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (or --overwrite) to replace it")
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-{_owner()}-", dir=parent)
    except OSError as e:
        if e.filename is None:  # ours, above: already names the path
            raise
        err = type(e)(f"{path}: cannot write there ({e.strerror})")  # (no "[Errno N]" in front of the message)
        err.errno = e.errno
        raise err from None
    tmp_lock = _lock(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the output should get the usual directory mode
    try:
        yield tmp
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"{path} appeared while writing it (another writer?); nothing replaced")
        if os.path.lexists(path):
            if keep is not None and os.path.isdir(path):
                _carry_over(path, tmp, keep)
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-{_owner()}-", dir=parent)
            old_lock = _lock(old)
            try:
                os.rename(path, os.path.join(old, "x"))
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(os.path.join(old, "x"), path)  # the previous output goes back
                    raise
                shutil.rmtree(old, ignore_errors=True)
            finally:
                _unlock(old_lock)
        else:
            try:
                os.rename(tmp, path)
            except OSError:  # a directory that appeared since the check above (rename keeps non-empty ones)
                if os.path.isdir(path) and not overwrite:
                    raise FileExistsError(f"{path} appeared while writing it (another writer?); nothing replaced"
                                          ) from None
                raise
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and path not in str(e):  # a writer's "[Errno 28] No space left on device"
            why = e.strerror if e.errno is not None and e.strerror else str(e)
            named = type(e)(f"writing {path} failed: {why}")  # (no "[Errno N]" in front of the message)
            named.errno = e.errno
            raise named from e
        raise
    finally:
        _unlock(tmp_lock)


def write_safetensors(out_dir: str, tensors: dict, framework: str, max_shard_size: int | str = DEFAULT_SHARD_SIZE
                      ) -> list[str]:
    """Write `tensors` (name -> array) as model.safetensors, or as shards plus an index above max_shard_size."""
    if framework == "pt":
        from safetensors.torch import save_file
    else:
        from safetensors.numpy import save_file
    limit = parse_size(max_shard_size)
    shards: list[dict] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = int(t.nbytes)
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(_contiguous(shards[0], framework), os.path.join(out_dir, SAFE_SINGLE), metadata=meta)
        return [SAFE_SINGLE]
    files, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(_contiguous(shard, framework), os.path.join(out_dir, fname), metadata=meta)
        files.append(fname)
        for name, t in shard.items():
            weight_map[name] = fname
            total += int(t.nbytes)
    with open(os.path.join(out_dir, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return files + [SAFE_INDEX]


def _contiguous(shard: dict, framework: str) -> dict:
    if framework == "pt":
        return {k: v.detach().contiguous() for k, v in shard.items()}
    import numpy as np

    return {k: np.ascontiguousarray(v) for k, v in shard.items()}


def _index_shards(path: str, index: str) -> list[str]:
    try:
        with open(os.path.join(path, index)) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}/{index}: unreadable index ({e})") from None
    missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise CheckpointError(f"{path}: shards listed in the index are missing: {', '.join(missing)}")
    return [os.path.join(path, n) for n in names]


def hub_hint(path: str) -> str:
    """A hint for a missing path that looks like a Hub id (ORG/NAME): only local directories are read."""
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(path)) and not os.path.exists(str(path).split("/")[0]):
        return (f" (a Hugging Face Hub id? Only local directories are read, nothing is downloaded: fetch it first, "
                f"e.g. `hf download {path} --local-dir DIR`)")
    return ""


def weight_files(path: str) -> list[str]:
    """The weight files of an HF directory, looked for in transformers' order: model.safetensors, the shards of
    model.safetensors.index.json, pytorch_model.bin, the shards of pytorch_model.bin.index.json."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory{hub_hint(path)}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: a file; pass the model directory (config.json and weights) that holds it")
    if os.path.isfile(os.path.join(path, SAFE_SINGLE)):
        return [os.path.join(path, SAFE_SINGLE)]
    if os.path.isfile(os.path.join(path, SAFE_INDEX)):
        return _index_shards(path, SAFE_INDEX)
    if os.path.isfile(os.path.join(path, TORCH_BIN)):
        return [os.path.join(path, TORCH_BIN)]
    if os.path.isfile(os.path.join(path, TORCH_INDEX)):
        return _index_shards(path, TORCH_INDEX)
    orbax = any(os.path.isdir(os.path.join(path, d)) for d in ("checkpoints", "params"))
    hint = (f"; it is a doge_jax (orbax) checkpoint: convert it first (python -m convert {path} OUT --to hf)"
            if orbax else torch_run_hint(path) or _orbax_steps_hint(path))
    raise CheckpointError(f"{path}: no {SAFE_SINGLE}, {SAFE_INDEX}, {TORCH_BIN} or {TORCH_INDEX} found{hint}")


def _orbax_steps_hint(path: str) -> str:
    """For a doge_jax run's checkpoints/ folder (steps as numbered directories): what to pass instead; else ''."""
    steps = sorted(int(n) for n in os.listdir(path) if n.isdigit() and os.path.isdir(os.path.join(path, n, "params")))
    if os.path.basename(path) != "checkpoints" or not steps:
        return ""
    return (f"; it is a doge_jax.train run's checkpoints/ folder: pass the run, {os.path.dirname(path)}, or one "
            f"step, {os.path.join(path, str(steps[-1]))} (doge_torch: convert it first)")


def torch_run_hint(path: str) -> str:
    """'; it is a doge_torch.train run directory: pass ...' naming its model directories, for a directory that
    holds OUT/final or OUT/checkpoint-N; else ''."""
    if not os.path.isdir(path):
        return ""
    steps = sorted((int(m.group(1)), n) for n in os.listdir(path)
                   if (m := re.fullmatch(r"checkpoint-(\d+)", n)) and os.path.isdir(os.path.join(path, n)))
    final = os.path.isdir(os.path.join(path, "final"))
    if not steps and not final:
        return ""
    names = (["final/"] if final else []) + ([f"{steps[-1][1]}/ (the newest checkpoint)"] if steps else [])
    return f"; it is a doge_torch.train run directory: pass one of its model directories, {' or '.join(names)}"


def iter_tensors(files: list[str], framework: str = "np") -> Iterator[tuple[str, object]]:
    """Yield (name, tensor) one at a time (streaming); corrupt files give a CheckpointError naming the file."""
    from safetensors import safe_open

    for fname in files:
        if fname.endswith(".bin") or fname.endswith(".pt"):
            yield from iter_torch_file(fname, framework)
            continue
        try:
            with safe_open(fname, framework=framework) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises SafetensorError / OSError on truncated or bad headers
            raise CheckpointError(f"{fname}: corrupt or truncated safetensors file ({e})") from None


def iter_torch_file(fname: str, framework: str = "np", only: set[str] | None = None) -> Iterator[tuple[str, object]]:
    """(name, tensor) of a PyTorch state-dict file, memory-mapped and released one tensor at a time; numpy arrays
    (bfloat16 bit-exact) for framework "np", torch tensors for "pt"."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{fname}: reading a PyTorch .bin/.pt file needs torch installed") from None
    try:
        import zipfile

        # the legacy (pre-1.6, _use_new_zipfile_serialization=False) format cannot be memory-mapped: read it whole
        sd = torch.load(fname, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(fname))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{fname}: not a readable PyTorch state dict ({type(e).__name__}: {first})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{fname}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    bad = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        hint = " (a training checkpoint? save its model's state_dict() alone)" if isinstance(sd[bad], dict) else ""
        raise CheckpointError(f"{fname}: expected a state dict (name -> tensor), but {bad!r} holds "
                              f"{type(sd[bad]).__name__}{hint}")
    for name in list(sd):
        t = sd.pop(name)
        if only is None or name in only:  # (`only`: the others are never converted)
            yield name, (t if framework == "pt" else torch_to_numpy(t))


def read_named(files: list[str], keys: set[str], framework: str = "np") -> dict[str, object]:
    """The tensors `keys` (file names) of a checkpoint's files, reading only those from safetensors files."""
    from safetensors import safe_open

    out: dict[str, object] = {}
    for fname in files:
        if fname.endswith((".bin", ".pt")):
            out.update(iter_torch_file(fname, framework, only=keys))
            continue
        try:
            with safe_open(fname, framework=framework) as f:
                out.update((k, f.get_tensor(k)) for k in keys & set(f.keys()))
        except Exception as e:
            raise CheckpointError(f"{fname}: corrupt or truncated safetensors file ({e})") from None
    return out


def check_tied_head(config: DogeConfig, head, embed, where: str) -> None:
    """A config that ties the head to the embedding (tie_word_embeddings) over weights whose lm_head.weight holds
    other values is refused: dropping that head silently changes every logit (transformers keeps it, untied)."""
    if not config.tie_word_embeddings or head is None or embed is None:
        return
    if tuple(head.shape) == tuple(embed.shape) and _equal_rows(head, embed):
        return
    raise CheckpointError(f"{where}: lm_head.weight differs from model.embed_tokens.weight, but the config ties them "
                          "(tie_word_embeddings: true), which would drop that head: set tie_word_embeddings to false "
                          "in config.json to keep it")


def _equal_rows(a, b, rows: int = 4096) -> bool:
    """Equal values (torch or numpy, any float dtypes), compared a block of rows at a time: a bf16 [65536, 2048]
    table pair is not copied to float32 whole."""
    for i in range(0, a.shape[0], rows):
        x, y = a[i:i + rows], b[i:i + rows]
        if hasattr(x, "float"):  # torch
            same = _torch_equal(x, y)
        else:
            same = bool(np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32)))
        if not same:
            return False
    return True


def _torch_equal(x, y) -> bool:
    return bool(x.equal(y)) if x.dtype == y.dtype else bool(x.float().equal(y.float()))


def check_tied_head_files(config: DogeConfig, files: list[str], keys, legacy: bool, where: str) -> None:
    """check_tied_head on a checkpoint's files (`keys`: the tensor names in them), reading just the two tensors."""
    if not config.tie_word_embeddings:
        return
    names = {k: (rename_legacy(k) if legacy else k) for k in keys}
    wanted = {k for k, n in names.items() if n in ("lm_head.weight", "model.embed_tokens.weight")}
    if not any(names[k] == "lm_head.weight" for k in wanted):
        return
    got = {names[k]: t for k, t in read_named(files, wanted).items()}
    check_tied_head(config, got.get("lm_head.weight"), got.get("model.embed_tokens.weight"), where)


def is_program_error(error: BaseException) -> bool:
    """An exception that means a bug, not a failed read or write (those pass through the I/O error wrapping)."""
    return isinstance(error, TypeError | AttributeError | NameError | KeyError | IndexError | AssertionError)


def widest_float(dtypes):
    """The one dtype that holds every value of these float dtypes exactly: the dtype itself when they agree,
    float64 with a float64 among them, else float32 (bfloat16 and float16 values are exact in float32)."""
    import numpy as np

    kinds = {np.dtype(d) for d in dtypes}
    if len(kinds) == 1:
        return kinds.pop()
    return np.dtype(np.float64) if np.dtype(np.float64) in kinds else np.dtype(np.float32)


def stack_layer(arrays: dict, key, n_layers: int, layer: int, t) -> None:
    """Put layer `layer` of a per-layer tensor into the stacked [n_layers, ...] array `arrays[key]` (allocated on
    the first layer seen), widening it when the layers' dtypes differ, so that no layer's values are rounded."""
    import numpy as np

    a = arrays.get(key)
    if a is None:
        arrays[key] = a = np.empty((n_layers, *t.shape), t.dtype)
    elif t.dtype != a.dtype:
        wide = widest_float([a.dtype, t.dtype])
        if wide != a.dtype:
            arrays[key] = a = a.astype(wide)
        t = t.astype(wide)
    a[layer] = t


def torch_to_numpy(t):
    """A torch tensor as a numpy array, bfloat16 included (bit-exact, via ml_dtypes)."""
    import ml_dtypes
    import numpy as np
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy() if t.is_contiguous() else np.ascontiguousarray(t.numpy())


def tensor_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor without loading the data (safetensors) or by loading (.bin)."""
    from safetensors import safe_open

    out = {}
    for fname in files:
        if fname.endswith((".bin", ".pt")):
            out.update({k: tuple(v.shape) for k, v in iter_torch_file(fname, "pt")})
            continue
        try:
            with safe_open(fname, framework="np") as f:
                for name in f.keys():
                    out[name] = tuple(f.get_slice(name).get_shape())
        except Exception as e:
            raise CheckpointError(f"{fname}: corrupt or truncated safetensors file ({e})") from None
    return out


def read_config(path: str, variant: str | None = None, keys: list[str] | None = None) -> DogeConfig:
    """The DogeConfig of an HF directory, its variant detected from the weight names when given (spec §2.3)."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"{path}: no config.json")
    raw = read_json(cfg_file)
    if variant is None and keys is not None:
        detected = detect_variant(keys)
        variant = "small_doge" if detected == "legacy" else detected
    return DogeConfig.from_hf_dict(raw, variant=variant)


def read_generation_config(path: str, cfg: DogeConfig) -> GenerationConfig:
    """What transformers' generate takes from the HF directory `path` of config `cfg`: the special ids of its
    generation_config.json (an id the file lacks is None, as in transformers: config.json's is not taken), else
    config.json's; the file's do_sample / temperature / top_k / top_p / repetition_penalty / max_new_tokens /
    min_new_tokens / min_length (null or absent: transformers' default) and its other fields as they are (`extra`).
    The ids never change the model config: the embedding's pad row is config.json's pad id."""
    gen_file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(gen_file):
        return GenerationConfig.from_config(cfg)
    gen = read_json(gen_file)
    if not isinstance(gen, dict):
        raise ConfigError(f"{gen_file}: expected a JSON object")
    return generation_config_from_dict(gen, cfg, gen_file)


def generation_config_from_dict(gen: dict, cfg: DogeConfig, where: str) -> GenerationConfig:
    """generation_config.json's content `gen` as a checked GenerationConfig (read_generation_config); `where`
    names it in errors."""
    try:  # the model config's checks: ids are integers in [0, vocab_size)
        checked = cfg.replace(**{k: gen.get(k) for k in SPECIAL_IDS})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    settings = {k: d if gen.get(k) is None else gen[k] for k, d in GENERATION_DEFAULTS.items()}
    _check_sampling_fields(where, **settings)
    extra = {k: v for k, v in gen.items() if k not in GENERATION_DEFAULTS and k not in SPECIAL_IDS}
    return dataclasses.replace(GenerationConfig.from_config(checked), **settings, extra=extra)


def _check_sampling_fields(gen_file: str, do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
                           max_new_tokens, min_new_tokens, min_length, no_repeat_ngram_size, num_beams,
                           num_return_sequences, length_penalty, early_stopping, typical_p, epsilon_cutoff,
                           eta_cutoff, return_dict_in_generate, output_scores, output_logits, remove_invalid_values,
                           **token_rules) -> None:
    """generation_config.json's generate settings have the types generate takes. Their values are checked when
    generate uses them, as transformers does (a greedy call never looks at temperature)."""
    def number(v):
        return isinstance(v, int | float) and not isinstance(v, bool)

    bad = None
    flags = (("do_sample", do_sample), ("return_dict_in_generate", return_dict_in_generate),
             ("output_scores", output_scores), ("output_logits", output_logits))
    wrong = next(((n, v) for n, v in flags if not isinstance(v, bool)), None)
    if remove_invalid_values is not None and not isinstance(remove_invalid_values, bool):
        wrong = ("remove_invalid_values", remove_invalid_values)
    shapes = next(((n, v) for n, v in token_rules.items()
                   if v is not None and not isinstance(v, int | list | tuple | dict) or isinstance(v, bool)),
                  None)  # (ids themselves are checked when generate uses them)
    if shapes:
        bad = f"{shapes[0]}={shapes[1]!r}: must be a token id or a list"
    elif wrong:
        bad = f"{wrong[0]}={wrong[1]!r}: must be true or false"
    elif not number(temperature):
        bad = f"temperature={temperature!r}: must be a number"
    elif top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
        bad = f"top_k={top_k!r}: must be an integer or null"
    elif top_p is not None and not number(top_p):
        bad = f"top_p={top_p!r}: must be a number or null"
    elif min_p is not None and not number(min_p):
        bad = f"min_p={min_p!r}: must be a number or null"
    elif any(v is not None and not number(v) for v in (typical_p, epsilon_cutoff, eta_cutoff)):
        name, v = next((n, v) for n, v in (("typical_p", typical_p), ("epsilon_cutoff", epsilon_cutoff),
                                           ("eta_cutoff", eta_cutoff)) if v is not None and not number(v))
        bad = f"{name}={v!r}: must be a number or null"
    elif not number(repetition_penalty):
        bad = f"repetition_penalty={repetition_penalty!r}: must be a number"
    elif not number(length_penalty):
        bad = f"length_penalty={length_penalty!r}: must be a number"
    elif not (isinstance(early_stopping, bool) or early_stopping == "never"):
        bad = f"early_stopping={early_stopping!r}: must be true, false or \"never\""
    else:
        for name, v in (("max_new_tokens", max_new_tokens), ("min_new_tokens", min_new_tokens),
                        ("min_length", min_length), ("no_repeat_ngram_size", no_repeat_ngram_size),
                        ("num_beams", num_beams), ("num_return_sequences", num_return_sequences)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                bad = f"{name}={v!r}: must be an integer or null"
                break
    if bad:
        raise ConfigError(f"{gen_file}: {bad}")


def write_generation_config(out_dir: str, gen: GenerationConfig) -> None:
    """generation_config.json of `gen` (GenerationConfig.to_dict), whole or not at all."""
    with atomic_file(os.path.join(out_dir, "generation_config.json")) as tmp, open(tmp, "w") as f:
        json.dump(gen.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")


def config_dtype(path: str) -> str | None:
    """The weights' dtype a config.json records (`dtype`, or the older `torch_dtype`), if it names one."""
    try:
        raw = read_json(os.path.join(path, "config.json"))
    except Exception:  # noqa: BLE001 - no or bad config: no recorded dtype (read_config reports it)
        return None
    name = raw.get("dtype") or raw.get("torch_dtype")
    name = name.replace("torch.", "") if isinstance(name, str) else None
    return name if name in ("float32", "float16", "bfloat16") else None


def current_name(key: str, legacy: bool) -> str | None:
    """The current HF key for a checkpoint key (legacy names renamed; None = dropped)."""
    return rename_legacy(key) if legacy else key


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copy generation config and tokenizer files from src to dst when present."""
    copied = []
    for name in SIDE_FILES:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(dst, name))
            copied.append(name)
    return copied
