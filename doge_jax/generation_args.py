"""The generation arguments both packages check the same way (JAX-free: doge_torch.generate imports it)."""

from __future__ import annotations

import dataclasses

import numpy as np

RIGHT_PADDED = ("a prompt row ends in padding (attention_mask 0 at the end): new tokens follow the padding; pad "
                "prompts on the left, as transformers expects for generation")


class _FromConfig:
    """generate's default for do_sample / temperature / top_k / top_p / repetition_penalty / max_new_tokens /
    min_new_tokens: the model's generation_config value."""

    def __repr__(self) -> str:
        return "FROM_CONFIG"

    def __reduce__(self) -> str:  # copy.deepcopy and pickle give the one instance back (`is FROM_CONFIG` holds)
        return "FROM_CONFIG"


FROM_CONFIG = _FromConfig()


def sampling_args(gen, do_sample, temperature, top_k, top_p, min_p=FROM_CONFIG
                  ) -> tuple[bool, float, int | None, float | None, float | None]:
    """The sampling arguments of a generate call, those not given (FROM_CONFIG) taken from `gen` (the model's
    generation_config), as transformers does; an explicit None is transformers' None: temperature 1, no top-k,
    no top-p, no min-p, greedy."""
    def pick(value, name):
        return getattr(gen, name) if value is FROM_CONFIG else value

    do_sample, temperature = pick(do_sample, "do_sample"), pick(temperature, "temperature")
    return (bool(do_sample), 1.0 if temperature is None else temperature, pick(top_k, "top_k"), pick(top_p, "top_p"),
            pick(min_p, "min_p"))


def call_generation_config(model, given=None):
    """The generation config of one generate call: `model.generation_config`, or `given` as transformers takes
    `generate(generation_config=...)`: a transformers GenerationConfig or a dict overrides the model's for the
    fields it sets (not None), a doge_jax GenerationConfig (e.g. `dataclasses.replace(model.generation_config,
    ...)`) is used as it is. Checked as generation_config.json is (ids in the vocabulary, field types)."""
    from .config import GenerationConfig
    from .hf_io import generation_config_from_dict

    if given is None:
        return model.generation_config
    if isinstance(given, GenerationConfig):  # checked as the file would be (an equal config comes back)
        return generation_config_from_dict(given.to_dict(), model.config, "generation_config")
    if isinstance(given, dict):
        fields = dict(given)
    elif callable(getattr(given, "to_dict", None)):  # transformers.GenerationConfig (its unset fields are None)
        fields = given.to_dict()
    else:
        raise TypeError(f"generation_config: expected a transformers or doge_jax GenerationConfig or a dict, got "
                        f"{type(given).__name__}")
    bad = [k for k in fields if not isinstance(k, str)]
    if bad:
        raise TypeError(f"generation_config: field names must be strings, got {bad[0]!r}")
    fields = {k: v for k, v in fields.items() if v is not None and k != "transformers_version"}
    asked = [k for k in _OTHER_OUTPUTS if fields.get(k)]
    if asked:  # (silently ignored, a caller would index a tensor as a GenerateOutput)
        raise ValueError(f"generation_config {asked[0]}=True: not supported; generate returns the token ids "
                         "(prompt + new tokens), with return_dict_in_generate also output_scores / output_logits")
    return generation_config_from_dict({**model.generation_config.to_dict(), **fields}, model.config,
                                       "generation_config")


_OTHER_OUTPUTS = ("output_hidden_states", "output_attentions")  # (return_dict_in_generate's scores and logits: taken)
DEFAULT_MAX_NEW_TOKENS = 20  # generate's max_new_tokens when neither the call nor generation_config.json sets it


