"""doge_torch.train's checkpoints, laid out as the transformers Trainer lays them out.

OUT/checkpoint-N is an HF model directory (config.json, model.safetensors: any tool loads it as a model) plus the
trainer's state: optimizer.pt, scheduler.pt, rng_state.pth and trainer_state.json (the step, and what the run was
started with, so that a resume can check it continues the same run). Each is written to a temporary directory and
renamed into place, so a kill leaves the previous checkpoints and no half-written one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch

from doge_jax import hf_io

from .io import write_model

STATE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


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


def path_of(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"checkpoint-{step}")


def save(out_dir: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, run: dict[str, Any], keep: int) -> str:
    """Write OUT/checkpoint-`step` atomically, then remove all but the `keep` newest checkpoints."""
    path = path_of(out_dir, step)
    with hf_io.atomic_output_dir(path, overwrite=True) as tmp:
        write_model(tmp, model)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, os.path.join(tmp, "rng_state.pth"))
        with open(os.path.join(tmp, STATE), "w") as f:
            json.dump({"global_step": step, **run}, f, indent=2, sort_keys=True)
    for old in steps(out_dir)[:-keep]:
        shutil.rmtree(path_of(out_dir, old), ignore_errors=True)
    return path


def read_state(path: str) -> dict[str, Any]:
    with open(os.path.join(path, STATE)) as f:
        return json.load(f)


def load(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Restore model weights, optimizer, scheduler and RNG from a checkpoint directory; returns its step."""
    from .io import load_hf_state

    _, state = load_hf_state(path, config=model.config)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    rng = torch.load(os.path.join(path, "rng_state.pth"), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(read_state(path)["global_step"])
