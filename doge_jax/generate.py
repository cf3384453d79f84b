"""Generation for doge_jax: a jit-compiled decode loop over a fixed-capacity KV cache (spec §4).

`generate(model, input_ids, ...)` returns prompt + new tokens like transformers' generate: left padding via
attention_mask (positions = cumsum(mask) - 1), greedy or sampled (temperature, top-k, top-p), stop on EOS.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .model import DogeCache, check_token_ids

CAPACITY_BUCKET = 128  # cache capacity is rounded up to this, so prompt lengths share compiled programs


def _filter_logits(logits: jax.Array, temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) on float32 logits [B, V], as transformers orders them."""
    logits = logits / temperature
    neg = jnp.finfo(logits.dtype).min
    if top_k is not None and top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = (cum <= 1.0 - top_p).at[..., -1].set(False)
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, neg, logits)
    return logits


def _next_token(logits, rng, do_sample: bool, temperature, top_k, top_p):
    logits = logits.astype(jnp.float32)
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, _filter_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)


@partial(nnx.jit, static_argnames=("max_new_tokens", "do_sample", "temperature", "top_k", "top_p"))
def _generate_cached(model, ids, mask, pos, cache, eos, pad, rng, max_new_tokens: int, do_sample: bool,
                     temperature: float, top_k, top_p):
    """Prefill, then a while_loop of single-token steps; returns (new tokens [B, N], number of steps)."""
    graphdef, state = nnx.split(model)
    B = ids.shape[0]

    def forward(tok, m, p, c):
        out = nnx.merge(graphdef, state)(tok, attention_mask=m, position_ids=p, cache=c, logits_to_keep=1)
        return out.logits[:, -1], out.cache

    logits, cache = forward(ids, mask, pos, cache)
    rng, sub = jax.random.split(rng)
    tok = _next_token(logits, sub, do_sample, temperature, top_k, top_p)
    done = jnp.isin(tok, eos)
    out = jnp.full((B, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)
    next_pos = jnp.max(pos, axis=1) + 1

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, tok, next_pos, cache, done, rng, out = carry
        logits, cache = forward(tok[:, None], jnp.ones((B, 1), bool), next_pos[:, None], cache)
        rng, sub = jax.random.split(rng)
        new = _next_token(logits, sub, do_sample, temperature, top_k, top_p)
        new = jnp.where(done, pad, new)
        out = out.at[:, step].set(new)
        done = done | jnp.isin(new, eos)
        return step + 1, new, next_pos + 1, cache, done, rng, out

    step, *_, out = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, next_pos, cache, done, rng, out))
    return out, step


@nnx.jit
def _last_logits(model, ids, mask, pos):
    return model(ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]


def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 20, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
             seed: int = 0, use_cache: bool = True, pad_token_id: int | None = None) -> np.ndarray:
    """Prompt + up to max_new_tokens new tokens [B, P + n]; finished rows are padded (pad id, else EOS).

    `use_cache=False` recomputes the whole sequence each step (one compile per length; for checking only)."""
    cfg = model.config
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0 (use do_sample=False for greedy)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    ids = np.asarray(input_ids, dtype=np.int32)
    if ids.ndim == 1:
        ids = ids[None]
    check_token_ids(ids, cfg.vocab_size)
    B, P = ids.shape
    mask = np.ones((B, P), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    eos = eos_token_id if eos_token_id is not None else cfg.eos_token_id
    eos = [] if eos is None else ([int(eos)] if np.ndim(eos) == 0 else [int(e) for e in eos])
    pad = pad_token_id if pad_token_id is not None else (
        cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0))
    pos = np.where(mask, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    eos_arr = jnp.asarray(eos if eos else [-1], jnp.int32)
    if use_cache:
        capacity = -(-(P + max_new_tokens) // CAPACITY_BUCKET) * CAPACITY_BUCKET
        dtype = model.model.embed_tokens.embedding[...].dtype
        cache = DogeCache.init(cfg, B, capacity, dtype)
        out, steps = _generate_cached(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos), cache, eos_arr,
                                      jnp.int32(pad), jax.random.key(seed), max_new_tokens=max_new_tokens,
                                      do_sample=do_sample, temperature=float(temperature), top_k=top_k, top_p=top_p)
        return np.concatenate([ids, np.asarray(out)[:, : int(steps)]], axis=1)
    return _generate_recompute(model, ids, mask, pos, eos, pad, seed, max_new_tokens, do_sample, float(temperature),
                               top_k, top_p)


def _generate_recompute(model, ids, mask, pos, eos, pad, seed, max_new_tokens, do_sample, temperature, top_k, top_p):
    """No cache: run the whole sequence every step. Dense models use one fixed-length buffer (future slots are
    masked, and causality makes them invisible); CDMoE routing mixes positions (spec §3.8), so MoE runs exact
    lengths (one compile each)."""
    B, P = ids.shape
    rng = jax.random.key(seed)
    done = np.zeros(B, bool)
    n = 0
    total = P + max_new_tokens
    buf = np.zeros((B, total), np.int32)
    buf_mask = np.zeros((B, total), bool)
    buf_pos = np.zeros((B, total), np.int32)
    buf[:, :P], buf_mask[:, :P], buf_pos[:, :P] = ids, mask, pos
    for n in range(max_new_tokens):
        cur = P + n
        if model.config.is_moe:
            logits = _last_logits(model, jnp.asarray(buf[:, :cur]), jnp.asarray(buf_mask[:, :cur]),
                                  jnp.asarray(buf_pos[:, :cur]))
        else:
            logits = _logits_at(model, jnp.asarray(buf), jnp.asarray(buf_mask), jnp.asarray(buf_pos), cur - 1)
        rng, sub = jax.random.split(rng)
        tok = np.asarray(_next_token(logits, sub, do_sample, temperature, top_k, top_p))
        tok = np.where(done, pad, tok)
        buf[:, cur], buf_mask[:, cur], buf_pos[:, cur] = tok, True, buf_pos[:, :cur].max(axis=1) + 1
        done |= np.isin(tok, eos)
        if done.all():
            break
    return buf[:, : P + n + 1]


@nnx.jit
def _logits_at(model, ids, mask, pos, i):
    x = model(ids, attention_mask=mask, position_ids=pos).logits
    return jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)
