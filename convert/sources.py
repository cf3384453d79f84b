"""Checkpoint sources: detect the format of SRC, read its config and tensor list, stream its tensors.

Every source presents the same view: current HF names (legacy names renamed, spec §2.2 c), torch layout
([out, in] Linear weights, one tensor per layer), numpy arrays (bfloat16 via ml_dtypes), one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np

from doge_jax import hf_io
from doge_jax.config import DogeConfig, read_json
from doge_jax.hf_names import CheckpointError, detect_variant, flax_to_hf, rename_legacy

from . import safetensors_io
from .variants import resolve_variant


@dataclasses.dataclass
class TensorRef:
    name: str  # current HF name
    src: str  # the name in the source (legacy key, Flax path, ...)
    shape: tuple[int, ...]  # torch layout
    dtype: np.dtype


@dataclasses.dataclass
class Source:
    kind: str  # e.g. "HF directory (sharded safetensors)"
    path: str
    config: DogeConfig
    detected: str  # legacy | native | small_doge, from the tensor names
    refs: dict[str, TensorRef]  # current HF name -> tensor
    dropped: list[str]  # source keys that have no current name (legacy router bias)
    side_dir: str | None  # where generation_config.json / tokenizer files may be
    _stream: object = None  # () -> iterator of (current HF name, array)
    notes: list[str] = dataclasses.field(default_factory=list)  # said before converting

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        return self._stream()


def load_config_file(path: str, variant: str | None) -> DogeConfig:
    """A DogeConfig from a config.json (or a directory holding one) or one of our YAML configs; `variant`
    overrides what a config.json implies (HF configs do not reliably say, the weights do)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: config not found")
    if path.endswith((".yaml", ".yml")):
        return DogeConfig.from_yaml(path)  # names its variant explicitly; callers check it against the weights
    return DogeConfig.from_hf_dict(read_json(path), variant=variant)


def _unset_ids_filled(source: Source, config: str | None, own: str | None) -> Source:
    """A --config in our YAML leaves bos/eos/pad_token_id null (the trainers fill them from the tokenizer): the unset
    ones come from the source's own config.json `own`, the rest from the tokenizer beside it, with a note (they were
    dropped silently: a converted model that never stops at EOS). An id the model cannot hold is an error."""
    cfg = source.config
    unset = [k for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(cfg, k) is None]
    if not config or not config.endswith((".yaml", ".yml")) or not unset:
        return source
    found: dict = {}
    notes = []
    if own and os.path.isfile(own):
        try:
            theirs = DogeConfig.from_hf_dict(read_json(own), variant=cfg.variant)
        except (ValueError, OSError, CheckpointError):  # (ConfigError is a ValueError) a broken one: --config's reason
            theirs = None
        got = {} if theirs is None else {k: getattr(theirs, k) for k in unset if getattr(theirs, k) is not None}
        if got:
            found.update(got)
            notes.append(f"from {own}: " + ", ".join(f"{k}={v}" for k, v in got.items()))
    rest = [k for k in unset if k not in found]
    tok_file = os.path.join(source.side_dir or "", "tokenizer.json")
    if rest and source.side_dir and os.path.isfile(tok_file):
        from tokenizers import Tokenizer

        from doge_jax import data

        try:
            ids = data.special_ids(Tokenizer.from_file(tok_file), source.side_dir)
        except Exception:  # noqa: BLE001 - an unreadable tokenizer has nothing to give (the tokenizers library's own)
            ids = {}
        got = {k: ids[k.split("_")[0]] for k in rest if ids.get(k.split("_")[0]) is not None}
        if got:
            found.update(got)
            notes.append(f"from {tok_file}: " + ", ".join(f"{k}={v}" for k, v in got.items()))
    if found:
        source.config = cfg.replace(**found)  # (an id outside the vocabulary: ConfigError naming it)
        source.notes.append(f"note: {config} leaves {', '.join(k for k in unset if k in found)} unset; taken "
                            + "; ".join(notes))
    return source


def open_source(src: str, config: str | None = None, variant: str | None = None, step: int | None = None) -> Source:
    """Detect SRC's format (HF directory, orbax checkpoint, or a single state-dict file) and open it."""
    source, own = _open(src, config, variant, step)
    return _unset_ids_filled(source, config, own)


def _open(src: str, config: str | None, variant: str | None, step: int | None) -> tuple[Source, str | None]:
    """(the source, the config.json it would use without --config)."""
    from doge_jax import checkpoint

    src = os.path.abspath(src)
    if not os.path.exists(src):
        raise CheckpointError(f"{src}: no such file or directory")
    if os.path.isdir(src) and checkpoint.is_orbax_checkpoint(src):
        source = _orbax_source(src, config, variant, step)
        return source, os.path.join(source.side_dir, "config.json")  # (the run's or model's, beside its params)
    if step is not None:
        torch_run = os.path.isdir(os.path.join(src, f"checkpoint-{step}"))
        raise CheckpointError(f"{src}: --step only applies to a doge_jax.train run directory" + (
            f"; it is a doge_torch.train run: pass its checkpoint directory, {os.path.join(src, f'checkpoint-{step}')}"
            if torch_run else hf_io.torch_run_hint(src)))
    if os.path.isfile(src):
        if not src.endswith((".pt", ".bin", ".pth", ".safetensors")):
            raise CheckpointError(f"{src}: expected a .pt/.bin/.pth state dict or a .safetensors file")
        cfg_path = config or os.path.join(os.path.dirname(src), "config.json")
        if not os.path.exists(cfg_path):
            raise CheckpointError(f"{src}: no config.json beside the file; pass --config PATH")
        kind = "safetensors file" if src.endswith(".safetensors") else "PyTorch state-dict file"
        # generation_config.json and tokenizer files come from where an HF config is (the model's directory);
        # with one of our YAML configs, from beside the weights
        if os.path.isdir(cfg_path):
            side = cfg_path
        elif cfg_path.endswith((".yaml", ".yml")):
            side = os.path.dirname(src)
        else:
            side = os.path.dirname(os.path.abspath(cfg_path))
        own = os.path.join(os.path.dirname(src), "config.json")
        return _file_source(src, [src], kind, cfg_path, variant, side), own
    files, kind = _hf_files(src)
    own = os.path.join(src, "config.json")
    return _file_source(src, files, f"HF directory ({kind})", config or own, variant, src), own