# transformers generate() arguments and generation-config fields not implemented here (beyond those in
# _NEUTRAL_FIELDS / _NO_EFFECT_VALUES): passed to generate with an effect, refused by name
_NOT_IMPLEMENTED = {"logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                    "assistant_model", "assistant_tokenizer", "tokenizer", "negative_prompt_ids",
                    "negative_prompt_attention_mask", "custom_generate", "use_model_defaults",
                    "force_words_ids", "constraints",
                    "guidance_scale", "penalty_alpha", "top_h", "stop_strings",
                    "watermarking_config", "token_healing", "diversity_penalty", "num_beam_groups",
                    "encoder_repetition_penalty", "encoder_no_repeat_ngram_size", "dola_layers", "max_time"}
# ... and those that change nothing here: ids generate does not read, a softmax
# renormalisation that keeps every token's rank and probability
_NO_EFFECT_HERE = {"low_memory", "renormalize_logits", "bos_token_id", "trust_remote_code"}


def call_min_length(model, generation_config, kwargs: dict):
    """The generation config of a call given transformers' `min_length=` (a total, prompt included), popped from
    `kwargs`: the call's generation config with that min_length (None: unchanged)."""
    min_length = kwargs.pop("min_length", None)
    if min_length is None:
        return generation_config
    import dataclasses

    return dataclasses.replace(call_generation_config(model, generation_config), min_length=min_length)


def check_generate_kwargs(kwargs: dict, input_ids) -> None:
    """The transformers generate() arguments a model's generate does not take: accepted where they change nothing
    (None, False, transformers' no-op values), refused by name otherwise (a ValueError, not a bare TypeError);
    anything else is Python's TypeError for an unexpected keyword argument. `input_ids` None: refused, naming
    inputs_embeds where it was given (transformers generates from embeddings; these generate from token ids)."""
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("inputs_embeds: not supported by this generate; pass the prompt's token ids as input_ids")
    if input_ids is None:
        raise ValueError("input_ids: required (the prompt's token ids)")
    kwargs.pop("inputs_embeds", None)
    for k, v in kwargs.items():
        known = k in _NOT_IMPLEMENTED or k in _NEUTRAL_FIELDS or k in _NO_EFFECT_VALUES or k in _NO_EFFECT_HERE
        if not known:
            raise TypeError(f"generate() got an unexpected keyword argument {k!r}")
        if (v is None or v is False or (k in _NO_EFFECT_VALUES and v == _NO_EFFECT_VALUES[k])
                or (isinstance(v, list | dict) and not v) or k in _NO_EFFECT_HERE
                or (k == "guidance_scale" and v == 1)):  # transformers' own no-op values
            continue
        if k in _OTHER_OUTPUTS:
            raise ValueError(f"{k}={v!r}: not supported; generate returns the token ids (prompt + new tokens), with "
                             "return_dict_in_generate also output_scores / output_logits")
        if k in _NEUTRAL_FIELDS and k not in _NOT_IMPLEMENTED:  # settings that do not change the tokens
            continue
        raise ValueError(f"{k}={v!r}: not implemented by this generate (it would change transformers' output); "
                         "supported: greedy or sampled decoding with temperature, top_k, top_p, min_p, typical_p, "
                         "epsilon_cutoff, eta_cutoff, repetition_penalty, no_repeat_ngram_size, min_new_tokens / "
                         "min_length, sequence_bias, bad_words_ids, suppress_tokens, begin_suppress_tokens, "
                         "forced_bos/eos_token_id, exponential_decay_length_penalty, remove_invalid_values, EOS and "
                         "streamer; beam search (num_beams, num_return_sequences, length_penalty, early_stopping); "
                         "return_dict_in_generate with output_scores / output_logits")


