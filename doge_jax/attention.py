"""Dynamic Mask Attention kernels for doge_jax (spec §3.5-§3.6, design.md §3).

`attention` dispatches on `impl`; every implementation computes the same function:

- `reference`: dense, mirrors transformers step by step (an explicit [B, heads, S, T] bias, top-k over keys when
  T > keep_window). Used for tiny inputs, dropout and the cases the others do not cover.
- `blockwise`: flash-style online softmax over [block_q x block_k] tiles; never materialises S x T. The
  keep-window top-k is applied in its *key-expiry* form (below); tiles with no live key are skipped. Gradients
  via `jax.custom_vjp` (a recomputing blockwise backward).
- `fused`: T <= keep_window and no cache: causal attention plus a per-key bias, the bias folded into one extra head
  dimension so that `jax.nn.dot_product_attention` runs it as plain causal attention (cuDNN flash on GPU).
- `pallas`: no cache, any T: a Pallas (Triton) flash kernel with the bias and the key-expiry mask per tile and a
  FlashAttention-2 backward (doge_jax/pallas_attention.py); for GPUs (interpret mode, slow, elsewhere).

Masks are passed as structure (`MaskInfo`: key padding, query offset, sliding window, number of existing cache
slots), never as a dense [S, T] tensor; the reference builds its dense mask from it.

Key-expiry form of the keep-window rule. Keys carry a total order: larger dt first, lower index on ties (spec §9.1).
Row i keeps key j iff j is allowed in row i and fewer than k = keep_window allowed keys of row i beat j. Without a
sliding window, row i's allowed keys are {j' <= i : valid(j')}, so the number of beaters only grows with i, and
j is kept exactly for j <= i < e_j, where e_j = index of the k-th valid key (anywhere in the sequence) that beats j,
or "never" if fewer than k do. Invalid (padding / not yet written) keys never beat and are never kept (e_j = 0).
With a sliding window W <= k a row has at most k allowed keys, so nothing expires; with W > k and T > k the count
over (i - W, i] is not monotone and we fall back to the reference. All e_j come from one stable sort and a wavelet
matrix (k-th smallest index among the keys ranked above j) in O(T log T), no T x T tensor.

Fully-masked rows (left-padding queries) match transformers: uniform over the existing keys (spec §3.6). This
matters beyond the pad rows themselves, because CDMoE routing mixes tokens across positions (spec §3.8).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp

IMPLS = ("auto", "reference", "blockwise", "fused", "pallas")
BLOCK_Q = 512
BLOCK_K = 512
# `auto` uses the dense reference up to this many score entries per (batch, head), blockwise above (on a GPU fused up
# to keep_window keys, pallas beyond).
# Measured on 2 CPU cores (Doge-20M training step, float32): blockwise 1.02x the reference's tokens/s at seq 512,
# 1.16x at 768, 1.35x at 1024 (benchmarks/RESULTS.md, 2026-11-28).
AUTO_DENSE_MAX = 512 * 512
_NEVER = jnp.iinfo(jnp.int32).max


@dataclasses.dataclass(frozen=True)
class MaskInfo:
    """What a query may see, as structure. Query s sits at key slot `q_offset + s`; key slot j is visible iff
    j <= q_offset + s, key_mask[b, j] (if given), j < num_keys (if given) and q_offset + s - j < sliding_window
    (if given). key_mask is [B, T] bool; q_offset and num_keys are ints or int32 scalars."""

    key_mask: jax.Array | None = None
    q_offset: jax.Array | int = 0
    num_keys: jax.Array | int | None = None
    sliding_window: int | None = None

    def valid_keys(self, B: int, T: int) -> jax.Array:
        """[B, T] bool: key slot exists and is not padding."""
        ok = jnp.ones((B, T), bool) if self.key_mask is None else jnp.broadcast_to(self.key_mask.astype(bool), (B, T))
        if self.num_keys is not None:
            ok = ok & (jnp.arange(T) < self.num_keys)[None]
        return ok

    def dense(self, B: int, S: int, T: int) -> jax.Array:
        """[B or 1, 1, S, T] bool allowed mask (existence via num_keys is handled separately)."""
        qi = self.q_offset + jnp.arange(S)[:, None]
        kj = jnp.arange(T)[None, :]
        ok = kj <= qi
        if self.sliding_window is not None:
            ok = ok & (qi - kj < self.sliding_window)
        ok = ok[None, None]
        if self.key_mask is not None:
            ok = ok & self.key_mask.astype(bool)[:, None, None, :]
        return ok

    def rows_with_keys(self, B: int, S: int, T: int) -> jax.Array:
        """[B, S] bool: query row has at least one allowed key (else it is fully masked)."""
        valid = self.valid_keys(B, T).astype(jnp.int32)
        csum = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), jnp.cumsum(valid, axis=1)], axis=1)  # [B, T+1]
        qi = self.q_offset + jnp.arange(S)
        hi = jnp.clip(qi + 1, 0, T)
        lo = jnp.zeros_like(hi) if self.sliding_window is None else jnp.clip(qi + 1 - self.sliding_window, 0, T)
        return (csum[:, hi] - csum[:, lo]) > 0


# ---- reference ----------------------------------------------------------------------------------------------------

def keep_top_k(bias: jax.Array, k: int) -> jax.Array:
    """Bool mask of the k largest entries per row (last axis); on ties the lower index wins (spec §9.1)."""
    kth = jax.lax.top_k(bias, k)[0][..., -1:]
    greater = bias > kth
    n_needed = k - jnp.sum(greater, axis=-1, keepdims=True)
    equal = bias == kth
    return greater | (equal & (jnp.cumsum(equal, axis=-1) <= n_needed))


def mask_value(dtype, dt_dtype) -> float:
    """The value of a masked bias entry: finfo(activation dtype).min, but never below what dt's dtype holds
    (float32's min in a bf16 cache would round to -inf, and a fully masked row's softmax would be NaN)."""
    return max(float(jnp.finfo(dtype).min), float(jnp.finfo(dt_dtype).min))


def rank_dtype(dtype):
    """The dtype dt is ranked in for the keep-window rule: float32, or float64 for float64 dt (as the top-k)."""
    return jnp.promote_types(dtype, jnp.float32)


def dynamic_bias(dt: jax.Array, allowed: jax.Array, keep_window: int, dtype, num_keys=None) -> jax.Array:
    """dt [B, n, T] and allowed [B, 1, S, T] -> bias [B, n, S, T]: dt where allowed, finfo.min elsewhere (an
    overwrite, not an addition), and only the keep_window largest entries of a row kept when T > keep_window.

    With a fixed-capacity cache only the first `num_keys` slots exist; the rest get -inf, so that they carry no
    weight even in a fully masked row (which transformers makes uniform over its T existing keys, spec §3.6)."""
    min_v = mask_value(dtype, dt.dtype)
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


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, dt: jax.Array, allowed, keep_window: int,
                        dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None, num_keys=None) -> jax.Array:
    """Dense DMA. q [B, H, S, D]; k, v [B, G, T, D]; dt [B, n, T] with n = G (native) or H (small_doge);
    allowed: a MaskInfo or a dense [B, 1, S, T] bool; num_keys = existing key slots (fixed-capacity cache) or
    None (all T; taken from the MaskInfo when one is given). Returns [B, H, S, D]."""
    B, H, S, D = q.shape
    G, T = k.shape[1], k.shape[2]
    r = H // G
    if isinstance(allowed, MaskInfo):
        allowed, num_keys = allowed.dense(B, S, T), allowed.num_keys
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


# ---- key expiry ---------------------------------------------------------------------------------------------------

def _kth_smallest_in_prefix(seq: jax.Array, prefix: jax.Array, k: int) -> jax.Array:
    """seq: a permutation of 0..T-1 [T]; prefix [T] ints. Returns, per query, the k-th smallest (1-based) value of
    seq[:prefix] (garbage where prefix < k). A wavelet matrix: log2(T) stable partitions, then a vectorised walk."""
    T = seq.shape[0]
    bits = max(1, math.ceil(math.log2(T)))
    idx = jnp.arange(T, dtype=jnp.int32)
    zeros, cur = [], seq
    for b in reversed(range(bits)):
        bit = (cur >> b) & 1
        z = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(1 - bit, dtype=jnp.int32)])
        nz = z[-1]
        pos = jnp.where(bit == 0, z[:-1], nz + idx - z[:-1])
        zeros.append(z)
        cur = jnp.zeros_like(cur).at[pos].set(cur, unique_indices=True)
    lo = jnp.zeros_like(prefix)
    hi = prefix
    kk = jnp.full_like(prefix, k - 1)
    res = jnp.zeros_like(prefix)
    for level, b in enumerate(reversed(range(bits))):
        z = zeros[level]
        nz = z[-1]
        zl, zh = z[lo], z[hi]
        c0 = zh - zl
        go0 = kk < c0
        res = jnp.where(go0, res, res | (1 << b))
        kk = jnp.where(go0, kk, kk - c0)
        lo = jnp.where(go0, zl, nz + lo - zl)
        hi = jnp.where(go0, zh, nz + hi - zh)
    return res


def key_expiry(dt: jax.Array, valid: jax.Array, keep_window: int) -> jax.Array:
    """dt [B, n, T], valid [B, T] -> e [B, n, T] int32: key j is kept by query slot i iff j <= i < e_j (no sliding
    window). e_j = slot of the k-th valid key that beats j (larger dt, lower index on ties), _NEVER if fewer than
    k do, 0 for invalid keys."""
    B, n, T = dt.shape
    dt = jax.lax.stop_gradient(dt)
    valid_b = jnp.broadcast_to(valid[:, None, :], dt.shape)
    if T <= keep_window:
        return jnp.where(valid_b, _NEVER, 0).astype(jnp.int32)

    def one(d, ok):
        key = jnp.where(ok, -d.astype(rank_dtype(d.dtype)), jnp.inf)
        perm = jnp.argsort(key, stable=True).astype(jnp.int32)  # key slots, best first; invalid keys last
        rank = jnp.zeros((T,), jnp.int32).at[perm].set(jnp.arange(T, dtype=jnp.int32), unique_indices=True)
        e = _kth_smallest_in_prefix(perm, rank, keep_window)
        return jnp.where(ok, jnp.where(rank >= keep_window, e, _NEVER), 0)

    return jax.vmap(jax.vmap(one, in_axes=(0, None)))(dt, valid).astype(jnp.int32)


def mask_expiry(dt: jax.Array, mask: MaskInfo, keep_window: int) -> jax.Array:
    """Expiry slots [B, n, T] of the keys under `mask` (0 = padding or nonexistent slot): key_expiry without a
    sliding window; with one (W <= keep_window, or T <= keep_window) nothing expires: a row has at most
    keep_window allowed keys."""
    B, _, T = dt.shape
    valid = mask.valid_keys(B, T)
    if mask.sliding_window is None:
        return key_expiry(dt, valid, keep_window)
    return jnp.broadcast_to(jnp.where(valid, _NEVER, 0)[:, None, :], dt.shape).astype(jnp.int32)


# ---- blockwise ----------------------------------------------------------------------------------------------------

def _tile_scores(qb, kb, dtb, eb, qi, j0, window, scale):
    """Scores [B, G, R, bq, bk] (float32, -inf where not kept) for a query block and a key block."""
    B, G, R, bq, D = qb.shape
    bk = kb.shape[2]
    s = jnp.matmul(qb.reshape(B, G, R * bq, D), jnp.swapaxes(kb, -1, -2), preferred_element_type=jnp.float32)
    s = s * jnp.float32(scale)
    s = s.reshape(B, G, R, bq, bk) + dtb[:, :, :, None, :].astype(jnp.float32)
    kj = j0 + jnp.arange(bk, dtype=jnp.int32)
    keep = (kj[None, :] <= qi[:, None]) & (qi[:, None] < eb[:, :, :, None, :])
    if window is not None:
        keep = keep & (qi[:, None] - kj[None, :] < window)
    return jnp.where(keep, s, -jnp.inf), keep


def _block_range(q_off, q0, bq, bk, nk, window, emax):
    """Key-block loop bounds for a query block and a liveness test per key block."""
    first = q_off + q0
    last = first + bq - 1
    hi = jnp.clip(last // bk + 1, 0, nk)
    lo = jnp.int32(0) if window is None else jnp.clip((first - window + 1) // bk, 0, nk)
    return lo, hi, (lambda kb: emax[kb] > first)


def _flash_fwd_impl(q, k, v, dt, e, q_off, window, bq, bk):
    B, G, R, Sp, D = q.shape
    Tp = k.shape[2]
    rr = dt.shape[2]
    nq, nk = Sp // bq, Tp // bk
    scale = D ** -0.5
    emax = jnp.max(e.reshape(B * G * rr, nk, bk), axis=(0, 2))

    def q_block(_, qb_i):
        q0 = qb_i * bq
        qb = jax.lax.dynamic_slice_in_dim(q, q0, bq, axis=3)
        qi = q_off + q0 + jnp.arange(bq, dtype=jnp.int32)
        lo, hi, live = _block_range(q_off, q0, bq, bk, nk, window, emax)

        def step(kb_i, carry):
            def compute(carry):
                m, l, acc = carry
                j0 = kb_i * bk
                kb = jax.lax.dynamic_slice_in_dim(k, j0, bk, axis=2)
                vb = jax.lax.dynamic_slice_in_dim(v, j0, bk, axis=2)
                dtb = jax.lax.dynamic_slice_in_dim(dt, j0, bk, axis=3)
                eb = jax.lax.dynamic_slice_in_dim(e, j0, bk, axis=3)
                s, _ = _tile_scores(qb, kb, dtb, eb, qi, j0, window, scale)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(s - m_safe[..., None])
                corr = jnp.exp(m - m_safe)
                l = l * corr + jnp.sum(p, axis=-1)
                pv = jnp.matmul(p.astype(v.dtype).reshape(B, G, R * bq, bk), vb, preferred_element_type=jnp.float32)
                acc = acc * corr[..., None] + pv.reshape(B, G, R, bq, D)
                return m_new, l, acc

            return jax.lax.cond(live(kb_i), compute, lambda c: c, carry)

        init = (jnp.full((B, G, R, bq), -jnp.inf, jnp.float32), jnp.zeros((B, G, R, bq), jnp.float32),
                jnp.zeros((B, G, R, bq, D), jnp.float32))
        m, l, acc = jax.lax.fori_loop(lo, hi, step, init)
        o = acc / jnp.where(l > 0, l, 1.0)[..., None]
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
        return None, (o.astype(q.dtype), lse)

    _, (o, lse) = jax.lax.scan(q_block, None, jnp.arange(nq, dtype=jnp.int32))
    o = jnp.moveaxis(o, 0, 3).reshape(B, G, R, Sp, D)
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, G, R, Sp)
    return o, lse


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, dt, e, q_off, window, bq, bk):
    return _flash_fwd_impl(q, k, v, dt, e, q_off, window, bq, bk)[0]


def _flash_fwd(q, k, v, dt, e, q_off, window, bq, bk):
    o, lse = _flash_fwd_impl(q, k, v, dt, e, q_off, window, bq, bk)
    return o, (q, k, v, dt, e, q_off, o, lse)


def _flash_bwd(window, bq, bk, res, do):
    q, k, v, dt, e, q_off, o, lse = res
    B, G, R, Sp, D = q.shape
    Tp = k.shape[2]
    rr = dt.shape[2]
    nq, nk = Sp // bq, Tp // bk
    scale = D ** -0.5
    emax = jnp.max(e.reshape(B * G * rr, nk, bk), axis=(0, 2))
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, G, R, Sp]
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def q_block(carry, qb_i):
        dk, dv, ddt = carry
        q0 = qb_i * bq
        qb = jax.lax.dynamic_slice_in_dim(q, q0, bq, axis=3)
        dob = jax.lax.dynamic_slice_in_dim(do, q0, bq, axis=3)
        lseb = jax.lax.dynamic_slice_in_dim(lse_safe, q0, bq, axis=3)
        deltab = jax.lax.dynamic_slice_in_dim(delta, q0, bq, axis=3)
        qi = q_off + q0 + jnp.arange(bq, dtype=jnp.int32)
        lo, hi, live = _block_range(q_off, q0, bq, bk, nk, window, emax)

        def step(kb_i, c):
            def compute(c):
                dq, dk, dv, ddt = c
                j0 = kb_i * bk
                kb = jax.lax.dynamic_slice_in_dim(k, j0, bk, axis=2)
                vb = jax.lax.dynamic_slice_in_dim(v, j0, bk, axis=2)
                dtb = jax.lax.dynamic_slice_in_dim(dt, j0, bk, axis=3)
                eb = jax.lax.dynamic_slice_in_dim(e, j0, bk, axis=3)
                s, keep = _tile_scores(qb, kb, dtb, eb, qi, j0, window, scale)
                p = jnp.where(keep, jnp.exp(s - lseb[..., None]), 0.0)  # [B, G, R, bq, bk]
                p2 = p.reshape(B, G, R * bq, bk)
                do2 = dob.reshape(B, G, R * bq, D).astype(jnp.float32)
                dvb = jnp.matmul(jnp.swapaxes(p2, -1, -2), do2)
                dp = jnp.matmul(do2, jnp.swapaxes(vb.astype(jnp.float32), -1, -2)).reshape(B, G, R, bq, bk)
                ds = p * (dp - deltab[..., None])
                ds2 = ds.reshape(B, G, R * bq, bk)
                dq = dq + (jnp.matmul(ds2, kb.astype(jnp.float32)) * scale).reshape(B, G, R, bq, D)
                dkb = jnp.matmul(jnp.swapaxes(ds2, -1, -2), qb.reshape(B, G, R * bq, D).astype(jnp.float32)) * scale
                ddtb = jnp.sum(ds, axis=3)  # [B, G, R, bk]
                if rr == 1:
                    ddtb = jnp.sum(ddtb, axis=2, keepdims=True)

                def add(acc, upd, axis):
                    cur = jax.lax.dynamic_slice_in_dim(acc, j0, bk, axis=axis)
                    return jax.lax.dynamic_update_slice_in_dim(acc, cur + upd, j0, axis=axis)

                return dq, add(dk, dkb, 2), add(dv, dvb, 2), add(ddt, ddtb, 3)

            return jax.lax.cond(live(kb_i), compute, lambda c: c, c)

        dq0 = jnp.zeros((B, G, R, bq, D), jnp.float32)
        dq, dk, dv, ddt = jax.lax.fori_loop(lo, hi, step, (dq0, dk, dv, ddt))
        return (dk, dv, ddt), dq

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32), jnp.zeros(dt.shape, jnp.float32))
    (dk, dv, ddt), dq = jax.lax.scan(q_block, init, jnp.arange(nq, dtype=jnp.int32))
    dq = jnp.moveaxis(dq, 0, 3).reshape(B, G, R, Sp, D)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), ddt.astype(dt.dtype), None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def blockwise_supported(T: int, keep_window: int, mask: MaskInfo) -> bool:
    """The expiry form is exact unless a sliding window wider than keep_window meets T > keep_window."""
    w = mask.sliding_window
    return T <= keep_window or w is None or w <= keep_window


def attention_blockwise(q, k, v, dt, mask: MaskInfo, keep_window: int, block_q: int = BLOCK_Q,
                        block_k: int = BLOCK_K) -> jax.Array:
    """Blockwise DMA (same arguments as `attention`, mask as MaskInfo). Returns [B, H, S, D]."""
    B, H, S, D = q.shape
    G, T = k.shape[1], k.shape[2]
    R = H // G
    n = dt.shape[1]
    if not blockwise_supported(T, keep_window, mask):
        raise ValueError("blockwise attention: sliding_window > keep_window with T > keep_window is not supported")
    e = mask_expiry(dt, mask, keep_window)
    bq = min(block_q, _round_up(S, 8))
    bk = min(block_k, _round_up(T, 8))
    Sp, Tp = _round_up(S, bq), _round_up(T, bk)
    rr = 1 if n == G else R
    qg = jnp.pad(q.reshape(B, G, R, S, D), ((0, 0),) * 3 + ((0, Sp - S), (0, 0)))
    kp = jnp.pad(k, ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
    dtp = jnp.pad(dt.reshape(B, G, rr, T), ((0, 0),) * 3 + ((0, Tp - T),))
    ep = jnp.pad(e.reshape(B, G, rr, T), ((0, 0),) * 3 + ((0, Tp - T),))
    q_off = jnp.asarray(mask.q_offset, jnp.int32)
    o = _flash(qg, kp, vp, dtp, ep, q_off, mask.sliding_window, bq, bk)[:, :, :, :S]
    return _fill_masked_rows(o, qg[:, :, :, :S], k, v, mask).reshape(B, H, S, D)
    return o.reshape(B, H, S, D)


# ---- fully-masked rows --------------------------------------------------------------------------------------------

@jax.custom_vjp
def _uniform_rows(q, k, v, exists):
    """Output of rows whose keys are all masked, as transformers computes them: every logit is q.k*scale +
    finfo.min, which rounds to finfo.min, so the softmax is uniform over the existing keys and the value is the
    mean of v. The gradient is the one of that expression (softmax at uniform p, d/dlogits = 1): nonzero for q and
    k, which matters when such rows feed real tokens (CDMoE routing mixes positions, spec §3.8).
    q [B, G, R, S, D]; k, v [B, G, T, D]; exists [T] float (1 = slot exists). Returns [B, G, R, S, D]."""
    return _uniform_rows_fwd(q, k, v, exists)[0]


def _uniform_rows_fwd(q, k, v, exists):
    n = jnp.sum(exists)
    mean_v = jnp.einsum("bgtd,t->bgd", v, exists.astype(v.dtype)) / n.astype(v.dtype)
    return jnp.broadcast_to(mean_v[:, :, None, None, :], q.shape[:4] + v.shape[-1:]), (q, k, v, exists, mean_v)


def _uniform_rows_bwd(res, g):
    q, k, v, exists, mean_v = res
    n = jnp.sum(exists).astype(jnp.float32)
    scale = q.shape[-1] ** -0.5
    ex = exists.astype(jnp.float32)[:, None]
    g = g.astype(jnp.float32)
    vc = (v.astype(jnp.float32) - mean_v[:, :, None, :].astype(jnp.float32)) * ex  # [B, G, T, D]
    c = jnp.einsum("bgtk,bgtv->bgkv", k.astype(jnp.float32), vc)
    dq = jnp.einsum("bgkv,bgrsv->bgrsk", c, g) * (scale / n)
    p = jnp.einsum("bgrsk,bgrsv->bgkv", q.astype(jnp.float32), g)
    dk = jnp.einsum("bgkv,bgtv->bgtk", p, vc) * (scale / n)
    dv = jnp.broadcast_to(jnp.sum(g, axis=(2, 3))[:, :, None, :], v.shape) * ex / n
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), jnp.zeros_like(exists)


_uniform_rows.defvjp(_uniform_rows_fwd, _uniform_rows_bwd)


def _fill_masked_rows(o, qg, k, v, mask: MaskInfo):
    """o, qg [B, G, R, S, D]: replace the rows with no allowed key by the reference's uniform rows. Without key
    padding every query sees at least its own slot, so nothing is replaced."""
    if mask.key_mask is None:
        return o
    B, G, R, S, _ = o.shape
    T = k.shape[2]
    exists = jnp.ones((T,), jnp.float32) if mask.num_keys is None else (
        jnp.arange(T) < mask.num_keys).astype(jnp.float32)
    has = mask.rows_with_keys(B, S, T)[:, None, None, :, None]
    return jnp.where(has, o, _uniform_rows(qg, k, v, exists).astype(o.dtype))


# ---- fused --------------------------------------------------------------------------------------------------------

def fused_supported(S: int, T: int, keep_window: int, mask: MaskInfo) -> bool:
    static_zero = isinstance(mask.q_offset, int) and mask.q_offset == 0
    return T <= keep_window and S == T and mask.num_keys is None and static_zero


# Large negative logit offset for padding keys in the folded bias column: exp() of it underflows to 0 in any
# dtype, and it stays finite in bf16 (cuDNN's own mask value is -2**41); float16 takes half its finfo.min (an inf
# there would meet a zero gradient in the backward: 0 * inf = NaN).
_PAD_BIAS = -(2.0 ** 40)


def pad_bias(dtype) -> float:
    """The padding keys' bias in `dtype`: _PAD_BIAS, or half of finfo.min where that is smaller (float16)."""
    return max(_PAD_BIAS, float(jnp.finfo(dtype).min) / 2)


