"""Generation for doge_jax: a jit-compiled decode loop over a fixed-capacity KV cache (spec §4).

`generate(model, input_ids, ...)` returns prompt + new tokens like transformers' generate: left padding via
attention_mask (positions = cumsum(mask) - 1), greedy or sampled (temperature, top-k, top-p), stop on EOS.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .decode import DecodeCache, decode_step, prepare_decode, use_counters
from .generation_args import (
    FROM_CONFIG,
    RIGHT_PADDED,
    UNSUPPORTED,
    _is_int,
    as_array,
    beam_args,
    beam_candidates,
    beam_fill,
    call_generation_config,
    check_beam_vocab,
    check_mask_values,
    check_sampling,
    cutoff_args,
    eos_ids,
    inferred_pad,
    length_and_penalty,
    min_new_arg,
    ngram_arg,
    output_args,
    output_pad,
    penalty_start,
    prompt_length,
    rule_values,
    sampling_args,
    token_rules,
    unsupported_message,
    warn_unsupported,
)
from .model import DogeCache, check_token_ids
from .model_output import GenerateOutput

CLI_MAX_NEW_TOKENS = 128  # the command line's default when generation_config.json sets no max_new_tokens
CAPACITY_BUCKET = 128  # cache capacity is rounded up to this, so prompt lengths share compiled programs
PROMPT_BUCKET = 32  # dense-model prompts are left-padded to a multiple of this (same reason)


def _filter_logits(logits: jax.Array, temperature: float, top_k: int | None, top_p: float | None,
                   min_p: float | None = None, min_keep: int = 1, neg=None, cutoffs=None) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus), then min-p, then `cutoffs` (typical_p, epsilon, eta:
    generation_args.cutoff_args) on float32 logits [B, V], as transformers orders them (min-p: tokens less probable
    than min_p times the most probable one are dropped), each keeping at least `min_keep` tokens (beam sampling
    keeps 1 + number of EOS ids); dropped tokens get `neg` (default: float32's lowest finite value)."""
    logits = logits / temperature
    neg = jnp.finfo(logits.dtype).min if neg is None else neg
    if top_k is not None and top_k > 0:
        kth = jax.lax.top_k(logits, min(max(top_k, min_keep), logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = (cum <= 1.0 - top_p).at[..., -min_keep:].set(False)
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, neg, logits)
    if min_p is not None:
        probs = jax.nn.softmax(logits, axis=-1)
        remove = probs < min_p * jnp.max(probs, axis=-1, keepdims=True)
        if min_keep > 1:
            top = jax.lax.top_k(probs, min(min_keep, probs.shape[-1]))[1]
            remove = remove.at[jnp.arange(probs.shape[0])[:, None], top].set(False)
        logits = jnp.where(remove, neg, logits)
    typical, eps, eta = cutoffs or (None, None, None)
    rows = jnp.arange(logits.shape[0])[:, None]
    if typical is not None:  # tokens whose surprise is closest to the entropy, up to `typical` probability mass
        logp = jax.nn.log_softmax(logits, axis=-1)
        ent = -jnp.nansum(logp * jnp.exp(logp), axis=-1, keepdims=True)
        shifted = jnp.abs(-logp - ent)
        order = jnp.argsort(shifted, axis=-1, stable=True)
        shifted = jnp.take_along_axis(shifted, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
        last = jnp.minimum(jnp.sum(cum < typical, axis=-1, keepdims=True), shifted.shape[-1] - 1)
        remove_sorted = (shifted > jnp.take_along_axis(shifted, last, axis=-1)).at[..., :min_keep].set(False)
        logits = jnp.where(jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted), neg, logits)
    for cut, scale_by_entropy in ((eps, False), (eta, True)):
        if cut is None:
            continue
        probs = jax.nn.softmax(logits, axis=-1)
        threshold = jnp.float32(cut)
        if scale_by_entropy:  # eta: min(eta, sqrt(eta) * exp(-entropy))
            norm = jnp.maximum(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True), jnp.finfo(jnp.float32).min)
            ent = -jnp.sum(norm * jax.nn.softmax(norm, axis=-1), axis=-1, keepdims=True)
            threshold = jnp.minimum(threshold, jnp.sqrt(threshold) * jnp.exp(-ent))
        kth = jax.lax.top_k(logits, min(min_keep, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where((probs < threshold) & (logits < kth), neg, logits)
    return logits


def _argmax(logits: jax.Array) -> jax.Array:
    """First index of the row maximum (= jnp.argmax without NaNs); max + where + min is ~5x faster on CPU."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    idx = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits == top, idx, logits.shape[-1]), axis=-1).astype(jnp.int32)


def _penalize(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """transformers' repetition penalty on float32 logits [B, V]: the logit of every token already in the row
    (`seen` [B, V]) is divided by `penalty` where positive, multiplied where negative."""
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def _ban_ngrams(logits: jax.Array, hist: jax.Array, length, n: int, skip=0) -> jax.Array:
    """transformers' no_repeat_ngram_size on float32 logits [B, V]: a token that would complete an n-gram already
    in tokens [skip, length) of `hist` [B, T] (the prompt with its padding after `skip` slots of bucket padding,
    then the new tokens) gets -inf."""
    B, T = hist.shape
    J = T - n + 1  # n-gram starts that fit in the buffer; those past length - n are not in the row yet
    if J <= 0:
        return logits
    starts = jnp.arange(J)
    match = ((starts >= skip) & (starts <= length - n))[None]
    if n > 1:  # the row's last n - 1 tokens (a clamped start where there are fewer: no valid start then)
        last = jax.lax.dynamic_slice_in_dim(hist, jnp.maximum(length - (n - 1), 0), n - 1, axis=1)
        for k in range(n - 1):
            match = match & (hist[:, k:k + J] == last[:, k:k + 1])
    hits = jnp.zeros(logits.shape, jnp.int32).at[jnp.arange(B)[:, None], hist[:, n - 1:]].add(match.astype(jnp.int32))
    return jnp.where(hits > 0, -jnp.inf, logits)


def _apply_bias(scores: jax.Array, hist, length, rules, skip=0) -> jax.Array:
    """transformers' sequence_bias on float32 scores [B, V], as doge_torch.apply_bias (prefixes matched on the end
    of `hist` [B, T]'s tokens [skip, length))."""
    if not (rules.bias_single or rules.bias_multi):
        return scores
    bias = jnp.zeros_like(scores)
    if rules.bias_single:
        row = jnp.zeros(scores.shape[-1], scores.dtype).at[jnp.asarray([t for t, _ in rules.bias_single])].set(
            jnp.asarray([b for _, b in rules.bias_single], scores.dtype))
        bias = bias + row
    for prefixes, toks, values in rules.bias_groups:
        m = len(prefixes[0])
        last = jax.lax.dynamic_slice_in_dim(hist, jnp.maximum(length - m, 0), m, axis=1)
        hit = jnp.all(last[:, None, :] == jnp.asarray(prefixes, hist.dtype), axis=-1) & (length - skip >= m)
        bias = bias.at[:, jnp.asarray(toks)].add(jnp.where(hit, jnp.asarray(values, scores.dtype), 0.0))
    return scores + bias


def _apply_rules(scores: jax.Array, hist, length, step, rules, skip=0) -> jax.Array:
    """generation_args.TokenRules on float32 scores [B, V] of new-token index `step`, as doge_torch.apply_rules;
    `hist` [B, T] holds the rows' tokens [skip, length) (the bad words' prefixes are matched on its end)."""
    neg = -jnp.inf
    if rules.bad_single:
        scores = scores.at[:, jnp.asarray(rules.bad_single)].set(neg)
    for prefix, tok in rules.bad_multi:
        m = len(prefix)
        last = jax.lax.dynamic_slice_in_dim(hist, jnp.maximum(length - m, 0), m, axis=1)
        hit = jnp.all(last == jnp.asarray(prefix, hist.dtype), axis=-1) & (length - skip >= m)
        scores = scores.at[:, tok].set(jnp.where(hit, neg, scores[:, tok]))
    for at, forced in rules.forced:
        scores = jnp.where(step == at, jnp.full_like(scores, neg).at[:, jnp.asarray(forced)].set(0.0), scores)
    if rules.remove_invalid:
        big = jnp.finfo(scores.dtype)
        scores = jnp.clip(jnp.where(jnp.isnan(scores), 0.0, scores), big.min, big.max)
    if rules.decay:
        e = jnp.asarray(rules.eos)
        at = scores[:, e]
        bonus = jnp.where(jnp.isfinite(at), jnp.abs(at) * jnp.asarray(rules.decay, jnp.float32)[step], 0.0)
        scores = scores.at[:, e].set(at + bonus)
    if rules.suppress:
        scores = scores.at[:, jnp.asarray(rules.suppress)].set(neg)
    if rules.begin_suppress:
        begun = scores.at[:, jnp.asarray(rules.begin_suppress)].set(neg)
        scores = jnp.where(step == rules.begin_step, begun, scores)
    return scores


def _seen_tokens(ids: np.ndarray, mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """[B, V] bool: the tokens of each prompt row from its first attended token on (penalty_start)."""
    B, P = ids.shape
    rows, cols = np.nonzero(np.arange(P)[None] >= penalty_start(mask)[:, None])
    seen = np.zeros((B, vocab_size), bool)
    seen[rows, ids[rows, cols]] = True
    return seen


def _next_token(logits, rng, do_sample: bool, temperature, top_k, top_p, min_p=None, seen=None, penalty=None,
                eos_mask=None, block_eos=None, cutoffs=None, rules=None, hist=None, length=None, step=None,
                skip=0) -> tuple[jax.Array, jax.Array]:
    """(next token per row, the step's scores: the logits after the processors and, sampling, the warpers).
    `rules` (generation_args.TokenRules) reads `hist` [B, T] (tokens [skip, length)) at new-token index `step`."""
    logits = logits.astype(jnp.float32)
    if rules is not None:  # sequence_bias: transformers' first processor
        logits = _apply_bias(logits, hist, length, rules, skip)
    if seen is not None:  # a logits processor: before the sampling filters, and for greedy too (transformers)
        logits = _penalize(logits, seen, penalty)
    if eos_mask is not None:  # min_new_tokens / min_length: no EOS yet (transformers' processors)
        logits = jnp.where(block_eos & eos_mask, -jnp.inf, logits)
    if rules is not None:
        logits = _apply_rules(logits, hist, length, step, rules, skip)
    if not do_sample:
        return _argmax(logits), logits
    logits = _filter_logits(logits, temperature, top_k, top_p, min_p, neg=-jnp.inf, cutoffs=cutoffs)  # (as
    # transformers' warpers: the step's scores record dropped tokens at -inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32), logits


_STREAM_SINK = [None]  # the Python callable that receives streamed tokens (set by `generate(..., on_token=)`)


def _emit(step, tokens):
    sink = _STREAM_SINK[0]
    if sink is not None:
        sink(int(step), np.asarray(tokens))


@partial(nnx.jit, static_argnames=("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "stream",
                                   "ngram", "cutoffs", "record", "rules"))
def _generate_cached(model, ids, mask, pos, cache, eos, pad, rng, max_new_tokens: int, do_sample: bool,
                     temperature: float, top_k, top_p, min_p=None, stream: bool = False, seen=None, penalty=None,
                     eos_mask=None, min_new=None, ngram: int = 0, skip=0, cutoffs=None, record=(False, False),
                     rules=None):
    """Prefill, then a while_loop of single-token steps; returns (new tokens [B, N], number of steps, the steps'
    scores [N, B, V] if record[0], raw logits [N, B, V] if record[1] (else None)). `seen`
    [B, V] (the prompt's tokens) and `penalty` turn the repetition penalty on; `eos_mask` [V] and `min_new` keep
    EOS out of the first min_new new tokens; `ngram` turns no_repeat_ngram_size on, over the prompt from slot
    `skip` on (the prompt as given: the bucket padding is not transformers' input) and the new tokens."""
    B, P = ids.shape
    keep_hist = bool(ngram or (rules is not None and rules.history))
    hist = jnp.pad(ids, ((0, 0), (0, max_new_tokens))) if keep_hist else None  # prompt, then the new tokens
    # Built once per call, outside the loop: joined q/k/v and gate/up weights, the RoPE table (decode.py).
    prep = prepare_decode(model, cache.capacity)
    out = model(ids, attention_mask=mask, position_ids=pos, cache=cache.unstacked(), logits_to_keep=1,
                layer_params=prep["states"])
    logits, cache = out.logits[:, -1], DecodeCache.from_cache(out.cache, use_counters(model.config, cache.capacity))
    V = logits.shape[-1]
    rec_s = jnp.zeros((max_new_tokens, B, V), jnp.float32) if record[0] else None
    rec_l = jnp.zeros((max_new_tokens, B, V), jnp.float32) if record[1] else None
    if record[1]:
        rec_l = rec_l.at[0].set(logits.astype(jnp.float32))
    if ngram:
        logits = _ban_ngrams(logits, hist, P, ngram, skip)
    if do_sample:
        rng, sub = jax.random.split(rng)
    else:
        sub = rng
    tok, scores = _next_token(logits, sub, do_sample, temperature, top_k, top_p, min_p, seen, penalty, eos_mask,
                              None if eos_mask is None else 0 < min_new, cutoffs, rules, hist, P, 0, skip)
    if record[0]:
        rec_s = rec_s.at[0].set(scores)
    rows = jnp.arange(B)
    if seen is not None:
        seen = seen.at[rows, tok].set(True)
    if keep_hist:
        hist = hist.at[:, P].set(tok)
    done = jnp.isin(tok, eos)
    if stream:
        jax.debug.callback(_emit, jnp.int32(0), tok, ordered=True)
    out = jnp.full((B, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)
    next_pos = jnp.max(pos, axis=1) + 1

    def cond(carry):
        step, _, _, _, done, *_ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, tok, next_pos, cache, done, rng, out, seen, hist, rec_s, rec_l = carry
        logits, cache = decode_step(model, prep, tok, next_pos, cache)
        if record[1]:
            rec_l = rec_l.at[step].set(logits.astype(jnp.float32))
        if ngram:
            logits = _ban_ngrams(logits, hist, P + step, ngram, skip)
        if do_sample:  # greedy decoding needs no random numbers (threefry is ~40 ops per step)
            rng, sub = jax.random.split(rng)
        new, scores = _next_token(logits, sub if do_sample else rng, do_sample, temperature, top_k, top_p, min_p,
                                  seen, penalty, eos_mask, None if eos_mask is None else step < min_new, cutoffs,
                                  rules, hist, P + step, step, skip)
        if record[0]:
            rec_s = rec_s.at[step].set(scores)
        new = jnp.where(done, pad, new)
        if seen is not None:
            seen = seen.at[rows, new].set(True)
        if keep_hist:
            hist = hist.at[:, P + step].set(new)
        out = out.at[:, step].set(new)
        if stream:
            jax.debug.callback(_emit, step, new, ordered=True)
        done = done | jnp.isin(new, eos)
        return step + 1, new, next_pos + 1, cache, done, rng, out, seen, hist, rec_s, rec_l

    carry = (jnp.int32(1), tok, next_pos, cache, done, rng, out, seen, hist, rec_s, rec_l)
    step, *_, out, _, _, rec_s, rec_l = jax.lax.while_loop(cond, body, carry)
    return out, step, rec_s, rec_l


@nnx.jit
def _last_logits(model, ids, mask, pos):
    return model(ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]


def generate(model, input_ids, attention_mask=None, max_new_tokens=FROM_CONFIG, do_sample=FROM_CONFIG,
             temperature=FROM_CONFIG, top_k=FROM_CONFIG, top_p=FROM_CONFIG, eos_token_id=FROM_CONFIG,
             seed: int = 0, use_cache: bool = True, pad_token_id=FROM_CONFIG, on_token=None,
             repetition_penalty=FROM_CONFIG, min_new_tokens=FROM_CONFIG, generation_config=None,
             max_length=None, min_p=FROM_CONFIG, streamer=None, no_repeat_ngram_size=FROM_CONFIG,
             num_beams=FROM_CONFIG, num_return_sequences=FROM_CONFIG, length_penalty=FROM_CONFIG,
             early_stopping=FROM_CONFIG, typical_p=FROM_CONFIG, epsilon_cutoff=FROM_CONFIG,
             eta_cutoff=FROM_CONFIG, return_dict_in_generate=FROM_CONFIG, output_scores=FROM_CONFIG,
             output_logits=FROM_CONFIG, **processors):
    """Prompt + up to max_new_tokens new tokens [B, P + n]; finished rows are padded (pad id, else EOS).
    Arguments not given come from `generation_config` (see generation_args.call_generation_config), else
    `model.generation_config` (generation_config.json; else transformers' defaults: greedy, temperature 1, top_k 50,
    no top-p / min-p, no repetition penalty; 20 new tokens). The length, as transformers: max_new_tokens, else
    max_length (prompt + new tokens: the call's, else the config's), else 20 new tokens.
    `repetition_penalty` is transformers': logits of tokens already in the row (prompt from its first attended
    token, and the new ones) are divided by it where positive and multiplied where negative, greedy or sampled.
    `min_new_tokens` (and generation_config.json's `min_length`, a total) keep EOS from being chosen before that
    many new tokens, as transformers. `no_repeat_ngram_size` n: no n-gram twice in a row (prompt and its padding
    included, as transformers reads input_ids). `typical_p`, `epsilon_cutoff`, `eta_cutoff`: transformers' sampling
    warpers (after min_p). `num_beams` > 1: transformers' beam search (doge_jax.beam, one
    compiled loop; with `length_penalty` and `early_stopping`), returning the best `num_return_sequences` sequences
    of each row, best first; sampling with num_return_sequences n repeats each row n times, as transformers.
    `return_dict_in_generate`: a GenerateOutput (doge_jax.model_output) as transformers' (numpy arrays; with
    `output_scores` each step's processed scores, with `output_logits` its raw logits, as tuples of [rows, V]).
    `processors`: transformers' bad_words_ids, suppress_tokens, begin_suppress_tokens, forced_bos_token_id,
    forced_eos_token_id, exponential_decay_length_penalty, remove_invalid_values (generation_args.token_rules).

    `on_token(step, tokens [B])` is called as each token is made (from inside the compiled loop when cached);
    a transformers `streamer` gets put(prompt ids), put(each new token [B]) and end(), as transformers calls it.
    Dense models left-pad the prompt to a multiple of PROMPT_BUCKET (masked, so the function is unchanged) to
    share compiled programs; CDMoE routing mixes positions (spec §3.8), so MoE prompts keep their exact length, as
    do prompts with an all-padding row (prompt_bucket_padding).
    `use_cache=False` recomputes the whole sequence each step (one compile per length; for checking only)."""
    cfg = model.config
    gcfg = call_generation_config(model, generation_config)
    do_sample, temperature, top_k, top_p, min_p = sampling_args(gcfg, do_sample, temperature, top_k, top_p, min_p)
    max_new_tokens, penalty = length_and_penalty(gcfg, max_new_tokens, repetition_penalty, max_length=max_length,
                                                 prompt_len=prompt_length(input_ids),
                                                 max_positions=cfg.max_position_embeddings)
    check_sampling(do_sample, temperature, top_k, top_p, max_new_tokens, min_p)
    min_p = float(min_p) if do_sample and min_p is not None else None  # (a static argument: greedy ignores it)
    ngram = ngram_arg(gcfg, no_repeat_ngram_size)
    cutoffs = cutoff_args(gcfg, typical_p, epsilon_cutoff, eta_cutoff, do_sample)
    as_dict, *record = output_args(gcfg, return_dict_in_generate, output_scores, output_logits)
    record = tuple(record)
    num_beams, n_seq, length_penalty, early_stopping = beam_args(gcfg, num_beams, num_return_sequences,
                                                                 length_penalty, early_stopping, do_sample, streamer)
    if num_beams > 1 and on_token is not None:
        raise ValueError(f"num_beams={num_beams}: on_token cannot be used with beam search (the best sequences are "
                         "known at the end only)")
    warn_unsupported(gcfg, source="generation_config" if generation_config is not None
                     else "the model's generation_config.json")
    if not _is_int(seed) or not 0 <= seed < 2**32:  # jax.random.key keeps the low 32 bits: 2**32 would be seed 0
        raise ValueError(f"seed={seed!r}: must be an integer in [0, 2**32)")
    ids = as_array(input_ids, "input_ids")
    check_token_ids(ids, cfg.vocab_size)  # before the cast: 2**32 + 7 or 7.9 must not become 7
    ids = ids.astype(np.int32)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids shape {ids.shape}: expected [batch, length >= 1] (or [length])")
    B, P = ids.shape
    if B == 0:
        raise ValueError(f"input_ids shape {ids.shape}: expected at least one row")
    eos = eos_ids(eos_token_id, gcfg)
    # (beam search fills with any id, as transformers; generated rows feed the pad back: it must be a token)
    check_beam_vocab(num_beams, eos, cfg.vocab_size)
    pad = beam_fill(pad_token_id, gcfg, eos) if num_beams > 1 else output_pad(pad_token_id, gcfg, eos, cfg.vocab_size)
    if attention_mask is None:  # as transformers: inferred from the pad id where the prompt holds it
        infer = inferred_pad(pad_token_id, gcfg, eos)
        mask = ids != infer if infer is not None and (ids == infer).any() else np.ones((B, P), bool)
    else:
        mask = as_array(attention_mask, "attention_mask")
        check_mask_values(mask)
        mask = mask.astype(bool)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    if not mask[:, -1].all():
        warnings.warn(RIGHT_PADDED, stacklevel=2)
    if max(num_beams, n_seq) > 1:  # each row once per beam or returned sample, as transformers expands them
        ids, mask = np.repeat(ids, max(num_beams, n_seq), axis=0), np.repeat(mask, max(num_beams, n_seq), axis=0)
        B = ids.shape[0]
    pos = np.where(mask, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    seen = _seen_tokens(ids, mask, cfg.vocab_size) if penalty != 1.0 else None  # transformers: no-op at 1.0
    min_new = min_new_arg(gcfg, min_new_tokens, P)
    rules = token_rules(gcfg, rule_values(processors), eos, P, cfg.vocab_size, max_new_tokens)
    eos_in = [e for e in eos if 0 <= e < cfg.vocab_size]
    eos_mask = np.isin(np.arange(cfg.vocab_size), eos_in) if min_new and eos_in else None
    eos_arr = jnp.asarray(eos if eos else [-1], jnp.int32)
    if (on_token is not None or streamer is not None) and use_cache:  # an ordered host callback: JAX runs it
        devices = {d for a in jax.tree.leaves(nnx.state(model)) if hasattr(a, "sharding")  # from one device only
                   for d in a.sharding.device_set}
        if len(devices) > 1:
            which = "on_token" if streamer is None else "streamer"
            raise ValueError(f"{which} streams tokens from one device, but the model's parameters are on "
                             f"{len(devices)}; load it on one (from_pretrained does) or generate without {which}")
    if streamer is not None:
        streamer.put(ids)
        user_on_token = on_token

        def on_token(step, tokens):
            streamer.put(tokens)
            if user_on_token is not None:
                user_on_token(step, tokens)
    if num_beams > 1:
        warp = (float(temperature), top_k, top_p, min_p, beam_candidates(eos), cutoffs) if do_sample else None
        out = _beam(model, ids, mask, pos, use_cache, eos, pad, max_new_tokens, num_beams, n_seq, length_penalty,
                    early_stopping, seen, penalty, eos_mask, min_new, ngram, warp,
                    jax.random.key(seed) if do_sample else None, record, rules)
        if not as_dict:
            return out["sequences"]
        if not record[0]:  # (as transformers: the final scores with output_scores only)
            out["sequences_scores"] = None
        return GenerateOutput(**out)
    if use_cache:
        extra = prompt_bucket_padding(cfg, mask)
        p_ids = np.pad(ids, ((0, 0), (extra, 0)))  # masked slots: any valid id
        p_mask, p_pos = np.pad(mask, ((0, 0), (extra, 0))), np.pad(pos, ((0, 0), (extra, 0)))
        capacity = -(-(P + extra + max_new_tokens) // CAPACITY_BUCKET) * CAPACITY_BUCKET
        dtype = model.model.embed_tokens.embedding[...].dtype
        cache = DogeCache.init(cfg, B, capacity, dtype)
        _STREAM_SINK[0] = on_token
        try:
            out, steps, rec_s, rec_l = _generate_cached(
                                          model, jnp.asarray(p_ids), jnp.asarray(p_mask), jnp.asarray(p_pos), cache,
                                          eos_arr, jnp.int32(pad), jax.random.key(seed),
                                          max_new_tokens=max_new_tokens, do_sample=do_sample,
                                          temperature=float(temperature), top_k=top_k, top_p=top_p, min_p=min_p,
                                          stream=on_token is not None,
                                          seen=None if seen is None else jnp.asarray(seen),
                                          penalty=jnp.float32(penalty),
                                          eos_mask=None if eos_mask is None else jnp.asarray(eos_mask),
                                          min_new=jnp.int32(min_new), ngram=ngram, skip=jnp.int32(extra),
                                          cutoffs=cutoffs, record=record, rules=rules)
            out = np.asarray(out)
            steps = int(steps)
        finally:
            _STREAM_SINK[0] = None
        result = np.concatenate([ids, out[:, :steps]], axis=1)
        scores, logits = (None if r is None else tuple(np.asarray(r)[:steps]) for r in (rec_s, rec_l))
    else:
        result, scores, logits = _generate_recompute(model, ids, mask, pos, eos, pad, seed, max_new_tokens, do_sample,
                                                     float(temperature), top_k, top_p, on_token, seen, penalty,
                                                     eos_mask, min_new, min_p, ngram, cutoffs, record, rules)
    if streamer is not None:
        streamer.end()
    return GenerateOutput(sequences=result, scores=scores, logits=logits) if as_dict else result


def _beam(model, ids, mask, pos, use_cache, eos, pad, max_new_tokens, num_beams, n_seq, length_penalty,
          early_stopping, seen, penalty, eos_mask, min_new, ngram, warp=None, rng=None,
          record=(False, False), rules=None) -> dict:
    """generate's beam search (doge_jax.beam): prompt rows [B * num_beams, P] -> the GenerateOutput fields
    (sequences [B * n_seq, P + n], ...)."""
    from .beam import beam_search_cached, beam_search_recompute, length_divisors, result

    cfg = model.config
    BK, P = ids.shape
    never_long = early_stopping == "never" and length_penalty > 0.0  # (transformers' heuristic: the longest output)
    consts = {"eos": jnp.asarray(eos if eos else [-1], jnp.int32),
              "fill": jnp.int32(pad),  # (generation_args.beam_fill)
              "divisors": jnp.asarray(length_divisors(max_new_tokens, length_penalty)),
              "never_divisor": jnp.float32(np.float32(float(max_new_tokens) ** length_penalty)),
              "penalty": jnp.float32(penalty), "eos_mask": None if eos_mask is None else jnp.asarray(eos_mask),
              "min_new": jnp.int32(min_new), "skip": jnp.int32(0)}
    seen = None if seen is None else jnp.asarray(seen)
    static = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, early_stopping=early_stopping,
                  never_long=never_long, ngram=ngram, warp=warp, record=record, rules=rules)
    if not use_cache:
        return result(beam_search_recompute(model, ids, mask, pos, consts, seen=seen, rng=rng, **static), n_seq)
    extra = prompt_bucket_padding(cfg, mask)  # (as generate: bucketed prompts share compiled programs)
    p_ids = np.pad(ids, ((0, 0), (extra, 0)))
    p_mask, p_pos = np.pad(mask, ((0, 0), (extra, 0))), np.pad(pos, ((0, 0), (extra, 0)))
    capacity = -(-(P + extra + max_new_tokens) // CAPACITY_BUCKET) * CAPACITY_BUCKET
    cache = DogeCache.init(cfg, BK, capacity, model.model.embed_tokens.embedding[...].dtype)
    consts["skip"] = jnp.int32(extra)
    return result(beam_search_cached(model, jnp.asarray(p_ids), jnp.asarray(p_mask), jnp.asarray(p_pos), cache,
                                     consts, seen=seen, rng=rng, **static), n_seq, skip=extra)


def exact_length_needed(cfg, mask: np.ndarray) -> bool:
    """Whether a forward over the prompt [B, P] must see exactly its P slots, no masked extra ones (bucket padding,
    the recompute paths' future slots): MoE (CDMoE routing mixes positions, spec §3.8), or a row that is all
    padding (its queries see no key: their attention is the mean over every existing slot, spec §3.6)."""
    return cfg.is_moe or not mask.any(axis=1).all()


def prompt_bucket_padding(cfg, mask: np.ndarray) -> int:
    """Masked slots to put before the prompt [B, P] so that its length is a multiple of PROMPT_BUCKET: none for MoE
    models, nor when a row's prompt is all padding (exact_length_needed)."""
    if exact_length_needed(cfg, mask):
        return 0
    return -mask.shape[1] % PROMPT_BUCKET


def _generate_recompute(model, ids, mask, pos, eos, pad, seed, max_new_tokens, do_sample, temperature, top_k, top_p,
                        on_token=None, seen=None, penalty=1.0, eos_mask=None, min_new=0, min_p=None, ngram=0,
                        cutoffs=None, record=(False, False), rules=None):
    """No cache: run the whole sequence every step. Dense models use one fixed-length buffer (future slots are
    masked, and causality makes them invisible); CDMoE routing mixes positions (spec §3.8), so MoE runs exact
    lengths (one compile each). Returns (prompt + new tokens, the steps' scores, raw logits: tuples if recorded)."""
    rec_s, rec_l = [], []
    B, P = ids.shape
    rng = jax.random.key(seed)
    seen = None if seen is None else jnp.asarray(seen)  # on the device once, updated there
    eos_mask = None if eos_mask is None else jnp.asarray(eos_mask)
    done = np.zeros(B, bool)
    n = 0
    total = P + max_new_tokens
    buf = np.zeros((B, total), np.int32)
    buf_mask = np.zeros((B, total), bool)
    buf_pos = np.zeros((B, total), np.int32)
    buf[:, :P], buf_mask[:, :P], buf_pos[:, :P] = ids, mask, pos
    exact = exact_length_needed(model.config, mask)
    for n in range(max_new_tokens):
        cur = P + n
        if exact:
            logits = _last_logits(model, jnp.asarray(buf[:, :cur]), jnp.asarray(buf_mask[:, :cur]),
                                  jnp.asarray(buf_pos[:, :cur]))
        else:
            logits = _logits_at(model, jnp.asarray(buf), jnp.asarray(buf_mask), jnp.asarray(buf_pos), cur - 1)
        if record[1]:
            rec_l.append(np.asarray(logits, np.float32))
        if ngram:
            logits = _ban_ngrams(logits, jnp.asarray(buf), cur, ngram)
        rng, sub = jax.random.split(rng)
        tok, scores = _next_token(logits, sub, do_sample, temperature, top_k, top_p, min_p, seen,
                                  jnp.float32(penalty), eos_mask, jnp.bool_(n < min_new), cutoffs, rules,
                                  jnp.asarray(buf), cur, n)
        tok = np.asarray(tok)
        if record[0]:
            rec_s.append(np.asarray(scores))
        tok = np.where(done, pad, tok)
        if seen is not None:
            seen = seen.at[np.arange(B), tok].set(True)
        if on_token is not None:
            on_token(n, tok)
        buf[:, cur], buf_mask[:, cur], buf_pos[:, cur] = tok, True, buf_pos[:, :cur].max(axis=1) + 1
        done |= np.isin(tok, eos)
        if done.all():
            break
    return buf[:, : P + n + 1], tuple(rec_s) if record[0] else None, tuple(rec_l) if record[1] else None


@nnx.jit
def _logits_at(model, ids, mask, pos, i):
    x = model(ids, attention_mask=mask, position_ids=pos).logits
    return jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)


class TextStream:
    """Writes the text of tokens as they come: the decoded prompt + new tokens minus the decoded prompt (decoding
    the new tokens alone would drop a SentencePiece/Metaspace word boundary between them). It decodes a window of
    the last tokens, not everything (that was quadratic: 8000 tokens streamed at half the model's speed): the
    window's text minus the text of the window before the new token. The window slides to its last CONTEXT tokens
    once they show text (else a next word would be the window's first, and a Metaspace / Strip decoder drops its
    space: a run of special tokens, which decode skips, e.g. repeated EOS)."""

    CONTEXT = 8

    def __init__(self, tokenizer, prompt_ids: list[int], out):
        self.tokenizer, self.toks, self.out = tokenizer, list(prompt_ids), out
        self.start = max(0, len(self.toks) - self.CONTEXT)
        self.text = tokenizer.decode(self.toks[self.start:])

    def push(self, token: int, final: bool = False) -> None:
        if token is not None:
            self.toks.append(token)
        text = self.tokenizer.decode(self.toks[self.start:])
        if text.endswith("\ufffd") and not final:  # wait for the rest of a multi-byte character
            return
        self.out.write(text[len(self.text):] if text.startswith(self.text) else "\n" + text)
        self.text = text
        if len(self.toks) - self.start > 4 * self.CONTEXT:
            context = self.tokenizer.decode(self.toks[-self.CONTEXT:])
            if context.strip() and not context.startswith("\ufffd"):
                self.start, self.text = len(self.toks) - self.CONTEXT, context

    def finish(self) -> None:
        self.push(None, final=True)


# ---- command line ----------------------------------------------------------------------------------------------


def _main(argv=None) -> int:
    """`python -m doge_jax.generate --model PATH --prompt "..."`: stream a continuation and report tokens/s."""
    import argparse
    import sys
    import time

    ap = argparse.ArgumentParser(prog="python -m doge_jax.generate", description=main.__doc__)
    ap.add_argument("--model", required=True, help="HF directory (config.json + safetensors) or orbax checkpoint")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt (needs tokenizer.json in the model directory)")
    src.add_argument("--prompt-ids", type=int, nargs="+", help="prompt as token ids (no tokenizer needed)")
    ap.add_argument("--tokenizer", help="tokenizer.json or a directory holding one (default: the model directory)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help=f"(default: generation_config.json's max_new_tokens, else its max_length minus the "
                    f"prompt, else {CLI_MAX_NEW_TOKENS})")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--do-sample", dest="do_sample", action="store_const", const=True, default=None,
                      help="sample (default: as the model's generation_config.json says, else greedy)")
    mode.add_argument("--greedy", dest="do_sample", action="store_const", const=False,
                      help="greedy decoding, even where generation_config.json samples")
    ap.add_argument("--temperature", type=float, default=None, help="when sampling: > 0 (default: "
                    "generation_config.json's, else 1; ignored when greedy)")
    ap.add_argument("--top-k", type=int, default=None, help="when sampling: keep the k most likely tokens "
                    "(default: generation_config.json's, else 50, as transformers; 0: no top-k)")
    ap.add_argument("--top-p", type=float, default=None, help="when sampling: nucleus sampling, in (0, 1] "
                    "(default: generation_config.json's, else none)")
    ap.add_argument("--min-p", type=float, default=None, help="when sampling: drop tokens less likely than this "
                    "times the most likely one, in [0, 1] (default: generation_config.json's, else none)")
    ap.add_argument("--typical-p", type=float, default=None, help="when sampling: typical sampling, in (0, 1] "
                    "(default: generation_config.json's, else none)")
    ap.add_argument("--epsilon-cutoff", type=float, default=None, help="when sampling: drop tokens less likely "
                    "than this, in (0, 1) (default: generation_config.json's, else none)")
    ap.add_argument("--eta-cutoff", type=float, default=None, help="when sampling: eta sampling, in (0, 1) "
                    "(default: generation_config.json's, else none)")
    ap.add_argument("--repetition-penalty", type=float, default=None, help="transformers' repetition penalty: > 0, "
                    "1 for none; greedy or sampled (default: generation_config.json's, else 1)")
    ap.add_argument("--no-repeat-ngram-size", type=int, default=None, help="no n-gram of this size twice, prompt "
                    "included (default: generation_config.json's, else none)")
    ap.add_argument("--min-new-tokens", type=int, default=None, help="no EOS before this many new tokens (default: "
                    "generation_config.json's min_new_tokens / min_length, else none)")
    ap.add_argument("--num-beams", type=int, default=None, help="beam search with this many beams (1: none; "
                    "default: generation_config.json's, else 1); the best sequences are printed at the end, not "
                    "streamed")
    ap.add_argument("--num-return-sequences", type=int, default=None, help="print this many sequences: the best "
                    "beams (<= --num-beams), or samples (default: generation_config.json's, else 1)")
    ap.add_argument("--length-penalty", type=float, default=None, help="beam search: finished beams' scores are "
                    "divided by length ** this (> 0 favours longer ones; default: generation_config.json's, else 1)")
    ap.add_argument("--early-stopping", choices=["true", "false", "never"], default=None, help="beam search: "
                    "stop when num-beams sequences are finished (true), when no running beam can still win by "
                    "transformers' heuristic (false), or only when none can by the canonical bound (never); "
                    "default: generation_config.json's, else false")
    ap.add_argument("--seed", type=int, default=0, help="when sampling: the random seed, in [0, 2**32) (default 0: "
                    "the same command gives the same text)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="compute in this dtype (default: the checkpoint's stored dtype)")
    ap.add_argument("--no-eos", action="store_true", help="ignore EOS (always make max-new-tokens tokens)")
    args = ap.parse_args(argv)
    try:  # the values given (with --do-sample); generation_config.json's are checked once the model is loaded
        check_sampling(args.do_sample is True, 1.0 if args.temperature is None else args.temperature, args.top_k,
                       args.top_p, CLI_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens,
                       args.min_p)
        # top-k / top-p / min-p typed out of range are mistakes also when decoding greedily (which ignores them), as
        # the cutoff flags below are (the API, as transformers, ignores such values when greedy; a temperature of 0
        # or below with greedy decoding is a common way of asking for it, and is let through)
        check_sampling(True, 1.0, args.top_k, args.top_p, 1, args.min_p)
        if args.repetition_penalty is not None:
            length_and_penalty(None, 1, args.repetition_penalty)
        from .config import GenerationConfig

        # the values of the flags alone (the file's, and what needs sampling, once the model is loaded)
        cutoff_args(GenerationConfig(), args.typical_p, args.epsilon_cutoff, args.eta_cutoff, True)
        if args.num_beams and args.num_return_sequences and args.num_beams > 1:
            beam_args(GenerationConfig(), args.num_beams, args.num_return_sequences, 1.0, False, False)
    except ValueError as e:
        ap.error(str(e))
    for flag, v in (("--epsilon-cutoff", args.epsilon_cutoff), ("--eta-cutoff", args.eta_cutoff)):
        if v is not None and not 0.0 < v < 1.0:  # (the API, as transformers, takes such a value as "off")
            ap.error(f"{flag} {v}: must be in (0, 1) (leave it out for none)")
    if args.typical_p is not None and not 0.0 < args.typical_p <= 1.0:  # (the API takes one above 1 as "off")
        ap.error(f"--typical-p {args.typical_p}: must be in (0, 1] (1 or left out: none)")
    if args.min_new_tokens is not None and args.min_new_tokens < 0:
        ap.error(f"--min-new-tokens {args.min_new_tokens}: must be >= 0")
    if args.no_repeat_ngram_size is not None and args.no_repeat_ngram_size < 0:
        ap.error(f"--no-repeat-ngram-size {args.no_repeat_ngram_size}: must be >= 0")
    if not 0 <= args.seed < 2**32:
        ap.error(f"--seed {args.seed}: must be in [0, 2**32)")
    for flag, v in (("--num-beams", args.num_beams), ("--num-return-sequences", args.num_return_sequences)):
        if v is not None and v < 1:
            ap.error(f"{flag} {v}: must be >= 1")
    early = {"true": True, "false": False, "never": "never", None: FROM_CONFIG}[args.early_stopping]

    import os

    from .config import ConfigError
    from .hf_names import CheckpointError
    from .init import find_tokenizer
    from .model import DogeForCausalLM

    def fail(msg: str) -> int:  # bad input (not bad syntax): one line, no usage block
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if not os.path.exists(args.model):
        return fail(f"--model {args.model}: no such file or directory")
    if not os.path.isdir(args.model):
        return fail(f"--model {args.model}: a file; pass the model's directory (config.json + weights) or an orbax "
                    "checkpoint")
    if args.tokenizer and not os.path.exists(args.tokenizer):
        return fail(f"--tokenizer {args.tokenizer}: no such file or directory")
    # a run's step directory RUN/checkpoints/N finds the run's tokenizer
    tok_path = args.tokenizer or find_tokenizer(args.model) or args.model
    tok_file = os.path.join(tok_path, "tokenizer.json") if os.path.isdir(tok_path) else tok_path
    tokenizer = None
    if os.path.isfile(tok_file):
        try:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(tok_file)
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type
            if args.prompt is not None or args.tokenizer:  # needed or asked for; with --prompt-ids, ids are shown
                return fail(f"{tok_file}: not a readable tokenizer.json ({e})")
    elif args.tokenizer:
        return fail(f"--tokenizer {args.tokenizer}: no tokenizer.json in that directory")
    try:  # (before the tokenizer's absence: a wrong --model is the thing to report then)
        model = DogeForCausalLM.from_pretrained(args.model, dtype=args.dtype)
    except (CheckpointError, ConfigError, OSError, ValueError) as e:
        msg = str(e)
        for named in (args.model, os.path.abspath(args.model)):  # (an error starting with the path: not twice)
            msg = msg.removeprefix(f"{named.rstrip(os.sep)}: ")
        return fail(f"--model {args.model}: {msg}")
    if args.prompt is not None and tokenizer is None:
        return fail(f"no tokenizer.json in {tok_path!r}: pass --tokenizer PATH, or give the prompt as --prompt-ids")
    ids = tokenizer.encode(args.prompt).ids if args.prompt is not None else args.prompt_ids
    if not ids:
        return fail("the prompt is empty after tokenization")
    bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if bad:
        hint = (f" (the tokenizer {tok_file} has {tokenizer.get_vocab_size()} tokens: not this model's? --tokenizer "
                "names another)" if args.prompt is not None else "")
        return fail(f"prompt ids outside [0, vocab_size={model.config.vocab_size}): {bad[:10]}{hint}")
    gen = model.generation_config
    given = [FROM_CONFIG if v is None else v
             for v in (args.do_sample, args.temperature, args.top_k, args.top_p, args.min_p)]
    do_sample, temperature, top_k, top_p, min_p = sampling_args(gen, *given)
    try:  # (no --max-new-tokens: the file's max_new_tokens, else its max_length, which counts the prompt)
        length_args = [FROM_CONFIG if v is None else v for v in (args.max_new_tokens, args.repetition_penalty)]
        max_new_tokens, penalty = length_and_penalty(gen, *length_args, default_length=CLI_MAX_NEW_TOKENS,
                                                     prompt_len=len(ids))
        check_sampling(do_sample, temperature, top_k, top_p, max_new_tokens, min_p)
        ngram_arg(gen, FROM_CONFIG if args.no_repeat_ngram_size is None else args.no_repeat_ngram_size)
        min_new_arg(gen, FROM_CONFIG if args.min_new_tokens is None else args.min_new_tokens, len(ids))
        # --num-beams 1 (greedy) also drops the file's num_return_sequences, which greedy search cannot return
        n_seq = 1 if args.num_beams == 1 and args.num_return_sequences is None and not do_sample else (
            args.num_return_sequences)
        beams = beam_args(gen, *[FROM_CONFIG if v is None else v for v in (
            args.num_beams, n_seq, args.length_penalty)], early, do_sample)
        cutoffs = [FROM_CONFIG if v is None else v for v in (args.typical_p, args.epsilon_cutoff, args.eta_cutoff)]
        cutoff_args(gen, *cutoffs, do_sample)
    except ValueError as e:
        msg = str(e)
        fix = ("--max-new-tokens N sets the length" if "max_length" in msg else
               "--no-repeat-ngram-size / --min-new-tokens set it" if "min_new_tokens=" in msg or "ngram" in msg else
               "--num-beams / --num-return-sequences / --length-penalty / --early-stopping set it"
               if any(k in msg for k in ("num_beams", "num_return_sequences", "length_penalty", "early_stopping"))
               else "--typical-p / --epsilon-cutoff / --eta-cutoff set it"
               if any(k in msg for k in ("typical_p", "epsilon_cutoff", "eta_cutoff"))
               else "--greedy decodes greedily")
        # the file named only for the settings of the message that it sets (a flag's own value: the flag's fix)
        from .config import GenerationConfig

        plain = GenerationConfig().to_dict()
        in_file = {k: v for k, v in gen.to_dict().items() if re.search(rf"\b{k}\b", msg) and plain.get(k) != v}
        return fail(f"{e} ({f'the model generation_config.json sets {in_file}; ' if in_file else ''}{fix})")
    # flags that do nothing here (transformers warns too: a --temperature without --do-sample is likely a forgotten
    # --do-sample)
    for used, why, flags in ((do_sample, "decoding is greedy (--do-sample samples)", (
            ("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p),
            ("--min-p", args.min_p), ("--typical-p", args.typical_p), ("--epsilon-cutoff", args.epsilon_cutoff),
            ("--eta-cutoff", args.eta_cutoff))), (beams[0] > 1, "no beam search (--num-beams N > 1)", (
            ("--length-penalty", args.length_penalty), ("--early-stopping", args.early_stopping)))):
        unused = [flag for flag, v in flags if v is not None]
        if unused and not used:
            print(f"note: {', '.join(unused)} not used: {why}", file=sys.stderr)
    if args.do_sample is None and do_sample:
        more = cutoff_args(gen, *cutoffs, do_sample) or (None, None, None)
        more = "".join(f", {k} {v}" for k, v in zip(("typical_p", "epsilon_cutoff", "eta_cutoff"), more)
                       if v is not None)
        print(f"note: {'beam ' if beams[0] > 1 else ''}sampling, as the model's generation_config.json says "
              f"(temperature {temperature}, top_k {top_k}, top_p {top_p}" + ("" if min_p is None else f", min_p "
              f"{min_p}") + more + "); --greedy for greedy decoding", file=sys.stderr)
    ignored = unsupported_message(gen)
    if ignored:  # said here, before the output, instead of as generate's warning in the middle of the stream
        print(f"note: {ignored}", file=sys.stderr)
    limit = model.config.max_position_embeddings
    if len(ids) + max_new_tokens > limit:
        print(f"note: prompt + new tokens = {len(ids) + max_new_tokens} > max_position_embeddings {limit}: "
              "positions past it were not trained", file=sys.stderr)
    if beams[0] > 1 or beams[1] > 1:  # several sequences, or beams known at the end only: no streaming
        return _print_sequences(model, ids, tokenizer, args, beams, do_sample, temperature, top_k, top_p, min_p,
                                max_new_tokens, penalty, cutoffs)
    new: list[int] = []
    times: list[float] = []
    out = sys.stdout
    stream = TextStream(tokenizer, ids, out) if tokenizer is not None else None
    base = tokenizer.decode(ids) if tokenizer is not None else ""

    # Ctrl-C while the compiled decode loop runs: Python runs signal handlers only between the main thread's
    # bytecodes, i.e. after the whole loop. The signal's byte also goes to a wakeup pipe, which the token callback
    # (another thread) reads: it raises there, which ends the loop.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    try:
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    except ValueError:  # not the main thread: Ctrl-C is acted on after the loop
        old_wakeup = None
    stopped: list[str] = []

    def quiet_when_stopped(record) -> bool:  # JAX logs the callback's exception with its traceback: not the stop's
        return not stopped

    logging.getLogger("jax._src.debugging").addFilter(quiet_when_stopped)

    def on_token(step, toks):
        try:
            if signal.SIGINT in os.read(wake_r, 64):
                stopped.append("interrupted")
        except BlockingIOError:
            pass
        if stopped:
            raise KeyboardInterrupt
        times.append(time.perf_counter())
        new.append(int(toks[0]))
        try:
            if stream is not None:
                stream.push(new[-1])
            else:
                out.write(f" {new[-1]}")
            out.flush()
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly
            stopped.append("broken pipe")
            raise

    if args.prompt is not None:
        out.write(args.prompt)
    elif tokenizer is not None:
        out.write(base)
    else:
        out.write(" ".join(str(i) for i in ids) + " |")
    out.flush()
    t0 = time.perf_counter()
    # one prompt is never padded: a pad id in it is a token (generate would infer a mask from it, as transformers)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*" + re.escape(UNSUPPORTED))  # (noted above)
            generate(model, np.asarray([ids]), np.ones((1, len(ids)), bool), max_new_tokens=max_new_tokens,
                     do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     seed=args.seed,
                     eos_token_id=-1 if args.no_eos else FROM_CONFIG, on_token=on_token, repetition_penalty=penalty,
                     min_new_tokens=FROM_CONFIG if args.min_new_tokens is None else args.min_new_tokens,
                     no_repeat_ngram_size=FROM_CONFIG if args.no_repeat_ngram_size is None
                     else args.no_repeat_ngram_size, typical_p=cutoffs[0], epsilon_cutoff=cutoffs[1],
                     eta_cutoff=cutoffs[2], return_dict_in_generate=False, num_beams=1, num_return_sequences=1)
    except Exception:  # noqa: BLE001 - the callback's exception, wrapped by JAX
        if not stopped:
            raise
    finally:
        if old_wakeup is not None:
            signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
    if stopped:  # the callback's error can also surface at the next sync of the ordered effects: take it here
        with contextlib.suppress(Exception):
            jax.effects_barrier()
    logging.getLogger("jax._src.debugging").removeFilter(quiet_when_stopped)
    if stopped and stopped[0] == "broken pipe":
        raise BrokenPipeError
    if stopped:
        raise KeyboardInterrupt
    if stream is not None and new:
        stream.finish()  # a tail held back for a multi-byte character that never completed
    out.write("\n")  # the output ends its line (a shell prompt or the next log line starts on its own)
    out.flush()
    t1 = time.perf_counter()
    _note_unknown_ids(tokenizer, ids + new, model.config.vocab_size)
    n = len(new)
    rate = f"decoding {(n - 1) / (times[-1] - times[0]):.1f} tokens/s; " if n > 1 and times[-1] > times[0] else ""
    print(f"\n[{n} new tokens; first token after {times[0] - t0:.2f} s (prompt {len(ids)} tokens, incl. "
          f"compilation); {rate}total {t1 - t0:.2f} s]", file=sys.stderr)
    return 0


def _note_unknown_ids(tokenizer, ids: list[int], vocab_size: int) -> None:
    """A note naming ids the tokenizer lacks (a tokenizer smaller than the model's padded vocab_size): they decode
    to nothing."""
    import sys

    if tokenizer is None:
        return
    unknown = sorted({i for i in ids if tokenizer.id_to_token(i) is None})
    if unknown:
        print(f"note: token id(s) {unknown[:10]}{' ...' if len(unknown) > 10 else ''} are not in the tokenizer's "
              f"vocabulary ({tokenizer.get_vocab_size()} tokens; the model has {vocab_size}): they decode to "
              "nothing", file=sys.stderr)


def _print_sequences(model, ids, tokenizer, args, beams, do_sample, temperature, top_k, top_p, min_p,
                     max_new_tokens, penalty, cutoffs) -> int:
    """The command line with beam search or several sequences: generate them all, then print each (up to and
    including its EOS): `prompt ids | new ids` on its own line, or the prompt text and continuation after a
    `=== k/n ===` line when there are several (a text may hold newlines). The search
    runs in a worker thread, so that Ctrl-C ends the process at once (exit 130) instead of after the compiled
    search."""
    import os
    import sys
    import threading
    import time

    num_beams, n_seq, length_penalty, early_stopping = beams
    what = (f"beam {'sampling' if do_sample else 'search'}, {num_beams} beams" if num_beams > 1 else "sampling")
    print(f"note: {what}: {n_seq} sequence(s), printed when done (not streamed)", file=sys.stderr)
    t0 = time.perf_counter()
    result: dict = {}

    def run() -> None:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*" + re.escape(UNSUPPORTED))  # (noted before)
                result["out"] = generate(
                    model, np.asarray([ids]), np.ones((1, len(ids)), bool), max_new_tokens=max_new_tokens,
                    do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    seed=args.seed, eos_token_id=-1 if args.no_eos else FROM_CONFIG, repetition_penalty=penalty,
                    min_new_tokens=FROM_CONFIG if args.min_new_tokens is None else args.min_new_tokens,
                    no_repeat_ngram_size=FROM_CONFIG if args.no_repeat_ngram_size is None
                    else args.no_repeat_ngram_size, num_beams=num_beams, num_return_sequences=n_seq,
                    length_penalty=length_penalty, early_stopping=early_stopping, typical_p=cutoffs[0],
                    epsilon_cutoff=cutoffs[1], eta_cutoff=cutoffs[2], return_dict_in_generate=False)
        except BaseException as e:  # noqa: BLE001 - raised again in the main thread
            result["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:  # the compiled search cannot be stopped: leave it, and the process, now
        print("\ninterrupted", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)
    if "error" in result:
        raise result["error"]
    out = result["out"]
    t1 = time.perf_counter()
    eos = [] if args.no_eos else eos_ids(FROM_CONFIG, model.generation_config)
    shown = list(ids)
    rows = np.asarray(out)
    for k, row in enumerate(rows):
        new = [int(t) for t in row[len(ids):]]
        end = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))  # (what follows EOS is filling)
        new = new[:end]
        shown += new
        if tokenizer is not None:
            if len(rows) > 1:  # (a text may hold newlines: one line per sequence would not tell them apart)
                print(f"=== {k + 1}/{len(rows)} ===")
            text = tokenizer.decode(ids + new)
            base = tokenizer.decode(ids)
            print((args.prompt if args.prompt is not None else base) + text[len(base):] if text.startswith(base)
                  else text)
        else:
            print(" ".join(str(i) for i in ids) + " | " + " ".join(str(t) for t in new))
    sys.stdout.flush()
    _note_unknown_ids(tokenizer, shown, model.config.vocab_size)
    print(f"\n[{len(out)} sequence(s) of up to {np.asarray(out).shape[1] - len(ids)} new tokens ({what}); total "
          f"{t1 - t0:.2f} s incl. compilation]", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """`python -m doge_jax.generate --model PATH --prompt "..."`: stream a continuation and report tokens/s."""
    import sys

    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output's reader went away (`| head`): no traceback, as SIGPIPE would end it
        return 141
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # (the decode cache and buffers hold prompt + max new tokens per row: an absurd --max-new-tokens)
        first = str(e).splitlines()[0][:300]
        print(f"error: out of device memory ({first}); a smaller --max-new-tokens (or --num-beams / "
              "--num-return-sequences) needs less", file=sys.stderr)
        return 1


if __name__ == "__main__":
    code = main()
    if code == 141:  # (stdout's reader is gone: the interpreter's last flush of it would fail again, loudly)
        import os
        import sys

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(code)