@dataclasses.dataclass(frozen=True)
class TokenRules:
    """transformers' other logits processors of a generate call, in its order after min_new_tokens (hashable: a
    static argument of doge_jax's compiled loops). Steps count new tokens from 0; the prompt has P tokens."""

    bias_single: tuple[tuple[int, float], ...] = ()  # sequence_bias of one token: (token, bias), added first
    bias_multi: tuple[tuple[tuple[int, ...], int, float], ...] = ()  # (prefix, token, bias) right after the prefix
    bad_single: tuple[int, ...] = ()  # bad_words_ids of one token: never chosen
    bad_multi: tuple[tuple[tuple[int, ...], int], ...] = ()  # (prefix, token): not chosen right after the prefix
    forced: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (step, ids): the only choices at that step (forced BOS
    # where the row holds one token: a one-token prompt's step 0; forced EOS: the last step)
    remove_invalid: bool = False  # NaN -> 0, +-inf -> float32's max / min
    decay: tuple[float, ...] = ()  # exponential_decay_length_penalty: per step, factor ** (step - start) - 1
    eos: tuple[int, ...] = ()  # (the EOS ids the decay raises)
    suppress: tuple[int, ...] = ()  # suppress_tokens: never chosen
    begin_suppress: tuple[int, ...] = ()  # begin_suppress_tokens: not chosen at step begin_step
    begin_step: int = 0

    @property
    def history(self) -> int:
        """How many earlier tokens the rules read (the longest bad-words prefix)."""
        return max([len(p) for p, _ in self.bad_multi] + [len(p) for p, _, _ in self.bias_multi], default=0)

    @property
    def bias_groups(self) -> tuple:
        """bias_multi grouped by prefix length, in transformers' order: ((prefixes, tokens, biases), ...)."""
        groups: dict[int, list] = {}
        for prefix, tok, b in self.bias_multi:
            groups.setdefault(len(prefix), []).append((prefix, tok, b))
        return tuple((tuple(p for p, _, _ in g), tuple(t for _, t, _ in g), tuple(b for _, _, b in g))
                     for g in groups.values())


def rule_values(given: dict) -> dict:
    """generate's **processors as token_rules' values: each TOKEN_RULE_FIELDS name, FROM_CONFIG where not given;
    another name is Python's TypeError for an unexpected keyword argument."""
    from .config import TOKEN_RULE_FIELDS

    unknown = [k for k in given if k not in TOKEN_RULE_FIELDS]
    if unknown:
        raise TypeError(f"generate() got an unexpected keyword argument {unknown[0]!r}")
    return {k: given.get(k, FROM_CONFIG) for k in TOKEN_RULE_FIELDS}


def pop_rule_values(kwargs: dict) -> dict:
    """The TOKEN_RULE_FIELDS arguments among a model.generate call's **kwargs, popped."""
    from .config import TOKEN_RULE_FIELDS

    return {k: kwargs.pop(k) for k in TOKEN_RULE_FIELDS if k in kwargs}


def token_rules(gen, values: dict, eos: list[int], prompt_len: int, vocab_size: int,
                max_new_tokens: int) -> TokenRules | None:
    """The TokenRules of a generate call: `values` maps bad_words_ids, suppress_tokens, begin_suppress_tokens,
    forced_bos_token_id, forced_eos_token_id, exponential_decay_length_penalty, remove_invalid_values to the call's
    values (FROM_CONFIG: the generation config's), checked (token ids in the vocabulary); None when none acts."""
    v = {k: getattr(gen, k) if x is FROM_CONFIG else x for k, x in values.items()}

    def ids(name, value, nested=False) -> tuple:
        if hasattr(value, "tolist"):  # a numpy array or torch tensor
            value = value.tolist()
        items = value if isinstance(value, list | tuple) else [value]
        if not items:
            raise ValueError(f"{name}={value!r}: a token id or a non-empty list of them")
        if nested and (not items or any(not isinstance(x, list | tuple) or not x for x in items)):
            raise ValueError(f"{name}={value!r}: a non-empty list of non-empty lists of token ids")
        flat = [t for x in items for t in x] if nested else items
        bad = [t for t in flat if not _is_int(t) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name}={value!r}: token ids must be integers in [0, vocab_size={vocab_size}), got "
                             f"{bad[0]!r}")
        return tuple(tuple(int(t) for t in x) for x in items) if nested else tuple(int(t) for t in items)

    rules = {}
    if v["sequence_bias"] is not None:  # [[ids, bias], ...] or {tuple(ids): bias}, as transformers
        given = v["sequence_bias"]
        pairs = list(given.items()) if isinstance(given, dict) else given
        if not isinstance(pairs, list | tuple) or not pairs or any(
                not isinstance(x, list | tuple) or len(x) != 2 or not isinstance(x[0], list | tuple)
                or hasattr(x[0], "tolist") or isinstance(x[1], bool)
                or not isinstance(x[1], int | float | np.number) for x in pairs):
            raise ValueError(f"sequence_bias={given!r}: a non-empty list of [token ids, bias] pairs (or a dict "
                             "{tuple of ids: bias})")
        seqs = ids("sequence_bias", [list(x[0]) for x in pairs], nested=True)
        table = dict(zip(seqs, (float(x[1]) for x in pairs)))  # (a repeated sequence: the last bias)
        rules["bias_single"] = tuple((k[0], b) for k, b in table.items() if len(k) == 1)
        rules["bias_multi"] = tuple((k[:-1], k[-1], b) for k, b in table.items() if len(k) > 1)
    if v["bad_words_ids"] is not None:  # (transformers drops a bad word that is one EOS id)
        words = [w for w in ids("bad_words_ids", v["bad_words_ids"], nested=True) if not (len(w) == 1 and w[0] in eos)]
        rules["bad_single"] = tuple(sorted({w[0] for w in words if len(w) == 1}))
        rules["bad_multi"] = tuple((w[:-1], w[-1]) for w in words if len(w) > 1)
    forced = []
    if v["forced_bos_token_id"] is not None:
        bos = ids("forced_bos_token_id", v["forced_bos_token_id"])
        if prompt_len == 1:
            forced.append((0, bos))
    if v["forced_eos_token_id"] is not None:
        forced.append((max_new_tokens - 1, ids("forced_eos_token_id", v["forced_eos_token_id"])))
    rules["forced"] = tuple(forced)
    rv = v["remove_invalid_values"]
    if rv is not None and not isinstance(rv, bool | np.bool_):
        raise ValueError(f"remove_invalid_values={rv!r}: must be True or False")
    rules["remove_invalid"] = bool(rv)
    decay = v["exponential_decay_length_penalty"]
    if decay is not None:
        if (not isinstance(decay, list | tuple) or len(decay) != 2 or not _is_int(decay[0])
                or isinstance(decay[1], bool) or not isinstance(decay[1], int | float | np.number)):
            raise ValueError(f"exponential_decay_length_penalty={decay!r}: (start_index, decay_factor)")
        start, factor = int(decay[0]), float(decay[1])
        in_vocab = tuple(e for e in eos if 0 <= e < vocab_size)
        if in_vocab:  # (no EOS id to raise, e.g. --no-eos: nothing to do)
            def bonus(n: int) -> float:  # Python's float power rounded once to float32, as transformers' scalar
                try:  # multiplies its scores (past float32's range: inf, as that cast gives)
                    v = factor ** n - 1
                except OverflowError:
                    v = float("inf")
                with np.errstate(over="ignore"):
                    return float(np.float32(v))

            rules["decay"] = tuple(bonus(s - start) if s > start else 0.0 for s in range(max_new_tokens))
            rules["eos"] = in_vocab
    if v["suppress_tokens"] is not None:
        rules["suppress"] = ids("suppress_tokens", v["suppress_tokens"])
    if v["begin_suppress_tokens"] is not None:
        rules["begin_suppress"] = ids("begin_suppress_tokens", v["begin_suppress_tokens"])
        # transformers: the first new token, one later where a one-token prompt gets the forced BOS first
        rules["begin_step"] = 0 if prompt_len > 1 or v["forced_bos_token_id"] is None else 1
    out = TokenRules(**rules)
    return None if out == TokenRules(remove_invalid=False) else out


