"""Incremental decoding for doge_torch: greedy or sampled, KV cache, left padding, EOS (spec §4)."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from doge_jax.generation_args import (
    FROM_CONFIG,
    RIGHT_PADDED,
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
    warn_unsupported,
)
from doge_jax.model_output import GenerateOutput

from .beam import beam_search
from .decode import SLOTS, run_step, static_cache, step_function
from .model import DogeCache, check_token_ids, token_ids_checked


def warp(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
         min_p: float | None = None, min_keep: int = 1, cutoffs=None) -> torch.Tensor:
    """transformers' sampling warpers on float32 scores [B, V]: temperature, then top-k, then top-p, then min-p,
    then `cutoffs` (typical_p, epsilon, eta: generation_args.cutoff_args) (dropped tokens get -inf), each keeping
    at least `min_keep` tokens (beam sampling keeps 1 + number of EOS ids)."""
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(max(top_k, min_keep), logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -min_keep:] = False
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    if min_p is not None:  # tokens less probable than min_p times the most probable one
        probs = logits.softmax(-1)
        remove = probs < min_p * probs.amax(-1, keepdim=True)
        remove.scatter_(-1, torch.topk(probs, min(min_keep, probs.shape[-1]), dim=-1).indices, False)
        logits = logits.masked_fill(remove, float("-inf"))
    typical, eps, eta = cutoffs or (None, None, None)
    if typical is not None:  # tokens whose surprise is closest to the entropy, up to `typical` probability mass
        logp = logits.log_softmax(-1)
        ent = -(logp * logp.exp()).nansum(-1, keepdim=True)
        shifted, order = torch.sort((-logp - ent).abs(), dim=-1)
        cum = logits.gather(-1, order).softmax(-1).cumsum(-1)
        last = (cum < typical).sum(-1, keepdim=True).clamp(max=shifted.shape[-1] - 1)
        remove = shifted > shifted.gather(-1, last)
        remove[..., :min_keep] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    for cut, scale_by_entropy in ((eps, False), (eta, True)):
        if cut is None:
            continue
        probs = logits.softmax(-1)
        if scale_by_entropy:  # eta: min(eta, sqrt(eta) * exp(-entropy)) (torch's Categorical entropy)
            norm = (logits - logits.logsumexp(-1, keepdim=True)).clamp(min=torch.finfo(logits.dtype).min)
            ent = -(norm * norm.softmax(-1)).sum(-1, keepdim=True)
            c = torch.tensor(cut, dtype=torch.float32, device=logits.device)
            threshold = torch.minimum(c, c.sqrt() * torch.exp(-ent))
        else:
            threshold = cut
        kth = torch.topk(logits, min(min_keep, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill((probs < threshold) & (logits < kth), float("-inf"))
    return logits


@functools.lru_cache(maxsize=256)
def _const(values: tuple, device: torch.device) -> torch.Tensor:
    """A rule's ids / biases as a tensor on `device`, made once (not copied to the device again each step)."""
    return torch.tensor(values, device=device)


def apply_bias(scores: torch.Tensor, ids: torch.Tensor, rules) -> torch.Tensor:
    """transformers' sequence_bias (generation_args.TokenRules) on float32 scores [B, V], its first processor: one
    bias row (single tokens, then each prefix-length group's matches added), then added to the scores."""
    if not (rules.bias_single or rules.bias_multi):
        return scores
    dev = scores.device
    bias = torch.zeros_like(scores)
    if rules.bias_single:
        row = torch.zeros(scores.shape[-1], device=dev)
        row[[t for t, _ in rules.bias_single]] = _const(tuple(b for _, b in rules.bias_single), dev)
        bias += row
    for prefixes, toks, values in rules.bias_groups:
        m = len(prefixes[0])
        if m > ids.shape[1]:
            continue
        hit = (ids[:, None, -m:] == _const(prefixes, dev)).all(-1)
        bias.index_add_(1, _const(toks, dev), torch.where(hit, _const(values, dev), 0.0).to(bias.dtype))
    return scores + bias


