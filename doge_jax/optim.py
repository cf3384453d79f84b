"""Optimizer pieces for training Doge with optax, matching the Hugging Face / PyTorch recipe (spec §6.1, §6.2).

- `wsd_schedule`: warmup-stable-decay learning rate, equal to `peak_lr` times the multiplier of
  `transformers.get_wsd_schedule`.
- `hf_name_decayed` / `decay_mask`: which parameters get weight decay, by the HF Trainer's name rule.
- `make_optimizer`: torch-style global-norm clipping followed by `optax.adamw` (same update as `torch.optim.AdamW`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from .recipe import SCHEDULE_TYPES, hf_name_decayed, wsd_phases  # noqa: F401 (re-exported)

# Flax leaf names -> the Hugging Face parameter name.
_HF_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


def _sin_pi_sq(num: jax.Array, den: jax.Array) -> jax.Array:
    """sin(pi * num / den) ** 2, accurate relative to its value even where it is tiny.

    `num` and `den` hold integers (exact in float32), so num is reduced modulo den exactly before the one
    rounding division; this avoids the float32 cancellation of `1 - cos(x)` / `1 + cos(x)` near zeros.
    """
    r = num - den * jnp.round(num / den)
    return jnp.sin(jnp.pi * (r / den)) ** 2


def wsd_schedule(
    peak_lr: float,
    num_warmup_steps: int,
    num_decay_steps: int,
    num_training_steps: int | None = None,
    num_stable_steps: int | None = None,
    warmup_type: str = "linear",
    decay_type: str = "cosine",
    min_lr_ratio: float = 0.0,
    num_cycles: float = 0.5,
) -> optax.Schedule:
    """Warmup-stable-decay schedule: `peak_lr * λ(step)` with λ as in `transformers.get_wsd_schedule`.

    Either `num_training_steps` or `num_stable_steps` is required; if both are given the stable count wins (with a
    warning), else stable = training - warmup - decay. After the decay phase the multiplier stays `min_lr_ratio`.
    The returned callable is jit-traceable and computes in float32.
    """
    warmup, stable, decay = wsd_phases("wsd_schedule", num_warmup_steps, num_decay_steps, num_training_steps,
                                       num_stable_steps, warmup_type, decay_type)
    f32 = jnp.float32
    rho = f32(min_lr_ratio)

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        step = jnp.asarray(step).astype(f32)
        # Warmup: k = step (clipped into the phase so unused branches stay finite), p = k / W.
        w_den = f32(max(1, warmup))
        k = jnp.clip(step, 0, w_den)
        p = k / w_den
        if warmup_type == "linear":
            fw = p
        elif warmup_type == "cosine":
            fw = _sin_pi_sq(k, 2 * w_den)  # 0.5 * (1 - cos(pi p)) = sin^2(pi p / 2)
        else:
            fw = p / (1 + jnp.sqrt((w_den - k) / w_den))  # 1 - sqrt(1 - p), without cancellation
        # Decay: k = steps into the phase, p = k / Dc.
        d_den = f32(max(1, decay))
        k = jnp.clip(step - f32(warmup + stable), 0, d_den)
        p = k / d_den
        if decay_type == "linear":
            fd = (d_den - k) / d_den
        elif decay_type == "cosine":
            # 0.5 * (1 + cos(2 pi c p)) = sin^2(pi (c p - 1/2)) = sin^2(pi (2 c k - Dc) / (2 Dc)).
            fd = _sin_pi_sq(2 * f32(num_cycles) * k - d_den, 2 * d_den)
        else:
            fd = ((d_den - k) / d_den) / (1 + jnp.sqrt(p))  # 1 - sqrt(p), without cancellation
        lam = jnp.where(
            step < warmup, jnp.maximum(0, fw * (1 - rho) + rho),
            jnp.where(step < warmup + stable, f32(1),
                      jnp.where(step < warmup + stable + decay, jnp.maximum(0, fd * (1 - rho) + rho), rho)))
        return f32(peak_lr) * lam

    return schedule


def _key_name(key: Any) -> str:
    """One path entry of a pytree key path as a string."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_to_hf_name(path: tuple) -> str:
    """HF-style dotted name of a pytree leaf path: ('lm_head', 'kernel') -> 'lm_head.weight'."""
    names = [_key_name(k) for k in path]
    # nnx Variables are pytrees whose array sits under the attribute 'value'.
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    if names:
        names[-1] = _HF_LEAF_NAMES.get(names[-1], names[-1])
    return ".".join(names)


def decay_mask(params: Any) -> Any:
    """Pytree of bools shaped like `params`: True where weight decay applies (HF Trainer rule on the path names).

    Can be passed directly as `mask=decay_mask` to `make_optimizer` / `optax.adamw`.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: hf_name_decayed(path_to_hf_name(path)), params)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """Global-norm clipping as `torch.nn.utils.clip_grad_norm_`: always scale by min(1, max_norm / (norm + 1e-6))."""

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        norm = optax.tree.norm(updates)
        coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree_util.tree_map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    schedule: optax.ScalarOrSchedule,
    weight_decay: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    max_grad_norm: float = 1.0,
    mask: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    """Torch-style gradient clipping + AdamW, the same update as `clip_grad_norm_` then `torch.optim.AdamW`.

    `mask` (a bool pytree or a callable such as `decay_mask`) selects the decayed parameters; None decays all.
    """
    return optax.chain(
        clip_by_global_norm_torch(max_grad_norm),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask),
    )