def output_args(gen, return_dict_in_generate, output_scores, output_logits) -> tuple[bool, bool, bool]:
    """(return a GenerateOutput, with the processed scores, with the raw logits) of a generate call, FROM_CONFIG
    from the generation config: transformers' return_dict_in_generate / output_scores / output_logits (the scores
    and logits only with return_dict_in_generate, as there)."""
    values = {"return_dict_in_generate": return_dict_in_generate, "output_scores": output_scores,
              "output_logits": output_logits}
    values = {k: getattr(gen, k) if v is FROM_CONFIG else bool(v is not None and v) for k, v in values.items()}
    as_dict = bool(values["return_dict_in_generate"])
    return as_dict, as_dict and bool(values["output_scores"]), as_dict and bool(values["output_logits"])


def cutoff_args(gen, typical_p, epsilon_cutoff, eta_cutoff, do_sample: bool
                ) -> tuple[float | None, float | None, float | None] | None:
    """transformers' typical_p / epsilon_cutoff / eta_cutoff sampling warpers of a generate call (FROM_CONFIG: the
    generation config's), as (typical_p, epsilon, eta) with None for each one off, or None when all are (or when
    greedy). As in transformers: typical_p acts below 1 and must be > 0; a cutoff acts strictly inside (0, 1)."""
    def pick(value, name):
        return getattr(gen, name) if value is FROM_CONFIG else value

    values = {"typical_p": pick(typical_p, "typical_p"), "epsilon_cutoff": pick(epsilon_cutoff, "epsilon_cutoff"),
              "eta_cutoff": pick(eta_cutoff, "eta_cutoff")}
    for name, v in values.items():
        if v is not None and (isinstance(v, bool | np.bool_) or not isinstance(v, int | float | np.number)
                              or v != v):
            raise ValueError(f"{name}={v!r}: must be a number, not NaN (None: off)")
    typ, eps, eta = values.values()
    if not do_sample:
        return None
    if typ is not None and typ < 1.0 and not typ > 0.0:
        raise ValueError(f"typical_p={typ!r}: must be in (0, 1] (1 or None: off)")
    out = (float(typ) if typ is not None and typ < 1.0 else None,
           float(eps) if eps is not None and 0.0 < eps < 1.0 else None,
           float(eta) if eta is not None and 0.0 < eta < 1.0 else None)
    return None if out == (None, None, None) else out


