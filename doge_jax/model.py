"""Doge causal LM in Flax NNX (spec §3-§5), module names equal to the Hugging Face ones.

Read top to bottom: RMSNorm, rotary, attention, MLP, CDMoE, decoder layer, model, LM head + loss. Layers are
stacked on a leading axis and run under `jax.lax.scan` (one compiled layer body).
"""

from __future__ import annotations

import warnings

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import MaskInfo, attention
from .config import DogeConfig, GenerationConfig
from .generation_args import FROM_CONFIG, call_min_length, check_generate_kwargs, pop_rule_values
from .model_output import OutputAccess, hidden_state_selection
from .sharding import constrain_rows


def softplus_torch(x: jax.Array) -> jax.Array:
    """torch's softplus (threshold 20), not jax.nn.softplus (spec §9.3). Computed in float32 and rounded once to
    x's dtype, as torch does for bf16: exp and log1p each rounded to bf16 move dt by an ulp on 1 in 6 inputs, and
    that reorders the keep-window top-k."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.where(xf > 20, xf, jnp.log1p(jnp.exp(jnp.minimum(xf, 20)))).astype(x.dtype)


def silu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


class Linear(nnx.Linear):
    """nnx.Linear applied as one 2-D matmul over all leading axes: XLA:CPU runs the backward of a [B, S, d]
    dot_general 2-3x slower than the same product on [B*S, d] (measured: Doge-20M MLP grad 33 ms vs 14 ms)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-1]
        return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)


# DogeMLP's gate and up projections as one matmul over their concatenated kernels (x read once; in the backward one
# matmul for d/dx instead of two and their sum): 4.5 GiB less traffic per Doge-160M step on an H100 by
# benchmarks/hlo_traffic.py; the same dot products, but d/dx rounds once in bf16 instead of twice. Off until a GPU
# times it (gpu_check --probes "[fewer bytes]"). Read when traced.
FUSED_GATE_UP = False


def fused_linears(x: jax.Array, *linears: nnx.Linear) -> list[jax.Array]:
    """[lin(x) for lin in linears] for Linears on the same input as one matmul over their concatenated kernels,
    then split (the first Linear's dtype, precision and bias rules for all)."""
    first = linears[0]
    kernel = jnp.concatenate([lin.kernel[...] for lin in linears], axis=-1)
    bias = jnp.concatenate([lin.bias[...] for lin in linears]) if first.bias is not None else None
    lead = x.shape[:-1]
    x, kernel, bias = first.promote_dtype((x.reshape(-1, x.shape[-1]), kernel, bias), dtype=first.dtype)
    kwargs = {} if first.preferred_element_type is None else {"preferred_element_type": first.preferred_element_type}
    y = first.dot_general(x, kernel, (((1,), (0,)), ((), ())), precision=first.precision, **kwargs)
    if bias is not None:
        y += bias[None, :]
    sizes = [lin.kernel.shape[-1] for lin in linears]
    parts = jnp.split(y, np.cumsum(sizes)[:-1].tolist(), axis=-1)
    return [part.reshape(*lead, n) for part, n in zip(parts, sizes)]


