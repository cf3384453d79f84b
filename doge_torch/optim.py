"""Optimizer pieces for training doge_torch the Hugging Face way (spec §6.1, §6.2), mirroring doge_jax.optim.

- `wsd_lambda` / `wsd_scheduler`: the warmup-stable-decay multiplier of `transformers.get_wsd_schedule`, pure
  Python (float64), as a `torch.optim.lr_scheduler.LambdaLR`.
- `hf_name_decayed` / `param_groups`: which parameters get weight decay, by the HF Trainer's name rule
  (doge_jax.recipe, shared with doge_jax.optim and free of JAX imports).
- `make_optimizer`: `torch.optim.AdamW` over those two groups; `clip_grad_norm` is torch's global-norm clipping.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from doge_jax.recipe import SCHEDULE_TYPES, hf_name_decayed, wsd_phases  # noqa: F401 (re-exported)


def decayed_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: the name rule, minus anything inside an nn.LayerNorm."""
    in_layernorm = {f"{m}.{n}" if m else n for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)
                    for n, _ in mod.named_parameters(recurse=False)}
    return {n for n, p in model.named_parameters() if p.requires_grad and n not in in_layernorm and hf_name_decayed(n)}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups, decayed (weight_decay) and not (0.0), in named_parameters order.

    Tied parameters appear once (named_parameters deduplicates); frozen parameters are left out.
    """
    decayed = decayed_parameter_names(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in params if n in decayed], "weight_decay": weight_decay},
        {"params": [p for n, p in params if n not in decayed], "weight_decay": 0.0},
    ]


def wsd_lambda(
    num_warmup_steps: int,
    num_decay_steps: int,
    num_training_steps: int | None = None,
    num_stable_steps: int | None = None,
    warmup_type: str = "linear",
    decay_type: str = "cosine",
    min_lr_ratio: float = 0.0,
    num_cycles: float = 0.5,
) -> Callable[[int], float]:
    """The multiplier λ(step) of `transformers.get_wsd_schedule` (spec §6.1), same arguments and checks as
    doge_jax.optim.wsd_schedule (which returns `peak_lr * λ` in float32); computed here in Python floats."""
    warmup, stable, decay = wsd_phases("wsd_lambda", num_warmup_steps, num_decay_steps, num_training_steps,
                                       num_stable_steps, warmup_type, decay_type)
    rho = float(min_lr_ratio)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            p = step / max(1, warmup)
            if warmup_type == "linear":
                f = p
            elif warmup_type == "cosine":
                f = 0.5 * (1.0 - math.cos(math.pi * p))
            else:
                f = 1.0 - math.sqrt(1.0 - p)
            return max(0.0, f * (1.0 - rho) + rho)
        if step < warmup + stable:
            return 1.0
        if step < warmup + stable + decay:
            p = (step - warmup - stable) / max(1, decay)
            if decay_type == "linear":
                f = 1.0 - p
            elif decay_type == "cosine":
                f = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * p))
            else:
                f = 1.0 - math.sqrt(p)
            return max(0.0, f * (1.0 - rho) + rho)
        return rho

    return lr_lambda


def wsd_scheduler(optimizer: torch.optim.Optimizer, num_warmup_steps: int, num_decay_steps: int,
                  num_training_steps: int | None = None, **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with the WSD multiplier; call `.step()` after every `optimizer.step()` (update k uses lr·λ(k))."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, wsd_lambda(num_warmup_steps, num_decay_steps, num_training_steps, **kwargs))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """torch.optim.AdamW over `param_groups(model, weight_decay)` (the recipe's adamw_torch_fused on CUDA when
    `fused` is None and the parameters live on CUDA)."""
    if fused is None:
        fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(b1, b2), eps=eps,
                             weight_decay=weight_decay, fused=fused or None)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2-norm clipping, `torch.nn.utils.clip_grad_norm_` (grads × min(1, max_norm / (norm + 1e-6)));
    returns the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