def transition_scores(sequences, scores, beam_indices, normalize_logits: bool, vocab_size: int) -> np.ndarray:
    """transformers' compute_transition_scores on numpy arrays: the score of each generated token [rows, steps]
    (its step's `scores` entry, following `beam_indices` for beam search; log-softmaxed over the vocabulary first
    with normalize_logits; 0 past a beam's end)."""
    scores = [np.asarray(s, np.float32) for s in scores]
    sequences = np.asarray(sequences)
    n = len(scores)
    if beam_indices is None:
        beam_indices = np.broadcast_to(np.arange(scores[0].shape[0])[:, None], (scores[0].shape[0], n))
    beam_indices = np.asarray(beam_indices).astype(np.int64)
    stacked = np.stack(scores).reshape(n, -1).T  # [rows * V, steps]
    if normalize_logits:
        x = stacked.reshape(-1, vocab_size, n)
        top = np.max(x, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            x = x - top - np.log(np.sum(np.exp(x - top), axis=1, keepdims=True))
        stacked = x.reshape(-1, n)
    ended = beam_indices < 0
    length = int((~ended).sum(-1).max())
    rows = np.where(ended, 0, beam_indices)[:, :length]
    ended = ended[:, :length]
    idx = sequences[:, sequences.shape[-1] - length:] + rows * vocab_size
    out = np.take_along_axis(stacked[:, :length], idx, axis=0)
    return np.where(ended, np.float32(0), out)


def beam_args(gen, num_beams, num_return_sequences, length_penalty, early_stopping, do_sample: bool,
              streamer=None) -> tuple[int, int, float, bool | str]:
    """(num_beams, num_return_sequences, length_penalty, early_stopping) of a generate call, those not given
    (FROM_CONFIG) from the generation config `gen`, checked as transformers checks them: beam search (with
    do_sample: beam sampling) takes num_return_sequences <= num_beams and no streamer; sampling (num_beams 1)
    repeats each row num_return_sequences times; greedy search returns one sequence per row."""
    def pick(value, name):
        return getattr(gen, name) if value is FROM_CONFIG else value

    num_beams, n_seq = pick(num_beams, "num_beams"), pick(num_return_sequences, "num_return_sequences")
    length_penalty, early_stopping = pick(length_penalty, "length_penalty"), pick(early_stopping, "early_stopping")
    num_beams = 1 if num_beams is None else num_beams
    n_seq = 1 if n_seq is None else n_seq
    length_penalty = 1.0 if length_penalty is None else length_penalty
    early_stopping = False if early_stopping is None else early_stopping
    if not _is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams={num_beams!r}: must be an integer >= 1 (1: no beam search)")
    if not _is_int(n_seq) or n_seq < 1:
        raise ValueError(f"num_return_sequences={n_seq!r}: must be an integer >= 1")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, int | float | np.integer | np.floating):
        raise ValueError(f"length_penalty={length_penalty!r}: must be a number")
    if not (isinstance(early_stopping, bool | np.bool_) or early_stopping == "never"):
        raise ValueError(f"early_stopping={early_stopping!r}: must be True, False or 'never'")
    if num_beams == 1 and not do_sample and n_seq > 1:
        raise ValueError(f"num_return_sequences={n_seq}: greedy search returns one sequence per row (as "
                         "transformers); use num_beams >= num_return_sequences, or do_sample=True")
    if num_beams > 1:
        if n_seq > num_beams:
            raise ValueError(f"num_return_sequences={n_seq} > num_beams={num_beams}: beam search returns at most "
                             "num_beams sequences per row")
        if streamer is not None:
            raise ValueError(f"num_beams={num_beams}: a streamer cannot be used with beam search (as in "
                             "transformers: the best sequences are known at the end only)")
    return int(num_beams), int(n_seq), float(length_penalty), early_stopping if early_stopping == "never" else bool(
        early_stopping)


