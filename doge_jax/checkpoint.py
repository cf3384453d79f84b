"""Orbax checkpoints of doge_jax models: the on-disk layout shared by training, from_pretrained and convert.

Layouts (all carry the model's HF-style `config.json`):
- model-only checkpoint:   DIR/config.json, DIR/params/            (orbax PyTree of the parameter tree)
- training run directory:  RUN/config.json, RUN/checkpoints/<step>/params/ (+ optimizer/data state items)
- one step of a run:       RUN/checkpoints/<step>/params/ (config.json found in the run directory)
The parameter tree is the Flax path dict of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from .config import DogeConfig
from .hf_io import atomic_output_dir
from .hf_names import CheckpointError

PARAMS = "params"
CHECKPOINTS = "checkpoints"


def is_orbax_checkpoint(path: str) -> bool:
    """True for a model-only checkpoint, a training run directory or one of its step directories."""
    return (os.path.isdir(os.path.join(path, PARAMS)) or os.path.isdir(os.path.join(path, CHECKPOINTS)))


def list_steps(run_dir: str) -> list[int]:
    """Finished steps of a run, ascending (orbax writes unfinished steps under temporary names)."""
    ck = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(ck):
        return []
    return sorted(int(n) for n in os.listdir(ck) if n.isdigit() and os.path.isdir(os.path.join(ck, n, PARAMS)))


def resolve(path: str, step: int | None = None) -> tuple[str, str]:
    """(params directory, config.json path) for any of the three layouts; `step` picks a run's step (default:
    the latest)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):
        steps = list_steps(path)
        if not steps:
            raise CheckpointError(f"{path}: training run has no finished checkpoint")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"{path}: no checkpoint for step {step} (have {steps})")
        return os.path.join(path, CHECKPOINTS, str(step), PARAMS), os.path.join(path, "config.json")
    if step is not None:
        raise CheckpointError(f"{path}: --step/step only applies to a training run directory")
    if not os.path.isdir(os.path.join(path, PARAMS)):
        raise CheckpointError(f"{path}: not an orbax checkpoint (no {PARAMS}/ or {CHECKPOINTS}/)")
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):  # a step directory: the config lives in the run directory
        cfg = os.path.join(os.path.dirname(os.path.dirname(path)), "config.json")
    return os.path.join(path, PARAMS), cfg


def abstract_params(cfg: DogeConfig, dtype=None) -> dict:
    """The parameter tree's shapes/dtypes (jax.ShapeDtypeStruct leaves) without allocating."""
    from .hf import abstract_model

    tree = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
    if dtype is None:
        return tree
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), tree)


def read_config(cfg_path: str) -> DogeConfig:
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{cfg_path}: missing (an orbax checkpoint needs the model's config.json)")
    return DogeConfig.from_json_file(cfg_path)


def load_params(path: str, step: int | None = None, dtype=None) -> tuple[DogeConfig, dict]:
    """(config, parameter tree) of an orbax checkpoint in any of the three layouts."""
    import orbax.checkpoint as ocp

    params_dir, cfg_path = resolve(path, step)
    cfg = read_config(cfg_path)
    target = abstract_params(cfg)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(params_dir)
            tree = getattr(meta, "item_metadata", meta)
            stored = {tuple(str(getattr(k, "key", k)) for k in p): v for p, v in
                      jax.tree_util.tree_flatten_with_path(tree)[0]}
            want = {tuple(str(getattr(k, "key", k)) for k in p): v for p, v in
                    jax.tree_util.tree_flatten_with_path(target)[0]}
            _check_tree(want, stored, params_dir)
            target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, s.dtype), target,
                                  _unflatten_like(target, stored))
            params = ckptr.restore(params_dir, target)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{params_dir}: cannot restore parameters ({type(e).__name__}: {e})") from None
    if dtype is not None:
        params = jax.tree.map(lambda a: a.astype(dtype), params)
    return cfg, params


def _unflatten_like(target: dict, flat: dict) -> dict:
    leaves = [flat[tuple(str(getattr(k, "key", k)) for k in p)] for p, _ in
              jax.tree_util.tree_flatten_with_path(target)[0]]
    return jax.tree.unflatten(jax.tree.structure(target), leaves)


def _check_tree(want: dict, stored: dict, where: str) -> None:
    missing = sorted(".".join(k) for k in want if k not in stored)
    unexpected = sorted(".".join(k) for k in stored if k not in want)
    wrong = sorted(f"{'.'.join(k)}: expected {tuple(want[k].shape)}, got {tuple(stored[k].shape)}"
                   for k in want if k in stored and tuple(stored[k].shape) != tuple(want[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{where} does not match the model config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items[:50]))
        raise CheckpointError("\n".join(parts))


def model_from_params(cfg: DogeConfig, params: dict):
    """A DogeForCausalLM holding the given parameter tree (no random init)."""
    from .hf import abstract_model

    model = abstract_model(cfg)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def load_model(path: str, step: int | None = None, dtype=None):
    """DogeForCausalLM from an orbax checkpoint (model-only, run directory or step directory)."""
    cfg, params = load_params(path, step, dtype)
    return model_from_params(cfg, params)


def save_model(model, path: str, overwrite: bool = True) -> None:
    """Write a model-only orbax checkpoint (config.json + params/) atomically."""
    import orbax.checkpoint as ocp

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = jax.tree.map(jnp.asarray, params)
    dtype = str(jax.tree.leaves(params)[0].dtype)
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        model.config.save_json(os.path.join(tmp, "config.json"), dtype=dtype)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS), params)
            ckptr.wait_until_finished()
