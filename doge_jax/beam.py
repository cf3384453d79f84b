"""Beam search for doge_jax: transformers' vectorized beam search (generation/utils.py `_beam_search`, as
doge_torch.beam), with fixed shapes so that the whole search is one compiled while_loop over the decode cache.

Each step keeps the top (1 + number of EOS ids, at least 2) x K continuations of all K beams of a row; the best K
that did not end run on (the cache rows follow them), and those of the best K that ended (EOS or the length limit)
compete, divided by (new length ** length_penalty), for the K finished places. The search stops when no running
beam can beat the worst finished one (transformers' heuristic, by early_stopping), when every finished place is
taken with early_stopping=True, or at the length limit.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .decode import DecodeCache, decode_step, prepare_decode, use_counters

NEG = -1.0e9  # transformers' "never pick this" score (added, not assigned: scores keep their order among equals)


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, K, ...] -> x[b, idx[b, j], ...] for idx [B, J]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def length_divisors(max_new_tokens: int, length_penalty: float) -> np.ndarray:
    """[max_new_tokens] float32: n ** length_penalty for n = 1.. new tokens, computed in float64 and rounded once,
    as transformers' Python float divides its float32 scores."""
    return (np.arange(1, max_new_tokens + 1, dtype=np.float64) ** length_penalty).astype(np.float32)


def init_state(ids: jax.Array, num_beams: int, max_new_tokens: int, fill) -> dict:
    """The search state for the prompt rows `ids` [B * K, P] (each row K times): running and finished sequences
    [B, K, P + max_new_tokens], their scores, finished flags, each new token's source row (-1: none yet)."""
    BK, P = ids.shape
    K = num_beams
    B = BK // K
    running = jnp.full((B, K, P + max_new_tokens), fill, jnp.int32).at[:, :, :P].set(ids.reshape(B, K, P))
    run_src = jnp.full((B, K, max_new_tokens), -1, jnp.int32)
    return {"running": running, "seqs": running, "run_scores": jnp.zeros((B, K), jnp.float32).at[:, 1:].set(NEG),
            "scores": jnp.full((B, K), NEG, jnp.float32), "finished": jnp.zeros((B, K), bool),
            "improvable": jnp.ones((B, 1), bool), "run_src": run_src, "src": run_src, "go_on": jnp.bool_(True)}


def beam_update(state: dict, log_probs: jax.Array, step, P: int, eos: jax.Array, divisors: jax.Array,
                never_divisor, early_stopping: bool | str, never_long: bool, rng=None) -> tuple[dict, jax.Array]:
    """One step: the processed log-probabilities [B * K, V] of the running beams' next token at new-token index
    `step` (prompt length P in the state's buffers) -> (state, rows [B * K]: the running row each new beam
    continues, for the cache). With `rng` (beam sampling) the candidates are drawn without replacement from the
    softmax of the scores (Gumbel top-k: the order of sequential draws) instead of taken best first."""
    running = state["running"]
    B, K, _ = running.shape
    V = log_probs.shape[-1]
    keep = max(2, 1 + eos.shape[0]) * K
    max_new = state["run_src"].shape[-1]
    scores = (log_probs.reshape(B, K, V) + state["run_scores"][:, :, None]).reshape(B, K * V)

    if rng is None:
        top_lp, top_idx = jax.lax.top_k(scores, keep)
    else:
        top_idx = jax.lax.top_k(scores + jax.random.gumbel(rng, scores.shape), keep)[1]
        top_lp = jnp.take_along_axis(scores, top_idx, axis=1)
    beam = top_idx // V
    tok = (top_idx % V).astype(jnp.int32)
    top_seqs = jax.lax.dynamic_update_slice_in_dim(_gather(running, beam), tok[..., None], P + step, axis=2)
    source = (beam + jnp.arange(B)[:, None] * K).astype(jnp.int32)
    top_src = jax.lax.dynamic_update_slice_in_dim(_gather(state["run_src"], beam), source[..., None], step, axis=2)
    ends = jnp.isin(tok, eos) | (step + 1 >= max_new)

    run_lp = top_lp + ends.astype(jnp.float32) * NEG
    nxt = jax.lax.top_k(run_lp, K)[1]
    running, run_scores, run_src = _gather(top_seqs, nxt), _gather(run_lp, nxt), _gather(top_src, nxt)

    just = ends & (jnp.arange(keep) < K)[None]
    fin = top_lp / divisors[step]
    full = jnp.all(state["finished"], axis=-1, keepdims=True) & (early_stopping is True)
    fin = fin + full.astype(jnp.float32) * NEG
    fin = fin + (~state["improvable"]).astype(jnp.float32) * NEG
    fin = fin + (~just).astype(jnp.float32) * NEG
    merged = jnp.concatenate([state["scores"], fin], axis=1)
    best = jax.lax.top_k(merged, K)[1]
    seqs = _gather(jnp.concatenate([state["seqs"], top_seqs], axis=1), best)
    src = _gather(jnp.concatenate([state["src"], top_src], axis=1), best)
    finished = _gather(jnp.concatenate([state["finished"], just], axis=1), best)
    scores = _gather(merged, best)

    best_run = run_scores[:, :1] / (never_divisor if never_long else divisors[step])
    worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
    improvable = state["improvable"] & jnp.any(best_run > worst, axis=-1, keepdims=True)
    go_on = jnp.any(improvable) & ~(jnp.all(finished) & (early_stopping is True)) & ~jnp.all(ends)
    rows = jax.lax.dynamic_index_in_dim(run_src, step, axis=2, keepdims=False).reshape(B * K)
    return ({"running": running, "seqs": seqs, "run_scores": run_scores, "scores": scores, "finished": finished,
             "improvable": improvable, "run_src": run_src, "src": src, "go_on": go_on}, rows)


