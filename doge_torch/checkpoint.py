"""doge_torch.train's checkpoints, laid out as the transformers Trainer lays them out.

OUT/checkpoint-N is an HF model directory (config.json, model.safetensors: any tool loads it as a model) plus the
trainer's state: optimizer.pt, scheduler.pt, rng_state.pth and trainer_state.json (the step, and what the run was
started with, so that a resume can check it continues the same run). Each is written to a temporary directory and
renamed into place, so a kill leaves the previous checkpoints and no half-written one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from typing import Any

import torch

from doge_jax import hf_io
from doge_jax.config import SPECIAL_IDS
from doge_jax.hf_names import CheckpointError, CheckpointWriteError

from .io import write_model

STATE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_LEFTOVER = re.compile(r"^\.(checkpoint-\d+)\.(?:tmp|old)-")


def steps(out_dir: str) -> list[int]:
    """The steps of the finished checkpoints in `out_dir`, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = _NAME.match(name)
        if m and os.path.isfile(os.path.join(out_dir, name, STATE)):
            found.append(int(m.group(1)))
    return sorted(found)


DIVERGED = "diverged_checkpoints"


def set_aside_diverged(out_dir: str, step: int) -> str:
    """Move checkpoint-<step> to OUT/diverged_checkpoints/ (its weights gave a non-finite loss: a re-run must not
    resume from it); returns that folder."""
    dest = os.path.join(out_dir, DIVERGED)
    os.makedirs(dest, exist_ok=True)
    shutil.move(path_of(out_dir, step), os.path.join(dest, f"checkpoint-{step}-{int(time.time())}"))
    return dest


def path_of(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"checkpoint-{step}")


def save(out_dir: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, run: dict[str, Any], keep: int, tokenizer=None,
         tokenizer_extras: dict | None = None) -> str:
    """Write OUT/checkpoint-`step` atomically (with the run's `tokenizer`, if any, and its tokenizer_config extras:
    the checkpoint is a model directory generate and --init-from read whole, and a resume checks it), then remove
    all but the `keep` newest checkpoints."""
    path = path_of(out_dir, step)
    # what killed writes left (a checkpoint of a step that is not saved again would keep its temporary for good)
    for name in {m.group(1) for m in map(_LEFTOVER.match, os.listdir(out_dir) if os.path.isdir(out_dir) else [])
                 if m}:
        hf_io.remove_stale(out_dir, name)
    try:
        _write(path, model, optimizer, scheduler, run, step, tokenizer, tokenizer_extras)
    except Exception as e:  # noqa: BLE001 - torch.save's zip writer raises RuntimeError, safetensors and tokenizers
        # their own plain exceptions; a program error (TypeError, ...) stays what it is
        if isinstance(e, CheckpointError | CheckpointWriteError) or hf_io.is_program_error(e):
            raise
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointWriteError.of(f"checkpoint step {step}", path, f"{type(e).__name__}: {first}") from e
    for old in steps(out_dir)[:-keep]:
        shutil.rmtree(path_of(out_dir, old), ignore_errors=True)
    return path


def _write(path: str, model, optimizer, scheduler, run: dict[str, Any], step: int, tokenizer,
           tokenizer_extras: dict | None = None) -> None:
    with hf_io.atomic_output_dir(path, overwrite=True) as tmp:
        write_model(tmp, model)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        rng = {"cpu": torch.get_rng_state()}
        if next(model.parameters()).device.type == "cuda":  # (not on a CPU run: that would start CUDA)
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, os.path.join(tmp, "rng_state.pth"))
        with open(os.path.join(tmp, STATE), "w") as f:
            json.dump({"global_step": step, **run}, f, indent=2, sort_keys=True)
        if tokenizer is not None:
            from doge_jax.data import save_tokenizer

            save_tokenizer(tokenizer, model.config, tmp, tokenizer_extras)


def read_state(path: str) -> dict[str, Any]:
    """A checkpoint's trainer_state.json (a ValueError, read as damage, when it does not hold a JSON object)."""
    with open(os.path.join(path, STATE)) as f:
        state = json.load(f)
    if not isinstance(state, dict):
        raise ValueError(f"{STATE} holds {type(state).__name__}, not an object")
    return state


def load(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Restore model weights, optimizer, scheduler and RNG from a checkpoint directory; returns its step."""
    from .io import load_hf_state

    _, state = load_hf_state(path, config=model.config)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    # (a run from --init-from keeps its start's settings; ids the file lacks, a run made before its config had
    # them, come from the model config, as a fresh run's would)
    gen = hf_io.read_generation_config(path, model.config)
    model.generation_config = dataclasses.replace(
        gen, **{k: getattr(model.config, k) for k in SPECIAL_IDS if getattr(gen, k) is None})
    # the moments and step counts come from the checkpoint; the hyperparameters (lr, betas, eps, weight decay, fused
    # or not) stay those of this run's config and device, so a changed train: section takes effect
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=device, weights_only=True))
    for g, h in zip(optimizer.param_groups, hyper):
        g.update(h)
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    scheduler.base_lrs = [h["initial_lr"] for h in hyper]
    for g, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        g["lr"] = base * fn(scheduler.last_epoch)  # what scheduler.step() set for this step, with this config
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    rng = torch.load(os.path.join(path, "rng_state.pth"), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(read_state(path)["global_step"])
