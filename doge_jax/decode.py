"""The lean single-token decode step used by `doge_jax.generate` (design.md §7).

Computes what `DogeForCausalLM.__call__` computes for one new token per row with a cache (tests check the logits
step by step), with fewer XLA ops and no cache copies per step:

- the q/k/v projections and the gate/up projections each run as one matmul, on weights concatenated once per
  generate call (`prepare_decode`, traced outside the decode loop): every output column is the same dot over
  the same inputs;
- layers are unrolled (no per-token slicing of the stacked parameters or caches);
- RoPE cos/sin come from a table built once for the whole cache capacity where that is exact (default RoPE, or
  dynamic RoPE whose NTK scaling cannot switch on inside the capacity);
- the allowed-key mask is built once per step and shared by all layers;
- the loop's cache (`DecodeCache`) keeps keys transposed and heads flattened ([B*G, D, C], [B*G, C, D]): the
  score matmul reads keys without a per-layer transpose, and XLA updates both caches in place (with a
  [B, G, C, D] value cache and G = 1 it copied the value cache three times per layer and step);
- greedy decoding draws no random numbers (generate.py).

Attention is the dense reference for one query (`_decode_attention`: the same dynamic bias, sliding window and
padding; the other attention_impl choices compute the same function). When the capacity exceeds keep_window_size
the keep-window rule runs on per-key "beaten-by" counters kept in the cache (design.md §3): a key stays alive while
fewer than keep_window valid keys beat it; each step updates the counts in O(C) instead of a top-k over the
cache (with a sliding window wider than keep_window the top-k stays). CDMoE layers call the model's own MLP module.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from .attention import MaskInfo, dynamic_bias, mask_value, rank_dtype
from .model import DogeCache, rotary_cos_sin, silu, softplus_torch


def _kernel(linear: nnx.Linear) -> jax.Array:
    return linear.kernel[...]


def _bias(linear: nnx.Linear) -> jax.Array | None:
    return None if linear.bias is None else linear.bias[...]


def _joined(linears) -> dict:
    """One [d, sum(n_out)] kernel (and bias) for several Linear layers reading the same input."""
    w = jnp.concatenate([_kernel(lin) for lin in linears], axis=1)
    biases = [_bias(lin) for lin in linears]
    b = None if biases[0] is None else jnp.concatenate(biases)
    return {"w": w, "b": b}


def prepare_decode(model, capacity: int) -> dict:
    """Per-call constants of the decode loop (traced inside the generate jit, computed once per call): per-layer
    modules with joined q/k/v and gate/up weights, the per-layer parameter states (`layer_params` of the model's
    forward, for the prefill) and the RoPE table when it is exact for every position."""
    cfg = model.config
    graphdef, state = nnx.split(model.model.layers)
    states = tuple(jax.tree.map(lambda a, i=i: a[i], state) for i in range(cfg.num_hidden_layers))
    layers = []
    for st in states:
        layer = nnx.merge(graphdef, st)
        attn = layer.self_attn
        entry = {"layer": layer, "qkv": _joined([attn.q_proj, attn.k_proj, attn.v_proj])}
        if not cfg.is_moe:
            entry["gate_up"] = _joined([layer.mlp.gate_proj, layer.mlp.up_proj])
        layers.append(entry)
    dtype = model.model.embed_tokens.embedding[...].dtype
    rope = None
    if cfg.rope_type != "dynamic" or capacity <= cfg.max_position_embeddings:
        # positions stay < capacity, so dynamic NTK (rope_len > max_position_embeddings) never switches on
        cos, sin = rotary_cos_sin(cfg, jnp.arange(capacity, dtype=jnp.int32)[None], dtype)
        rope = (cos[0], sin[0])
    return {"layers": layers, "states": states, "rope": rope}


def _linear(x: jax.Array, p: dict) -> jax.Array:
    """nnx.Linear's computation (promote to a common dtype, dot over the last axis, add the bias)."""
    dtype = jnp.result_type(x, p["w"]) if p["b"] is None else jnp.result_type(x, p["w"], p["b"])
    y = jax.lax.dot_general(x.astype(dtype), p["w"].astype(dtype), (((x.ndim - 1,), (0,)), ((), ())))
    if p["b"] is not None:
        y = y + p["b"].astype(dtype)
    return y