def apply_rules(scores: torch.Tensor, ids: torch.Tensor, step: int, rules) -> torch.Tensor:
    """generation_args.TokenRules on float32 scores [B, V] of new-token index `step` (`ids` [B, L] the rows so far,
    prompt and padding included), in transformers' order: bad words, forced BOS / EOS, NaN/inf removal, the EOS
    length bonus, suppressed tokens."""
    dev, inf = scores.device, float("inf")
    if rules.bad_single:
        scores = scores.index_fill(1, _const(rules.bad_single, dev), -inf)
    for prefix, tok in rules.bad_multi:
        if len(prefix) <= ids.shape[1]:
            hit = (ids[:, -len(prefix):] == _const(prefix, dev)).all(-1)
            scores = scores.clone()
            scores[:, tok] = scores[:, tok].masked_fill(hit, -inf)
    for at, forced in rules.forced:
        if step == at:
            scores = torch.full_like(scores, -inf)
            scores[:, list(forced)] = 0.0
    if rules.remove_invalid:
        big = torch.finfo(scores.dtype)
        scores = torch.where(scores != scores, 0.0, scores)
        scores = scores.clamp(big.min, big.max)
    if rules.decay and rules.decay[step]:
        e = _const(rules.eos, dev)
        at = scores[:, e]
        bonus = torch.zeros_like(scores)
        bonus[:, e] = (at.abs() * rules.decay[step]).masked_fill(~torch.isfinite(at), 0.0)
        scores = scores + bonus
    if rules.suppress:
        scores = scores.index_fill(1, _const(rules.suppress, dev), -inf)
    if rules.begin_suppress and step == rules.begin_step:
        scores = scores.index_fill(1, _const(rules.begin_suppress, dev), -inf)
    return scores


def ban_repeated_ngrams(logits: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' no_repeat_ngram_size: a token that would complete an n-gram already in the row (`ids` [B, L],
    prompt and padding included, as transformers reads them) gets -inf."""
    L = ids.shape[1]
    if L < n:  # (no n-gram in the row yet)
        return logits
    win = ids.unfold(1, n, 1)  # [B, L - n + 1, n]: every n-gram of the row
    match = (win[..., :n - 1] == ids[:, L - n + 1:][:, None, :]).all(-1)  # its first n-1 tokens are the last n-1
    hits = torch.zeros_like(logits, dtype=torch.int32).scatter_add_(1, win[..., -1], match.int())
    return logits.masked_fill(hits > 0, float("-inf"))


def penalize(logits: torch.Tensor, ids: torch.Tensor, start: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty on float32 logits [B, V]: tokens of `ids` [B, T] from column start[b] on
    (the row's first attended prompt token) have their logit divided by `penalty` if positive, multiplied if not."""
    V = logits.shape[-1]
    cols = torch.arange(ids.shape[1], device=ids.device)
    keys = ids.masked_fill(cols[None] < start[:, None], V)  # left padding goes to a dropped column
    seen = torch.zeros(logits.shape[0], V + 1, dtype=torch.bool, device=logits.device).scatter_(1, keys, True)
    return torch.where(seen[:, :V], torch.where(logits < 0, logits * penalty, logits / penalty), logits)