def result(out: tuple, num_return_sequences: int, skip: int = 0) -> dict:
    """generate's fields from a search's (seqs, src, scores, recorded scores, recorded logits, steps): the best
    num_return_sequences finished sequences of each row [B * n, P + new] (`skip` leading bucket-padding slots
    dropped), their scores, transformers' beam_indices [B * n, new] and the recorded steps (on the host: one
    compiled search serves every num_return_sequences)."""
    seqs, src, scores, rec_s, rec_l, steps = out
    k = num_return_sequences
    seqs, src = np.asarray(seqs)[:, :k], np.asarray(src)[:, :k]
    n, steps = int((src >= 0).sum(-1).max()), int(steps)
    P = seqs.shape[-1] - src.shape[-1]
    return {"sequences": seqs.reshape(-1, seqs.shape[-1])[:, skip:P + n],
            "sequences_scores": np.asarray(scores)[:, :k].reshape(-1),
            "beam_indices": src.reshape(-1, src.shape[-1])[:, :n],
            "scores": None if rec_s is None else tuple(np.asarray(rec_s)[:steps]),
            "logits": None if rec_l is None else tuple(np.asarray(rec_l)[:steps])}


def process(log_probs, hist, length, step, seen, penalty, eos_mask, min_new, ngram: int, skip, warp=None,
            rules=None):
    """The logits processors on log-probabilities [B, V], in doge_jax.generate's order: no_repeat_ngram_size over
    `hist` [B, T] up to `length`, the repetition penalty over `seen` [B, V], no EOS before min_new new tokens;
    then, beam sampling, the warpers (`warp`: temperature, top_k, top_p, min_p, min_keep, cutoffs)."""
    from .generate import _apply_bias, _apply_rules, _ban_ngrams, _filter_logits, _penalize

    if rules is not None:  # sequence_bias: transformers' first processor
        log_probs = _apply_bias(log_probs, hist, length, rules, skip)
    if ngram:
        log_probs = _ban_ngrams(log_probs, hist, length, ngram, skip)
    if seen is not None:
        log_probs = _penalize(log_probs, seen, penalty)
    if eos_mask is not None:
        log_probs = jnp.where(eos_mask & (step < min_new), -jnp.inf, log_probs)
    if rules is not None:
        log_probs = _apply_rules(log_probs, hist, length, step, rules, skip)
    if warp is not None:
        temperature, top_k, top_p, min_p, min_keep, cutoffs = warp
        log_probs = _filter_logits(log_probs, temperature, top_k, top_p, min_p, min_keep, -jnp.inf, cutoffs)
    return log_probs


def advance(state: dict, logits: jax.Array, step, P: int, consts: dict, early_stopping: bool | str,
            never_long: bool, ngram: int, seen=None, warp=None, rng=None, rules=None
            ) -> tuple[dict, jax.Array, jax.Array | None, jax.Array, jax.Array]:
    """log_softmax of the running beams' logits [B * K, V], the logits processors, one beam_update; returns
    (state, rows for the cache, `seen` following the beams, the new tokens [B * K], the processed
    log-probabilities: what transformers records as the step's scores)."""
    BK = logits.shape[0]
    hist = state["running"].reshape(BK, -1)
    lp = process(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), hist, P + step, step, seen,
                 consts["penalty"], consts["eos_mask"], consts["min_new"], ngram, consts["skip"], warp, rules)
    state, rows = beam_update(state, lp, step, P, consts["eos"], consts["divisors"], consts["never_divisor"],
                              early_stopping, never_long, rng)
    tok = jax.lax.dynamic_index_in_dim(state["running"], P + step, axis=2, keepdims=False).reshape(BK)
    if seen is not None:
        seen = jnp.take(seen, rows, axis=0).at[jnp.arange(BK), tok].set(True)
    return state, rows, seen, tok, lp


@partial(nnx.jit, static_argnames=("max_new_tokens", "num_beams", "early_stopping", "never_long", "ngram", "warp",
                                   "record", "rules"))