def fold_bias(q, k, v, dt, valid=None, pad_v: bool = True):
    """Fold the per-key bias into one extra head dimension (design.md §3): q' = [q * scale, 1, 0...],
    k' = [k, b, 0...], v' = [v, 0...], padded to a multiple of 8, so that q'.k' = q.k * scale + b_j and plain
    causal attention with scale 1 computes DMA (gradients included: dk'[..., D] is d(dt)). b = dt, or a large
    negative number for padding keys (`valid` [B, T] bool). q [B, H, S, D]; k, v [B, G, T, D]; dt [B, n, T] with
    n = G or H (kv heads are repeated to the query heads when n = H > G). Returns (q', k', v'); pad_v=False: v'
    is v (for a kernel that takes values narrower than q' and k': v's extra columns are zeros, o'[..., :D] the same)."""
    B, H, S, D = q.shape
    G, T = k.shape[1], k.shape[2]
    if dt.shape[1] != G:
        k, v = jnp.repeat(k, H // G, axis=1), jnp.repeat(v, H // G, axis=1)
        G = H
    b = dt.astype(q.dtype)
    if valid is not None:
        b = jnp.where(valid[:, None, :], b, jnp.asarray(pad_bias(q.dtype), q.dtype))
    pad = _round_up(D + 1, 8) - D - 1
    qa = jnp.concatenate([q * jnp.asarray(D ** -0.5, q.dtype), jnp.ones((B, H, S, 1), q.dtype),
                          jnp.zeros((B, H, S, pad), q.dtype)], axis=-1)
    ka = jnp.concatenate([k, b[..., None], jnp.zeros((B, G, T, pad), k.dtype)], axis=-1)
    va = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, pad + 1))) if pad_v else v
    return qa, ka, va