def _hf_files(path: str) -> tuple[list[str], str]:
    names = (hf_io.SAFE_SINGLE, hf_io.SAFE_INDEX, hf_io.TORCH_BIN, hf_io.TORCH_INDEX)
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        raise CheckpointError(f"{path}: not a checkpoint: no model.safetensors(.index.json), pytorch_model.bin"
                              "(.index.json), params/ (orbax model) or checkpoints/ (training run)"
                              + hf_io.torch_run_hint(path))
    files = hf_io.weight_files(path)
    kind = "pytorch_model.bin" if files[0].endswith(".bin") else "safetensors"
    return files, ("sharded " + kind if len(files) > 1 else kind)


def _file_meta(files: list[str]) -> dict[str, tuple[str, tuple[int, ...], np.dtype]]:
    """{key: (file, shape, dtype)} without reading tensor data (.bin files are memory-mapped)."""
    out = {}
    for fname in files:
        if fname.endswith(".safetensors"):
            header, _ = safetensors_io.read_header(fname)
            out.update({k: (fname, v[0], v[1]) for k, v in header.items()})
        else:
            for k, t in hf_io.iter_torch_file(fname):
                out[k] = (fname, tuple(t.shape), t.dtype)
    return out


def _file_source(path, files, kind, cfg_path, variant, side_dir) -> Source:
    meta = _file_meta(files)
    detected = detect_variant(meta)
    chosen = resolve_variant(variant, detected, path, cfg_hint=None)
    config = load_config_file(cfg_path, chosen)
    if config.variant != chosen:
        resolve_variant(config.variant, detected, path, cfg_hint=cfg_path)
    legacy = detected == "legacy"
    hf_io.check_tied_head_files(config, files, meta, legacy, path)
    refs, dropped, by_file = {}, [], {}
    for key, (fname, shape, dtype) in meta.items():
        new = rename_legacy(key) if legacy else key
        if new is None:
            dropped.append(key)
            continue
        refs[new] = TensorRef(new, key, shape, np.dtype(dtype))
        by_file.setdefault(fname, {})[key] = new

    def stream():
        for fname in files:
            wanted = by_file.get(fname, {})
            if fname.endswith(".safetensors"):
                items = safetensors_io.read_tensors(fname, wanted)
            else:
                items = ((k, a) for k, a in hf_io.iter_torch_file(fname) if k in wanted)
            for key, arr in items:
                yield wanted[key], arr

    return Source(kind, path, config, detected, refs, dropped, side_dir, stream)


def _orbax_source(path, config, variant, step) -> Source:
    from doge_jax import checkpoint

    params_dir, cfg_path, meta = checkpoint.param_metadata(path, step)
    detected = "native" if any("q_norm" in p for p in meta) else "small_doge"
    cfg = load_config_file(config or cfg_path, None)
    chosen = resolve_variant(variant, detected, path, cfg_hint=None)
    if cfg.variant != chosen:
        resolve_variant(cfg.variant, detected, path, cfg_hint=config or cfg_path)
    if cfg.tie_word_embeddings and ("lm_head", "kernel") in meta:  # an untied model's head under a tied config
        head, emb = (checkpoint.read_param(params_dir, p) for p in (("lm_head", "kernel"),
                                                                    ("model", "embed_tokens", "embedding")))
        hf_io.check_tied_head(cfg, head.T, emb, path)
        del head, emb
    refs = {}
    for fpath, (shape, dtype) in meta.items():
        for i, name, transpose in _unstack(fpath, shape):
            s = shape[1:] if i is not None else shape
            refs[name] = TensorRef(name, ".".join(fpath) + (f"[{i}]" if i is not None else ""),
                                   tuple(reversed(s)) if transpose else tuple(s), np.dtype(dtype))

    def stream():
        for fpath, (shape, _) in meta.items():
            arr = checkpoint.read_param(params_dir, fpath)
            for i, name, transpose in _unstack(fpath, shape):
                a = arr[i] if i is not None else arr
                yield name, np.ascontiguousarray(a.T if transpose else a)
            del arr

    if step is None and os.path.isdir(os.path.join(path, checkpoint.CHECKPOINTS)):
        step = checkpoint.list_steps(path)[-1]
    kind = "orbax model checkpoint" if os.path.isdir(os.path.join(path, checkpoint.PARAMS)) else \
        f"orbax training run (step {step}; optimizer state dropped)"
    if os.path.basename(os.path.dirname(path)) == checkpoint.CHECKPOINTS:
        kind = f"orbax training-run step directory (step {os.path.basename(path)}; optimizer state dropped)"
    return Source(kind, path, cfg, detected, refs, [], os.path.dirname(cfg_path), stream)


def _unstack(fpath: tuple[str, ...], shape: tuple[int, ...]):
    if fpath[:2] == ("model", "layers"):
        for i in range(shape[0] if shape else 0):
            name, transpose = flax_to_hf(fpath, i)
            yield i, name, transpose
    else:
        name, transpose = flax_to_hf(fpath)
        yield None, name, transpose
