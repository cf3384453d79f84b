"""doge_jax: the Doge causal LM in JAX/Flax NNX (model, training, generation).

`doge_jax.config`, `doge_jax.hf_names`, `doge_jax.hf_io`, `doge_jax.train_config`, `doge_jax.generation_args` and
`doge_jax.model_output` import neither JAX nor torch, so doge_torch and the converters share them; the model
itself is loaded lazily.
"""

from .config import ConfigError, DogeConfig

__all__ = ["DogeConfig", "ConfigError", "DogeForCausalLM", "DogeCache"]


def __getattr__(name: str):
    if name in ("DogeForCausalLM", "DogeCache"):
        from . import model

        return getattr(model, name)
    raise AttributeError(name)
