"""Hugging Face checkpoint I/O for doge_jax: HF directory <-> Flax NNX model, through the one name table."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from . import hf_io
from .config import DogeConfig
from .hf_names import check_keys, expected_hf_shapes, flax_to_hf, hf_to_flax, is_legacy, rename_legacy

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype):
    """None or "auto" (each tensor's stored dtype), a name, or a dtype."""
    if dtype is None or dtype == "auto":
        return None
    if type(dtype).__module__ == "torch":  # torch.bfloat16, as a transformers user passes it: by its name
        dtype = str(dtype).removeprefix("torch.")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: use one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


def abstract_model(cfg: DogeConfig):
    """The model's graph and parameter shapes without allocating or initialising anything."""
    from .model import DogeForCausalLM

    return nnx.eval_shape(lambda: DogeForCausalLM(cfg, rngs=nnx.Rngs(0)))


def flat_params(model) -> dict[tuple[str, ...], jax.Array]:
    """{Flax path: array} of every parameter of the model."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        out[tuple(str(p) for p in path)] = var[...] if hasattr(var, "__getitem__") else var.value
    return out


def load_hf_arrays(path: str, variant: str | None = None, config: DogeConfig | None = None):
    """(config, {Flax path: numpy array}) of an HF directory, layers stacked, kernels transposed, streamed
    tensor by tensor."""
    files = hf_io.weight_files(path)
    shapes = hf_io.tensor_shapes(files)
    legacy = is_legacy(shapes)
    if config is None:
        config = hf_io.read_config(path, variant=variant, keys=list(shapes))
    config = DogeConfig.coerce(config)
    renamed = {}
    for k, shp in shapes.items():
        new = rename_legacy(k) if legacy else k
        if new is not None:
            renamed[new] = shp
    if config.tie_word_embeddings and renamed.pop("lm_head.weight", None) is not None:
        hf_io.check_tied_head_files(config, files, shapes, legacy, path)
    check_keys(expected_hf_shapes(config), renamed, where=path)
    L = config.num_hidden_layers
    arrays: dict[tuple[str, ...], np.ndarray] = {}
    for name, t in hf_io.iter_tensors(files, framework="np"):
        new = rename_legacy(name) if legacy else name
        if new is None or new not in renamed:
            continue
        fpath, layer, transpose = hf_to_flax(new)
        if transpose:
            t = t.T
        if layer is None:
            arrays[fpath] = np.ascontiguousarray(t)
        else:
            hf_io.stack_layer(arrays, fpath, L, layer, t)
    return config, arrays


def from_pretrained(path: str, dtype=None, variant: str | None = None, config: DogeConfig | None = None):
    """Load a doge_jax DogeForCausalLM from an HF directory (native, small_doge or legacy names) or an orbax
    checkpoint (model-only, training run directory (latest step) or step directory)."""
    from . import checkpoint

    if checkpoint.is_orbax_checkpoint(path):
        if config is not None or variant is not None:
            raise ValueError(f"{path}: an orbax checkpoint carries its own config.json; config= and variant= apply "
                             "to HF directories only")
        return checkpoint.load_model(path, dtype=resolve_dtype(dtype))
    config, arrays = load_hf_arrays(path, variant, config)
    dtype = resolve_dtype(dtype)
    model = abstract_model(config)
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    new_leaves = []
    for p, var in flat:
        key = tuple(str(x) for x in p)
        a = arrays[key]
        new_leaves.append((p, var.replace(jnp.asarray(a, dtype=dtype if dtype is not None else a.dtype))))
    nnx.update(model, nnx.from_flat_state(new_leaves))
    model.generation_config = hf_io.read_generation_config(path, config)
    return model


def hf_state_dict(model) -> dict[str, np.ndarray]:
    """{HF key: numpy array (torch layout)} of a doge_jax model; tied lm_head omitted, as transformers does."""
    return to_hf_arrays(flat_params(model))


def to_hf_arrays(flat: dict[tuple[str, ...], jax.Array]) -> dict[str, np.ndarray]:
    """{Flax path: array} (parameters, or gradients of them) -> {HF key: numpy array in torch layout}."""
    out = {}
    for fpath, a in flat.items():
        a = np.asarray(jax.device_get(a))
        if fpath[:2] == ("model", "layers"):
            for i in range(a.shape[0]):
                name, transpose = flax_to_hf(fpath, i)
                out[name] = np.ascontiguousarray(a[i].T if transpose else a[i])
        else:
            name, transpose = flax_to_hf(fpath)
            out[name] = np.ascontiguousarray(a.T if transpose else a)
    return out


def _dtype_name(a: np.ndarray) -> str:
    return "bfloat16" if a.dtype == ml_dtypes.bfloat16 else str(a.dtype)


def save_pretrained(model, path: str, max_shard_size="5GB", overwrite: bool = True) -> None:
    """Write config.json, generation_config.json and safetensors (sharded above max_shard_size) atomically. In an
    existing directory the other files (tokenizer, README...) stay and old weight files go, as in transformers."""
    sd = hf_state_dict(model)
    cfg: DogeConfig = model.config
    with hf_io.model_output_dir(path, overwrite=overwrite) as tmp:
        cfg.save_json(os.path.join(tmp, "config.json"), dtype=_dtype_name(next(iter(sd.values()))))
        hf_io.write_generation_config(tmp, model.generation_config)
        hf_io.write_safetensors(tmp, sd, framework="np", max_shard_size=max_shard_size)
