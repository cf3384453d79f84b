"""Training-recipe rules shared by doge_jax.optim and doge_torch.optim (no JAX or torch import).

The HF-Trainer weight-decay name rule (spec §6.2) and the argument rules of the WSD schedule (spec §6.1).
"""

from __future__ import annotations

import re
import warnings

SCHEDULE_TYPES = ("linear", "cosine", "1-sqrt")

# Parameters whose lowercase dotted name matches one of these get no weight decay (HF Trainer rule).
NO_DECAY_PATTERNS = tuple(
    re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
)


def hf_name_decayed(name: str) -> bool:
    """Whether the HF Trainer applies weight decay to the parameter with this dotted name (e.g. 'model.norm.weight')."""
    lowered = name.lower()
    return not any(p.search(lowered) for p in NO_DECAY_PATTERNS)


def wsd_phases(caller: str, num_warmup_steps: int, num_decay_steps: int, num_training_steps: int | None,
               num_stable_steps: int | None, warmup_type: str, decay_type: str) -> tuple[int, int, int]:
    """(warmup, stable, decay) step counts with transformers' argument rules: training or stable steps required;
    stable wins (with a warning) when both are given; stable = training - warmup - decay otherwise."""
    if num_training_steps is None and num_stable_steps is None:
        raise ValueError(f"{caller}: either num_training_steps or num_stable_steps must be given")
    if num_training_steps is not None and num_stable_steps is not None:
        warnings.warn(f"{caller}: both num_training_steps and num_stable_steps given; using num_stable_steps",
                      stacklevel=3)
    for arg, value in (("warmup_type", warmup_type), ("decay_type", decay_type)):
        if value not in SCHEDULE_TYPES:
            raise ValueError(f"{caller}: unknown {arg} {value!r}, expected one of {SCHEDULE_TYPES}")
    if num_stable_steps is None:
        num_stable_steps = num_training_steps - num_warmup_steps - num_decay_steps
        if num_stable_steps < 0:
            raise ValueError(
                f"{caller}: num_training_steps={num_training_steps} is less than num_warmup_steps="
                f"{num_warmup_steps} + num_decay_steps={num_decay_steps} (stable phase would be {num_stable_steps})")
    for arg, value in (("num_warmup_steps", num_warmup_steps), ("num_decay_steps", num_decay_steps),
                       ("num_stable_steps", num_stable_steps)):
        if value < 0:
            raise ValueError(f"{caller}: {arg} must be >= 0, got {value}")
    return int(num_warmup_steps), int(num_stable_steps), int(num_decay_steps)
