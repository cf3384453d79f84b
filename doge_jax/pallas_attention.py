"""Dynamic Mask Attention as a Pallas kernel for GPUs (Triton lowering): flash attention with the per-key bias
and the keep-window rule in key-expiry form applied per tile (design.md §3), forward and backward.

Why: on an H200 the pure-JAX `blockwise` implementation ran forward+backward at 16k tokens 47x slower than flash
causal attention (benchmarks/RESULTS.md); its tiles are XLA loops of small kernels. Here one kernel instance owns a
query block (forward, dq) or a key block (dk, dv, d(dt)), as in FlashAttention-2, so d(dt_j) = sum_i dS_ij is a
per-key-block reduction with no atomics (the cost FlexAttention pays for a differentiable bias).

Function (spec §3.5): s_ij = q_i . k_j * scale + dt_j; query i sees key j iff j <= i < e_j (and i - j < window
when a sliding window is set), where e_j is the key's expiry slot (`attention.key_expiry`); 0 marks padding keys.
q [B, H, T, D], k/v [B, G, T, D], dt/e per query head [B, H, T]. Only S == T with no cache (training, prefill).

Off GPU the kernels run in Pallas interpret mode (tests); choose this implementation on a GPU.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# masked scores: finite, so a tile whose row is fully masked gives no NaN (rescaled away by any live score)
MASK = -0.7 * float(jnp.finfo(jnp.float32).max)
BLOCK_Q = 64
BLOCK_K = 64
# the dk/dv/d(dt) kernel steps through the queries 32 at a time (as doge_torch's Triton kernel: 64 spills registers
# at D = 128 there)
BLOCK_Q_DKV = 32


def _dot(a, b):
    """A tile product. HIGHEST: float32 inputs get IEEE products (Triton's default for them is TF32); bfloat16
    inputs are unaffected (bf16 products, float32 accumulation)."""
    return plgpu.dot(a, b, precision=jax.lax.Precision.HIGHEST)


def _acc(dtype):
    """Accumulator dtype: float32 (float64 for float64 inputs, used to check rounding in tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def _scores(q, k, dt, e, qi, kj, scale, window):
    """Scores of one tile, masked: [bq, bk] float32. Natural-exp domain, as the reference (on GPU Triton's exp is
    an exp2 of a product anyway; rescaling the scores to log2 units here would add a rounding step that the
    ill-conditioned d(dt) amplifies)."""
    s = _dot(q, k.T) * scale + dt[None, :]
    keep = (kj[None, :] <= qi[:, None]) & (qi[:, None] < e[None, :])
    if window is not None:
        keep = keep & (qi[:, None] - kj[None, :] < window)
    return jnp.where(keep, s, MASK)


def _fwd_kernel(q_ref, k_ref, v_ref, dt_ref, e_ref, o_ref, lse_ref, *, scale, window, bq, bk):
    qb = pl.program_id(0)
    q = q_ref[...]
    qi = qb * bq + jnp.arange(bq)
    f = _acc(q.dtype)

    def body(kb, carry):
        acc, m, l = carry
        sl = pl.ds(kb * bk, bk)
        v = v_ref[sl, :]
        s = _scores(q, k_ref[sl, :], dt_ref[sl], e_ref[sl], qi, kb * bk + jnp.arange(bk), scale, window)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = l * corr + jnp.sum(p, axis=1)
        acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    hi = lax_div_up((qb + 1) * bq, bk)  # causal: no key block past the diagonal
    lo = 0 if window is None else jnp.maximum(qb * bq - window + 1, 0) // bk
    D = q_ref.shape[-1]
    init = (jnp.zeros((bq, D), f), jnp.full((bq,), -jnp.inf, f), jnp.zeros((bq,), f))
    acc, m, l = jax.lax.fori_loop(lo, hi, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def lax_div_up(x, m: int):
    """ceil(x / m) for a non-negative traced int32 (Triton lowering has no floor division)."""
    x = jnp.asarray(x, jnp.int32)
    return jax.lax.div(x + jnp.int32(m - 1), jnp.int32(m))


def _dq_kernel(q_ref, k_ref, v_ref, dt_ref, e_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, window, bq, bk):
    qb = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    qi = qb * bq + jnp.arange(bq)

    def body(kb, dq):
        sl = pl.ds(kb * bk, bk)
        k, v = k_ref[sl, :], v_ref[sl, :]
        s = _scores(q, k, dt_ref[sl], e_ref[sl], qi, kb * bk + jnp.arange(bk), scale, window)
        p = jnp.exp(s - lse[:, None])
        ds = p * (_dot(do, v.T) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    hi = lax_div_up((qb + 1) * bq, bk)
    lo = 0 if window is None else jnp.maximum(qb * bq - window + 1, 0) // bk
    dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, _acc(q.dtype)))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, dt_ref, e_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, ddt_ref, *, scale,
                window, bq, bk, r, nq):
    """One key block of one kv head: loops over the r query heads of its group and the query blocks that can see
    it (from the diagonal to the last query any of its keys is alive for)."""
    kb = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    kj = kb * bk + jnp.arange(bk)
    sl_k = pl.ds(kb * bk, bk)
    f = _acc(k.dtype)
    dk = jnp.zeros(k.shape, f)
    dv = jnp.zeros(v.shape, f)
    for j in range(r):
        dt, e = dt_ref[j, sl_k], e_ref[j, sl_k]

        def body(qb, carry, j=j, dt=dt, e=e):
            dk, dv, ddt = carry
            sl = pl.ds(qb * bq, bq)
            q, do = q_ref[j, sl, :], do_ref[j, sl, :]
            lse, delta = lse_ref[j, sl], delta_ref[j, sl]
            s = _scores(q, k, dt, e, qb * bq + jnp.arange(bq), kj, scale, window)
            p = jnp.exp(s - lse[:, None])
            dv = dv + _dot(p.astype(do.dtype).T, do)
            ds = p * (_dot(do, v.T) - delta[:, None])
            dk = dk + _dot(ds.astype(q.dtype).T, q)
            return dk, dv, ddt + jnp.sum(ds, axis=0)

        lo = (kb * bk) // bq
        last = jnp.max(e)  # no query at or past the latest expiry sees this block
        if window is not None:
            last = jnp.minimum(last, kb * bk + bk - 1 + window)
        hi = jnp.minimum(lax_div_up(jnp.minimum(last, nq * bq), bq), nq)
        dk, dv, ddt = jax.lax.fori_loop(lo, jnp.maximum(hi, lo), body, (dk, dv, jnp.zeros((bk,), f)))
        ddt_ref[j, :] = ddt
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs_q(bq, D):
    return pl.BlockSpec((None, None, bq, D), lambda i, b, h: (b, h, i, 0))


def _forward(q, k, v, dt, e, scale, window, bq, bk, interpret):
    B, H, T, D = q.shape
    G = k.shape[1]
    r = H // G
    full_kv = pl.BlockSpec((None, None, T, D), lambda i, b, h: (b, h // r, 0, 0))
    per_head = pl.BlockSpec((None, None, T), lambda i, b, h: (b, h, 0))
    o, lse = pl.pallas_call(
        partial(_fwd_kernel, scale=scale, window=window, bq=bq, bk=bk),
        grid=(T // bq, B, H),
        in_specs=[_specs_q(bq, D), full_kv, full_kv, per_head, per_head],
        out_specs=[_specs_q(bq, D), pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, T), _acc(q.dtype))],
        compiler_params=plgpu.CompilerParams(num_warps=4 if D <= 64 else 8, num_stages=2),
        interpret=interpret,
        name="doge_dma_forward",
    )(q, k, v, dt, e)
    return o, lse


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _dma(q, k, v, dt, e, scale, window, bq, bk, interpret):
    return _forward(q, k, v, dt, e, scale, window, bq, bk, interpret)[0]


def _dma_fwd(q, k, v, dt, e, scale, window, bq, bk, interpret):
    o, lse = _forward(q, k, v, dt, e, scale, window, bq, bk, interpret)
    return o, (q, k, v, dt, e, o, lse)


def _dma_bwd(scale, window, bq, bk, interpret, res, do):
    q, k, v, dt, e, o, lse = res
    B, H, T, D = q.shape
    G = k.shape[1]
    r = H // G
    f = _acc(q.dtype)
    delta = jnp.sum(o.astype(f) * do.astype(f), axis=-1)
    params = plgpu.CompilerParams(num_warps=4 if D <= 64 else 8, num_stages=2)
    full_kv = pl.BlockSpec((None, None, T, D), lambda i, b, h: (b, h // r, 0, 0))
    per_head = pl.BlockSpec((None, None, T), lambda i, b, h: (b, h, 0))
    row = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    dq = pl.pallas_call(
        partial(_dq_kernel, scale=scale, window=window, bq=bq, bk=bk),
        grid=(T // bq, B, H),
        in_specs=[_specs_q(bq, D), full_kv, full_kv, per_head, per_head, _specs_q(bq, D), row, row],
        out_specs=_specs_q(bq, D),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="doge_dma_dq",
    )(q, k, v, dt, e, do, lse, delta)
    group_rows = pl.BlockSpec((None, r, T, D), lambda i, b, g: (b, g, 0, 0))
    group_vec = pl.BlockSpec((None, r, T), lambda i, b, g: (b, g, 0))
    kv_block = pl.BlockSpec((None, None, bk, D), lambda i, b, g: (b, g, i, 0))
    bq2 = min(bq, BLOCK_Q_DKV)
    dk, dv, ddt = pl.pallas_call(
        partial(_dkv_kernel, scale=scale, window=window, bq=bq2, bk=bk, r=r, nq=T // bq2),
        grid=(T // bk, B, G),
        in_specs=[group_rows, kv_block, kv_block, group_vec, group_vec, group_rows, group_vec, group_vec],
        out_specs=[kv_block, kv_block, pl.BlockSpec((None, r, bk), lambda i, b, g: (b, g, i))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct((B, H, T), f)],
        compiler_params=params,
        interpret=interpret,
        name="doge_dma_dkv",
    )(q, k, v, dt, e, do, lse, delta)
    return dq, dk, dv, ddt.astype(dt.dtype), None


_dma.defvjp(_dma_fwd, _dma_bwd)


def dma_pallas(q, k, v, dt, e, window: int | None = None, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
               interpret: bool | None = None) -> jax.Array:
    """q [B, H, T, D], k/v [B, G, T, D], dt [B, n, T] (n = G or H), e [B, n, T] int32 expiry slots (0 = padding
    key). Returns [B, H, T, D]; differentiable in q, k, v, dt. T is padded to a multiple of the blocks; D must be
    a power of two >= 16 (Triton tiles)."""
    B, H, T, D = q.shape
    n = dt.shape[1]
    if D < 16 or D & (D - 1):
        raise ValueError(f"pallas attention needs a power-of-two head dim >= 16, got {D}")
    if B * H * (-(-T // max(block_q, block_k)) * max(block_q, block_k)) * D >= 2 ** 31:
        # the Triton lowering addresses each array with 32-bit offsets
        raise ValueError(f"pallas attention: B*H*T*D = {B * H * T * D} needs 64-bit offsets; split the batch")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    blk = max(block_q, block_k)
    Tp = -(-T // blk) * blk
    if n != H:
        dt, e = jnp.repeat(dt, H // n, axis=1), jnp.repeat(e, H // n, axis=1)
    pad = ((0, 0), (0, 0), (0, Tp - T))
    q, k, v = (jnp.pad(x, pad + ((0, 0),)) for x in (q, k, v))
    dt = jnp.pad(dt.astype(_acc(q.dtype)), pad)
    e = jnp.pad(e.astype(jnp.int32), pad)  # padding keys: expired before they exist
    o = _dma(q, k, v, dt, e, D ** -0.5, window, block_q, block_k, interpret)
    return o[:, :, :T]
