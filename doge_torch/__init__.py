"""doge_torch: the Doge causal LM in PyTorch, parameter names equal to the Hugging Face state-dict keys."""

from doge_jax.config import DogeConfig

from .model import DogeCache, DogeForCausalLM, DogeOutput

__all__ = ["DogeConfig", "DogeForCausalLM", "DogeCache", "DogeOutput"]
