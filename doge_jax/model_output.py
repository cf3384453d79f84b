"""transformers' ModelOutput access for both packages' forward outputs: `out[0]`, `out["logits"]`, `out.to_tuple()`.
JAX-free (doge_torch uses it too)."""

from __future__ import annotations

import dataclasses
from typing import Any

# transformers' MoeCausalLMOutputWithPast order (its DogeForCausalLM output); doge_jax's cache is `cache`
ORDER = ("loss", "aux_loss", "logits", "past_key_values", "cache", "hidden_states", "router_logits")


def hidden_state_selection(flag, n: int) -> set[int] | None:
    """The hidden states (of n = num_hidden_layers + 1) that `output_hidden_states` asks for, as transformers:
    None / False none, True all, an int or a list of ints those indices (negative ones from the end; the others are
    returned as None). Out-of-range indices and other types are errors."""
    if flag is None or flag is False:
        return None
    if flag is True:
        return set(range(n))
    picks = [flag] if isinstance(flag, int) else list(flag) if isinstance(flag, list | tuple) else None
    if picks is None or any(isinstance(i, bool) or not isinstance(i, int) for i in picks):
        raise ValueError(f"output_hidden_states={flag!r}: expected a bool, an int or a list of ints")
    if not picks:
        raise ValueError(f"output_hidden_states={flag!r}: an empty list selects no hidden state (False for none)")
    bad = [i for i in picks if not -n <= i < n]
    if bad:
        raise ValueError(f"output_hidden_states={flag!r}: index {bad[0]} out of range for {n} hidden states (the "
                         f"embeddings and the {n - 1} layers' outputs, the last one after the final norm)")
    return {i % n for i in picks}


class OutputAccess:
    """As transformers' ModelOutput (an ordered dict of the fields that are set, not None, in its order): indexing
    by position or name, keys / values / items / get, iteration over the names, `in`."""

    _order = ORDER

    def keys(self) -> list[str]:
        return [n for n in self._order if getattr(self, n, None) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, n) for n in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(n, getattr(self, n)) for n in self.keys()]

    def get(self, key: str, default: Any = None) -> Any:
        """The field `key` if it is set, else `default` (dict.get, as a ModelOutput)."""
        return getattr(self, key) if key in self.keys() else default

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())

    def __iter__(self):
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __len__(self) -> int:
        return len(self.keys())

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if getattr(self, key, None) is None or key not in self._order:
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclasses.dataclass
class GenerateOutput(OutputAccess):
    """What generate returns with return_dict_in_generate, as transformers' GenerateDecoderOnlyOutput /
    GenerateBeamDecoderOnlyOutput: the token ids (prompt + new tokens), with output_scores the processed scores of
    each step (tuple of [rows, V]: after the logits processors and, sampling, the warpers; beam search: the
    log-probabilities of each running beam) and, beam search, each returned sequence's final score; with
    output_logits the raw logits of each step; beam search: beam_indices [rows, n] (the running row each new token
    came from, -1 past the sequence's end). Arrays of the package's kind (torch tensors / numpy arrays)."""

    _order = ("sequences", "sequences_scores", "scores", "logits", "beam_indices")

    sequences: Any = None
    sequences_scores: Any = None
    scores: tuple | None = None
    logits: tuple | None = None
    beam_indices: Any = None