def _linear(cfg: DogeConfig, n_in: int, n_out: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return Linear(n_in, n_out, use_bias=bias, kernel_init=_normal(cfg.initializer_range),
                      bias_init=nnx.initializers.zeros_init(), rngs=rngs)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float):
        self.weight = nnx.Param(jnp.ones((size,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Spec §3.1 / §9.7: upcast, normalise, cast back to the input dtype, then multiply by the weight.
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


def rope_inv_freq(cfg: DogeConfig, rope_len: jax.Array | int) -> jax.Array:
    """float32 inverse frequencies for a sequence length: default, or dynamic NTK above max_position (spec §3.3)."""
    dim = cfg.head_size
    exps = jnp.arange(0, dim, 2, dtype=jnp.int32).astype(jnp.float32) / dim
    default = 1.0 / (jnp.float32(cfg.rope_theta) ** exps)
    if cfg.rope_type != "dynamic":
        return default
    s = jnp.asarray(rope_len, jnp.float32)
    f = jnp.float32(cfg.rope_factor)
    base = jnp.float32(cfg.rope_theta) * ((f * s / cfg.max_position_embeddings) - (f - 1)) ** jnp.float32(
        dim / (dim - 2))
    return jnp.where(rope_len > cfg.max_position_embeddings, 1.0 / (base ** exps), default)


def rotary_cos_sin(cfg: DogeConfig, position_ids: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, S, D] (rotate-half layout); dynamic RoPE uses max(position_ids) + 1 as the length."""
    inv_freq = rope_inv_freq(cfg, jnp.max(position_ids) + 1)
    freqs = position_ids[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


@flax.struct.dataclass
class LayerCache:
    """Fixed-capacity cache of one layer (or all layers, stacked on axis 0): k after norm+RoPE and v
    [B, G, C, D], dynamic-mask dt [B, n_dt, C] (cached per key, design.md §3)."""

    k: jax.Array
    v: jax.Array
    dt: jax.Array


@flax.struct.dataclass
class DogeCache:
    """KV cache for all layers plus the slot bookkeeping: `index` = slots filled, `key_mask` [B, C] = slot holds
    a real (non-padding) token."""

    layers: LayerCache
    index: jax.Array
    key_mask: jax.Array

    @classmethod
    def init(cls, cfg: DogeConfig, batch: int, capacity: int, dtype=jnp.float32) -> DogeCache:
        L, G, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_size
        kv = jnp.zeros((L, batch, G, capacity, D), dtype)
        return cls(LayerCache(kv, kv, jnp.zeros((L, batch, cfg.num_dt_heads, capacity), dtype)),
                   jnp.zeros((), jnp.int32), jnp.zeros((batch, capacity), bool))

    @property
    def capacity(self) -> int:
        return self.key_mask.shape[1]

    def unstacked(self) -> DogeCache:
        """The same cache with `layers` a tuple of per-layer LayerCache (the decoding fast path)."""
        if isinstance(self.layers, tuple):
            return self
        L = self.layers.k.shape[0]
        return self.replace(layers=tuple(jax.tree.map(lambda a, i=i: a[i], self.layers) for i in range(L)))

    def stacked(self) -> DogeCache:
        """The same cache with `layers` one LayerCache of stacked [L, ...] arrays."""
        if not isinstance(self.layers, tuple):
            return self
        return self.replace(layers=jax.tree.map(lambda *a: jnp.stack(a), *self.layers))


class DogeAttention(nnx.Module):
    def __init__(self, cfg: DogeConfig, rngs: nnx.Rngs):
        H, G, D, d, b = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size, cfg.hidden_size,
                         cfg.attention_bias)
        self.cfg = cfg
        self.q_proj = _linear(cfg, d, H * D, b, rngs)
        self.k_proj = _linear(cfg, d, G * D, b, rngs)
        self.v_proj = _linear(cfg, d, G * D, b, rngs)
        self.A = nnx.Param(jnp.zeros((cfg.num_dt_heads,), jnp.float32))
        self.dt_proj = _linear(cfg, G * D, cfg.num_dt_heads, b, rngs)
        self.o_proj = _linear(cfg, H * D, d, b, rngs)
        if cfg.variant == "native":
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def __call__(self, x, cos, sin, mask: MaskInfo, cache: LayerCache | None = None, index=None,
                 dropout_rng=None) -> tuple[jax.Array, LayerCache | None]:
        cfg = self.cfg
        B, S, _ = x.shape
        H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        q = self.q_proj(x).reshape(B, S, H, D)
        k = self.k_proj(x).reshape(B, S, G, D)
        v_flat = self.v_proj(x)
        if cfg.variant == "native":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        v = v_flat.reshape(B, S, G, D).transpose(0, 2, 1, 3)
        c, s = cos[:, None], sin[:, None]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        # Spec §3.4: dt = exp(A * softplus(dt_proj(v))), one value per key and dt-head.
        dt = jnp.exp(self.A[...] * softplus_torch(self.dt_proj(v_flat))).transpose(0, 2, 1).astype(x.dtype)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), index, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), index, axis=2)
            dt = jax.lax.dynamic_update_slice_in_dim(cache.dt, dt.astype(cache.dt.dtype), index, axis=2)
            cache = LayerCache(k, v, dt)
        rate = cfg.attention_dropout if dropout_rng is not None else 0.0
        o = attention(q, k, v, dt, mask, cfg.keep_window_size, impl=cfg.attention_impl, dropout_rate=rate,
                      dropout_rng=dropout_rng)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, S, H * D)), cache


class DogeMLP(nnx.Module):
    def __init__(self, cfg: DogeConfig, rngs: nnx.Rngs):
        d, inter, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = _linear(cfg, d, inter, b, rngs)
        self.up_proj = _linear(cfg, d, inter, b, rngs)
        self.down_proj = _linear(cfg, inter, d, b, rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        if FUSED_GATE_UP:
            gate, up = fused_linears(x, self.gate_proj, self.up_proj)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(silu(gate) * up), None


def route(router_logits: jax.Array, num_keys: int, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Product-key routing (spec §3.8 steps 2-4): [2, N, K] -> (scores [N,k], experts [N,k]). lax.top_k keeps the
    lower index on ties, like doge_torch's stable sort.

    The spec ranks all K² sums of the two sorted halves; only the first k of each half can reach the top k: a pair
    (a, b) with a >= k is beaten by the k pairs (a' < k, b), which score at least as much (rounding is monotone) and
    come earlier in the K x K order. The k x k corner keeps that order, so scores, experts and ties are the same
    without an [N, K²] (= [N, num_experts]) array. (For finite logits: -inf + inf is NaN, and there the full
    ranking may differ.)"""
    # lax.top_k ranks +0.0 above -0.0 where torch's sort calls them equal (a tie): one zero for both
    # (-0.0 + 0.0 = +0.0; the added term carries no gradient, so exact zeros keep theirs)
    router_logits = router_logits + jax.lax.stop_gradient(jnp.where(router_logits == 0, -router_logits, 0))
    kk = min(top_k, num_keys)
    sx, ix = jax.lax.top_k(router_logits[0], kk)
    sy, iy = jax.lax.top_k(router_logits[1], kk)
    N = sx.shape[0]
    grid = (sx[:, :, None] + sy[:, None, :]).reshape(N, -1)
    grid_idx = (ix[:, :, None] * num_keys + iy[:, None, :]).reshape(N, -1)
    scores, pos = jax.lax.top_k(grid, top_k)
    return scores, jnp.take_along_axis(grid_idx, pos, axis=-1)


@jax.checkpoint
def routed_experts(x: jax.Array, w: jax.Array, experts: jax.Array, down: jax.Array, up: jax.Array) -> jax.Array:
    """The routed single-neuron experts (spec §3.8 step 5): x [N, d], weights w and ids experts [N, k], tables
    [E, d] -> [N, d]. Rematerialised: the gathered [N, k, d] rows are 2k times x's size (2 x 300 MB a layer at
    Doge-480M-MoE, 2048 tokens, float32) and cheap to gather again, so the backward gathers them again instead of
    keeping them."""
    dvec, uvec = down[experts], up[experts]  # [N, k, d]
    a = silu(jnp.einsum("nkd,nd->nk", dvec, x)) * w
    return jnp.einsum("nk,nkd->nd", a, uvec)


class DogeCDMoE(DogeMLP):
    """Shared SwiGLU expert + product-key routed single-neuron experts (spec §3.8)."""

    def __init__(self, cfg: DogeConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        self.cfg = cfg
        init = _normal(cfg.initializer_range)
        self.router_gate = _linear(cfg, cfg.hidden_size, 2 * cfg.num_keys, False, rngs)
        self.down_embed = nnx.Embed(cfg.num_experts, cfg.hidden_size, embedding_init=init, rngs=rngs)
        self.up_embed = nnx.Embed(cfg.num_experts, cfg.hidden_size, embedding_init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        B, S, d = x.shape
        N = B * S
        # Quirk kept on purpose (spec §3.8 step 1): [B, S, 2K] reinterpreted in memory order as [2, N, K].
        router_logits = self.router_gate(x).reshape(2, N, cfg.num_keys)
        scores, experts = route(router_logits, cfg.num_keys, cfg.num_experts_per_tok)
        w = jax.nn.softmax(scores, axis=-1)
        if cfg.norm_topk_prob:
            w = w / jnp.sum(w, axis=-1, keepdims=True)
        routed = routed_experts(x.reshape(N, d), w, experts, self.down_embed.embedding[...],
                                self.up_embed.embedding[...]).reshape(B, S, d)
        shared, _ = super().__call__(x)
        return shared + routed, router_logits


class DogeDecoderLayer(nnx.Module):
    def __init__(self, cfg: DogeConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.cfg = cfg
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.self_attn = DogeAttention(cfg, rngs)
        self.input_residual = nnx.Param(jnp.ones((d,), jnp.float32))
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.mlp = DogeCDMoE(cfg, rngs) if cfg.is_moe else DogeMLP(cfg, rngs)
        self.post_attention_residual = nnx.Param(jnp.ones((d,), jnp.float32))

    def __call__(self, x, cos, sin, mask: MaskInfo, cache=None, index=None, dropout_rng=None):
        p = self.cfg.hidden_dropout
        keys = jax.random.split(dropout_rng, 3) if dropout_rng is not None else (None, None, None)
        y, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, index, keys[0])
        x = self.input_residual[...] * x + _dropout(y, p, keys[1])
        y, router_logits = self.mlp(self.post_attention_layernorm(x))
        x = self.post_attention_residual[...] * x + _dropout(y, p, keys[2])
        return x, cache, router_logits


def _dropout(x: jax.Array, rate: float, rng) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class DogeModel(nnx.Module):
    def __init__(self, cfg: DogeConfig, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size,
                                      embedding_init=_embed_init(cfg), rngs=rngs)
        # One layer module whose parameters carry a leading [num_hidden_layers] axis (run under lax.scan).
        layers = [nnx.split(DogeDecoderLayer(cfg, rngs)) for _ in range(cfg.num_hidden_layers)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[s for _, s in layers])
        self.layers = nnx.merge(layers[0][0], stacked)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def _embed_init(cfg: DogeConfig):
    base = _normal(cfg.initializer_range)

    def init(key, shape, dtype=jnp.float32):
        w = base(key, shape, dtype)
        return w if cfg.pad_token_id is None else w.at[cfg.pad_token_id].set(0)  # spec §5: pad row zero

    return init


@flax.struct.dataclass
class DogeOutput(OutputAccess):
    logits: jax.Array
    loss: jax.Array | None = None
    aux_loss: jax.Array | None = None
    router_logits: jax.Array | None = None  # [L, 2, N, K] when requested
    cache: DogeCache | None = None
    hidden_states: tuple | None = None  # num_hidden_layers + 1 arrays [B, S, hidden] (None where not selected)


def allowed_mask(cfg: DogeConfig, S: int, T: int, start, key_mask: jax.Array | None) -> jax.Array:
    """[B or 1, 1, S, T] bool: key slot j visible from query slot start+i (causal, sliding window, padding)."""
    qi = start + jnp.arange(S)[:, None]
    kj = jnp.arange(T)[None, :]
    ok = kj <= qi
    if cfg.sliding_window is not None:
        ok = ok & (qi - kj < cfg.sliding_window)
    ok = ok[None, None]
    if key_mask is not None:
        ok = ok & key_mask[:, None, None, :].astype(bool)
    return ok


def causal_lm_loss(logits: jax.Array, labels: jax.Array, num_items_in_batch=None) -> jax.Array:
    """Shifted cross-entropy in float32 (float64 for float64 logits) with -100 ignored; mean, or sum /
    num_items_in_batch (spec §3.9)."""
    f = jnp.promote_types(logits.dtype, jnp.float32)
    logits = logits.astype(f)
    target = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], -100)], axis=1)
    valid = target != -100
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(valid, logz - picked, 0.0))
    denom = jnp.sum(valid) if num_items_in_batch is None else num_items_in_batch
    return total / jnp.asarray(denom, f)


