"""The generation arguments both packages check the same way (JAX-free: doge_torch.generate imports it)."""

from __future__ import annotations

import numpy as np

RIGHT_PADDED = ("a prompt row ends in padding (attention_mask 0 at the end): new tokens follow the padding; pad "
                "prompts on the left, as transformers expects for generation")


def check_sampling(do_sample: bool, temperature, top_k, top_p, max_new_tokens) -> None:
    """The generation arguments transformers would refuse, named (shared with doge_torch.generate)."""
    if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
    if not do_sample:  # greedy: the sampling knobs are ignored, as in transformers
        return
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0 when sampling (do_sample=False for greedy)")
    if top_k is not None and (not isinstance(top_k, int | np.integer) or top_k < 0):
        raise ValueError(f"top_k={top_k!r}: must be an integer >= 0 (0 or None: no top-k)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")


def output_pad(pad_token_id, cfg, eos: list[int]) -> int:
    """The id written after a row's EOS: pad_token_id, else the config's pad id, else its first valid EOS, else
    0. An explicit pad id must be a token of the vocabulary (it is fed back like any generated token)."""
    V = cfg.vocab_size
    if pad_token_id is not None:
        if not 0 <= int(pad_token_id) < V:
            raise ValueError(f"pad_token_id={pad_token_id}: must be in [0, vocab_size={V})")
        return int(pad_token_id)
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    return next((e for e in eos if 0 <= e < V), 0)