def prompt_length(input_ids) -> int | None:
    """The prompt's length (the last axis) of ids given as an array, a tensor or nested lists."""
    try:
        shape = tuple(input_ids.shape) if hasattr(input_ids, "shape") else np.shape(input_ids)
    except ValueError:  # ragged lists: generate's own check names them
        return None
    return shape[-1] if shape else None


def length_and_penalty(gen, max_new_tokens, repetition_penalty, default_length: int = DEFAULT_MAX_NEW_TOKENS,
                       max_length=None, prompt_len: int | None = None,
                       max_positions: int | None = None) -> tuple[int, float]:
    """max_new_tokens and repetition_penalty of a generate call, as transformers sizes its output: max_new_tokens
    (the call's, else `gen`'s; an explicit None: none), else max_length (the call's, else `gen`'s: prompt + new
    tokens), else `default_length` new tokens, the total capped at `max_positions` (transformers caps its default
    length at config.max_position_embeddings, and refuses a prompt that leaves no room). repetition_penalty: the
    call's, else `gen`'s (None: none). Checked: an integer >= 1, a number > 0."""
    if max_new_tokens is FROM_CONFIG:
        max_new_tokens = gen.max_new_tokens
    if max_new_tokens is None:
        total = max_length if max_length is not None else (getattr(gen, "extra", None) or {}).get("max_length")
        if total is not None and prompt_len is not None:
            if isinstance(total, bool) or not isinstance(total, int | np.integer) or total <= prompt_len:
                where = "" if max_length is not None else " (the generation config's)"
                raise ValueError(f"max_length={total!r}{where}: must be an int above the prompt's {prompt_len} tokens "
                                 "(it counts the prompt, as in transformers; max_new_tokens counts new tokens only)")
            max_new_tokens = int(total) - prompt_len
        elif max_positions is not None and prompt_len is not None:
            total = min(prompt_len + default_length, max_positions)
            if total <= prompt_len:
                raise ValueError(f"the prompt's {prompt_len} tokens leave no room: with no max_new_tokens or "
                                 f"max_length, the output is {default_length} new tokens at most up to "
                                 f"max_position_embeddings={max_positions} tokens in all, as in transformers; "
                                 "pass max_new_tokens")
            max_new_tokens = total - prompt_len
        else:
            max_new_tokens = default_length
    if repetition_penalty is FROM_CONFIG:
        repetition_penalty = gen.repetition_penalty
    if repetition_penalty is None:
        repetition_penalty = 1.0
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
    number = isinstance(repetition_penalty, int | float | np.integer | np.floating) and not isinstance(
        repetition_penalty, bool | np.bool_)
    if not number or not 0 < repetition_penalty < float("inf"):
        raise ValueError(f"repetition_penalty={repetition_penalty!r}: must be a number > 0 (1: no penalty)")
    return int(max_new_tokens), float(repetition_penalty)


