"""Doge causal LM in PyTorch: the spec's function (spec §3-§4), with parameter names equal to the HF keys.

Read top to bottom: RMSNorm, rotary, attention (dynamic mask), MLP, CDMoE, decoder layer, model, LM head + loss.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from doge_jax.config import DogeConfig, GenerationConfig
from doge_jax.generation_args import FROM_CONFIG, call_min_length, check_generate_kwargs, pop_rule_values
from doge_jax.model_output import OutputAccess, hidden_state_selection
from doge_torch.loss import IGNORE, causal_lm_loss, causal_lm_loss_fused
from doge_torch.triton_attention import dma_triton, triton_available, use_sparse

# attention_impl "auto" on CUDA runs the sparse Triton kernels (not FlexAttention) for T > this many keep windows.
# H200, bf16, forward+backward vs flash causal (benchmarks/RESULTS.md, 2026-11-30): at 16k (8 keep windows) the
# kernels 1.09x (the model path compiled 1.29x), FlexAttention 1.58x; at 32k 0.53x vs 1.40x; at 8k (4) 1.97x vs 1.74x.
TRITON_AUTO_MIN_WINDOWS = 4

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch without FlexAttention: the dense-bias sdpa path serves every length
    BlockMask = flex_attention = None
_flex_compiled = None


def _flex_cuda(*args, **kw):
    """FlexAttention on CUDA: inside a compiled model dynamo captures the call itself; in eager mode it runs
    through its own torch.compile wrapper, made on first use (making it at import costs ~1.6 s of dynamo and
    inductor imports for every user of doge_torch)."""
    global _flex_compiled
    if torch.compiler.is_compiling():
        return flex_attention(*args, **kw)
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled(*args, **kw)


SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
_sdpa_priority: list[SDPBackend] | None = None


def set_sdpa_backends(names: list[str] | None) -> None:
    """Priority order of torch's sdpa kernels in doge_torch's attention, e.g. ["cudnn", "flash"] (names: cudnn,
    flash, efficient, math; the unnamed ones follow in torch's order); None restores torch's own order (flash
    first, cuDNN last). Applies from the next call (the next trace, for a compiled model)."""
    global _sdpa_priority
    if names is None:
        _sdpa_priority = None
        return
    bad = [n for n in names if n not in SDPA_BACKENDS]
    if bad or not names:
        raise ValueError(f"sdpa backends {bad or names}: each must be one of {sorted(SDPA_BACKENDS)}")
    named = [SDPA_BACKENDS[n] for n in names]
    _sdpa_priority = named + [b for b in SDPA_BACKENDS.values() if b not in named]


def run_sdpa(*args, **kw) -> torch.Tensor:
    """F.scaled_dot_product_attention under the `set_sdpa_backends` priority order, if one is set."""
    if _sdpa_priority is None:
        return F.scaled_dot_product_attention(*args, **kw)
    with sdpa_kernel(_sdpa_priority, set_priority=True):
        return F.scaled_dot_product_attention(*args, **kw)


def stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest k along the last axis, sorted, ties broken by lower index (the rule doge_jax uses, spec §9.1).
    The sort runs without autograd (it would keep its [..., n] int64 indices for the backward) and the k values are
    gathered, so the backward keeps only [..., k] indices."""
    with torch.no_grad():
        idx = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]
    return x.gather(-1, idx), idx


def torch_softplus(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x)  # threshold 20: x if x > 20 else log1p(exp(x)) (spec §9.3)


class DogeRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Spec §3.1 / §9.7: upcast, normalise, cast back, then multiply by the weight.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: DogeConfig, seq_len: torch.Tensor | int | None = None,
                  device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies for a sequence length (default or dynamic NTK RoPE, spec §3.3), float32, made on
    `device` (a CPU table copied to a GPU would wait for the GPU's queue: a host sync per forward).

    `seq_len` may be a tensor (dynamic RoPE with data-dependent positions): the choice between the default and
    the NTK-scaled frequencies is then a `torch.where`, with no host sync (torch.compile-friendly)."""
    dim = cfg.head_size
    if isinstance(seq_len, torch.Tensor):
        device = seq_len.device
    exps = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    default = 1.0 / (cfg.rope_theta ** exps)
    if cfg.rope_type != "dynamic" or seq_len is None:
        return default
    if not isinstance(seq_len, torch.Tensor) and int(seq_len) <= cfg.max_position_embeddings:
        return default
    s = torch.as_tensor(seq_len, dtype=torch.int64)
    base = cfg.rope_theta * ((cfg.rope_factor * s / cfg.max_position_embeddings) - (cfg.rope_factor - 1)) ** (
        dim / (dim - 2))
    scaled = 1.0 / (base ** exps)
    if not isinstance(seq_len, torch.Tensor):
        return scaled
    return torch.where(s > cfg.max_position_embeddings, scaled, default)  # NaN in `scaled` for short s is unused


def rotary_cos_sin(cfg: DogeConfig, position_ids: torch.Tensor, dtype: torch.dtype,
                   rope_len: torch.Tensor | int | None = None):
    """cos/sin [B or 1, S, D] for the positions. Dynamic RoPE scales by max(position)+1 (a tensor, no host sync)
    unless rope_len is given; the default RoPE ignores it."""
    if rope_len is None and cfg.rope_type == "dynamic":
        rope_len = position_ids.max() + 1
    inv_freq = rope_inv_freq(cfg, rope_len, device=position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


@dataclass
class LayerCache:
    """Per layer: keys (after q/k-norm and RoPE) and values [B, G, T, D], dynamic-mask bias dt [B, n_dt, T]."""

    k: torch.Tensor
    v: torch.Tensor
    dt: torch.Tensor


class DogeCache:
    """A growing KV cache; dt is cached per key because it depends only on that key's value (design.md §3)."""

    def __init__(self, num_layers: int):
        self.layers: list[LayerCache | None] = [None] * num_layers

    def get_seq_length(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0].k.shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor) -> LayerCache:
        old = self.layers[i]
        if old is not None:
            k, v, dt = torch.cat([old.k, k], 2), torch.cat([old.v, v], 2), torch.cat([old.dt, dt], 2)
        self.layers[i] = LayerCache(k, v, dt)
        return self.layers[i]

    def reorder(self, rows: torch.Tensor) -> None:
        """Row r of the cache becomes old row rows[r] (beam search: the cache follows the surviving beams)."""
        self.layers = [None if lc is None else LayerCache(*(t.index_select(0, rows) for t in (lc.k, lc.v, lc.dt)))
                       for lc in self.layers]


def _kth_smallest_in_prefix(seq: torch.Tensor, prefix: torch.Tensor, k: int) -> torch.Tensor:
    """seq [N, T]: rows are permutations of 0..T-1; prefix [N, T]. Per query, the k-th smallest (1-based) value of
    seq[n, :prefix] (garbage where prefix < k): a wavelet matrix, log2(T) stable partitions (as doge_jax)."""
    N, T = seq.shape
    bits = max(1, math.ceil(math.log2(T)))
    idx = torch.arange(T, device=seq.device)
    zeros, cur = [], seq
    for b in reversed(range(bits)):
        bit = (cur >> b) & 1
        z = F.pad(torch.cumsum(1 - bit, dim=1), (1, 0))
        nz = z[:, -1:]
        pos = torch.where(bit == 0, z[:, :-1], nz + idx - z[:, :-1])
        zeros.append(z)
        cur = torch.empty_like(cur).scatter_(1, pos, cur)
    lo, hi = torch.zeros_like(prefix), prefix.clone()
    kk = torch.full_like(prefix, k - 1)
    res = torch.zeros_like(prefix)
    for z, b in zip(zeros, reversed(range(bits))):
        nz = z[:, -1:]
        zl, zh = z.gather(1, lo), z.gather(1, hi)
        c0 = zh - zl
        go0 = kk < c0
        res = torch.where(go0, res, res | (1 << b))
        kk = torch.where(go0, kk, kk - c0)
        lo = torch.where(go0, zl, nz + lo - zl)
        hi = torch.where(go0, zh, nz + hi - zh)
    return res