# How `fused` folds the bias: "qk" (`fold_bias`: one extra q/k head dim; at D = 128 the padded 136 runs cuDNN's
# 192-wide kernels, whose backward took 4.5x the forward on an H200) or "v" (`fold_bias_v`: weights on the values,
# q and k stay at D). "v" is not yet timed on a GPU (benchmarks/headdim_probe.py; gpu_check's "[v-side fold]" row).
FUSED_FOLD = "qk"
# The "qk" fold on a GPU without padding v to q' and k's width (cuDNN takes d_v 128 with d_qk 136, through JAX's
# cuDNN wrapper; cuDNN >= 9.10 on Hopper): no v padding, no o[..., :D] slice, no padded dO: 7.2 GiB less traffic per
# Doge-160M step by benchmarks/hlo_traffic.py. Off until a GPU times it (gpu_check --probes "[fewer bytes]"; a
# refusal at trace time falls back to the padded call). Read when traced.
FUSED_V_UNPADDED = False
# the "v" fold's weights exp(b - max b) stay far from underflow while the keys' bias spans at most this much (any
# batch row or head beyond it: the "qk" fold runs for the whole call; lax.cond, whose predicate XLA's GPU
# conditional reads on the host: a sync per call)
V_FOLD_MAX_SPREAD = 60.0


