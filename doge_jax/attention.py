"""Dynamic Mask Attention kernels for doge_jax (spec §3.5-§3.6, design.md §3).

`attention` dispatches on `impl`; every implementation computes the same function. The dense `reference` path
mirrors transformers step by step (an explicit [B, heads, S, T] bias, top-k over keys when T > keep_window).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def keep_top_k(bias: jax.Array, k: int) -> jax.Array:
    """Bool mask of the k largest entries per row (last axis); on ties the lower index wins (spec §9.1)."""
    kth = jax.lax.top_k(bias, k)[0][..., -1:]
    greater = bias > kth
    n_needed = k - jnp.sum(greater, axis=-1, keepdims=True)
    equal = bias == kth
    return greater | (equal & (jnp.cumsum(equal, axis=-1) <= n_needed))


def dynamic_bias(dt: jax.Array, allowed: jax.Array, keep_window: int, dtype, num_keys=None) -> jax.Array:
    """dt [B, n, T] and allowed [B, 1, S, T] -> bias [B, n, S, T]: dt where allowed, finfo.min elsewhere (an
    overwrite, not an addition), and only the keep_window largest entries of a row kept when T > keep_window.

    With a fixed-capacity cache only the first `num_keys` slots exist; the rest get -inf, so that they carry no
    weight even in a fully masked row (which transformers makes uniform over its T existing keys, spec §3.6)."""
    min_v = jnp.finfo(dtype).min
    bias = jnp.where(allowed, dt[:, :, None, :], min_v).astype(dt.dtype)
    exists = None if num_keys is None else jnp.arange(bias.shape[-1]) < num_keys
    if exists is not None:
        bias = jnp.where(exists, bias, -jnp.inf).astype(dt.dtype)
    if bias.shape[-1] > keep_window:
        keep = keep_top_k(bias, keep_window)
        if exists is not None:
            keep = keep | ~exists
        bias = jnp.where(keep, bias, min_v).astype(dt.dtype)
    return bias


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, dt: jax.Array, allowed: jax.Array,
                        keep_window: int, dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                        num_keys=None) -> jax.Array:
    """Dense DMA. q [B, H, S, D]; k, v [B, G, T, D]; dt [B, n, T] with n = G (native) or H (small_doge);
    allowed [B, 1, S, T] bool; num_keys = existing key slots (fixed-capacity cache) or None (all T).
    Returns [B, H, S, D]."""
    B, H, S, D = q.shape
    G, T = k.shape[1], k.shape[2]
    r = H // G
    bias = dynamic_bias(dt, allowed, keep_window, q.dtype, num_keys)  # [B, n, S, T]
    bias = bias[:, :, None] if bias.shape[1] == G else bias.reshape(B, G, r, S, T)
    # Query heads sharing a kv head are folded into one matmul ([B, G, r*S, D] @ [B, G, D, T]).
    qg = q.reshape(B, G, r * S, D)
    w = jnp.matmul(qg, jnp.swapaxes(k, -1, -2)) * jnp.asarray(D ** -0.5, q.dtype)
    w = w.reshape(B, G, r, S, T) + bias
    p = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(q.dtype)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, p.shape)
        p = jnp.where(keep, p / (1.0 - dropout_rate), 0).astype(q.dtype)
    o = jnp.matmul(p.reshape(B, G, r * S, T), v)
    return o.reshape(B, H, S, D)


def attention(q, k, v, dt, allowed, keep_window: int, impl: str = "reference", dropout_rate: float = 0.0,
              dropout_rng=None, num_keys=None) -> jax.Array:
    """Dispatch to an attention implementation (only `reference` so far)."""
    if impl not in ("reference", "auto"):
        raise ValueError(f"attention impl {impl!r} is not available (have: reference)")
    return attention_reference(q, k, v, dt, allowed, keep_window, dropout_rate, dropout_rng, num_keys)