def load_balancing_loss(router_logits: jax.Array, cfg: DogeConfig, attention_mask: jax.Array | None = None
                        ) -> jax.Array:
    """MoE aux loss, transformers 5.23 semantics (router probs scattered to expert order, spec §3.9).
    router_logits [L, 2, N, K]; attention_mask [B, S] with B*S = N.

    transformers builds the softmax over all K² sums, [L, N, num_experts]. A softmax over the sums x_a + y_b is
    softmax(x)_a * softmax(y)_b, so the mean router probability of expert a*K + b is a [K, N] @ [N, K] product and
    nothing of size num_experts per token is formed."""
    E, K, k = cfg.num_experts, cfg.num_keys, cfg.num_experts_per_tok
    L, _, N, _ = router_logits.shape
    _, experts = jax.vmap(lambda r: route(r, K, k))(router_logits)  # [L, N, k]
    m = jnp.ones((N,), jnp.float32) if attention_mask is None else attention_mask.reshape(N).astype(jnp.float32)
    # float32 throughout: a bf16 count stops growing at 256 (256 + 1 rounds to 256)
    counts = jnp.zeros((E,), jnp.float32).at[experts.reshape(-1)].add(
        jnp.broadcast_to(m[None, :, None], experts.shape).reshape(-1))
    f = counts / (L * k * jnp.sum(m))
    px = jax.nn.softmax(router_logits[:, 0].astype(jnp.float32), axis=-1)  # [L, N, K]
    py = jax.nn.softmax(router_logits[:, 1].astype(jnp.float32), axis=-1)
    p_mean = jnp.einsum("lna,lnb->ab", px * m[None, :, None], py, precision=jax.lax.Precision.HIGHEST)
    p_mean = p_mean.reshape(E) / (L * jnp.sum(m))
    return jnp.sum(f * p_mean) * E


