"""transformers' ModelOutput access for both packages' forward outputs: `out[0]`, `out["logits"]`, `out.to_tuple()`.
JAX-free (doge_torch uses it too)."""

from __future__ import annotations

from typing import Any

# transformers' MoeCausalLMOutputWithPast order (its DogeForCausalLM output); doge_jax's cache is `cache`
ORDER = ("loss", "aux_loss", "logits", "past_key_values", "cache", "router_logits")


class OutputAccess:
    """Indexing as transformers' ModelOutput: the fields that are set (not None), in its order."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v for v in (getattr(self, n, None) for n in ORDER) if v is not None)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if getattr(self, key, None) is None or key not in ORDER:
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]