class _Decoder:
    """The float32 next-token logits [B, V] of growing sequences, one call per new token: the tokens the cache has
    not seen go through the model (dynamic cache; the static one from the first new token on), or, without a
    cache, the whole sequence each time."""

    def __init__(self, model, use_cache: bool, static: bool, slots: int):
        self.model, self.use_cache, self.static, self.slots = model, use_cache, static, slots
        self.cache = DogeCache(model.config.num_hidden_layers) if use_cache else None
        self.scache = self.step = None  # the static cache and its decode step, from the first new token on
        self.seen = 0

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = self.model
        # transformers: positions from the attention mask (cumsum - 1, padding at 0)
        pos = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        new = ids[:, self.seen:]
        self.seen = ids.shape[1]
        if self.scache is not None:
            logits, self.step = run_step(self.step, model, self.scache, new, pos[:, -1:])
            return logits
        if not self.use_cache:
            return model(ids, attention_mask=attention_mask, position_ids=pos, logits_to_keep=1,
                         use_cache=False).logits[:, -1].float()
        out = model(new, attention_mask=attention_mask, position_ids=pos[:, -new.shape[1]:],
                    past_key_values=self.cache, logits_to_keep=1)
        if self.static:  # the prompt's keys into a cache with room for every new token
            self.scache = static_cache(model, self.cache, attention_mask, self.slots)
            self.step = step_function(ids.device)
        return out.logits[:, -1].float()

    def reorder(self, rows: torch.Tensor) -> None:
        """Row r continues old row rows[r] (beam search)."""
        if self.scache is not None:
            self.scache.reorder(rows)
        elif self.cache is not None:
            self.cache.reorder(rows)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens=FROM_CONFIG,
             do_sample=FROM_CONFIG, temperature=FROM_CONFIG, top_k=FROM_CONFIG, top_p=FROM_CONFIG,
             eos_token_id=FROM_CONFIG, seed: int | None = None, use_cache: bool = True, pad_token_id=FROM_CONFIG,
             repetition_penalty=FROM_CONFIG, min_new_tokens=FROM_CONFIG, generation_config=None,
             max_length=None, cache_implementation: str | None = None, min_p=FROM_CONFIG,
             streamer=None, no_repeat_ngram_size=FROM_CONFIG, num_beams=FROM_CONFIG,
             num_return_sequences=FROM_CONFIG, length_penalty=FROM_CONFIG, early_stopping=FROM_CONFIG,
             typical_p=FROM_CONFIG, epsilon_cutoff=FROM_CONFIG, eta_cutoff=FROM_CONFIG,
             return_dict_in_generate=FROM_CONFIG, output_scores=FROM_CONFIG, output_logits=FROM_CONFIG,
             **processors):
    """Prompt + up to max_new_tokens new tokens per row; finished rows are padded (pad id, else EOS). Arguments
    not given come from `generation_config`, else `model.generation_config` (generation_config.json; else
    transformers' defaults: greedy, temperature 1, top_k 50, no top-p / min-p, no repetition penalty; 20 new tokens, or
    max_length, the call's or the config's, as doge_jax.generate); sampling draws from torch's global generator
    as transformers does (`torch.manual_seed(s)` before the call gives transformers' tokens; successive calls
    differ), or with `seed` from a generator of its own on the model's device, seeded by it (the same tokens).
    `repetition_penalty`, `min_new_tokens`, `no_repeat_ngram_size` and the `typical_p` / `epsilon_cutoff` /
    `eta_cutoff` sampling warpers as transformers (see doge_jax.generate).
    `cache_implementation` as transformers': None / "dynamic" (a cache growing by one slot per token, eager), or
    "static": after the eager prefill, the tokens are decoded in a preallocated cache by one torch.compile'd step
    of fixed shapes (doge_torch.decode; CUDA graphs on CUDA), the first call compiling it. A transformers
    `streamer` gets put(prompt ids), put(each new token [B]) and end(), as transformers calls it.
    `num_beams` > 1: transformers' beam search (doge_torch.beam; with `length_penalty`, `early_stopping`), returning
    the best `num_return_sequences` sequences of each row; sampling with num_return_sequences n repeats each row n
    times (transformers' rows and, from the same seed, its tokens). `return_dict_in_generate`: a GenerateOutput
    (doge_jax.model_output) as transformers' (with `output_scores` / `output_logits`). `processors`: transformers'
    bad_words_ids, suppress_tokens, begin_suppress_tokens, forced_bos_token_id, forced_eos_token_id,
    exponential_decay_length_penalty, remove_invalid_values (generation_args.token_rules)."""
    if cache_implementation not in (None, "dynamic", "static"):
        raise ValueError(f"cache_implementation={cache_implementation!r}: None, 'dynamic' or 'static'")
    static = cache_implementation == "static"
    if static and not use_cache:
        raise ValueError("cache_implementation='static' needs use_cache=True")
    cfg = model.config
    gcfg = call_generation_config(model, generation_config)
    do_sample, temperature, top_k, top_p, min_p = sampling_args(gcfg, do_sample, temperature, top_k, top_p, min_p)
    max_new_tokens, penalty = length_and_penalty(gcfg, max_new_tokens, repetition_penalty, max_length=max_length,
                                                 prompt_len=prompt_length(input_ids),
                                                 max_positions=cfg.max_position_embeddings)
    check_sampling(do_sample, temperature, top_k, top_p, max_new_tokens, min_p)
    ngram = ngram_arg(gcfg, no_repeat_ngram_size)
    cutoffs = cutoff_args(gcfg, typical_p, epsilon_cutoff, eta_cutoff, do_sample)
    as_dict, record_scores, record_logits = output_args(gcfg, return_dict_in_generate, output_scores, output_logits)
    num_beams, n_seq, length_penalty, early_stopping = beam_args(gcfg, num_beams, num_return_sequences,
                                                                 length_penalty, early_stopping, do_sample, streamer)
    warn_unsupported(gcfg, source="generation_config" if generation_config is not None
                     else "the model's generation_config.json")
    device = next(model.parameters()).device
    if not isinstance(input_ids, torch.Tensor):  # a list or a numpy array, as doge_jax takes them
        arr = as_array(input_ids, "input_ids")
        input_ids = torch.as_tensor(arr.astype(np.int64) if arr.dtype.kind in "iu" else arr, device=device)
    elif input_ids.dtype not in (torch.int64, torch.int32) and not (
            input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool):
        input_ids = input_ids.long()  # uint8/int16/uint16 ...: the embedding takes int32/int64
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        attention_mask = torch.as_tensor(as_array(attention_mask, "attention_mask"), device=input_ids.device)
    if input_ids.numel() == 0:  # (before the dtype check: [] and [[]] become float arrays)
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)}: expected [batch >= 1, length >= 1] (or "
                         "[length])")
    check_token_ids(input_ids, cfg.vocab_size)  # once (and its dtype): generated ids are in range
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if attention_mask is not None and attention_mask.ndim == 1:
        attention_mask = attention_mask[None]
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)}: expected [batch >= 1, length >= 1] (or "
                         "[length])")
    eos = eos_ids(eos_token_id, gcfg)
    # (beam search fills with any id, as transformers; generated rows feed the pad back: it must be a token)
    check_beam_vocab(num_beams, eos, cfg.vocab_size)
    pad = beam_fill(pad_token_id, gcfg, eos) if num_beams > 1 else output_pad(pad_token_id, gcfg, eos, cfg.vocab_size)
    device = input_ids.device
    if seed is not None and (not isinstance(seed, int | np.integer) or isinstance(seed, bool)
                             or not 0 <= seed < 2**64):
        raise ValueError(f"seed={seed!r}: must be None (torch's global generator) or an integer in [0, 2**64)")
    gen = torch.Generator(device=device).manual_seed(int(seed)) if do_sample and seed is not None else None
    B = input_ids.shape[0]
    if attention_mask is None:  # as transformers: inferred from the pad id where the prompt holds it
        infer = inferred_pad(pad_token_id, gcfg, eos)
        attention_mask = torch.ones_like(input_ids)
        if infer is not None and bool((input_ids == infer).any()):
            attention_mask = (input_ids != infer).long()
    else:
        check_mask_values(attention_mask.detach().cpu().float().numpy())  # (.float(): numpy has no bfloat16)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    attention_mask = attention_mask.long()
    if not bool(attention_mask[:, -1].all()):
        warnings.warn(RIGHT_PADDED, stacklevel=2)
    ids = input_ids
    if max(num_beams, n_seq) > 1:  # each row once per beam or returned sample, as transformers expands them
        ids = ids.repeat_interleave(max(num_beams, n_seq), 0)
        attention_mask = attention_mask.repeat_interleave(max(num_beams, n_seq), 0)
        B = ids.shape[0]
    start = torch.as_tensor(penalty_start(attention_mask.cpu().numpy()), device=device)
    P = ids.shape[1]
    min_new = min_new_arg(gcfg, min_new_tokens, P)
    rules = token_rules(gcfg, rule_values(processors), eos, P, cfg.vocab_size, max_new_tokens)
    eos_in = [e for e in eos if 0 <= e < cfg.vocab_size]
    eos_cols = torch.tensor(eos_in, dtype=torch.long, device=device) if min_new and eos_in else None
    decoder = _Decoder(model, use_cache, static, -(-(P + max_new_tokens) // SLOTS) * SLOTS)  # (slots rounded
    # up, so that other lengths reuse the compiled step)

    def processors(seqs: torch.Tensor, logits: torch.Tensor, new: int) -> torch.Tensor:
        if rules is not None:  # sequence_bias: transformers' first processor
            logits = apply_bias(logits, seqs, rules)
        if penalty != 1.0:  # a logits processor: before sampling, greedy too (transformers; none at 1.0)
            logits = penalize(logits, seqs, start, penalty)
        if ngram:
            logits = ban_repeated_ngrams(logits, seqs, ngram)
        if eos_cols is not None and new < min_new:  # min_new_tokens / min_length: no EOS yet
            logits = logits.index_fill(1, eos_cols, float("-inf"))
        if rules is not None:
            logits = apply_rules(logits, seqs, new, rules)
        if do_sample and num_beams > 1:  # beam sampling: the warpers act on the log-probabilities too
            logits = warp(logits, temperature, top_k, top_p, min_p, min_keep=beam_candidates(eos), cutoffs=cutoffs)
        return logits

    def draw(scores: torch.Tensor, n: int) -> torch.Tensor:  # beam sampling: n of [B, K*V] without replacement
        return torch.multinomial(scores.softmax(-1), n, generator=gen)

    if num_beams > 1:
        with token_ids_checked():
            out = beam_search(decoder, decoder.reorder, ids, attention_mask, num_beams=num_beams,
                              num_return_sequences=n_seq, max_new_tokens=max_new_tokens, eos=eos, fill=pad,
                              length_penalty=length_penalty, early_stopping=early_stopping, processors=processors,
                              draw=draw if do_sample else None, record_scores=record_scores,
                              record_logits=record_logits)
        if not as_dict:
            return out["sequences"]
        if not record_scores:  # (as transformers: the final scores with output_scores only)
            out["sequences_scores"] = None
        return GenerateOutput(**out)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    eos_t = torch.tensor(eos, dtype=ids.dtype, device=device)
    all_scores: list[torch.Tensor] = []
    all_logits: list[torch.Tensor] = []
    if streamer is not None:
        streamer.put(ids.cpu())
    with token_ids_checked():
        for _ in range(max_new_tokens):
            logits = decoder(ids, attention_mask)
            scores = processors(ids, logits, ids.shape[1] - P)
            if do_sample:  # the warpers: what transformers records as the step's scores
                scores = warp(scores, temperature, top_k, top_p, min_p, cutoffs=cutoffs)
            all_scores.append(scores) if record_scores else None
            all_logits.append(logits) if record_logits else None
            nxt = (torch.multinomial(scores.softmax(-1), 1, generator=gen)[:, 0] if do_sample
                   else scores.argmax(-1))
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(nxt[:, None])], 1)
            if len(eos):
                done = done | torch.isin(nxt, eos_t)
            if streamer is not None:
                streamer.put(nxt.cpu())
            if bool(done.all()):
                break
    if streamer is not None:
        streamer.end()
    if as_dict:
        return GenerateOutput(sequences=ids, scores=tuple(all_scores) if record_scores else None,
                              logits=tuple(all_logits) if record_logits else None)
    return ids