NEVER = torch.iinfo(torch.int64).max


def key_expiry(dt: torch.Tensor, valid: torch.Tensor, keep_window: int) -> torch.Tensor:
    """dt [B, n, T], valid [B, T] bool -> e [B, n, T] int64: key j is among the keep_window best allowed keys of
    query slot i (no sliding window) iff j <= i < e_j; e_j = slot of the k-th valid key beating j (larger dt, lower
    index on ties), NEVER if fewer do, 0 for invalid keys (design.md §3)."""
    B, n, T = dt.shape
    ok = valid[:, None, :].expand(B, n, T).reshape(B * n, T)
    if T <= keep_window:  # nothing can expire
        return torch.where(ok, NEVER, 0).view(B, n, T)
    key = torch.where(ok, -dt.detach().reshape(B * n, T).to(torch.promote_types(dt.dtype, torch.float32)),
                      torch.inf)  # float64 dt is ranked in float64, as the top-k path does
    perm = torch.sort(key, dim=-1, stable=True).indices  # best first, invalid keys last
    rank = torch.empty_like(perm).scatter_(1, perm, torch.arange(T, device=dt.device).expand(B * n, T))
    e = _kth_smallest_in_prefix(perm, rank, keep_window)
    e = torch.where(rank >= keep_window, e, NEVER)
    return torch.where(ok, e, 0).view(B, n, T)


def dynamic_mask_bias(dt: torch.Tensor, allowed: torch.Tensor, keep_window: int, dtype: torch.dtype,
                      expiry: bool = False) -> torch.Tensor:
    """The additive attention bias of spec §3.5: dt where allowed, finfo.min elsewhere, top-keep_window per row.

    dt [B, n, T]; allowed [B, 1, S, T] bool. Returns [B, n, S, T]. Ties in the keep-window top-k keep the lower
    key index. `expiry=True` (only valid without a sliding window: the valid keys are read off the last query's row)
    applies the same rule in its key-expiry form (j kept by query i iff j <= i < e_j), with no sort over the [S, T]
    rows (for S > 1; one row is sorted directly).
    """
    min_v = torch.finfo(dtype).min
    T = dt.shape[-1]
    # (a single query row, as in decoding, takes the top-k below: one sort of the row, as the expiry form's, without
    # its wavelet passes)
    if T > keep_window and expiry and allowed.shape[2] > 1:
        S = allowed.shape[2]
        valid = allowed[:, 0, -1, :]  # the last query slot (T - 1) sees every valid key when nothing slides
        e = key_expiry(dt, valid, keep_window)
        qi = torch.arange(T - S, T, device=dt.device)
        keep = allowed & (qi[:, None] < e[:, :, None, :])
        return dt[:, :, None, :].masked_fill(~keep, min_v)
    bias = dt[:, :, None, :].masked_fill(~allowed, min_v)
    if T > keep_window:
        _, idx = stable_topk(bias, keep_window)
        keep = torch.zeros_like(bias, dtype=torch.bool).scatter(-1, idx, True)
        bias = bias.masked_fill(~keep, min_v)
    return bias


def use_sdpa(cfg: DogeConfig, dtype: torch.dtype, device: torch.device) -> bool:
    """`attention_impl` for doge_torch: reference -> eager (transformers' op order); blockwise / fused -> sdpa;
    pallas -> the Triton kernel where it applies (CUDA, power-of-two head dim >= 16, no cache, no sliding window, no
    dropout), sdpa elsewhere;
    auto -> sdpa (and on CUDA the sparse Triton kernels past TRITON_AUTO_MIN_WINDOWS keep windows: dma_attention),
    except reduced precision on CPU, where eager keeps transformers' bf16 rounding (and sdpa is not faster)."""
    if cfg.attention_impl == "reference":
        return False
    if cfg.attention_impl == "auto":
        return dtype == torch.float32 or device.type == "cuda"
    return True


class DogeAttention(nn.Module):
    def __init__(self, cfg: DogeConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, G, D, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size, cfg.hidden_size
        b = cfg.attention_bias
        self.q_proj = nn.Linear(d, H * D, bias=b)
        self.k_proj = nn.Linear(d, G * D, bias=b)
        self.v_proj = nn.Linear(d, G * D, bias=b)
        self.A = nn.Parameter(torch.zeros(cfg.num_dt_heads))
        self.dt_proj = nn.Linear(G * D, cfg.num_dt_heads, bias=b)
        self.o_proj = nn.Linear(H * D, d, bias=b)
        if cfg.variant == "native":
            self.q_norm = DogeRMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = DogeRMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor,
                cache: DogeCache | None = None) -> torch.Tensor:
        cfg = self.cfg
        B, S, _ = x.shape
        H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        q = self.q_proj(x).view(B, S, H, D)
        k = self.k_proj(x).view(B, S, G, D)
        v_flat = self.v_proj(x)
        v = v_flat.view(B, S, G, D).transpose(1, 2)
        if cfg.variant == "native":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        c, s = cos[:, None], sin[:, None]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        dt = self.dynamic_dt(v_flat)
        if cache is not None:
            lc = cache.update(self.layer_idx, k, v, dt)
            k, v, dt = lc.k, lc.v, lc.dt
        dropout = cfg.attention_dropout if self.training else 0.0
        o = dma_attention(cfg, q, k, v, dt, allowed, x.dtype, dropout)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * D))

    def dynamic_dt(self, v_flat: torch.Tensor) -> torch.Tensor:
        """Dynamic-mask source (spec §3.4): dt = exp(A * softplus(dt_proj(v))) [B, n_dt, T], one value per key and
        dt-head. A is a float32 parameter, so under bf16 autocast A * softplus(.) promotes to float32 and dt stays
        float32 (spec §9.9); in a model cast to bf16 everything runs in bf16, as in transformers."""
        # Computed in transformers' [B, T, n] layout: softplus rounds by memory position on some CPUs (vectorised
        # body vs tail), so another layout loses bit-parity. dt's gradient reaches softplus_backward contiguous
        # (_DenseGrad; as a transposed view it made softplus_backward return strides its meta function does not
        # predict, and the compiled value fold's backward failed at run time).
        return torch.exp(self.A * _DenseGrad.apply(torch_softplus(self.dt_proj(v_flat)))).transpose(1, 2)


def pad_bias(dtype: torch.dtype) -> float:
    """Padding keys' bias in the q/k fold (as doge_jax.attention.pad_bias): -2**40, whose exp() underflows to 0, or
    half of finfo.min where that is smaller (float16): finite, so no 0 * inf reaches the backward."""
    return max(-(2.0 ** 40), torch.finfo(dtype).min / 2)


