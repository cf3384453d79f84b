"""Start training from existing weights (`--init-from PATH`), dense -> MoE continuation, MoE warm-up freezing
(issue 6 items 3-4, spec §7).

- `checkpoint_config(path)`: the DogeConfig of anything `DogeForCausalLM.from_pretrained` accepts (HF directory,
  orbax model / run / step directory).
- `merge_config(base, requested)`: the checkpoint's config with the train-time model fields applied. Fields that
  change parameter shapes are refused (the error names the field), except dense -> MoE (`is_moe: true` with
  `num_experts` / `num_experts_per_tok` on a dense checkpoint).
- `init_params(path, cfg, seed)`: the float32 parameter tree of `cfg` holding the checkpoint's weights. For dense
  -> MoE the dense MLP gate/up/down become the CDMoE shared expert (same names), attention / norms / residuals /
  embeddings are copied, and `router_gate`, `down_embed`, `up_embed` get the standard fresh init Normal(0,
  initializer_range) (what upstream's `from_pretrained(dense, config=moe_config)` does: nothing else).
- `freeze_optimizer(...)`: clipped AdamW in which, for the first N steps, only the new MoE parameters train (the
  others get no update, no weight decay, no Adam moments and do not count in the clipping norm), then everything.
  The parameters unfrozen at step N start a fresh Adam (own count, zero moments), as torch parameters that had no
  gradient before; their learning rate still follows the global schedule step.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, NamedTuple

from .config import ConfigError, DogeConfig
from .hf_names import CheckpointError

# Fields that change parameter shapes or names: never changed by --init-from (dense -> MoE aside).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "attention_bias", "mlp_bias", "tie_word_embeddings", "variant",
                "hidden_act")
MOE_FIELDS = ("is_moe", "num_experts", "num_experts_per_tok")
# The parameters CDMoE adds to a dense layer (dotted Flax paths).
NEW_MOE_PARAM = re.compile(r"\.mlp\.(router_gate|down_embed|up_embed)\.")


def _effective(cfg: DogeConfig, field: str) -> Any:
    if field == "num_key_value_heads":
        return cfg.num_key_value_heads or cfg.num_attention_heads
    if field == "head_dim":
        return cfg.head_size
    if field == "hidden_act":  # transformers' "swish" is SiLU
        return "silu" if cfg.hidden_act == "swish" else cfg.hidden_act
    return getattr(cfg, field)


def checkpoint_config(path: str) -> DogeConfig:
    """DogeConfig of an HF directory or an orbax checkpoint (model-only, run or step directory)."""
    from . import checkpoint, hf_io

    if not os.path.exists(path):
        raise CheckpointError(f"--init-from {path!r}: no such file or directory")
    if checkpoint.is_orbax_checkpoint(path):
        return checkpoint.read_config(checkpoint.resolve(path)[1])
    files = hf_io.weight_files(path)
    return hf_io.read_config(path, keys=list(hf_io.tensor_shapes(files)))


def start_generation_config(path: str, cfg: DogeConfig):
    """The generate settings (GenerationConfig) of the checkpoint a run starts from: its generation_config.json
    (an HF or orbax model's, or a run's for a run or step directory), checked against the run's model `cfg`; None
    when it has none. A fine-tuned model samples as its start did (transformers' Trainer keeps the file too). When
    the run changes a token id (--model.eos_token_id, a new tokenizer's), the ids are the run's."""
    import dataclasses

    from . import checkpoint, hf_io
    from .config import SPECIAL_IDS, GenerationConfig

    where = os.path.dirname(checkpoint.resolve(path)[1]) if checkpoint.is_orbax_checkpoint(path) else path
    if not os.path.isfile(os.path.join(where, "generation_config.json")):
        return None
    start = checkpoint_config(path)
    if any(getattr(start, k) != getattr(cfg, k) for k in SPECIAL_IDS):
        run_ids = GenerationConfig.from_config(cfg)
        gen = hf_io.read_generation_config(where, start)
        return dataclasses.replace(gen, **{k: getattr(run_ids, k) for k in SPECIAL_IDS})
    return hf_io.read_generation_config(where, cfg)


def merge_config(base: DogeConfig, requested: dict[str, Any], where: str = "--init-from") -> DogeConfig:
    """`base` (the checkpoint's config) with the requested model fields (None = not requested) applied."""
    req = {k: v for k, v in requested.items() if v is not None}
    if base.is_moe and req.get("is_moe") is False:
        raise ConfigError(f"model.is_moe=false: {where} checkpoint is a MoE model; MoE -> dense is not supported")
    merged = base.replace(**req)
    way = ("only dense -> MoE via model.is_moe is supported" if where == "--init-from" else
           "a resumed run keeps its model; for another one use a new run directory")
    for f in SHAPE_FIELDS:
        if f in req and _effective(merged, f) != _effective(base, f):
            if f == "vocab_size" and where == "--init-from":
                way = ("to add or drop tokens, resize the checkpoint first: m = DogeForCausalLM.from_pretrained(CKPT); "
                       "m.resize_token_embeddings(N); m.save_pretrained(NEW); then --init-from NEW with the new "
                       "tokenizer (its tokenizer.json in NEW, or --train.tokenizer)")
            raise ConfigError(f"model.{f}={req[f]!r}: {where} checkpoint has {f}={_effective(base, f)!r}; changing "
                              f"it would change parameter shapes ({way})")
    merged = merged.replace(**{f: getattr(base, f) for f in SHAPE_FIELDS})  # same shapes: keep the stored form
    if base.is_moe and merged.num_experts != base.num_experts:
        raise ConfigError(f"model.num_experts={merged.num_experts}: {where} checkpoint has num_experts="
                          f"{base.num_experts}; changing it would change parameter shapes")
    if not merged.is_moe:  # irrelevant for a dense model: keep the checkpoint's values
        unused = [f"model.{f}={req[f]!r}" for f in ("num_experts", "num_experts_per_tok")
                  if f in req and req[f] != getattr(base, f)]
        if unused and "is_moe" not in req:  # (--model.is_moe true forgotten: a dense run without a word)
            print(f"note: {', '.join(unused)} not used: the model is dense (model.is_moe false); for dense -> MoE "
                  "add --model.is_moe true", file=sys.stderr)
        merged = merged.replace(num_experts=base.num_experts, num_experts_per_tok=base.num_experts_per_tok)
    return merged


def config_changes(base: DogeConfig, cfg: DogeConfig) -> list[str]:
    import dataclasses

    return [f"{f.name} {getattr(base, f.name)!r} -> {getattr(cfg, f.name)!r}" for f in dataclasses.fields(DogeConfig)
            if getattr(base, f.name) != getattr(cfg, f.name)]


def find_tokenizer(path: str) -> str | None:
    """The directory holding tokenizer.json next to a checkpoint (HF dir, orbax model dir, run dir or step dir)."""
    path = os.path.abspath(path)
    dirs = [path]
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "checkpoints" and os.path.basename(path).isdigit():  # RUN/checkpoints/N -> RUN
        dirs.append(os.path.dirname(parent))
    for d in dirs:
        if os.path.isfile(os.path.join(d, "tokenizer.json")):
            return d
    return None


def _dotted(path) -> str:
    from .sharding import path_names

    return ".".join(path_names(path))


def is_new_moe_param(name: str) -> bool:
    return NEW_MOE_PARAM.search("." + name) is not None


def init_params(path: str, cfg: DogeConfig, seed: int) -> dict:
    """float32 parameter tree (DogeForCausalLM / DogeTrunk paths) of `cfg` initialised from the checkpoint at
    `path`; for dense -> MoE the new router/expert tables are fresh (seeded by `seed`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from .loss import DogeTrunk
    from .model import DogeForCausalLM

    loaded = nnx.to_pure_dict(nnx.state(DogeForCausalLM.from_pretrained(path), nnx.Param))
    src = {_dotted(p): x for p, x in jax.tree_util.tree_flatten_with_path(loaded)[0]}
    to_moe = cfg.is_moe and not any(is_new_moe_param(n) for n in src)
    if to_moe:  # only the new tables need random values
        fresh = nnx.to_pure_dict(nnx.split(DogeTrunk(cfg, rngs=nnx.Rngs(seed)), nnx.Param)[1])
    else:
        fresh = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: DogeTrunk(cfg, rngs=nnx.Rngs(seed))),
                                           nnx.Param)[1])
    used = set()

    def pick(p, target):
        name = _dotted(p)
        if name in src:
            a = src[name]
            if tuple(a.shape) != tuple(target.shape):
                raise CheckpointError(f"--init-from {path}: {name} has shape {tuple(a.shape)}, the model config "
                                      f"needs {tuple(target.shape)}")
            used.add(name)
            return jnp.asarray(a, jnp.float32)
        if to_moe and is_new_moe_param(name):
            return jnp.asarray(target, jnp.float32)
        raise CheckpointError(f"--init-from {path}: the checkpoint has no parameter {name}")

    params = jax.tree_util.tree_map_with_path(pick, fresh)
    unused = sorted(set(src) - used)
    if unused:
        raise CheckpointError(f"--init-from {path}: parameters not used by the model config: {', '.join(unused[:20])}")
    upcast_note(path, {str(x.dtype) for x in src.values()})
    return params


def upcast_note(path: str, dtypes: set[str]) -> None:
    """Say that a checkpoint stored in 16-bit floats is trained (and saved) in float32, as the recipe keeps its
    parameters (both trainers)."""
    low = sorted({d.removeprefix("torch.") for d in dtypes} & {"bfloat16", "float16"})
    if low:
        print(f"note: --init-from {path} holds {' and '.join(low)} weights: they are trained, and saved, as float32 "
              "(python -m convert --dtype bfloat16 casts a saved model back)", file=sys.stderr)


# ---- MoE warm-up: train only the new MoE parameters for the first N steps --------------------------------------------
def new_param_mask(params: Any) -> Any:
    """Bool tree shaped like `params`: True for router_gate / down_embed / up_embed."""
    import jax

    return jax.tree_util.tree_map_with_path(lambda p, _: is_new_moe_param(_dotted(p)), params)


class DelayedState(NamedTuple):
    count: Any  # updates seen so far (int32)
    inner: Any


def delayed(inner, steps: int):
    """A GradientTransformation that outputs zero updates (and leaves `inner`'s state untouched) for its first
    `steps` updates, then behaves as `inner` started fresh."""
    import jax
    import jax.numpy as jnp
    import optax

    def init_fn(params):
        return DelayedState(jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None):
        def run(_):
            return inner.update(updates, state.inner, params)

        def skip(_):
            return jax.tree.map(jnp.zeros_like, updates), state.inner

        new_updates, inner_state = jax.lax.cond(state.count >= steps, run, skip, None)
        return new_updates, DelayedState(optax.safe_int32_increment(state.count), inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def freeze_optimizer(schedule, steps: int, weight_decay: float, b1: float, b2: float, eps: float,
                     max_grad_norm: float, decay_mask):
    """Torch-style clipping + AdamW where every parameter but the new MoE ones is frozen for `steps` updates.

    The caller zeroes the frozen gradients during those steps (`mask_frozen_grads`) so they do not count in the
    global clipping norm (torch's clip_grad_norm_ only sees parameters with a gradient)."""
    import jax
    import optax

    from .optim import clip_by_global_norm_torch

    def adamw(sched):
        return optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)

    def shifted(count):  # the unfrozen group's count 0 is global step `steps`
        return schedule(count + steps)

    return optax.chain(
        clip_by_global_norm_torch(max_grad_norm),
        optax.multi_transform({"new": adamw(schedule), "old": delayed(adamw(shifted), steps)},
                              lambda params: jax.tree.map(lambda m: "new" if m else "old", new_param_mask(params))),
    )


def mask_frozen_grads(grads: Any, step, steps: int) -> Any:
    """Gradients with the frozen (non-new) parameters' entries zeroed while step < steps."""
    import jax
    import jax.numpy as jnp

    def one(g, new):
        return g if new else jnp.where(step < steps, jnp.zeros_like(g), g)

    return jax.tree.map(one, grads, new_param_mask(grads))