@flax.struct.dataclass
class DecodeCache:
    """The decode loop's cache: per layer (k^T [B*G, D, C], v [B*G, C, D], dt [B, n, C]) — keys stored
    transposed, so the score matmul reads them in place (a [B, G, C, D] key cache cost one transpose per layer
    and step); see `_flat_heads` — plus the slot count and the key mask [B, C] of DogeCache."""

    layers: tuple
    index: jax.Array
    key_mask: jax.Array
    counts: tuple | None = None  # per layer [B, n, C] int32 "beaten-by" counts, when keep-window counters are used

    @classmethod
    def from_cache(cls, cache: DogeCache, counters: bool = False) -> DecodeCache:
        layers = cache.unstacked().layers
        counts = tuple(beaten_by(lc.dt, cache.key_mask) for lc in layers) if counters else None
        return cls(tuple((_flat_heads(jnp.swapaxes(lc.k, -1, -2)), _flat_heads(lc.v), lc.dt) for lc in layers),
                   cache.index, cache.key_mask, counts)


    def reorder(self, rows: jax.Array) -> DecodeCache:
        """Row r continues old row rows[r] (beam search: the cache follows the surviving beams)."""
        B = self.key_mask.shape[0]

        def take(a):  # a [B*G, X, Y] (heads flattened) or [B, ...]
            if a.shape[0] == B:
                return jnp.take(a, rows, axis=0)
            return jnp.take(a.reshape((B, -1) + a.shape[1:]), rows, axis=0).reshape(a.shape)

        if self.layers and self.layers[0][0].ndim == 2:  # B*G = 1: one row, nothing to reorder
            return self
        layers = tuple(tuple(take(a) for a in lc) for lc in self.layers)
        counts = None if self.counts is None else tuple(take(c) for c in self.counts)
        return DecodeCache(layers, self.index, take(self.key_mask), counts)


def use_counters(cfg, capacity: int) -> bool:
    """Keep-window counters replace the per-step top-k when the cache can hold more than keep_window keys and
    the allowed keys only grow (no sliding window); with a window <= keep_window nothing is ever dropped, and a
    wider window keeps the top-k (a key can leave the window, so counts are not monotone)."""
    return capacity > cfg.keep_window_size and cfg.sliding_window is None


def beaten_by(dt: jax.Array, valid: jax.Array) -> jax.Array:
    """[B, n, C] int32: for each valid key, how many valid keys beat it (larger dt, lower index on ties, spec
    §9.1), i.e. its rank in that order; a key is kept by the keep-window rule while this is < keep_window."""
    key = jnp.where(valid[:, None, :], -dt.astype(rank_dtype(dt.dtype)), jnp.inf)
    order = jnp.argsort(key, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


def update_beaten_by(counts: jax.Array, dt_cache: jax.Array, valid: jax.Array, dt_new: jax.Array, index
                     ) -> jax.Array:
    """Counts after a new key (dt_new [B, n]) is written at slot `index`: every valid key it beats (strictly larger
    dt; ties go to the older, lower-index key) counts one more beater; the new key's count is the number of valid
    keys with dt >= its own. O(C) per step instead of a top-k over the cache."""
    v = valid[:, None, :]
    d = dt_new[..., None].astype(dt_cache.dtype)
    counts = counts + (v & (d > dt_cache)).astype(jnp.int32)
    new = jnp.sum(v & (dt_cache >= d), axis=-1, dtype=jnp.int32)[..., None]
    return jax.lax.dynamic_update_slice_in_dim(counts, new, index, axis=2)


def _flat_heads(a: jax.Array) -> jax.Array:
    """[B, G, X, Y] -> [B*G, X, Y], or [X, Y] when B*G = 1. With no size-1 dimension, XLA feeds the attention
    matmuls straight from the updated cache buffers; a degenerate batch dimension made it duplicate the cache
    update (a bitcast fused into it) and copy the whole value cache three times per layer and step."""
    a = a.reshape((-1,) + a.shape[2:])
    return a[0] if a.shape[0] == 1 else a


def _decode_attention(q, k_t, v, dt, allowed, num_keys, keep_window: int, G: int, counts=None) -> jax.Array:
    """attention_reference for one query per row, with the cache in DecodeCache layout (k_t [B*G, D, T],
    v [B*G, T, D], leading axis dropped when B*G = 1). Same operations in the same order: the dynamic bias (with
    the keep-window top-k when T > keep_window), grouped score matmul, float32 softmax, value matmul.
    Returns [B, H, 1, D]."""
    B, H, S, D = q.shape
    T = v.shape[-2]
    r = H // G
    lead = (B * G,) if B * G > 1 else ()
    if counts is None:
        bias = dynamic_bias(dt, allowed, keep_window, q.dtype, num_keys)  # [B, n, 1, T]
    else:  # the same bias, with the top-k replaced by the keep-window counters
        alive = allowed & (counts < keep_window)[:, :, None, :]
        bias = jnp.where(alive, dt[:, :, None, :], mask_value(q.dtype, dt.dtype)).astype(dt.dtype)
        bias = jnp.where(jnp.arange(T) < num_keys, bias, -jnp.inf).astype(dt.dtype)
    bias = bias[:, :, None] if bias.shape[1] == G else bias.reshape(B, G, r, S, T)
    w = jnp.matmul(q.reshape(lead + (r * S, D)), k_t) * jnp.asarray(D ** -0.5, q.dtype)
    w = w.reshape(B, G, r, S, T) + bias
    p = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.matmul(p.reshape(lead + (r * S, T)), v).reshape(B, H, S, D)


def _attention_step(cfg, entry, x, cos, sin, allowed, lc, index, counts=None, valid=None):
    """DogeAttention.__call__ for S = 1 with a cache, q/k/v from one matmul."""
    attn = entry["layer"].self_attn
    B, S, _ = x.shape
    H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    qkv = _linear(x, entry["qkv"])
    q = qkv[..., : H * D].reshape(B, S, H, D)
    k = qkv[..., H * D: (H + G) * D].reshape(B, S, G, D)
    v_flat = qkv[..., (H + G) * D:]
    if cfg.variant == "native":
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1)  # q [B, H, 1, D], k^T [B, G, D, 1]
    v = v_flat.reshape(B, S, G, D).transpose(0, 2, 1, 3)
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    cos_t, sin_t = jnp.swapaxes(cos, 1, 2)[:, None], jnp.swapaxes(sin, 1, 2)[:, None]  # [B, 1, D, 1]
    k = k * cos_t + rotate_half(k, axis=-2) * sin_t
    dt = jnp.exp(attn.A[...] * softplus_torch(attn.dt_proj(v_flat))).transpose(0, 2, 1).astype(x.dtype)
    k_cache, v_cache, dt_cache = lc
    k_t = jax.lax.dynamic_update_slice_in_dim(k_cache, _flat_heads(k).astype(k_cache.dtype), index, axis=-1)
    v = jax.lax.dynamic_update_slice_in_dim(v_cache, _flat_heads(v).astype(v_cache.dtype), index, axis=-2)
    if counts is not None:
        counts = update_beaten_by(counts, dt_cache, valid, dt[..., 0], index)
    dt = jax.lax.dynamic_update_slice_in_dim(dt_cache, dt.astype(dt_cache.dtype), index, axis=2)
    o = _decode_attention(q, k_t, v, dt, allowed, index + 1, cfg.keep_window_size, G, counts)
    return attn.o_proj(o.transpose(0, 2, 1, 3).reshape(B, S, H * D)), (k_t, v, dt), counts