def beam_search_cached(model, ids, mask, pos, cache, consts: dict, max_new_tokens: int, num_beams: int,
                       early_stopping, never_long: bool, ngram: int = 0, seen=None, warp=None, rng=None,
                       record=(False, False), rules=None):
    """Prefill the prompt rows `ids` [B * K, P] (each row K times), then a while_loop of single-token steps on the
    beams, the cache rows following them; returns what result() takes (`record`: the steps' scores, logits).
    `consts`: eos, fill, divisors, never_divisor, penalty, eos_mask, min_new, skip (see generate); `warp` and `rng`:
    beam sampling."""
    P = ids.shape[1]
    prep = prepare_decode(model, cache.capacity)
    out = model(ids, attention_mask=mask, position_ids=pos, cache=cache.unstacked(), logits_to_keep=1,
                layer_params=prep["states"])
    cache = DecodeCache.from_cache(out.cache, use_counters(model.config, cache.capacity))
    state = init_state(ids, num_beams, max_new_tokens, consts["fill"])
    logits = out.logits[:, -1]
    shape = (max_new_tokens,) + logits.shape
    recs = tuple(jnp.zeros(shape, jnp.float32) if on else None for on in record)

    def step_on(state, logits, step, cache, seen, rng, recs):
        draw = None
        if rng is not None:
            rng, draw = jax.random.split(rng)
        state, rows, seen, tok, lp = advance(state, logits, step, P, consts, early_stopping, never_long, ngram,
                                             seen, warp, draw, rules)
        recs = tuple(None if r is None else r.at[step].set(x.astype(jnp.float32))
                     for r, x in zip(recs, (lp, logits)))
        return state, cache.reorder(rows), seen, rng, recs, tok

    state, cache, seen, rng, recs, tok = step_on(state, logits, 0, cache, seen, rng, recs)

    def body(carry):
        state, step, tok, next_pos, cache, seen, rng, recs = carry
        logits, cache = decode_step(model, prep, tok, next_pos, cache)
        state, cache, seen, rng, recs, tok = step_on(state, logits, step, cache, seen, rng, recs)
        return state, step + 1, tok, next_pos + 1, cache, seen, rng, recs

    carry = (state, jnp.int32(1), tok, jnp.max(pos, axis=1) + 1, cache, seen, rng, recs)
    state, steps, *_, recs = jax.lax.while_loop(lambda carry: carry[0]["go_on"], body, carry)
    return state["seqs"], state["src"], state["scores"], recs[0], recs[1], steps


_advance = jax.jit(advance, static_argnames=("P", "early_stopping", "never_long", "ngram", "warp", "rules"))


def beam_search_recompute(model, ids, mask, pos, consts: dict, max_new_tokens: int, num_beams: int,
                          early_stopping, never_long: bool, ngram: int = 0, seen=None, warp=None, rng=None,
                          record=(False, False), rules=None):
    """beam_search_cached without a cache (use_cache=False, for checking): each step runs the model over the
    whole running sequences (dense: one fixed-length buffer, later slots masked; MoE or a prompt row that is all
    padding: the exact length, as doge_jax.generate's recompute path)."""
    from .generate import _last_logits, _logits_at, exact_length_needed

    BK, P = ids.shape
    L = P + max_new_tokens
    state = init_state(jnp.asarray(ids), num_beams, max_new_tokens, consts["fill"])
    full_mask = jnp.asarray(np.concatenate([mask, np.ones((BK, max_new_tokens), bool)], axis=1))
    full_pos = jnp.asarray(np.concatenate([pos, pos.max(axis=1, keepdims=True) + 1 + np.arange(max_new_tokens)],
                                          axis=1).astype(np.int32))
    cols = jnp.arange(L)
    recs: tuple[list, list] = ([], [])
    exact = exact_length_needed(model.config, np.asarray(mask))
    for step in range(max_new_tokens):
        cur = P + step
        seqs = state["running"].reshape(BK, L)
        if exact:
            logits = _last_logits(model, seqs[:, :cur], full_mask[:, :cur], full_pos[:, :cur])
        else:  # (unwritten slots hold the fill id, maybe -1: any valid id, they are masked)
            logits = _logits_at(model, jnp.where(cols < cur, seqs, 0), full_mask & (cols < cur), full_pos, cur - 1)
        draw = None
        if rng is not None:
            rng, draw = jax.random.split(rng)
        state, _, seen, _, lp = _advance(state, logits, step, P, consts, early_stopping, never_long, ngram, seen,
                                         warp, draw, rules)
        recs[0].append(lp)
        recs[1].append(logits.astype(jnp.float32))
        if not bool(state["go_on"]):
            break
    stacked = tuple(jnp.stack(r) if on else None for r, on in zip(recs, record))
    return state["seqs"], state["src"], state["scores"], stacked[0], stacked[1], len(recs[0])
