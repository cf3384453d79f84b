"""from_pretrained / save_pretrained for doge_torch: an HF directory *is* a doge_torch checkpoint."""

from __future__ import annotations

import os

import torch

from doge_jax import hf_io
from doge_jax.config import DogeConfig
from doge_jax.hf_names import CheckpointError, check_keys, expected_hf_shapes, is_legacy, rename_legacy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype) -> torch.dtype | None:
    """None or "auto" (the checkpoint's dtype), a name, or a torch.dtype."""
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype}: a model's weights are floating point; use one of {sorted(DTYPES)}")
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_hf_state(path: str, variant: str | None = None, config: DogeConfig | None = None):
    """(config, state dict with current HF names) of an HF directory; legacy names are renamed (spec §2.2 c)."""
    files = hf_io.weight_files(path)
    shapes = hf_io.tensor_shapes(files)
    legacy = is_legacy(shapes)
    if config is None:
        config = hf_io.read_config(path, variant=variant, keys=list(shapes))
    config = DogeConfig.coerce(config)
    state = {}
    for name, t in hf_io.iter_tensors(files, framework="pt"):
        new = rename_legacy(name) if legacy else name
        if new is not None:
            state[new] = t
    return config, state


def from_pretrained(cls, path: str, dtype=None, variant: str | None = None, config: DogeConfig | None = None):
    """Build `cls(config)` and load the weights of an HF directory strictly (errors list missing/unexpected keys).
    The model comes back in eval mode (no dropout), as transformers' does; `.train()` for training."""
    config, state = load_hf_state(path, variant, config)
    expected = expected_hf_shapes(config)
    if config.tie_word_embeddings:
        hf_io.check_tied_head(config, state.pop("lm_head.weight", None), state.get("model.embed_tokens.weight"), path)
    check_keys(expected, {k: tuple(v.shape) for k, v in state.items()}, where=path)
    dtype = resolve_dtype(dtype)
    if dtype is None:  # as transformers: the config's dtype, else the widest floating dtype stored (never downcast)
        dtype = resolve_dtype(hf_io.config_dtype(path))
    if dtype is None:
        floats = [v.dtype for v in state.values() if v.is_floating_point()]
        dtype = max(floats, key=lambda d: (torch.finfo(d).bits, d == torch.bfloat16), default=torch.float32)
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device="cpu").to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=False)
    model.generation_config = hf_io.read_generation_config(path, config)
    return model.eval()


def state_for_hf(model) -> dict[str, torch.Tensor]:
    sd = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def write_model(out_dir: str, model, max_shard_size="5GB") -> None:
    """config.json, generation_config.json and the safetensors of `model` into the (new) directory `out_dir`."""
    sd = state_for_hf(model)
    dtype = str(next(iter(sd.values())).dtype).replace("torch.", "")
    model.config.save_json(os.path.join(out_dir, "config.json"), dtype=dtype)
    hf_io.write_generation_config(out_dir, model.generation_config)
    hf_io.write_safetensors(out_dir, sd, framework="pt", max_shard_size=max_shard_size)


def save_pretrained(model, path: str, max_shard_size="5GB", overwrite: bool = True) -> None:
    """Write config.json, generation_config.json and safetensors (sharded above max_shard_size) atomically. In an
    existing directory the other files (tokenizer, README...) stay and old weight files go, as in transformers."""
    with hf_io.model_output_dir(path, overwrite=overwrite) as tmp:
        write_model(tmp, model, max_shard_size)


__all__ = ["from_pretrained", "save_pretrained", "load_hf_state", "CheckpointError"]