def fold_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor,
              valid: torch.Tensor | None = None):
    """Fold the per-key bias into one extra head dimension (design.md §3, as doge_jax.attention.fold_bias):
    q' = [q * scale, 1, 0...], k' = [k, b, 0...], v' = [v, 0...], padded to a multiple of 8, so q'.k' =
    q.k * scale + b_j and plain causal attention with scale 1 computes DMA for T <= keep_window (d(dt) is
    dk'[..., D]). b = dt, or a large negative number for padding keys (`valid` [B, T] bool). dt [B, n, T] with
    n = G or H (kv heads repeated to the query heads when n = H > G)."""
    B, H, S, D = q.shape
    G = k.shape[1]
    if dt.shape[1] != G:
        k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    pad = -(-(D + 1) // 8) * 8 - D - 1
    # Built in the dtype sdpa runs in (autocast's, which casts float32 inputs; else k's): the values autocast's
    # cast of float32 folds would give, without writing and reading those float32 copies
    dev = k.device.type
    run = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and k.dtype != torch.float64 else k.dtype
    b = dt.to(run)
    if valid is not None:  # (finite in that dtype)
        b = b.masked_fill(~valid[:, None, :], max(pad_bias(k.dtype), pad_bias(run)))
    qs = (q * D ** -0.5).to(run)
    qa = torch.cat([qs, qs.new_ones(B, H, S, 1), qs.new_zeros(B, H, S, pad)], dim=-1)
    ka = torch.cat([k.to(run), b[..., None], b.new_zeros(*k.shape[:3], pad)], dim=-1)
    return qa, ka, F.pad(v.to(run), (0, pad + 1))


FUSED_FOLD = "qk"  # "v": fold the bias into the values where it applies (`attention_by_values`; not in float16,
# whose range would let the weights underflow); "flex": no fold, FlexAttention at T <= keep_window too on CUDA
# (the bias as its score_mod, a causal block mask; no dropout): a probe, timed against the folds on a GPU
V_FOLD_MAX_SPREAD = 60.0  # the most dt may span per batch row and head for the value-side fold (weights >= e^-60)


def fold_bias_v(v: torch.Tensor, dt: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Fold the per-key bias into the values (as doge_jax.attention.fold_bias_v): softmax_j(s_ij + b_j) = softmax_j(
    s_ij) w_j / sum_j(...) with w_j = exp(b_j - max b), so DMA = o'[:D] / o'[D] for plain causal attention o' over
    v' = [w v, w, 0...] (padded to a multiple of 8) with q and k unchanged: the kernels keep head dim D for q and k.
    Padding keys (`valid` [B, T] bool False) get w = 0. v [B, G, T, D]; dt [B, n, T] (v repeated to the query heads
    when n = H > G). Returns v' [B, n, T, Dv]."""
    B, G, T, D = v.shape
    n = dt.shape[1]
    if n != G:
        v = v.repeat_interleave(n // G, dim=1)
    b = dt.to(torch.promote_types(dt.dtype, torch.float32))
    if valid is None:
        w = torch.exp(b - b.amax(-1, keepdim=True).detach())  # the max cancels out of the ratio
    else:
        live = valid[:, None, :]
        c = b.masked_fill(~live, -torch.inf).amax(-1, keepdim=True).detach()
        c = torch.where(torch.isfinite(c), c, 0.0)  # (a row with no valid key)
        w = torch.where(live, torch.exp(torch.where(live, b, c) - c), 0.0)  # (padding keys: no exp overflow)
    w = w[..., None]
    pad = -(-(D + 1) // 8) * 8 - D - 1
    return torch.cat([(v * w).to(v.dtype), w.to(v.dtype), v.new_zeros(B, n, T, pad)], dim=-1)


class _DenseGrad(torch.autograd.Function):
    """Identity whose gradient is made contiguous: torch.cond needs its branches' gradients laid out alike."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _by_values(q, k, v, dt, gqa: bool, valid=None):
    """Causal DMA with the bias folded into the values (`fold_bias_v`; T <= keep_window, no cache; padding keys
    where `valid` is False: rows with no valid key come out 0, for `fill_masked_rows`)."""
    D = q.shape[-1]
    n = dt.shape[1]
    if n != k.shape[1]:
        k = k.repeat_interleave(n // k.shape[1], dim=1)
    if valid is not None:
        # padding keys (weight 0) still take softmax mass: at score 0 they cannot outweigh the valid keys by the
        # e^-100 or so that would underflow o'[D] to 0 (an unbounded padding score could)
        k = k.masked_fill(~valid[:, None, :, None], 0.0)
    # cuDNN first; never flash: on CUDA it needs equal head dims for q/k and v, and on the CPU its shape function
    # assumes them (torch.cond's tracing then fails)
    order = [b for b in _sdpa_priority or [SDPA_BACKENDS[b] for b in ("cudnn", "efficient", "math")]
             if b != SDPBackend.FLASH_ATTENTION]
    with sdpa_kernel(order, set_priority=True):
        o = F.scaled_dot_product_attention(q, k, fold_bias_v(v, dt, valid), is_causal=True, scale=D ** -0.5,
                                           enable_gqa=gqa)
    f = torch.promote_types(o.dtype, torch.float32)
    den = o[..., D:D + 1].to(f)  # > 0 wherever a query sees a valid key (without padding: itself)
    return (o[..., :D].to(f) / torch.where(den > 0, den, 1.0)).to(o.dtype)


def _by_keys(q, k, v, dt, gqa: bool, valid=None, dropout: float = 0.0):
    """Causal DMA with the bias folded into q and k (`fold_bias`; T <= keep_window, no cache; padding keys where
    `valid` is False)."""
    qa, ka, va = fold_bias(q, k, v, dt, valid)
    return run_sdpa(qa, ka, va, is_causal=True, scale=1.0, dropout_p=dropout, enable_gqa=gqa)[..., :q.shape[-1]]


def attention_by_values(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """Causal DMA for T <= keep_window without cache or dropout (padding keys where `valid` [B, T] is False), with
    the bias folded into the values (`fold_bias_v`) where dt spans at most V_FOLD_MAX_SPREAD over the valid keys of
    every batch row and head, else into q and k (`fold_bias`): in Python in eager mode, by torch.cond in a compiled
    graph. The choice is read on the host either way (inductor's code for torch.cond does too): one host sync per
    call, so a training step with this fold is not free of syncs."""
    if valid is None:
        ok = (dt.amax(-1) - dt.amin(-1) <= V_FOLD_MAX_SPREAD).all()
    else:
        live = valid[:, None, :]
        hi, lo = dt.masked_fill(~live, -torch.inf).amax(-1), dt.masked_fill(~live, torch.inf).amin(-1)
        ok = (torch.where(torch.isfinite(hi), hi - lo, 0.0) <= V_FOLD_MAX_SPREAD).all()  # (no valid key: no span)
    gqa = bool(dt.shape[1] != q.shape[1])  # (both folds give k and v' dt's heads)
    if not torch.compiler.is_compiling():  # eager torch.cond would trace both branches with dynamo on every call
        return (_by_values if bool(ok) else _by_keys)(q, k, v, dt, gqa, valid)

    # torch.cond wants its branches' outputs and gradients laid out alike; strides of size-1 dimensions (one kv
    # head, one batch row) came out differently in the two branches (and differently again in inductor's lowering),
    # so q, k, v, dt and the output cross it flat (1-D: nothing left to differ), in their shapes inside
    shapes = [tuple(x.shape) for x in (q, k, v, dt)]

    def branch(fn):
        def run(q, k, v, dt, *valid):
            args = (_DenseGrad.apply(x).view(shape) for x, shape in zip((q, k, v, dt), shapes))
            return fn(*args, gqa, *valid).reshape(-1)

        return run

    flat = tuple(x.reshape(-1) for x in (q, k, v, dt))
    o = torch.cond(ok, branch(_by_values), branch(_by_keys), flat if valid is None else (*flat, valid))
    return o.view(q.shape)


def fill_masked_rows(o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
    """Replace the rows of o [B, H, S, D] (no cache: S = T) whose query sees no valid key (slots before a row's
    first valid key) by the reference's: every logit there is q.k * scale + finfo.min, which rounds to finfo.min,
    so the softmax is uniform over the T keys and the row is the mean of v (as doge_jax.attention's
    _fill_masked_rows). The gradient is that expression's too (softmax at uniform p): through u = mean(v) +
    (scale / T) q C with C = k^T (v - mean(v)), C's value part held constant and q C minus itself in the forward,
    so it is nonzero for q and k, which matters where such rows feed real tokens (CDMoE routing mixes positions,
    spec §3.8)."""
    B, H, S, D = q.shape
    G, T = k.shape[1], k.shape[2]
    has = (valid.cumsum(-1) > 0)[:, None, :S, None]  # [B, 1, S, 1]
    mean_v = v.mean(2, keepdim=True)  # [B, G, 1, D]
    c = torch.matmul(k.transpose(-1, -2), (v - mean_v).detach())  # [B, G, D, D]
    lin = torch.matmul(q.reshape(B, G, H // G, S, D), c[:, :, None]) * (D ** -0.5 / T)
    u = (mean_v[:, :, None] + (lin - lin.detach())).reshape(B, H, S, D)
    return torch.where(has, o, u.to(o.dtype))


FLEX_BLOCK = 128


def flex_available(device: torch.device) -> bool:
    """FlexAttention runs DMA beyond keep_window on CUDA (torch has no FlexAttention backward on CPU)."""
    return device.type == "cuda" and flex_attention is not None


def expiry_block_mask(e: torch.Tensor, H: int, S: int, T: int, block: int = FLEX_BLOCK):
    """The FlexAttention BlockMask of the keep-window rule in key-expiry form (no cache; padding keys have e = 0):
    query i sees key j iff j <= i < e[b, h // r, j]. e [B, n, T] int. Built from per-key-block max/min of e in
    O((T/block)^2) per head, no [S, T] tensor: a (query block, key block) tile is live iff some key of the block
    can be alive for some query of the block, and full (mask_mod skipped) iff every key of a complete block below
    the diagonal is alive for every query of the block."""
    B, n, _ = e.shape
    nq, nk = -(-S // block), -(-T // block)
    Tp = nk * block
    e = F.pad(e.to(torch.int32), (0, Tp - T))  # keys past T: never alive
    j = torch.arange(Tp, device=e.device, dtype=torch.int32)
    eb = e.view(B, n, nk, block)
    live_end = torch.where(eb > j.view(nk, block), eb, 0).amax(-1)  # [B, n, nk]
    e_min = eb.amin(-1)
    qs = torch.arange(nq, device=e.device) * block
    qe = (qs + block).clamp_max(S) - 1
    ks = torch.arange(nk, device=e.device) * block
    ke = ks + block - 1
    live = (ks[None, :] <= qe[:, None]) & (live_end[..., None, :] > qs[:, None])  # [B, n, nq, nk]
    full = (ke[None, :] < qs[:, None]) & (ke[None, :] < T) & (e_min[..., None, :] > qe[:, None]) & live
    part = live & ~full
    r = H // n
    if r > 1:
        part, full = part.repeat_interleave(r, dim=1), full.repeat_interleave(r, dim=1)

    def lists(m):  # the listed blocks first, in index order
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return m.sum(-1, dtype=torch.int32), order

    kv_num, kv_idx = lists(part)
    full_num, full_idx = lists(full)

    def mask_mod(b, h, qi, kj):
        return (kj <= qi) & (qi < e[b, h // r, kj])

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_kv_num_blocks=full_num, full_kv_indices=full_idx,
                                    BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(S, T))


def flex_dma(cfg: DogeConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor,
             compute: torch.dtype | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """DMA with no cache and no sliding window at any T, as FlexAttention: the bias is a score_mod (dt[b, head, j]
    in float32, differentiable) and the keep window the block mask of `expiry_block_mask`, so no [S, T] tensor
    exists and tiles with no live key are skipped. Padding keys (`valid` [B, T] False) expire before they exist;
    rows with no valid key come out 0 (FlexAttention's fully masked rows), for `fill_masked_rows`. q, k, v run in
    `compute` (the autocast dtype: FlexAttention is not autocast-aware, and RoPE leaves q, k in float32 under
    autocast)."""
    if compute is not None:
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
    B, H, S, D = q.shape
    G, T = k.shape[1], k.shape[2]
    n = dt.shape[1]
    r = H // n
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=q.device)
    e = key_expiry(dt, valid, cfg.keep_window_size).clamp_max(T)
    block_mask = expiry_block_mask(e, H, S, T)
    bias = F.pad(dt.float(), (0, block_mask.kv_indices.shape[-1] * FLEX_BLOCK - T))

    def score_mod(score, b, h, qi, kj):
        return score + bias[b, h // r, kj]

    fn = flex_attention if q.device.type == "cpu" else _flex_cuda
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=D ** -0.5, enable_gqa=G != H)


def dma_attention(cfg: DogeConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor,
                  allowed: torch.Tensor | None, mask_dtype: torch.dtype, dropout: float = 0.0) -> torch.Tensor:
    """Dynamic Mask Attention (spec §3.5): q [B, H, S, D], k/v [B, G, T, D], dt [B, n_dt, T], allowed [B, 1, S, T]
    (None: plain causal, no padding, no cache, no sliding window; [B, T] bool: the same with padding keys where
    False). Returns [B, H, S, D]. `mask_dtype` is the hidden-state dtype whose finfo.min marks masked entries
    (spec §9.5).

    With allowed None or [B, T] ("causal"; padding keys get zero weight, and rows with no valid key the reference's
    uniform rows, `fill_masked_rows`): `attention_impl="pallas"` on CUDA runs the Triton flash kernel of
    doge_torch.triton_attention (the counterpart of doge_jax's Pallas kernel), and "auto" its sparse kernels too for
    T > TRITON_AUTO_MIN_WINDOWS * keep_window. sdpa paths: for T <= keep_window the bias is folded into the head
    dimension (`fold_bias`; with FUSED_FOLD = "v" and no dropout into the values where it can,
    `attention_by_values`) and sdpa runs plain causal attention (a flash kernel on CUDA); beyond keep_window on
    CUDA, FlexAttention (`flex_dma`). Otherwise the bias (dt, finfo.min where masked: causal always
    applied, padding, keep window in its key-expiry form) is sdpa's float attn_mask. Under bf16 autocast sdpa runs
    in bf16 while the hidden states (and so the mask) are float32; the mask is then clamped to bf16's finfo.min
    before the cast (float32's min rounds to -inf in bf16, and sdpa returns 0, not the uniform average, for a row
    that is all -inf)."""
    H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    B, _, S, _ = q.shape
    T = k.shape[2]
    r = H // G
    dev = q.device.type
    compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
    sdpa = use_sdpa(cfg, compute, q.device)
    valid = None
    if allowed is not None and allowed.ndim == 2:  # [B, T]: plain causal with padding keys
        valid, allowed = allowed.bool(), None
    if allowed is None:
        keep = cfg.keep_window_size
        kernel = D >= 16 and D & (D - 1) == 0 and (  # (power-of-two head dims: Triton tiles; else the sdpa paths)
            cfg.attention_impl == "pallas" or (  # "auto": the sparse kernels, far beyond the keep window
                cfg.attention_impl == "auto" and T > TRITON_AUTO_MIN_WINDOWS * keep and use_sparse(T, keep)))
        o = None
        if kernel and dropout == 0.0 and triton_available(q.device):  # Triton kernel, any T
            ok = torch.ones(B, T, dtype=torch.bool, device=q.device) if valid is None else valid
            e = key_expiry(dt, ok, keep)  # (padding keys: e = 0, expired before they exist)
            o = dma_triton(q.to(compute), k.to(compute), v.to(compute), dt, e, keep=keep,
                           check=False).to(q.dtype)  # e from key_expiry keeps the rule: no eager host sync
        elif sdpa and T <= cfg.keep_window_size and not (FUSED_FOLD == "flex" and dropout == 0.0
                                                          and flex_available(q.device)):
            # (dropout would reach the denominator o'[D] too; float16's range is too small for the weights)
            # (compiled with remat: the q/k fold; checkpoint's dispatch modes take no torch.cond)
            if (FUSED_FOLD == "v" and dropout == 0.0 and compute != torch.float16
                    and not (cfg.remat != "none" and torch.compiler.is_compiling())):
                o = attention_by_values(q, k, v, dt, valid)
            else:
                o = _by_keys(q, k, v, dt, dt.shape[1] != H, valid, dropout)
        elif sdpa and dropout == 0.0 and flex_available(q.device):
            o = flex_dma(cfg, q, k, v, dt, compute, valid).to(q.dtype)
        if o is not None:
            return o if valid is None else fill_masked_rows(o, q, k, v, valid)
        allowed = allowed_mask(cfg, B, S, T - S, valid, q.device)
    if cfg.sliding_window is not None and cfg.sliding_window <= cfg.keep_window_size:
        # each row sees at most sliding_window <= keep_window keys: the keep-window top-k drops none (spec §3.5)
        bias = dynamic_mask_bias(dt, allowed, dt.shape[-1], mask_dtype)
    else:
        bias = dynamic_mask_bias(dt, allowed, cfg.keep_window_size, mask_dtype, expiry=cfg.sliding_window is None)
    if cfg.variant == "native" and r > 1 and G > 1:
        bias = bias.repeat_interleave(r, dim=1)  # head h uses kv-group h // r
    if sdpa:
        # The bias carries the causal, padding and keep-window masks (finfo.min): causal is always applied
        # (spec §3.5.2), and fully-masked rows come out uniform as in the eager path.
        if bias.dtype != compute:
            bias = bias.clamp_min(torch.finfo(compute).min).to(compute)
        return run_sdpa(q, k, v, attn_mask=bias, scale=D ** -0.5, dropout_p=dropout, enable_gqa=r > 1)
    if cfg.variant == "native" and r > 1 and G == 1:
        bias = bias.expand(-1, H, -1, -1)
    k = k.repeat_interleave(r, dim=1) if r > 1 else k
    v = v.repeat_interleave(r, dim=1) if r > 1 else v
    w = torch.matmul(q, k.transpose(2, 3)) * (D ** -0.5) + bias
    p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    p = F.dropout(p, p=dropout, training=dropout > 0)
    return torch.matmul(p, v)


class DogeMLP(nn.Module):
    def __init__(self, cfg: DogeConfig):
        super().__init__()
        d, inter, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, inter, bias=b)
        self.up_proj = nn.Linear(d, inter, bias=b)
        self.down_proj = nn.Linear(inter, d, bias=b)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), None


def route(router_logits: torch.Tensor, num_keys: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Product-key routing (spec §3.8 steps 2-4): router logits [2, N, K] -> (scores [N,k], experts [N,k]).
    Only the first k of each sorted half can reach the top k of the K² sums (see doge_jax.model.route), so the
    k x k corner is ranked: the same scores, experts and ties without an [N, num_experts] array (finite logits)."""
    kk = min(top_k, num_keys)
    sx, ix = stable_topk(router_logits[0], kk)
    sy, iy = stable_topk(router_logits[1], kk)
    grid = (sx[:, :, None] + sy[:, None, :]).flatten(1)
    grid_idx = (ix[:, :, None] * num_keys + iy[:, None, :]).flatten(1)
    scores, pos = stable_topk(grid, top_k)
    return scores, grid_idx.gather(-1, pos)


def routed_experts(x: torch.Tensor, w: torch.Tensor, experts: torch.Tensor, down: torch.Tensor,
                   up: torch.Tensor) -> torch.Tensor:
    """The routed single-neuron experts (spec §3.8 step 5): x [N, d], weights w and ids experts [N, k], tables
    [E, d] -> [N, d]."""
    dvec, uvec = F.embedding(experts, down), F.embedding(experts, up)  # [N, k, d]
    a = F.silu(torch.matmul(dvec, x.unsqueeze(-1)).squeeze(-1)) * w
    return torch.matmul(a.unsqueeze(1), uvec).squeeze(1)


class DogeCDMoE(DogeMLP):
    """Shared SwiGLU expert + product-key routed single-neuron experts (spec §3.8)."""

    def __init__(self, cfg: DogeConfig):
        super().__init__(cfg)
        self.cfg = cfg
        self.router_gate = nn.Linear(cfg.hidden_size, 2 * cfg.num_keys, bias=False)
        self.down_embed = nn.Embedding(cfg.num_experts, cfg.hidden_size)
        self.up_embed = nn.Embedding(cfg.num_experts, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, d = x.shape
        N = B * S
        # Quirk kept on purpose (spec §3.8 step 1): reinterpret [B, S, 2K] in memory order as [2, N, K].
        router_logits = self.router_gate(x).reshape(2, N, -1)
        scores, experts = route(router_logits, self.cfg.num_keys, self.cfg.num_experts_per_tok)
        w = F.softmax(scores, dim=-1)
        if self.cfg.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        args = (x.reshape(N, d), w, experts, self.down_embed.weight, self.up_embed.weight)
        if torch.is_grad_enabled():
            # the gathered [N, k, d] rows are 2k times x's size; the backward gathers them again (doge_jax does too)
            routed = torch.utils.checkpoint.checkpoint(routed_experts, *args, use_reentrant=False)
        else:
            routed = routed_experts(*args)
        routed = routed.view(B, S, d)
        shared, _ = super().forward(x)
        return shared + routed, router_logits


class DogeDecoderLayer(nn.Module):
    def __init__(self, cfg: DogeConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.input_layernorm = DogeRMSNorm(d, cfg.rms_norm_eps)
        self.self_attn = DogeAttention(cfg, layer_idx)
        self.input_residual = nn.Parameter(torch.ones(d))
        self.post_attention_layernorm = DogeRMSNorm(d, cfg.rms_norm_eps)
        self.mlp = DogeCDMoE(cfg) if cfg.is_moe else DogeMLP(cfg)
        self.post_attention_residual = nn.Parameter(torch.ones(d))

    def forward(self, x, cos, sin, allowed, cache=None):
        p = self.cfg.hidden_dropout
        y = self.self_attn(self.input_layernorm(x), cos, sin, allowed, cache)
        x = self.input_residual * x + F.dropout(y, p=p, training=self.training)
        y, router_logits = self.mlp(self.post_attention_layernorm(x))
        x = self.post_attention_residual * x + F.dropout(y, p=p, training=self.training)
        return x, router_logits


def _saved_ops() -> set:
    """The ops whose outputs `remat: dots_saveable` keeps (as jax.checkpoint_policies.dots_saveable keeps every
    dot_general): matmuls and the attention kernels; everything else in a layer is recomputed in the backward."""
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_efficient_attention_forward", "_flash_attention_forward")
    return {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}


def _dots_saveable(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SAVED_OPS = _saved_ops()


def remat_layer(layer: nn.Module, policy: str, *args):
    """Run a decoder layer, rematerialised in the backward pass as config.remat says (as doge_jax's remat): "full"
    keeps only its input, "dots_saveable" also the matmul and attention outputs."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    if policy == "full":
        return checkpoint(layer, *args, use_reentrant=False)
    # (a functools.partial: what torch.compile traces as a selective-checkpoint context)
    return checkpoint(layer, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _dots_saveable))


class DogeModel(nn.Module):
    def __init__(self, cfg: DogeConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.layers = nn.ModuleList([DogeDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = DogeRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def allowed_mask(cfg: DogeConfig, B: int, S: int, past: int, attention_mask: torch.Tensor | None,
                 device) -> torch.Tensor:
    """[B, 1, S, T] bool: key slot j visible from query slot past+i (causal, sliding window, padding)."""
    T = past + S
    qi = torch.arange(past, T, device=device)[:, None]
    kj = torch.arange(T, device=device)[None, :]
    ok = kj <= qi
    if cfg.sliding_window is not None:
        ok = ok & (qi - kj < cfg.sliding_window)
    ok = ok[None, None].expand(B, 1, S, T)
    if attention_mask is not None:
        ok = ok & attention_mask[:, None, None, :T].bool()
    return ok


@dataclass
class DogeOutput(OutputAccess):
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    past_key_values: DogeCache | None = None
    hidden_states: tuple[torch.Tensor | None, ...] | None = None


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], cfg: DogeConfig,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MoE aux loss with transformers 5.23 semantics: router probabilities scattered to expert order (spec §3.9).
    The softmax over the K² sums x_a + y_b factors as softmax(x)_a * softmax(y)_b, so the mean probability per expert
    is a [K, N] @ [N, K] product instead of transformers' [L, N, num_experts] array."""
    E, K, k = cfg.num_experts, cfg.num_keys, cfg.num_experts_per_tok
    experts = torch.cat([route(rl, K, k)[1] for rl in router_logits])  # [L*N, k]
    L, N = len(router_logits), router_logits[0].shape[1]
    dev = experts.device
    # float32: bf16 token counts and sums round (1174 tokens became 1176)
    m = (torch.ones(N, device=dev) if attention_mask is None
         else attention_mask.reshape(-1).to(device=dev, dtype=torch.float32))  # [N]
    # padding tokens' choices count 0 (weights, not a boolean selection: no device sync)
    counts = torch.zeros(E, dtype=torch.float32, device=dev).scatter_add_(
        0, experts.reshape(-1), m.repeat(L)[:, None].expand(-1, k).reshape(-1))
    f = counts / (L * k * m.sum())
    with torch.autocast(dev.type, enabled=False):
        px = torch.stack([F.softmax(rl[0].float(), dim=-1) for rl in router_logits])  # [L, N, K]
        py = torch.stack([F.softmax(rl[1].float(), dim=-1) for rl in router_logits])
        p_mean = torch.einsum("lna,lnb->ab", px * m[None, :, None], py).reshape(E) / (L * m.sum())
    return (f * p_mean).sum() * E


def _tied_head_key(module, state_dict, prefix, local_metadata) -> None:
    """state_dict() of a tied model also holds `lm_head.weight` (the embedding's tensor), as transformers'."""
    state_dict[prefix + "lm_head.weight"] = state_dict[prefix + "model.embed_tokens.weight"]


def _drop_tied_head_key(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs) -> None:
    """load_state_dict() of a tied model takes a state dict with `lm_head.weight` (transformers', ours) or
    without it (HF files, where the tied key is left out): the embedding is the head. A head that differs from
    the embedding (an untied model's) is an error, not dropped silently."""
    head = state_dict.pop(prefix + "lm_head.weight", None)
    emb = state_dict.get(prefix + "model.embed_tokens.weight")
    if head is None or emb is None or head is emb or "meta" in (head.device.type, emb.device.type):
        return
    if head.shape != emb.shape or not torch.equal(head.to(emb), emb):
        error_msgs.append("lm_head.weight differs from model.embed_tokens.weight, but this model ties them "
                          "(tie_word_embeddings=True): load it into a model with tie_word_embeddings=False")


def _resized_rows(w: nn.Parameter, n: int, mean_resizing: bool, std: float, head: bool) -> nn.Parameter:
    """`w`'s first min(n, rows) rows, plus new rows drawn as transformers' resize draws them: the same generator
    calls in the same order (the fresh module's own init included), so the same values for the same torch seed."""
    old, d = w.shape
    kw = dict(dtype=w.dtype, device=w.device)
    new = (nn.Linear(d, n, bias=False, **kw) if head else nn.Embedding(n, d, **kw)).weight.detach()
    if n > old and not mean_resizing:
        nn.init.normal_(new, 0.0, std)
    elif n > old:  # the old rows' mean, plus noise of 1e-9 times their covariance where it is positive definite
        x = w.detach().float()
        mean = x.mean(0)
        cov = 1e-9 * ((x - mean).T @ (x - mean) / old)
        if torch.distributions.constraints.positive_definite.check(cov).all():
            dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
            new[old:] = dist.sample((n - old,)).to(w.dtype)
        else:
            new[old:] = mean.to(w.dtype)
    new[:min(n, old)] = w[:min(n, old)]
    return nn.Parameter(new, requires_grad=w.requires_grad)


def check_num_items(n) -> None:
    """num_items_in_batch (the label count the loss sum is divided by) must be > 0 where its value is known without
    a device sync: a Python number or a CPU tensor (0 gave an inf loss, a negative count a negative one)."""
    if n is None or torch.compiler.is_compiling() or (isinstance(n, torch.Tensor) and n.device.type != "cpu"):
        return
    v = n.detach() if isinstance(n, torch.Tensor) else torch.as_tensor(n)
    if v.numel() != 1 or v.is_complex() or not bool(v.reshape(()) > 0):
        raise ValueError(f"num_items_in_batch={n!r}: the number of label tokens the loss sum is divided by, > 0")


class DogeForCausalLM(nn.Module):
    """The Doge causal LM. `model(input_ids, attention_mask=None, logits_to_keep=0).logits`."""

    def __init__(self, config: DogeConfig):
        super().__init__()
        self.config = config = DogeConfig.coerce(config)  # (a transformers DogeConfig too)
        self.generation_config = GenerationConfig.from_config(config)  # generate's default ids (from_pretrained:
        # generation_config.json's, as transformers)
        self.model = DogeModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        else:  # the state dict names the tied head as transformers' does (one Parameter, two keys)
            self.register_state_dict_post_hook(_tied_head_key)
            self.register_load_state_dict_pre_hook(_drop_tied_head_key)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Spec §5: normal(0, initializer_range) for Linear/Embedding, zero pad row, biases 0, norms/residuals 1,
        A 0."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith(".A") or name.endswith(".bias"):
                p.zero_()
            elif "norm" in name.rsplit(".", 2)[-2] or name.endswith("_residual"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)
        if self.config.pad_token_id is not None:
            self.model.embed_tokens.weight[self.config.pad_token_id].zero_()

    def lm_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    # transformers' PreTrainedModel conveniences
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head; when tied, a Linear holding the input embedding's very Parameter."""
        if not self.config.tie_word_embeddings:
            return self.lm_head
        head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False, device="meta")
        head.weight = self.model.embed_tokens.weight
        return head

    @torch.no_grad()
    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """As transformers: keep the first rows of the embedding (and of an untied head), drop the rows past
        `new_num_tokens` or add new ones, rounded up to `pad_to_multiple_of`; new rows are drawn from
        torch's global generator as transformers draws them (`mean_resizing`: near the old rows' mean, so the
        next-token distribution barely moves; else normal(0, initializer_range)). Updates config.vocab_size."""
        n = self.config.resized_vocab(new_num_tokens, pad_to_multiple_of)
        emb = self.model.embed_tokens
        if n is None or n == emb.num_embeddings:
            return emb
        emb.weight = _resized_rows(emb.weight, n, mean_resizing, self.config.initializer_range, head=False)
        emb.num_embeddings = n
        if not self.config.tie_word_embeddings:
            self.lm_head.weight = _resized_rows(self.lm_head.weight, n, mean_resizing, self.config.initializer_range,
                                                head=True)
            self.lm_head.out_features = n
        self.config = self.model.cfg = self.config.replace(vocab_size=n)
        return emb

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """As transformers: rematerialise every layer in the backward pass (config.remat "full"; "dots_saveable"
        also keeps the matmul outputs). Only the non-reentrant form: use_reentrant=True is refused."""
        kw = dict(gradient_checkpointing_kwargs or {})
        if kw.pop("use_reentrant", False):
            raise ValueError("gradient_checkpointing_kwargs use_reentrant=True: doge_torch checkpoints without "
                             "reentrancy only")
        if kw:
            raise ValueError(f"gradient_checkpointing_kwargs {sorted(kw)}: not supported (only use_reentrant=False)")
        self.config = self.config.replace(remat="full")

    def gradient_checkpointing_disable(self) -> None:
        self.config = self.config.replace(remat="none")

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.config.remat != "none"

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """As transformers': exclude_embeddings leaves out every nn.Embedding's weight (the token embedding, tied
        lm_head included, and a CDMoE layer's expert embeddings)."""
        skip = {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, nn.Embedding)} if exclude_embeddings \
            else set()
        return sum(p.numel() for n, p in self.named_parameters()
                   if n not in skip and (p.requires_grad or not only_trainable))

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: DogeCache | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0, num_items_in_batch=None,
                output_router_logits: bool | None = None, use_cache: bool | None = None,
                return_logits: bool = True, inputs_embeds: torch.Tensor | None = None, return_dict: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                cache_position: torch.Tensor | None = None) -> DogeOutput | tuple:
        """transformers' DogeForCausalLM.forward: token ids, or `inputs_embeds` [B, S, hidden] in place of their
        embedding lookup (exactly one of the two). `return_logits=False` with labels (training): the loss without
        ever storing the logits (`doge_torch.loss.causal_lm_loss_fused`, the same value), and `logits` None.
        `use_cache` None: config.use_cache in eval mode (as transformers, whose manual decoding loops pass
        `out.past_key_values` back), no cache in training mode. `return_dict=False`: `out.to_tuple()`;
        `cache_position` (transformers' loops pass it) must be the cache's next positions. `output_hidden_states`
        as transformers: the embeddings and each layer's output, the last after the final norm (num_hidden_layers + 1
        tensors [B, S, hidden]; an int or a list selects some, the others None); attention weights are not returned
        (True is an error)."""
        cfg = self.config
        if output_attentions:
            raise ValueError("output_attentions=True: not supported (doge_torch returns logits, loss, the cache, "
                             "hidden states and router logits)")
        selected = hidden_state_selection(output_hidden_states, cfg.num_hidden_layers + 1)
        if use_cache is None:
            use_cache = cfg.use_cache and not self.training
        if past_key_values is not None and not isinstance(past_key_values, DogeCache):
            raise TypeError(f"past_key_values: a doge_torch DogeCache (a previous output's past_key_values) or None, "
                            f"got {type(past_key_values).__name__}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        check_num_items(num_items_in_batch)
        if input_ids is not None and not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids: a torch.Tensor [batch, seq], got {type(input_ids).__name__} "
                            "(torch.as_tensor(ids); generate takes lists too)")
        if input_ids is not None:
            if input_ids.ndim != 2 or 0 in input_ids.shape:
                raise ValueError(f"input_ids shape {tuple(input_ids.shape)}: expected [batch >= 1, seq >= 1]")
            check_token_ids(input_ids, cfg.vocab_size)
            if input_ids.dtype in (torch.uint8, torch.int8, torch.int16):
                input_ids = input_ids.long()  # the embedding takes int32/int64 only
            B, S = input_ids.shape
            x = self.model.embed_tokens(input_ids)
        else:
            if inputs_embeds.ndim != 3 or 0 in inputs_embeds.shape[:2] or inputs_embeds.shape[2] != cfg.hidden_size:
                raise ValueError(f"inputs_embeds shape {tuple(inputs_embeds.shape)}: expected [batch >= 1, seq >= 1, "
                                 f"hidden_size={cfg.hidden_size}]")
            B, S = inputs_embeds.shape[:2]
            x = inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = DogeCache(cfg.num_hidden_layers)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past and past_key_values.layers[0].k.shape[0] != B:
            raise ValueError(f"past_key_values hold batch {past_key_values.layers[0].k.shape[0]}, input batch {B}")
        if cache_position is not None and not torch.compiler.is_compiling() and not torch.equal(
                cache_position.reshape(-1).cpu(), torch.arange(past, past + S)):
            raise ValueError(f"cache_position {cache_position.reshape(-1)[:8].tolist()}: the new tokens go to the "
                             f"cache's next positions, {past}..{past + S - 1}")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + S):
            # a shorter mask would broadcast over the cached keys and drop the prompt's padding silently
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must be (batch, cached + new "
                             f"tokens) = {(B, past + S)}")
        rope_len = None
        if position_ids is None:
            position_ids = (past + torch.arange(S, device=x.device))[None]
            rope_len = past + S  # = max(position) + 1, known statically (no host sync)
        elif position_ids.ndim != 2 or position_ids.shape[0] not in (1, B) or position_ids.shape[1] != S:
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)}: expected (batch or 1, new tokens) = "
                             f"({B}, {S})")
        cos, sin = rotary_cos_sin(cfg, position_ids, x.dtype, rope_len)
        # plain causal (no cache, no sliding window): None, or with padding the [B, T] key mask (the attention's
        # fast paths); else the full [B, 1, S, T] mask
        if past == 0 and cfg.sliding_window is None:
            allowed = None if attention_mask is None else attention_mask.bool()
        else:
            allowed = allowed_mask(cfg, B, S, past, attention_mask, x.device)
        router, states = [], []  # (states: only those asked for, not every layer's input)
        # (never with a cache: the recomputation would append the keys again)
        remat = cfg.remat != "none" and past_key_values is None and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.model.layers):
            states.append(x if selected is not None and i in selected else None)
            if remat:
                x, rl = remat_layer(layer, cfg.remat, x, cos, sin, allowed)
            else:
                x, rl = layer(x, cos, sin, allowed, past_key_values)
            router.append(rl)
        x = self.model.norm(x)
        states.append(x if selected is not None and cfg.num_hidden_layers in selected else None)
        keep_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if labels is not None and (tuple(labels.shape) != (B, S) or not keep_all):
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {(B, S)}, with "
                             f"logits_to_keep=0 (got {logits_to_keep!r})")
        if labels is not None:
            check_labels(labels, cfg.vocab_size)
            if labels.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
                labels = labels.long()  # (cross_entropy wants int64 targets)
        if labels is not None and not return_logits:
            out = DogeOutput(logits=None, past_key_values=past_key_values,
                             loss=causal_lm_loss_fused(x, self.lm_weight(), labels, num_items_in_batch))
        else:
            if not keep_all:  # an int: the last n positions; a tensor: those positions (as transformers)
                x = x[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else x[:, logits_to_keep]
            logits = F.linear(x, self.lm_weight())
            out = DogeOutput(logits=logits, past_key_values=past_key_values)
            if labels is not None:
                out.loss = causal_lm_loss(logits, labels, num_items_in_batch)
        want_router = (cfg.output_router_logits if output_router_logits is None else output_router_logits)
        if want_router and cfg.is_moe:
            out.router_logits = tuple(router)
            mask2d = attention_mask[:, -S:] if attention_mask is not None else None
            out.aux_loss = load_balancing_loss(out.router_logits, cfg, mask2d)
            if out.loss is not None:
                out.loss = out.loss + cfg.router_aux_loss_coef * out.aux_loss
        if selected is not None:
            out.hidden_states = tuple(states)
        return out.to_tuple() if return_dict is False else out

    # generation and checkpoint I/O live in their own modules; bound here for the expected API
    def generate(self, input_ids=None, attention_mask=None, max_new_tokens=FROM_CONFIG, do_sample=FROM_CONFIG,
                 temperature=FROM_CONFIG, top_k=FROM_CONFIG, top_p=FROM_CONFIG,
                 eos_token_id=FROM_CONFIG, seed: int | None = None, use_cache: bool = True, pad_token_id=FROM_CONFIG,
                 repetition_penalty=FROM_CONFIG, min_new_tokens=FROM_CONFIG, max_length=None, num_beams=FROM_CONFIG,
                 num_return_sequences=FROM_CONFIG, generation_config=None,
                 cache_implementation: str | None = None, min_p=FROM_CONFIG, streamer=None,
                 no_repeat_ngram_size=FROM_CONFIG, length_penalty=FROM_CONFIG,
                 early_stopping=FROM_CONFIG, typical_p=FROM_CONFIG, epsilon_cutoff=FROM_CONFIG,
                 eta_cutoff=FROM_CONFIG, return_dict_in_generate=FROM_CONFIG, output_scores=FROM_CONFIG,
                 output_logits=FROM_CONFIG, **kwargs):
        """Prompt + new tokens (see doge_torch.generate); transformers' `max_length` counts the prompt too
        (num_beams > 1: beam search); `streamer` as transformers'. transformers arguments this
        generate does not implement are refused by name where they would change the output."""
        from .generate import generate

        generation_config = call_min_length(self, generation_config, kwargs)  # (transformers' total length)
        processors = pop_rule_values(kwargs)
        check_generate_kwargs(kwargs, input_ids)
        return generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, eos_token_id=eos_token_id,
                        seed=seed,
                        use_cache=use_cache, pad_token_id=pad_token_id, repetition_penalty=repetition_penalty,
                        min_new_tokens=min_new_tokens, generation_config=generation_config,
                        max_length=max_length, cache_implementation=cache_implementation, streamer=streamer,
                        no_repeat_ngram_size=no_repeat_ngram_size, num_beams=num_beams,
                        num_return_sequences=num_return_sequences, length_penalty=length_penalty,
                        early_stopping=early_stopping,
                        typical_p=typical_p, epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff,
                        return_dict_in_generate=return_dict_in_generate, output_scores=output_scores,
                        output_logits=output_logits, **processors)

    def compute_transition_scores(self, sequences, scores, beam_indices=None, normalize_logits: bool = False
                                  ) -> torch.Tensor:
        """transformers' compute_transition_scores for a GenerateOutput (generate with return_dict_in_generate and
        output_scores): each generated token's score [rows, steps] (beam search: pass out.beam_indices)."""
        from doge_jax.generation_args import transition_scores

        def host(x):
            return x.detach().cpu().numpy() if torch.is_tensor(x) else x

        out = transition_scores(host(sequences), [host(s.float() if torch.is_tensor(s) else s) for s in scores],
                                host(beam_indices), normalize_logits, self.config.vocab_size)
        return torch.from_numpy(out).to(scores[0].device)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | str | None = None, variant: str | None = None,
                        config: DogeConfig | None = None, *, torch_dtype: torch.dtype | str | None = None,
                        device_map: str | torch.device | None = None,
                        attn_implementation: str | None = None) -> DogeForCausalLM:
        """A local HF directory. As transformers: `torch_dtype` (its older name for `dtype`), `device_map` (one
        device, or "auto": CUDA when there is one) and `attn_implementation` "eager" / "sdpa" (the same function
        here: doge_torch picks its attention kernels itself)."""
        from .io import from_pretrained

        if torch_dtype is not None:
            if dtype is not None:
                raise ValueError("pass dtype or its older name torch_dtype, not both")
            dtype = torch_dtype
        if attn_implementation not in (None, "eager", "sdpa"):
            raise ValueError(f"attn_implementation={attn_implementation!r}: doge_torch picks its attention kernels "
                             "itself; None, 'eager' or 'sdpa'")
        if isinstance(device_map, dict):
            raise ValueError("device_map: one device (a string or torch.device) or 'auto'; a per-module map is not "
                             "supported")
        model = from_pretrained(cls, path, dtype=dtype, variant=variant, config=config)
        if device_map == "auto":
            device_map = "cuda" if torch.cuda.is_available() else None
        return model.to(device_map) if device_map is not None else model

    def save_pretrained(self, path: str, max_shard_size: int | str = "5GB", overwrite: bool = True) -> None:
        from .io import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, overwrite=overwrite)