def rotate_half(x: jax.Array, axis: int = -1) -> jax.Array:
    """model.rotate_half along any axis."""
    h = x.shape[axis] // 2
    lo, hi = jax.lax.slice_in_dim(x, 0, h, axis=axis), jax.lax.slice_in_dim(x, h, None, axis=axis)
    return jnp.concatenate([-hi, lo], axis=axis)


def _mlp_step(cfg, entry, x):
    mlp = entry["layer"].mlp
    if cfg.is_moe:
        return mlp(x)[0]
    inter = cfg.intermediate_size
    gu = _linear(x, entry["gate_up"])
    return mlp.down_proj(silu(gu[..., :inter]) * gu[..., inter:])


def decode_step(model, prep: dict, tok: jax.Array, pos: jax.Array, cache: DecodeCache):
    """One new token per row: tok [B], pos [B] (its position id). Returns (logits [B, V], updated cache); the
    token is written at slot cache.index."""
    cfg = model.config
    B = tok.shape[0]
    index = cache.index
    x = jnp.take(model.model.embed_tokens.embedding[...], tok[:, None], axis=0)  # [B, 1, d]
    key_mask = jax.lax.dynamic_update_slice_in_dim(cache.key_mask, jnp.ones((B, 1), bool), index, axis=1)
    allowed = MaskInfo(key_mask, index, None, cfg.sliding_window).dense(B, 1, key_mask.shape[1])  # shared
    if prep["rope"] is not None:
        cos, sin = (jnp.take(t, pos, axis=0)[:, None] for t in prep["rope"])  # [B, 1, D]
    else:
        cos, sin = rotary_cos_sin(cfg, pos[:, None], x.dtype)
    new_layers, new_counts = [], []
    counts = cache.counts if cache.counts is not None else (None,) * len(cache.layers)
    for entry, lc, cnt in zip(prep["layers"], cache.layers, counts):
        layer = entry["layer"]
        y, lc, cnt = _attention_step(cfg, entry, layer.input_layernorm(x), cos, sin, allowed, lc, index, cnt,
                                     cache.key_mask)
        x = layer.input_residual[...] * x + y
        x = layer.post_attention_residual[...] * x + _mlp_step(cfg, entry, layer.post_attention_layernorm(x))
        new_layers.append(lc)
        new_counts.append(cnt)
    logits = model.lm_logits(model.model.norm(x))[:, -1]
    counts = tuple(new_counts) if cache.counts is not None else None
    return logits, DecodeCache(tuple(new_layers), index + 1, key_mask, counts)