def check_logits_to_keep(logits_to_keep, S: int) -> None:
    """An array of positions must index the S positions (JAX would clamp an out-of-range index silently; torch
    raises). No-op on traced values and ints (an int n keeps the last n, as transformers)."""
    if isinstance(logits_to_keep, (int, jax.core.Tracer)) and not isinstance(logits_to_keep, bool):
        return
    a = np.asarray(logits_to_keep)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"logits_to_keep: an int (the last n positions) or integer positions, got {a.dtype}")
    bad = a[(a < -S) | (a >= S)]
    if bad.size:
        raise ValueError(f"logits_to_keep: position {int(bad.reshape(-1)[0])} out of range for {S} positions "
                         f"(-{S}..{S - 1})")


def check_num_items(n) -> None:
    """num_items_in_batch (the label count the loss sum is divided by) must be > 0 when known (0 gave an inf loss, a
    negative count a negative one). No-op on traced values."""
    if n is None or isinstance(n, jax.core.Tracer):
        return
    v = np.asarray(n)
    if v.size != 1 or np.iscomplexobj(v) or not float(v.reshape(())) > 0:
        raise ValueError(f"num_items_in_batch={n!r}: the number of label tokens the loss sum is divided by, > 0")


def check_token_ids(input_ids, vocab_size: int) -> None:
    """Token ids outside [0, vocab) raise (JAX would clamp the gather silently). No-op on traced values."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise ValueError(f"input_ids contain ids outside [0, vocab_size={vocab_size}): {bad[:10].tolist()}")


def check_labels(labels, vocab_size: int) -> None:
    """Labels outside [0, vocab) other than -100 raise (the gather would wrap or clamp). No-op on traced values."""
    if isinstance(labels, jax.core.Tracer):
        return
    a = np.asarray(labels)
    if a.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer token ids (or -100), got dtype {a.dtype}")
    bad = a[((a < 0) & (a != -100)) | (a >= vocab_size)]
    if bad.size:
        raise ValueError(f"labels outside [0, vocab_size={vocab_size}) and not -100: {bad[:10].tolist()}")


def _resized_rows(w: jax.Array, n: int, mean_resizing: bool, std: float, rng: np.random.Generator) -> jax.Array:
    """`w`'s first min(n, rows) rows plus new ones (see resize_token_embeddings), in w's dtype and placement."""
    old, d = w.shape
    x = np.asarray(jax.device_get(w))
    if n <= old:
        out = x[:n]
    else:
        if not mean_resizing:
            new = rng.normal(0.0, std, (n - old, d))
        else:  # as transformers: noise of 1e-9 times the covariance where that is positive definite, else none
            xf = x.astype(np.float64)
            mean = xf.mean(0)
            try:
                chol = np.linalg.cholesky(1e-9 * ((xf - mean).T @ (xf - mean) / old))
                new = mean + rng.standard_normal((n - old, d)) @ chol.T
            except np.linalg.LinAlgError:
                new = np.broadcast_to(mean, (n - old, d))
        out = np.concatenate([x, new.astype(x.dtype)])
    try:
        return jax.device_put(out, w.sharding)
    except ValueError:  # a mesh axis that does not divide the new size: replicated over the same devices
        mesh = getattr(w.sharding, "mesh", None)
        if mesh is None:
            return jnp.asarray(out)
        warnings.warn(f"resize_token_embeddings: {n} rows do not split over the mesh as {tuple(w.shape)} did; the "
                      "resized table is replicated on its devices (pad_to_multiple_of keeps it split)", stacklevel=3)
        return jax.device_put(out, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


class DogeForCausalLM(nnx.Module):
    """The Doge causal LM. `model(input_ids, attention_mask=None, logits_to_keep=0).logits`."""

    def __init__(self, config: DogeConfig, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config = DogeConfig.coerce(config)  # (a transformers DogeConfig too)
        self.generation_config = GenerationConfig.from_config(config)  # generate's default ids (from_pretrained:
        # generation_config.json's, as transformers)
        self.model = DogeModel(config, rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config, config.hidden_size, config.vocab_size, False, rngs)

    def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, cache: DogeCache | None = None,
                 labels: jax.Array | None = None, logits_to_keep: int = 0, num_items_in_batch=None,
                 output_router_logits: bool | None = None, dropout_rng: jax.Array | None = None,
                 layer_params: tuple | None = None, inputs_embeds: jax.Array | None = None,
                 return_dict: bool | None = None, output_attentions: bool | None = None,
                 output_hidden_states: bool | None = None) -> DogeOutput | tuple:
        """Forward pass of token ids, or of `inputs_embeds` [B, S, hidden] in place of their embedding lookup
        (exactly one of the two, as transformers). attention_mask is [B, S] (new tokens) or [B, past + S] (HF
        style, last S used with a cache). dropout_rng enables dropout (training mode). With a cache the new tokens
        are written at slot `cache.index`.

        Decoding fast path: `layer_params` = `split_layers(model)` (per-layer parameter states, sliced once) and/or
        a cache whose `layers` is a tuple of per-layer LayerCache (`DogeCache.unstacked()`) run the layers as an
        unrolled Python loop, with no per-token slicing of the stacked arrays.

        As transformers: `return_dict=False` gives `out.to_tuple()`; `output_hidden_states` returns the embeddings
        and each layer's output, the last after the final norm (num_hidden_layers + 1 arrays [B, S, hidden]; an int
        or a list selects some, the others None); attention weights are not returned (True is an error)."""
        cfg = self.config
        if output_attentions:
            raise ValueError("output_attentions=True: not supported (doge_jax returns logits, loss, the cache, hidden "
                             "states and router logits)")
        selected = hidden_state_selection(output_hidden_states, cfg.num_hidden_layers + 1)
        collect = selected is not None and bool(selected & set(range(1, cfg.num_hidden_layers)))
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            x = jnp.asarray(inputs_embeds)
            if x.ndim != 3 or 0 in x.shape[:2] or x.shape[2] != cfg.hidden_size:
                raise ValueError(f"inputs_embeds shape {tuple(x.shape)}: expected [batch >= 1, seq >= 1, "
                                 f"hidden_size={cfg.hidden_size}]")
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise ValueError(f"inputs_embeds dtype {x.dtype}: expected floating point vectors (token ids go in "
                                 "input_ids)")
            B, S = x.shape[:2]
        else:
            check_token_ids(input_ids, cfg.vocab_size)
            input_ids = jnp.asarray(input_ids)
            if input_ids.ndim != 2 or 0 in input_ids.shape:
                raise ValueError(f"input_ids shape {tuple(input_ids.shape)}: expected [batch >= 1, seq >= 1]")
            B, S = input_ids.shape
            x = jnp.take(self.model.embed_tokens.embedding[...], input_ids, axis=0)
        if input_ids is not None and cfg.pad_token_id is not None:
            # spec §9.14: as torch's Embedding(padding_idx), the lookup gives the pad row no gradient (the pad row
            # starts at zero, where RMSNorm's gradient is ~1/sqrt(eps): it swamped the clipping norm)
            x = jnp.where((input_ids == cfg.pad_token_id)[..., None], jax.lax.stop_gradient(x), x)
        check_logits_to_keep(logits_to_keep, S)
        check_num_items(num_items_in_batch)
        start = cache.index if cache is not None else 0
        if cache is not None and cache.key_mask.shape[0] != B:
            raise ValueError(f"cache for batch {cache.key_mask.shape[0]}, input batch {B}: DogeCache.init(config, "
                             f"{B}, capacity) for this batch")
        if cache is not None and not isinstance(start, jax.core.Tracer) and int(start) + S > cache.capacity:
            raise ValueError(f"cache overflow: {int(start)} cached + {S} new tokens > capacity {cache.capacity} "
                             "(DogeCache.init with a larger capacity)")
        if position_ids is None:
            position_ids = (start + jnp.arange(S))[None]
        position_ids = jnp.asarray(position_ids)
        if position_ids.ndim != 2 or position_ids.shape[0] not in (1, B) or position_ids.shape[1] != S:
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)}: expected (batch or 1, new tokens) = "
                             f"({B}, {S})")
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            shape = tuple(attention_mask.shape)
            ok = len(shape) == 2 and shape[0] == B and (shape[1] >= S if cache is not None else shape[1] == S)
            known = cache is not None and not isinstance(start, jax.core.Tracer)  # (under jit: the shape only)
            if ok and known and shape[1] != S:
                ok = shape[1] == int(start) + S
            if not ok:
                raise ValueError(f"attention_mask shape {shape} must be (batch, new tokens) = {(B, S)}" + (
                    f" or (batch, cached + new tokens) = {(B, int(start) + S)}" if known else
                    " or (batch, cached + new tokens)" if cache is not None else ""))
            concrete = known and not any(isinstance(a, jax.core.Tracer) for a in (attention_mask, cache.key_mask))
            if concrete and shape[1] != S and not np.array_equal(
                    np.asarray(attention_mask[:, :-S]).astype(bool), np.asarray(cache.key_mask[:, :int(start)])):
                # the cache keeps the mask its keys were written with; a different one would be dropped silently
                raise ValueError("attention_mask: its columns for the cached tokens differ from the mask those "
                                 "tokens were cached with; pass the same columns, or only the new tokens' [batch, new]")
        new_mask = None if attention_mask is None else attention_mask[:, -S:].astype(bool)
        if cache is not None:
            col = new_mask if new_mask is not None else jnp.ones((B, S), bool)
            key_mask = jax.lax.dynamic_update_slice_in_dim(cache.key_mask, col, start, axis=1)
            mask = MaskInfo(key_mask, start, start + S, cfg.sliding_window)  # only slots < index + S exist
        else:
            key_mask = None
            mask = MaskInfo(None if attention_mask is None else attention_mask.astype(bool), 0, None,
                            cfg.sliding_window)
        cos, sin = rotary_cos_sin(cfg, position_ids, x.dtype)

        graphdef, layer_state = nnx.split(self.model.layers)
        rngs = (jax.random.split(dropout_rng, cfg.num_hidden_layers) if dropout_rng is not None else None)

        def body(h, xs):
            state, lcache, rng = xs
            layer = nnx.merge(graphdef, state)
            h, lcache, router = layer(constrain_rows(h), cos, sin, mask, lcache, start, rng)
            h = constrain_rows(h)
            return h, (lcache, router, h if collect else None)  # (each layer's output, when hidden states are asked)

        if cfg.remat != "none":
            policy = jax.checkpoint_policies.dots_saveable if cfg.remat == "dots_saveable" else None
            body = jax.checkpoint(body, policy=policy)
        unstacked_cache = cache is not None and isinstance(cache.layers, tuple)
        embedded = x
        if layer_params is not None or unstacked_cache or not cfg.scan_layers:
            # Unrolled layers (design.md §7: ~2x faster than a scanned body for batch-1 decoding; config.scan_layers).
            L = cfg.num_hidden_layers
            states = layer_params if layer_params is not None else [
                jax.tree.map(lambda a, i=i: a[i], layer_state) for i in range(L)]
            lcaches = [None] * L if cache is None else (cache.layers if unstacked_cache else [
                jax.tree.map(lambda a, i=i: a[i], cache.layers) for i in range(L)])
            outs = []
            for i in range(L):
                x, o = body(x, (states[i], lcaches[i], None if rngs is None else rngs[i]))
                outs.append(o)
            new_caches = tuple(o[0] for o in outs)
            if cache is not None and not unstacked_cache:
                new_caches = jax.tree.map(lambda *a: jnp.stack(a), *new_caches)
            layer_caches = new_caches if cache is not None else None
            router = None if outs[0][1] is None else jnp.stack([o[1] for o in outs])
            layer_outs = [o[2] for o in outs]
        else:
            x, (layer_caches, router, stacked) = jax.lax.scan(
                body, x, (layer_state, cache.layers if cache is not None else None, rngs))
            layer_outs = [None] * cfg.num_hidden_layers if stacked is None else list(stacked)
        x = self.model.norm(x)
        if selected is not None:  # the embeddings, layers 0..L-2's outputs, the normed last one (transformers')
            states = [embedded, *layer_outs[:-1], x]
            hidden = tuple(h if i in selected else None for i, h in enumerate(states))
        keep_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if not keep_all:  # an int: the last n positions; an array: those positions (as transformers)
            x = x[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else x[:, jnp.asarray(logits_to_keep)]
        logits = self.lm_logits(x)
        out = DogeOutput(logits=logits)
        if cache is not None:
            out = out.replace(cache=DogeCache(layer_caches, cache.index + S, key_mask))
        if labels is not None:
            labels = jnp.asarray(labels)
            if labels.shape != (B, S) or not keep_all:
                raise ValueError(f"labels shape {labels.shape} must equal input_ids shape {(B, S)}, with "
                                 f"logits_to_keep=0 (got {logits_to_keep!r})")
            check_labels(labels, cfg.vocab_size)
            out = out.replace(loss=causal_lm_loss(logits, labels, num_items_in_batch))
        want = cfg.output_router_logits if output_router_logits is None else output_router_logits
        if want and cfg.is_moe:
            aux = load_balancing_loss(router, cfg, new_mask)
            out = out.replace(router_logits=router, aux_loss=aux)
            if out.loss is not None:
                out = out.replace(loss=out.loss + cfg.router_aux_loss_coef * aux)
        if selected is not None:
            out = out.replace(hidden_states=hidden)
        return out.to_tuple() if return_dict is False else out

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True, seed: int = 0) -> nnx.Embed:
        """As transformers: keep the first rows of the embedding (and of an untied head), drop the rows past
        `new_num_tokens` or add new ones, rounded up to `pad_to_multiple_of`. New rows (NumPy's generator from
        `seed`): with `mean_resizing`, the old rows' mean plus noise of 1e-9 times their covariance (so the
        next-token distribution barely moves), else normal(0, initializer_range). Updates config.vocab_size."""
        n = self.config.resized_vocab(new_num_tokens, pad_to_multiple_of)
        emb = self.model.embed_tokens
        if n is None or n == emb.num_embeddings:
            return emb
        rng = np.random.default_rng(seed)
        emb.embedding = nnx.Param(_resized_rows(emb.embedding[...], n, mean_resizing, self.config.initializer_range,
                                                rng))
        emb.num_embeddings = n
        if not self.config.tie_word_embeddings:  # kernel [hidden, vocab]: resize its columns
            k = self.lm_head.kernel[...]
            self.lm_head.kernel = nnx.Param(_resized_rows(k.T, n, mean_resizing, self.config.initializer_range,
                                                          rng).T)
            self.lm_head.out_features = n
        self.config = self.config.replace(vocab_size=n)
        return emb

    def lm_logits(self, x: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            # contract with the embedding's last axis directly (a `.T` made XLA copy 32 MB per decode step)
            emb = self.model.embed_tokens.embedding[...]
            return jax.lax.dot_general(x, emb, (((x.ndim - 1,), (1,)), ((), ())))
        return self.lm_head(x)

    def generate(self, input_ids=None, attention_mask=None, max_new_tokens=FROM_CONFIG, do_sample=FROM_CONFIG,
                 temperature=FROM_CONFIG, top_k=FROM_CONFIG, top_p=FROM_CONFIG,
                 eos_token_id=FROM_CONFIG, seed: int = 0, use_cache: bool = True, pad_token_id=FROM_CONFIG,
                 on_token=None, repetition_penalty=FROM_CONFIG, min_new_tokens=FROM_CONFIG, max_length=None,
                 num_beams=FROM_CONFIG, num_return_sequences=FROM_CONFIG, generation_config=None, min_p=FROM_CONFIG,
                 streamer=None, no_repeat_ngram_size=FROM_CONFIG, length_penalty=FROM_CONFIG,
                 early_stopping=FROM_CONFIG, typical_p=FROM_CONFIG, epsilon_cutoff=FROM_CONFIG,
                 eta_cutoff=FROM_CONFIG, return_dict_in_generate=FROM_CONFIG, output_scores=FROM_CONFIG,
                 output_logits=FROM_CONFIG, **kwargs):
        """Prompt + new tokens, as transformers' generate returns them (see doge_jax.generate); transformers'
        `max_length` counts the prompt too (num_beams > 1: beam search); `streamer` as transformers'
        (TextStreamer: put() the prompt, then each new token, then end()). transformers arguments this generate
        does not implement are refused by name where they would change the output."""
        from .generate import generate

        generation_config = call_min_length(self, generation_config, kwargs)  # (transformers' total length)
        processors = pop_rule_values(kwargs)
        check_generate_kwargs(kwargs, input_ids)
        return generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, eos_token_id=eos_token_id,
                        seed=seed, use_cache=use_cache, pad_token_id=pad_token_id, on_token=on_token,
                        repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens,
                        generation_config=generation_config,
                        max_length=max_length, streamer=streamer, no_repeat_ngram_size=no_repeat_ngram_size,
                        num_beams=num_beams, num_return_sequences=num_return_sequences,
                        length_penalty=length_penalty, early_stopping=early_stopping,
                        typical_p=typical_p, epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff,
                        return_dict_in_generate=return_dict_in_generate, output_scores=output_scores,
                        output_logits=output_logits, **processors)

    def compute_transition_scores(self, sequences, scores, beam_indices=None, normalize_logits: bool = False
                                  ) -> np.ndarray:
        """transformers' compute_transition_scores for a GenerateOutput (generate with return_dict_in_generate and
        output_scores): each generated token's score [rows, steps] (beam search: pass out.beam_indices)."""
        from .generation_args import transition_scores

        return transition_scores(sequences, scores, beam_indices, normalize_logits, self.config.vocab_size)

    @classmethod
    def from_pretrained(cls, path: str, dtype=None, variant: str | None = None,
                        config: DogeConfig | None = None, *, torch_dtype=None) -> DogeForCausalLM:
        """A local HF directory or orbax checkpoint (doge_jax.hf.from_pretrained); `torch_dtype` is transformers'
        older name for `dtype`."""
        from .hf import from_pretrained

        if torch_dtype is not None:
            if dtype is not None:
                raise ValueError("pass dtype or its older name torch_dtype, not both")
            dtype = torch_dtype
        return from_pretrained(path, dtype=dtype, variant=variant, config=config)

    def save_pretrained(self, path: str, max_shard_size: int | str = "5GB", overwrite: bool = True) -> None:
        from .hf import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, overwrite=overwrite)



def with_attention_impl(model: DogeForCausalLM, impl: str) -> DogeForCausalLM:
    """Switch a model's attention implementation in place (a runtime choice; parameters are untouched)."""
    import dataclasses

    cfg = dataclasses.replace(model.config, attention_impl=impl)
    for _, m in nnx.iter_modules(model):
        if getattr(m, "cfg", None) is not None:
            m.cfg = cfg
    model.config = cfg
    return model


def split_layers(model: DogeForCausalLM) -> tuple:
    """Per-layer parameter states of the stacked layers (slice once, reuse for every decode step)."""
    _, state = nnx.split(model.model.layers)
    return tuple(jax.tree.map(lambda a, i=i: a[i], state) for i in range(model.config.num_hidden_layers))
