"""convert(): open the source, plan, check, then stream every tensor into the target inside an atomic directory."""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

from doge_jax import hf_io
from doge_jax.hf_names import CheckpointError

from .plan import build_plan, cast, describe
from .sinks import SINKS, output_files
from .sources import open_source

# Signals the command line received (SIGINT/SIGTERM), acted on between tensors: an exception raised from the signal
# handler itself can land in a garbage-collection callback (XLA's), where Python prints and drops it.
STOP: list[int] = []


def _check_stop() -> None:
    if STOP:
        raise KeyboardInterrupt if STOP[0] == signal.SIGINT else SystemExit(128 + STOP[0])


def convert(src: str, dst: str, to: str, *, dtype: str | None = None, variant: str | None = None,
            step: int | None = None, config: str | None = None, shard_size="5GB", dry_run: bool = False,
            overwrite: bool = False, log=None) -> dict:
    """Convert the checkpoint SRC into DST in the `to` format ("hf" | "jax" | "torch"); see convert/__init__.py.

    Returns a summary (target files, tensor count, bytes, seconds). Raises CheckpointError / ConfigError /
    FileExistsError with a message naming what is wrong; DST is never left half-written.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    dst = os.path.abspath(dst)
    _check_apart(src, dst, overwrite)
    source = open_source(src, config=config, variant=variant, step=step)
    for note in source.notes:
        log(note)
    plan = build_plan(source, to, dtype)
    files = output_files(plan, shard_size)
    if plan.config.variant != "native" and to in ("hf", "torch"):
        log(f"note: {dst} will hold the {plan.config.variant} layout (config.json says doge_variant); doge_jax and "
            "doge_torch load it, but transformers' built-in Doge would load it as the native layout with wrong "
            "weights (q/k norms missing, dynamic-mask heads differ)")
    if dry_run:
        print(describe(plan, dst, files))
        if os.path.exists(dst) and not overwrite:
            print(f"note   : {dst} exists; the real run needs --overwrite")
        print("dry run: nothing written")
        return {"files": files, "tensors": len(plan.entries), "bytes": plan.nbytes, "seconds": 0.0, "dry_run": True}
    if os.path.exists(dst) and not overwrite:
        empty = os.path.isdir(dst) and not os.listdir(dst)  # (`mkdir DST` first: still a folder that gets replaced)
        raise FileExistsError(f"{dst} exists{' (an empty folder)' if empty else ''}; pass --overwrite to replace it")
    # as save_pretrained: DST's old model files go (weights, configs), anything else in it stays (a --overwrite of
    # a folder that also holds other files, other models or a training run's checkpoints/ must not delete them);
    # the tokenizer files go too: they belong to the old model (SRC's own are copied when it has them)
    with hf_io.model_output_dir(dst, overwrite=overwrite, replace_side_files=True) as tmp:
        sink = SINKS[to](plan, tmp, shard_size)
        seen, overflowed = set(), []
        for name, arr in source.tensors():
            e = plan.entries.get(name)
            if e is None:
                continue  # tied lm_head, dropped legacy keys
            if tuple(arr.shape) != e.shape:
                raise CheckpointError(f"{source.path}: {e.src}: shape {arr.shape}, expected {e.shape}")
            with np.errstate(over="ignore", invalid="ignore"):  # (overflow: said below; a NaN stays NaN, as in torch)
                out = cast(arr, e.dtype)
            if out is not arr and np.isinf(out).any() and (np.isinf(out) & ~np.isinf(arr)).any():
                overflowed.append(name)
            sink.put(name, out)
            del out
            seen.add(name)
            del arr
            _check_stop()
        missing = sorted(set(plan.entries) - seen)
        if missing:
            raise CheckpointError(f"{source.path}: tensors listed but never read: {', '.join(missing)}")
        sink.finish()
        _chmod_like_mkdir(tmp)
        _check_stop()  # (the last chance to leave nothing: DST is renamed into place next)
    secs = time.perf_counter() - t0
    if overflowed:
        log(f"warning: {len(overflowed)} tensor(s) hold values beyond {dtype}'s range, now inf: "
            f"{', '.join(overflowed[:5])}{' ...' if len(overflowed) > 5 else ''} (keep a wider --dtype for them)")
    log(f"wrote {dst} ({to}: {len(plan.entries)} tensors, {plan.nbytes / 1e6:.1f} MB, {plan.dtype_name}) "
        f"from the {source.kind} in {secs:.1f} s")
    return {"files": files, "tensors": len(plan.entries), "bytes": plan.nbytes, "seconds": secs, "dry_run": False}


def _chmod_like_mkdir(path: str) -> None:
    """The temporary directory is created 0700 (mkdtemp); give DST the mode a plain mkdir would (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _check_apart(src: str, dst: str, overwrite: bool) -> None:
    """DST must not be the source, contain it (replacing DST would delete it), or be an existing part of it."""
    s, d = os.path.realpath(src), os.path.realpath(dst)
    if s == d:
        raise FileExistsError(f"{dst}: DST is the source; write to another directory")
    if os.path.commonpath([s, d]) == d:
        raise FileExistsError(f"{dst}: DST contains the source {src}; write to another directory")
    if os.path.commonpath([s, d]) == s and os.path.lexists(d) and overwrite:
        raise FileExistsError(f"{dst}: DST is inside the source {src}; replacing it would change the source")
    if os.path.lexists(d) and not os.path.isdir(d):
        raise FileExistsError(f"{dst} is a file, not a directory; nothing replaced (a model is a directory)")
    # a training run's checkpoints/ holds steps only: a model written there could pass for its newest step
    run = s if os.path.isdir(os.path.join(s, "checkpoints")) else None
    if run is None and os.path.basename(os.path.dirname(s)) == "checkpoints":  # SRC is a step directory
        run = os.path.dirname(os.path.dirname(s))
    steps_dir = os.path.join(run, "checkpoints") if run is not None else None
    other = hf_io.run_holding(d)  # any run's checkpoints/ (a source in the run's folder too)
    if other is not None:
        run, steps_dir = other, os.path.join(other, "checkpoints")
    if steps_dir is not None and os.path.commonpath([steps_dir, d]) == steps_dir:
        raise FileExistsError(f"{dst}: DST is inside the training run's checkpoints/ ({run}); a model there could "
                              "pass for one of its steps (and be loaded as its newest); write to another directory")

