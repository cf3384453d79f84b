"""The conversion plan: which source tensor becomes which output tensor, in which dtype; checked against the
config before anything is written, and printable (--dry-run)."""

from __future__ import annotations

import dataclasses
import re

import ml_dtypes
import numpy as np

from doge_jax.config import DogeConfig
from doge_jax.hf_io import widest_float
from doge_jax.hf_names import CheckpointError, check_keys, expected_hf_shapes, hf_to_flax

from .sources import Source

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
TARGETS = ("hf", "jax", "torch")


def dtype_name(dt: np.dtype) -> str:
    return "bfloat16" if dt == np.dtype(ml_dtypes.bfloat16) else str(dt)


@dataclasses.dataclass
class Entry:
    name: str  # current HF name (torch layout)
    src: str
    shape: tuple[int, ...]
    src_dtype: np.dtype
    dtype: np.dtype  # output dtype


@dataclasses.dataclass
class Plan:
    source: Source
    target: str
    config: DogeConfig
    entries: dict[str, Entry]  # sorted by name
    skipped: list[tuple[str, str]]  # (source key, why)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(e.shape, dtype=np.int64)) * e.dtype.itemsize for e in self.entries.values())

    @property
    def dtype_name(self) -> str:
        """The model dtype written to config.json (the embedding's)."""
        return dtype_name(self.entries["model.embed_tokens.weight"].dtype)


def build_plan(source: Source, target: str, dtype: str | None = None) -> Plan:
    """Check the source against its config (missing/unexpected keys, shapes) and fix every output tensor."""
    if target not in TARGETS:
        raise ValueError(f"target {target!r}: use one of {TARGETS}")
    cfg = source.config
    refs = dict(source.refs)
    skipped = [(k, "legacy key with no current equivalent, dropped (spec §2.2 c)") for k in source.dropped]
    if cfg.tie_word_embeddings and "lm_head.weight" in refs:
        skipped.append((refs.pop("lm_head.weight").src, "tied to model.embed_tokens.weight (tie_word_embeddings)"))
    try:
        check_keys(expected_hf_shapes(cfg), {k: r.shape for k, r in refs.items()}, where=source.path)
    except CheckpointError as e:
        raise CheckpointError(str(e) + _variant_hint(cfg, refs)) from None
    not_float = sorted(f"{n} ({r.dtype})" for n, r in refs.items() if not _is_float(r.dtype))
    if not_float:  # every Doge parameter is a float (doge_jax would keep an int32 norm weight as int32)
        raise CheckpointError(f"{source.path}: non-floating-point weights: {', '.join(not_float[:5])}")
    out = DTYPES[dtype] if dtype else None
    entries = {}
    for name in sorted(refs):
        r = refs[name]
        entries[name] = Entry(name, r.src, r.shape, r.dtype, out if out is not None else r.dtype)
    if target == "jax" and out is None:
        _widen_stacked(entries)
    return Plan(source, target, cfg, entries, skipped)


def _widen_stacked(entries: dict[str, Entry]) -> None:
    """The jax target stacks each per-layer tensor into one [L, ...] array of one dtype: where the layers' dtypes
    differ (a hand-edited checkpoint), every layer takes the widest (the values are exact in it)."""
    groups: dict[tuple[str, ...], list[Entry]] = {}
    for e in entries.values():
        fpath, layer, _ = hf_to_flax(e.name)
        if layer is not None:
            groups.setdefault(fpath, []).append(e)
    for group in groups.values():
        wide = widest_float([e.dtype for e in group])
        for e in group:
            e.dtype = wide


def _is_float(dt: np.dtype) -> bool:
    return dt.kind == "f" or dt == DTYPES["bfloat16"]


def _variant_hint(cfg: DogeConfig, refs) -> str:
    a = refs.get("model.layers.0.self_attn.A")
    H, G = cfg.num_attention_heads, cfg.num_key_value_heads
    if a is None or H == G:
        return ""
    if cfg.variant == "small_doge" and a.shape == (G,):
        return (f"\n  hint: A has {G} entries (kv heads), as in a native checkpoint, but no q_norm/k_norm weights "
                "were found: an incomplete native checkpoint?")
    if cfg.variant == "native" and a.shape == (H,):
        return f"\n  hint: A has {H} entries (query heads), as in a small_doge checkpoint (--variant small_doge?)"
    return ""


def cast(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return arr if arr.dtype == dtype else arr.astype(dtype)


# ---- --dry-run ---------------------------------------------------------------------------------------------------

_LAYER = re.compile(r"(?<=\.layers\.)\d+(?=\.)")
_INDEX = re.compile(r"\[\d+\]$")


def _target_name(plan: Plan, name: str) -> str:
    if plan.target != "jax":
        return name
    fpath, layer, transpose = hf_to_flax(name)
    notes = [n for n, on in (("transposed", transpose), ("stacked: layer {i} of the leading axis", layer is not None))
             if on]
    return "/".join(fpath) + (f"  ({', '.join(notes)})" if notes else "")


def describe(plan: Plan, dst: str, files: list[str]) -> str:
    """The plan as text: source, config, output files, and the name mapping with layers collapsed."""
    src, cfg = plan.source, plan.config
    src_dtypes = sorted({dtype_name(e.src_dtype) for e in plan.entries.values()})
    out_dtypes = sorted({dtype_name(e.dtype) for e in plan.entries.values()})
    lines = [
        f"source : {src.path}",
        f"         {src.kind}; variant {cfg.variant} (weights look {src.detected})",
        f"config : {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}/"
        f"{cfg.num_key_value_heads} kv, vocab {cfg.vocab_size}, "
        f"{'MoE ' + str(cfg.num_experts) + ' experts' if cfg.is_moe else 'dense'}"
        f"{', tied embeddings' if cfg.tie_word_embeddings else ''}",
        f"target : {plan.target} -> {dst}",
        f"dtype  : {', '.join(src_dtypes)} -> {', '.join(out_dtypes)}",
        f"tensors: {len(plan.entries)} ({plan.nbytes / 1e6:.1f} MB)",
        f"files  : {', '.join(files)}",
        "mapping:",
    ]
    groups: dict[tuple, list[int]] = {}
    from_jax = src.kind.startswith("orbax") and plan.target != "jax"
    for e in plan.entries.values():
        m = _LAYER.search(e.name)
        layer = int(m.group()) if m else None
        src_pat = _INDEX.sub("[{i}]", _LAYER.sub("{i}", e.src)) if layer is not None else e.src
        dst_pat = _target_name(plan, e.name) if plan.target == "jax" else _LAYER.sub("{i}", e.name)
        shape = e.shape  # (the HF layout's)
        if from_jax and hf_to_flax(e.name)[2]:  # a Flax kernel: stored [in, out], written [out, in]
            shape, dst_pat = tuple(reversed(e.shape)), dst_pat + "  (transposed)"
        key = (src_pat, dst_pat, shape, dtype_name(e.src_dtype), dtype_name(e.dtype))
        groups.setdefault(key, []).append(layer)
    for (s, d, shape, sd, od), layers in groups.items():
        if layers[0] is not None:
            rng = f"{{{min(layers)}..{max(layers)}}}" if len(layers) > 1 else f"{{{layers[0]}}}"
            s, d = s.replace("{i}", rng), d.replace("{i}", rng)
        dt = sd if sd == od else f"{sd}->{od}"
        lines.append(f"  {s} {list(shape)} {dt}" + ("" if s == d else f"\n      -> {d}"))
    for k, why in plan.skipped:
        lines.append(f"  skip {k}: {why}")
    return "\n".join(lines)
