"""The generation arguments both packages check the same way (JAX-free: doge_torch.generate imports it)."""

from __future__ import annotations

import numpy as np

RIGHT_PADDED = ("a prompt row ends in padding (attention_mask 0 at the end): new tokens follow the padding; pad "
                "prompts on the left, as transformers expects for generation")


class _FromConfig:
    """generate's default for do_sample / temperature / top_k / top_p: the model's generation_config value."""

    def __repr__(self) -> str:
        return "FROM_CONFIG"

    def __reduce__(self) -> str:  # copy.deepcopy and pickle give the one instance back (`is FROM_CONFIG` holds)
        return "FROM_CONFIG"


FROM_CONFIG = _FromConfig()


def sampling_args(gen, do_sample, temperature, top_k, top_p) -> tuple[bool, float, int | None, float | None]:
    """The sampling arguments of a generate call, those not given (FROM_CONFIG) taken from `gen` (the model's
    generation_config), as transformers does; an explicit None is transformers' None: temperature 1, no top-k,
    no top-p, greedy."""
    def pick(value, name):
        return getattr(gen, name) if value is FROM_CONFIG else value

    do_sample, temperature = pick(do_sample, "do_sample"), pick(temperature, "temperature")
    return bool(do_sample), 1.0 if temperature is None else temperature, pick(top_k, "top_k"), pick(top_p, "top_p")


def check_sampling(do_sample: bool, temperature, top_k, top_p, max_new_tokens) -> None:
    """The generation arguments transformers would refuse, named (shared with doge_torch.generate)."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
    if not do_sample:  # greedy: the sampling knobs are ignored, as in transformers
        return
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0 when sampling (do_sample=False for greedy)")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise ValueError(f"top_k={top_k!r}: must be an integer >= 0 (0 or None: no top-k)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")


def _is_int(x) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def _ids(value, name: str) -> list[int]:
    """An id or ids (int, list, numpy / torch / JAX array of any shape) as a list of ints; non-integers raise."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, list | tuple):
        items = list(value)
    else:
        items = np.asarray(value).ravel().tolist() if hasattr(value, "__array__") else [value]
    bad = [e for e in items if not _is_int(e)]
    if bad:
        raise ValueError(f"{name}={value!r}: token ids must be integers, got {bad[0]!r}")
    return [int(e) for e in items]


def eos_ids(eos_token_id, gen) -> list[int]:
    """The EOS ids generation stops at: eos_token_id (an id or ids: list, array, tensor), else the model's
    generation config's (`gen`); [] for none. Non-integer ids raise (5.5 is not an id)."""
    eos = eos_token_id if eos_token_id is not None else gen.eos_token_id
    return [] if eos is None else _ids(eos, "eos_token_id")


def pad_id(pad_token_id) -> int | None:
    """An explicit pad_token_id as an int (None stays None); a non-integer raises."""
    if pad_token_id is None:
        return None
    ids = _ids(pad_token_id, "pad_token_id")
    if len(ids) != 1:
        raise ValueError(f"pad_token_id={pad_token_id!r}: one token id")
    return ids[0]


def inferred_pad(pad_token_id, gen, eos: list[int]) -> int | None:
    """The pad id transformers' generate infers a missing attention_mask from (pad_token_id, else the generation
    config's; None when there is none or it is an EOS id, as transformers then keeps every token). A prompt
    holding it gets attention_mask = (ids != pad)."""
    pad = pad_id(pad_token_id) if pad_token_id is not None else gen.pad_token_id
    return None if pad is None or int(pad) in eos else int(pad)


def as_array(value, name: str) -> np.ndarray:
    """input_ids / attention_mask as a numpy array; rows of different lengths are named (numpy's own error says
    "inhomogeneous shape")."""
    try:
        return np.asarray(value)
    except ValueError:
        raise ValueError(f"{name}: rows of different lengths; left-pad the prompts to one length and pass "
                         "attention_mask (0 on the padding)") from None


def check_mask_values(mask: np.ndarray) -> None:
    """An attention_mask holds 0 and 1 only (2 or 0.5 meant different things to the two packages)."""
    if mask.size and not np.isin(mask, (0, 1)).all():
        bad = mask[~np.isin(mask, (0, 1))]
        raise ValueError(f"attention_mask values must be 0 or 1, got {bad[:5].tolist()}")


def output_pad(pad_token_id, gen, eos: list[int], V: int) -> int:
    """The id written after a row's EOS: pad_token_id, else the generation config's pad id, else the first EOS
    id in [0, V), else 0. An explicit pad id must be a token of the vocabulary V (it is fed back like any
    generated token)."""
    pad_token_id = pad_id(pad_token_id)
    if pad_token_id is not None:
        if not 0 <= int(pad_token_id) < V:
            raise ValueError(f"pad_token_id={pad_token_id}: must be in [0, vocab_size={V})")
        return int(pad_token_id)
    if gen.pad_token_id is not None:
        return gen.pad_token_id
    return next((e for e in eos if 0 <= e < V), 0)