def min_new_arg(gen, min_new_tokens, prompt_len: int) -> int:
    """How many new tokens come before EOS may be chosen: min_new_tokens (FROM_CONFIG: the generation config's),
    else the config's min_length (a total, prompt included), as transformers; 0: no rule."""
    if min_new_tokens is FROM_CONFIG:
        min_new_tokens = gen.min_new_tokens
    if min_new_tokens is not None and (not _is_int(min_new_tokens) or min_new_tokens < 0):
        raise ValueError(f"min_new_tokens={min_new_tokens!r}: must be an integer >= 0")
    if min_new_tokens is not None:  # it replaces min_length, as in transformers (0 included)
        return int(min_new_tokens)
    return max(int(getattr(gen, "min_length", None) or 0) - prompt_len, 0)


def ngram_arg(gen, no_repeat_ngram_size) -> int:
    """no_repeat_ngram_size of a generate call (FROM_CONFIG: the generation config's; None or 0: none), checked."""
    n = gen.no_repeat_ngram_size if no_repeat_ngram_size is FROM_CONFIG else no_repeat_ngram_size
    if n is None:
        return 0
    if not _is_int(n) or n < 0:
        raise ValueError(f"no_repeat_ngram_size={n!r}: must be an integer >= 0 (0: none)")
    return int(n)


def penalty_start(mask: np.ndarray) -> np.ndarray:
    """[B] index of each row's first attended prompt token: transformers' repetition penalty skips the left
    padding before it (and nothing else)."""
    return np.argmax(np.asarray(mask) != 0, axis=1)


# generation_config.json fields that never change transformers' output tokens, and values of others that do not
# either (a hand-written file, or an older transformers' full dump, may spell them out; False / {} / [] are unset)
_NEUTRAL_FIELDS = {"transformers_version", "_from_model_config", "use_cache", "cache_implementation", "cache_config",
                   "output_attentions", "output_hidden_states", "decoder_start_token_id", "compile_config",
                   "disable_compile", "trust_remote_code", "max_time", "streamer", "return_legacy_cache",
                   "generation_kwargs", "max_cache_len", "prefill_chunk_size", "is_assistant", "num_assistant_tokens",
                   "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind",
                   "target_lookbehind", "assistant_early_exit", "prompt_lookup_num_tokens", "max_matching_ngram_size",
                   "dola_layers"}
_IMPLEMENTED = {"max_length"}  # (the others generate implements are GenerationConfig fields, not `extra`)
_NO_EFFECT_VALUES = {"num_beam_groups": 1, "diversity_penalty": 0.0, "encoder_repetition_penalty": 1.0,
                     "encoder_no_repeat_ngram_size": 0}


def unsupported_fields(gen) -> dict:
    """The fields of a generation config (generation_config.json's) that would change transformers' output and
    that generate does not implement (group beam search, bad_words_ids, ...); generate warns,
    naming them."""
    extra = getattr(gen, "extra", None) or {}

    def unset(k, v):
        return (v is None or v is False or v == {} or v == [] or k in _NEUTRAL_FIELDS or k in _IMPLEMENTED
                or (k in _NO_EFFECT_VALUES and v == _NO_EFFECT_VALUES[k]))
    return {k: v for k, v in extra.items() if not unset(k, v)}


UNSUPPORTED = ": not implemented by this generate, ignored (transformers' output may differ)"