def fold_bias_v(v, dt, valid=None):
    """Fold the per-key bias into the values: softmax_j(s_ij + b_j) = softmax_j(s_ij) * w_j / sum_j(...) with
    w_j = exp(b_j - c), c = max_j b_j, so DMA = o'[:D] / o'[D] for plain causal attention o' over v' = [w * v, w, 0...]
    (padded to a multiple of 8; padding keys get w = 0). v [B, G, T, D]; dt [B, n, T] (n = G or H: v is repeated to
    the query heads when n = H > G); valid [B, T] bool or None. Returns (v', ok): ok (a traced bool) says that b
    spans at most V_FOLD_MAX_SPREAD over the valid keys of every batch row and head (else weights may underflow)."""
    B, G, T, D = v.shape
    n = dt.shape[1]
    if n != G:
        v = jnp.repeat(v, n // G, axis=1)
    b = dt.astype(jnp.promote_types(dt.dtype, jnp.float32))
    live = jnp.ones((B, 1, T), bool) if valid is None else valid[:, None, :]
    # c cancels out of o'[:D] / o'[D]: no gradient through it (only its rounding would flow)
    c = jax.lax.stop_gradient(jnp.max(jnp.where(live, b, -jnp.inf), axis=-1, keepdims=True))
    lo = jnp.min(jnp.where(live, b, jnp.inf), axis=-1, keepdims=True)
    ok = jnp.all(jnp.where(jnp.isfinite(c), c - lo, 0.0) <= V_FOLD_MAX_SPREAD)  # (no valid key: nothing to span)
    c = jnp.where(jnp.isfinite(c), c, 0.0)
    w = jnp.where(live, jnp.exp(jnp.where(live, b, c) - c), 0.0)[..., None]  # padding keys: no exp overflow
    pad = _round_up(D + 1, 8) - D - 1
    va = jnp.concatenate([(v * w).astype(v.dtype), w.astype(v.dtype), jnp.zeros((B, n, T, pad), v.dtype)], axis=-1)
    return va, ok


def platform() -> str:
    """The backend the attention paths are chosen for (jax.default_backend()); benchmarks/hlo_traffic.py replaces it
    to trace the GPU paths on a machine without one."""
    return jax.default_backend()


def _cudnn_causal(q, k, v, scale: float, window: int | None = None):
    """cuDNN's fused causal attention (q [B, S, H, Dqk], k [B, T, G, Dqk], v [B, T, G, Dv]) through JAX's cuDNN
    wrapper, which takes Dv != Dqk where jax.nn.dot_product_attention does not; None off a GPU, outside 16-bit, or
    where the wrapper refuses the shapes at trace time."""
    if platform() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        return None
    try:
        from jax._src.cudnn.fused_attention_stablehlo import MaskType
        from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

        return cudnn_attention(q, k, v, scale=scale, mask_type=MaskType.CAUSAL, qkv_layout="BTNH",
                               sliding_window_length=window)
    except (ImportError, ValueError, NotImplementedError, TypeError, RuntimeError):
        return None


def _causal_attention_v(q, k, va):
    """Causal attention with values wider than queries and keys (q [B, S, H, D], k [B, T, G, D], va [B, T, G, Dv];
    scale D**-0.5): cuDNN's fused kernel in 16-bit on a GPU (through JAX's cuDNN wrapper, which allows Dv != D where
    jax.nn.dot_product_attention does not), else XLA with q and k zero-padded to Dv."""
    D, Dv = q.shape[-1], va.shape[-1]
    o = _cudnn_causal(q, k, va, D ** -0.5)
    if o is not None:
        return o
    z = ((0, 0),) * 3 + ((0, Dv - D),)
    return jax.nn.dot_product_attention(jnp.pad(q, z), jnp.pad(k, z), va, is_causal=True, scale=D ** -0.5)


def attention_fused(q, k, v, dt, mask: MaskInfo, keep_window: int) -> jax.Array:
    """T <= keep_window, no cache: DMA is causal attention plus a per-key bias, folded into the head dimension
    (`fold_bias`) so that a plain causal flash kernel runs it (cuDNN on GPU), or with FUSED_FOLD = "v" into the
    values (`fold_bias_v`; the "qk" fold where the bias spans too much or with a sliding window). Padding keys get
    a large negative bias (zero weight); rows with no key at all are replaced by the reference's uniform rows."""
    B, H, S, D = q.shape
    G = k.shape[1]
    if not fused_supported(S, k.shape[2], keep_window, mask):
        raise ValueError("fused attention needs T <= keep_window and no cache (S == T, q_offset 0)")
    valid = None if mask.key_mask is None else mask.key_mask.astype(bool)
    if FUSED_FOLD == "v" and mask.sliding_window is None and q.dtype != jnp.float16:  # (float16: weights underflow)
        va, ok = fold_bias_v(v, dt, valid)
        kr = k if dt.shape[1] == G else jnp.repeat(k, H // G, axis=1)
        if valid is not None:
            # padding keys (weight 0) still take softmax mass: at score 0 they cannot outweigh the valid keys by the
            # e^-100 or so that would underflow o'[D] to 0 (an unbounded padding score could)
            kr = jnp.where(valid[:, None, :, None], kr, jnp.zeros((), kr.dtype))

        def by_values(q, kr, va, k, v, dt):
            o = _causal_attention_v(*(x.transpose(0, 2, 1, 3) for x in (q, kr, va)))
            o = o.transpose(0, 2, 1, 3).astype(jnp.promote_types(o.dtype, jnp.float32))  # [B, H, S, Dv]
            den = o[..., D:D + 1]
            return (o[..., :D] / jnp.where(den > 0, den, 1.0)).astype(q.dtype)

        def by_keys(q, kr, va, k, v, dt):
            return _fused_qk(q, k, v, dt, valid, mask.sliding_window)

        o = jax.lax.cond(ok, by_values, by_keys, q, kr, va, k, v, dt)
    else:
        o = _fused_qk(q, k, v, dt, valid, mask.sliding_window)
    o = o.reshape(B, G, H // G, S, D)
    return _fill_masked_rows(o, q.reshape(B, G, H // G, S, D), k, v, mask).reshape(B, H, S, D)


def _fused_qk(q, k, v, dt, valid, w):
    """The "qk" fold's attention: [B, H, S, D]."""
    B, H, S, D = q.shape
    if FUSED_V_UNPADDED:
        qa, ka, va = fold_bias(q, k, v, dt, valid, pad_v=False)
        o = _cudnn_causal(*(x.transpose(0, 2, 1, 3) for x in (qa, ka, va)), 1.0, w)
        if o is not None:
            return o.transpose(0, 2, 1, 3)
    qa, ka, va = fold_bias(q, k, v, dt, valid)
    args = tuple(x.transpose(0, 2, 1, 3) for x in (qa, ka, va))  # BNTH -> BTNH
    kwargs = dict(is_causal=True, scale=1.0, local_window_size=None if w is None else (w - 1, 0))
    o = None
    if platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        # implementation=None always means XLA in this JAX; ask for cuDNN's flash kernel explicitly and fall back
        # to XLA when it refuses the shapes (it checks them at trace time).
        try:
            o = jax.nn.dot_product_attention(*args, implementation="cudnn", **kwargs)
        except (ValueError, NotImplementedError, TypeError, RuntimeError):
            o = None
    if o is None:
        o = jax.nn.dot_product_attention(*args, **kwargs)
    return o[..., :D].transpose(0, 2, 1, 3)


# ---- pallas -------------------------------------------------------------------------------------------------------

def pallas_supported(S: int, T: int, D: int, keep_window: int, mask: MaskInfo) -> bool:
    static_zero = isinstance(mask.q_offset, int) and mask.q_offset == 0
    return (S == T and mask.num_keys is None and static_zero and D >= 16 and D & (D - 1) == 0
            and blockwise_supported(T, keep_window, mask))


def attention_pallas(q, k, v, dt, mask: MaskInfo, keep_window: int) -> jax.Array:
    """No cache (S == T): the Pallas flash kernel of doge_jax.pallas_attention (GPU; interpret mode elsewhere),
    with the keep window in key-expiry form, padding keys as expired, fully padded rows as in the reference."""
    from doge_jax.pallas_attention import dma_pallas

    B, H, S, D = q.shape
    G, T = k.shape[1], k.shape[2]
    if not pallas_supported(S, T, D, keep_window, mask):
        raise ValueError("pallas attention needs S == T (no cache), a power-of-two head dim >= 16, and no sliding "
                         "window wider than keep_window when T > keep_window")
    e = mask_expiry(dt, mask, keep_window)
    o = dma_pallas(q, k, v, dt, e, window=mask.sliding_window, keep=keep_window).reshape(B, G, H // G, S, D)
    return _fill_masked_rows(o, q.reshape(B, G, H // G, S, D), k, v, mask).reshape(B, H, S, D)


# ---- dispatch -----------------------------------------------------------------------------------------------------

def choose_impl(impl: str, S: int, T: int, keep_window: int, mask: MaskInfo, dropout: bool,
                head_dim: int = 128, backend: str | None = None, devices: int | None = None,
                q_elements: int = 0) -> str:
    """Resolve `impl` to the implementation that will run on `backend` with `devices` devices (default: JAX's),
    for a query of `q_elements` elements (B*H*S*D: `auto` leaves the Pallas kernels where their 32-bit offsets
    would not cover it).
    Explicit choices fall back to the reference only where they cannot compute the function (dropout; blockwise
    with sliding_window > keep_window < T); `fused` beyond its range (T > keep_window, cache) and `pallas` beyond
    its (cache, head dim) run blockwise."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r}: must be one of {IMPLS}")
    if dropout:
        return "reference"
    if impl == "fused" and not fused_supported(S, T, keep_window, mask):
        impl = "blockwise"
    if impl == "pallas" and not pallas_supported(S, T, head_dim, keep_window, mask):
        impl = "blockwise"
    if impl == "blockwise" and not blockwise_supported(T, keep_window, mask):
        return "reference"
    if impl != "auto":
        return impl
    if not blockwise_supported(T, keep_window, mask) or S * T <= AUTO_DENSE_MAX:
        return "reference"
    if (backend or platform()) == "gpu":
        if fused_supported(S, T, keep_window, mask):
            return "fused"
        # beyond the keep window the Pallas kernels: H200, bf16, forward+backward at 8k / 16k keys 1.67x / 1.05x
        # flash causal, blockwise 12.9x / 18.3x (benchmarks/RESULTS.md, 2026-11-30). One device only: XLA cannot
        # partition the kernel's custom call over a mesh (it would gather the whole batch onto every device).
        one = (devices or jax.device_count()) == 1
        # dma_pallas refuses B*H*T*D past 32-bit offsets, T padded to the blocks (<= 128) plus a spare key block
        fits = q_elements // max(S, 1) * (-(-T // 128) * 128 + 128) < 2 ** 31
        if one and fits and pallas_supported(S, T, head_dim, keep_window, mask):
            return "pallas"
    return "blockwise"


def attention(q, k, v, dt, mask, keep_window: int, impl: str = "reference", dropout_rate: float = 0.0,
              dropout_rng=None, num_keys=None) -> jax.Array:
    """Dynamic Mask Attention. q [B, H, S, D]; k, v [B, G, T, D]; dt [B, n, T]; mask: MaskInfo (or a dense
    [B, 1, S, T] bool for the reference, with num_keys). Returns [B, H, S, D]."""
    if not isinstance(mask, MaskInfo):  # dense legacy form: reference only
        return attention_reference(q, k, v, dt, mask, keep_window, dropout_rate, dropout_rng, num_keys)
    S, T = q.shape[2], k.shape[2]
    dropout = dropout_rate > 0.0 and dropout_rng is not None
    which = choose_impl(impl, S, T, keep_window, mask, dropout, q.shape[-1], q_elements=q.size)
    if which == "reference":
        return attention_reference(q, k, v, dt, mask, keep_window, dropout_rate, dropout_rng)
    if which == "fused":
        return attention_fused(q, k, v, dt, mask, keep_window)
    if which == "pallas":
        return attention_pallas(q, k, v, dt, mask, keep_window)
    return attention_blockwise(q, k, v, dt, mask, keep_window)