_IDS_CHECKED = contextvars.ContextVar("doge_torch_ids_checked", default=False)


def with_attention_impl(model: DogeForCausalLM, impl: str) -> DogeForCausalLM:
    """Switch a model's attention implementation in place (a runtime choice; parameters are untouched), as
    doge_jax.model.with_attention_impl. The config is frozen: this replaces it in the model and every layer."""
    import dataclasses

    cfg = dataclasses.replace(model.config, attention_impl=impl)  # (validated: a bad name raises ConfigError)
    for m in model.modules():
        if getattr(m, "cfg", None) is not None:
            m.cfg = cfg
    model.config = cfg
    return model


@contextlib.contextmanager
def token_ids_checked():
    """Inside this block the model does not check its input_ids: the caller has checked them where they were made
    (on the host, for free), and on a GPU the model's own check would wait for the device (`train_step`)."""
    token = _IDS_CHECKED.set(True)
    try:
        yield
    finally:
        _IDS_CHECKED.reset(token)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids outside [0, vocab) are an error, not silent garbage. Skipped while torch.compile traces (the check
    is a host sync and a graph break) and inside `token_ids_checked()`; eager calls and the training step (on the
    host copy of the batch) still validate."""
    if torch.compiler.is_compiling() or _IDS_CHECKED.get():
        return
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)]
        raise ValueError(f"input_ids contain ids outside [0, vocab_size={vocab_size}): {bad[:10].tolist()}")


def check_labels(labels: torch.Tensor, vocab_size: int) -> None:
    """Labels outside [0, vocab) other than -100 raise ValueError, as doge_jax's do (torch's own error is an
    IndexError or a CUDA assert, depending on the loss path). Skipped where `check_token_ids` is."""
    if torch.compiler.is_compiling() or _IDS_CHECKED.get():
        return
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids (or {IGNORE}), got dtype {labels.dtype}")
    bad = labels[((labels < 0) & (labels != IGNORE)) | (labels >= vocab_size)]
    if bad.numel():
        raise ValueError(f"labels outside [0, vocab_size={vocab_size}) and not {IGNORE}: {bad[:10].tolist()}")