def unsupported_message(gen, source: str = "the model's generation_config.json") -> str | None:
    """The sentence naming the fields of `gen` that generate ignores (unsupported_fields), or None."""
    bad = unsupported_fields(gen)
    return f"{source} sets " + ", ".join(f"{k}={v!r}" for k, v in bad.items()) + UNSUPPORTED if bad else None


def warn_unsupported(gen, stacklevel: int = 3, source: str = "the model's generation_config.json") -> None:
    """A warning naming generation_config.json's fields that generate ignores (unsupported_fields), if any."""
    msg = unsupported_message(gen, source)
    if msg:
        import warnings

        warnings.warn(msg, stacklevel=stacklevel)


def check_sampling(do_sample: bool, temperature, top_k, top_p, max_new_tokens, min_p=None) -> None:
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
    if min_p is not None and (isinstance(min_p, bool) or not isinstance(min_p, int | float | np.number)
                              or not 0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p={min_p!r}: must be in [0, 1] (None: no min-p)")


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
    """The EOS ids generation stops at: eos_token_id (an id or ids: list, array, tensor), FROM_CONFIG the model's
    generation config's (`gen`); [] for none (an explicit None too, as transformers). Non-integer ids raise (5.5 is
    not an id)."""
    eos = gen.eos_token_id if eos_token_id is FROM_CONFIG else eos_token_id
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
    """The pad id transformers' generate infers a missing attention_mask from (pad_token_id, FROM_CONFIG the
    generation config's; None when there is none or it is an EOS id, as transformers then keeps every token). A
    prompt holding it gets attention_mask = (ids != pad)."""
    pad = gen.pad_token_id if pad_token_id is FROM_CONFIG else pad_id(pad_token_id)
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


def beam_candidates(eos: list[int]) -> int:
    """Candidates beam search keeps per beam each step (1 + number of EOS ids, at least 2: enough for every beam to
    go on if the best all end), and the tokens beam sampling's warpers keep (transformers' min_tokens_to_keep)."""
    return max(2, 1 + len(eos))


def check_beam_vocab(num_beams: int, eos: list[int], vocab_size: int) -> None:
    """Beam search keeps beam_candidates(eos) candidates per beam each step: the vocabulary must hold that many
    tokens (transformers fails deep inside top-k)."""
    per_beam = beam_candidates(eos)
    if num_beams > 1 and per_beam > vocab_size:
        raise ValueError(f"num_beams={num_beams} with {len(eos)} EOS id(s): beam search keeps {per_beam} candidates "
                         f"per beam each step, more than the vocabulary's {vocab_size} tokens")


def beam_fill(pad_token_id, gen, eos: list[int]) -> int:
    """What beam search writes after a finished sequence's EOS, as transformers: the pad id (the call's,
    FROM_CONFIG the generation config's; where that is None, the first EOS id), or the first EOS id where that is 0;
    -1 without EOS ids (then every sequence runs to the length limit and nothing is filled). Never fed to the
    model: any integer."""
    pad = gen.pad_token_id if pad_token_id is FROM_CONFIG else pad_id(pad_token_id)
    if not eos:
        return -1
    return (eos[0] if pad is None else pad) or eos[0]


def output_pad(pad_token_id, gen, eos: list[int], V: int) -> int:
    """The id written after a row's EOS: pad_token_id (FROM_CONFIG: the generation config's pad id), where that is
    None the first EOS id in [0, V) (as transformers sets pad to EOS), else 0. An explicit pad id must be a token of
    the vocabulary V (it is fed back like any generated token)."""
    if pad_token_id is FROM_CONFIG:
        if gen.pad_token_id is not None:
            return gen.pad_token_id
    elif (pad_token_id := pad_id(pad_token_id)) is not None:
        if not 0 <= int(pad_token_id) < V:
            raise ValueError(f"pad_token_id={pad_token_id}: must be in [0, vocab_size={V})")
        return int(pad_token_id)
    return next((e for e in eos if 0 <= e < V), 0)
