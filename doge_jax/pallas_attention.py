"""Dynamic Mask Attention as a Pallas kernel for GPUs (Triton lowering): flash attention with the per-key bias
and the keep-window rule in key-expiry form applied per tile (design.md §3), forward and backward.

Why: on an H200 the pure-JAX `blockwise` implementation ran forward+backward at 16k tokens 47x slower than flash
causal attention (benchmarks/RESULTS.md); its tiles are XLA loops of small kernels. Here one kernel instance owns a
query block (forward, dq) or a key block (dk, dv, d(dt)), as in FlashAttention-2, so d(dt_j) = sum_i dS_ij is a
per-key-block reduction with no atomics (the cost FlexAttention pays for a differentiable bias).

Function (spec §3.5): s_ij = q_i . k_j * scale + dt_j; query i sees key j iff j <= i < e_j (and i - j < window
when a sliding window is set), where e_j is the key's expiry slot (`attention.key_expiry`); 0 marks padding keys.
q [B, H, T, D], k/v [B, G, T, D], dt/e per query head [B, H, T]. Only S == T with no cache (training, prefill).

Sparse kernels (T well past keep_window; `key_lists`): each query keeps at most keep_window alive keys, spread over
its whole prefix, so the dense loops visit every causal tile although most keys in them are expired. Per superblock
of queries the keys alive for any of them (at most keep_window + superblock - 1) are listed; the forward and dq
kernels gather their key tiles from that list, and the key-side kernel takes one list chunk and adds its dk, dv,
d(dt) atomically into float32 sums. Same per-element rule, same function (doge_torch's Triton kernels do the same).

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
# 16-bit inputs at D = 128 take 128-query tiles (forward and dq kernels): on an H200 at T = 16384 (bf16, D 128,
# benchmarks/RESULTS.md, 2026-11-30) the sparse kernels' forward+backward took 4.65 ms vs 5.43 ms with 64 x 64
# (gpu_check) and the dense ones 10.50 ms vs 13.66 ms (kernel_tune).
BLOCK_Q_16BIT = 128
# the dk/dv/d(dt) kernel steps through the queries 32 at a time (as doge_torch's Triton kernel: 64 spills registers
# at D = 128 there)
BLOCK_Q_DKV = 32


def default_blocks(D: int, itemsize: int) -> tuple[int, int]:
    """(block_q, block_k): 128 x 64 for 16-bit inputs at D = 128 (the size timed; at D = 64, with 4 warps, they
    spill on sm_90 where 64 x 64 does not), else 64 x 64, or 32 x 32 for float32 at D = 256,
    whose 64-wide dq kernel asks for 262-279 KB of shared memory on sm_90 (227 KB allowed; 32 x 32: 135 KB).
    benchmarks/pallas_compile_check.py measures."""
    if D * itemsize > 512:
        return (32, 32)
    return (BLOCK_Q_16BIT if itemsize <= 2 and D == 128 else BLOCK_Q, BLOCK_K)


def _params(D: int) -> plgpu.CompilerParams:
    """Launch parameters (two pipeline stages fit every default config, float32 included: at most 148 KB)."""
    return plgpu.CompilerParams(num_warps=4 if D <= 64 else 8, num_stages=2)


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


def _key_tile(c, k_ref, v_ref, dt_ref, e_ref, bk, lst):
    """(kj, k, v, dt, e) of key tile c of a query block's loop: key block c (dense, lst None) or entries c * bk.. of
    the query block's key list (lst = (idx_ref, superblock, count): a gather; slots past the count read key 0 and
    are masked as expired)."""
    if lst is None:
        sl = pl.ds(c * bk, bk)
        return c * bk + jnp.arange(bk), k_ref[sl, :], v_ref[sl, :], dt_ref[sl], e_ref[sl]
    idx_ref, sb, cnt = lst
    inb = c * bk + jnp.arange(bk) < cnt
    kj = jnp.where(inb, idx_ref[sb, pl.ds(c * bk, bk)], 0)
    return kj, k_ref[kj, :], v_ref[kj, :], dt_ref[kj], jnp.where(inb, e_ref[kj], 0)


def _key_range(qb, bq, bk, window, sparse, lst_refs):
    """Loop bounds over key tiles for query block qb and the list argument of `_key_tile`: dense, the key blocks
    from the first one the window allows to the causal diagonal; sparse, the chunks of its superblock's key list up
    to its own last query (the list is in key order)."""
    if sparse is not None:
        idx_ref, cntq_ref = lst_refs
        cnt = cntq_ref[qb]
        return 0, lax_div_up(cnt, bk), (idx_ref, (qb * bq) // sparse, cnt)
    hi = lax_div_up((qb + 1) * bq, bk)  # causal: no key block past the diagonal
    lo = 0 if window is None else jnp.maximum(qb * bq - window + 1, 0) // bk
    return lo, hi, None


def _fwd_kernel(q_ref, k_ref, v_ref, dt_ref, e_ref, *refs, scale, window, bq, bk, sparse):
    *lst_refs, o_ref, lse_ref = refs
    qb = pl.program_id(0)
    q = q_ref[...]
    qi = qb * bq + jnp.arange(bq)
    f = _acc(q.dtype)
    lo, hi, lst = _key_range(qb, bq, bk, window, sparse, lst_refs)

    def body(c, carry):
        acc, m, l = carry
        kj, k, v, dt, e = _key_tile(c, k_ref, v_ref, dt_ref, e_ref, bk, lst)
        s = _scores(q, k, dt, e, qi, kj, scale, window)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = l * corr + jnp.sum(p, axis=1)
        acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    D = q_ref.shape[-1]
    init = (jnp.zeros((bq, D), f), jnp.full((bq,), -jnp.inf, f), jnp.zeros((bq,), f))
    acc, m, l = jax.lax.fori_loop(lo, hi, body, init)
    # a query block with an empty key list (sparse: its keys all padding or expired) visited no tile: o = 0 and an
    # lse that keeps exp(s - lse) = 0 for masked scores in the backward
    m = jnp.where(l > 0, m, 0.0)
    l = jnp.where(l > 0, l, 1.0)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def lax_div_up(x, m: int):
    """ceil(x / m) for a non-negative traced int32 (Triton lowering has no floor division)."""
    x = jnp.asarray(x, jnp.int32)
    return jax.lax.div(x + jnp.int32(m - 1), jnp.int32(m))


def _dq_kernel(q_ref, k_ref, v_ref, dt_ref, e_ref, *refs, scale, window, bq, bk, sparse):
    *lst_refs, do_ref, lse_ref, delta_ref, dq_ref = refs
    qb = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    qi = qb * bq + jnp.arange(bq)
    lo, hi, lst = _key_range(qb, bq, bk, window, sparse, lst_refs)

    def body(c, dq):
        kj, k, v, dt, e = _key_tile(c, k_ref, v_ref, dt_ref, e_ref, bk, lst)
        s = _scores(q, k, dt, e, qi, kj, scale, window)
        p = jnp.exp(s - lse[:, None])
        ds = p * (_dot(do, v.T) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, _acc(q.dtype)))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _key_grads(qb, carry, rows, j, k, v, dt, e, kj, scale, window, bq):
    """The key-side kernels' step: query block qb of one query head (rows = the q, do, lse, delta refs, of its
    group's head j when j is not None) added to a key tile's (dk unscaled, dv, d(dt))."""
    dk, dv, ddt = carry
    q_ref, do_ref, lse_ref, delta_ref = rows
    at = (pl.ds(qb * bq, bq),) if j is None else (j, pl.ds(qb * bq, bq))  # one indexer: Triton lowering
    q, do = q_ref[at + (slice(None),)], do_ref[at + (slice(None),)]
    lse, delta = lse_ref[at], delta_ref[at]
    s = _scores(q, k, dt, e, qb * bq + jnp.arange(bq), kj, scale, window)
    p = jnp.exp(s - lse[:, None])
    dv = dv + _dot(p.astype(do.dtype).T, do)
    ds = p * (_dot(do, v.T) - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype).T, q)
    return dk, dv, ddt + jnp.sum(ds, axis=0)


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
            return _key_grads(qb, carry, (q_ref, do_ref, lse_ref, delta_ref), j, k, v, dt, e, kj, scale, window, bq)

        lo = (kb * bk) // bq
        last = jnp.max(e)  # no query at or past the latest expiry sees this block
        if window is not None:
            last = jnp.minimum(last, kb * bk + bk - 1 + window)
        hi = jnp.minimum(lax_div_up(jnp.minimum(last, nq * bq), bq), nq)
        dk, dv, ddt = jax.lax.fori_loop(lo, jnp.maximum(hi, lo), body, (dk, dv, jnp.zeros((bk,), f)))
        ddt_ref[j, :] = ddt
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkv_sparse_kernel(q_ref, k_ref, v_ref, dt_ref, e_ref, idx_ref, cnt_ref, do_ref, lse_ref, delta_ref, dk0, dv0,
                       ddt0, dk_ref, dv_ref, ddt_ref, *, scale, window, bq, bk, sb, tp, interpret):
    """Sparse keys: one chunk of bk entries of one superblock's key list of one query head (grid: chunk,
    superblock, batch x head); dk, dv, d(dt) over the superblock's queries that can see them, added atomically into
    float32 sums (a key is listed by every superblock it is alive in). Slots past the list's count are masked out
    (interpret mode's atomics take no mask: they add zeros into a discarded row `tp` there)."""
    del dk0, dv0, ddt0  # the zero-initialised sums, aliased to dk_ref, dv_ref, ddt_ref
    c, s = pl.program_id(0), pl.program_id(1)
    cnt = cnt_ref[s]
    inb = c * bk + jnp.arange(bk) < cnt
    kj = jnp.where(inb, idx_ref[s, pl.ds(c * bk, bk)], 0)
    k, v, dt = k_ref[kj, :], v_ref[kj, :], dt_ref[kj]
    e = jnp.where(inb, e_ref[kj], 0)
    f = _acc(k.dtype)
    first = jnp.maximum(s * sb, jnp.min(jnp.where(inb, kj, tp)))
    last = jnp.minimum(jnp.max(e), s * sb + sb)
    if window is not None:
        last = jnp.minimum(last, jnp.max(kj) + window)

    def body(qb, carry):
        return _key_grads(qb, carry, (q_ref, do_ref, lse_ref, delta_ref), None, k, v, dt, e, kj, scale, window, bq)

    lo = first // bq
    hi = jnp.maximum(lax_div_up(jnp.minimum(last, tp), bq), lo)
    init = (jnp.zeros(k.shape, f), jnp.zeros(v.shape, f), jnp.zeros((bk,), f))
    dk, dv, ddt = jax.lax.fori_loop(lo, hi, body, init)
    cols = jnp.arange(k.shape[1])[None, :]
    if interpret:
        kw, mask, mask_d = jnp.where(inb, kj, tp), None, None
    else:
        kw, mask, mask_d = kj, jnp.broadcast_to(inb[:, None], dk.shape), inb
    plgpu.atomic_add(dk_ref, (kw[:, None], cols), dk * scale, mask=mask)
    plgpu.atomic_add(dv_ref, (kw[:, None], cols), dv, mask=mask)
    plgpu.atomic_add(ddt_ref, (kw,), ddt, mask=mask_d)


def _specs_q(bq, D):
    return pl.BlockSpec((None, None, bq, D), lambda i, b, h: (b, h, i, 0))


def key_lists(e, keep: int, window: int | None, superblock: int, bq: int, bk: int, max_elements: int = 1 << 24):
    """The sparse kernels' key lists (as doge_torch.triton_attention.key_lists): per (batch, head, superblock of
    `superblock` queries) the keys alive for some query of it, in key order. e [B, H, Tp] int32 (0 = padding key).
    Returns idx [B, H, NS, LMAX] int32 (unused slots 0), cnt [B, H, NS] and cntq [B, H, Tp // bq] (listed keys up
    to each query block's last query). LMAX = keep + superblock rounded up to bk, capped at Tp: enough when at most
    `keep` keys are alive per query (the keep-window rule); `overflow` [B, H] says where a list did not fit.
    Superblocks are listed a group at a time, so the [B, H, group, Tp] temporaries stay near `max_elements`."""
    B, H, Tp = e.shape
    ns = -(-Tp // superblock)
    lmax = min(-(-(keep + superblock) // bk) * bk, Tp)
    group = max(1, min(ns, max_elements // (B * H * Tp)))
    j = jnp.arange(Tp, dtype=jnp.int32)
    idx, cnt, cntq, overflow = [], [], [], []
    for g0 in range(0, ns, group):
        g1 = min(g0 + group, ns)
        s0 = jnp.arange(g0, g1, dtype=jnp.int32)[:, None] * superblock
        # key j is alive for some query i in [s0, s0 + superblock): j < s0 + superblock and e_j > max(s0, j); with
        # a sliding window also s0 - j < window
        live = (j < s0 + superblock) & (e[:, :, None, :] > jnp.maximum(s0, j))
        if window is not None:
            live = live & (j + window > s0)
        cs = jnp.cumsum(live, axis=-1, dtype=jnp.int32)
        overflow.append(cs[..., -1] > lmax)
        cs = jnp.minimum(cs, lmax)  # the kernels never read past a list, even for such an e (dma_pallas poisons it)
        slot = jnp.where(live, cs - 1, lmax).clip(max=lmax)  # unlisted keys go to a discarded last slot
        bi, hi, si = jnp.ogrid[:B, :H, :g1 - g0, :1][:3]
        idx.append(jnp.zeros((B, H, g1 - g0, lmax + 1), jnp.int32).at[bi, hi, si, slot].set(
            jnp.broadcast_to(j, live.shape), mode="drop")[..., :lmax])
        qe = jnp.arange(g0 * superblock + bq, min(g1 * superblock, Tp) + 1, bq) - 1  # query blocks' last queries
        cntq.append(cs[:, :, qe // superblock - g0, qe])
        cnt.append(cs[..., -1])
    cat = partial(jnp.concatenate, axis=2)
    return cat(idx), cat(cnt), cat(cntq), jnp.any(cat(overflow), axis=-1)


def _query_side_lists(lists):
    """BlockSpecs and arguments of the forward / dq kernels' key lists (idx, cntq of one (batch, head)): none when
    dense."""
    if lists is None:
        return [], []
    idx, _, cntq = lists
    specs = [pl.BlockSpec((None, None) + idx.shape[2:], lambda i, b, h: (b, h, 0, 0)),
             pl.BlockSpec((None, None, cntq.shape[2]), lambda i, b, h: (b, h, 0))]
    return specs, [idx, cntq]


def _forward(q, k, v, dt, e, lists, scale, window, bq, bk, sb, interpret):
    B, H, T, D = q.shape
    G = k.shape[1]
    r = H // G
    full_kv = pl.BlockSpec((None, None, T, D), lambda i, b, h: (b, h // r, 0, 0))
    per_head = pl.BlockSpec((None, None, T), lambda i, b, h: (b, h, 0))
    list_specs, list_args = _query_side_lists(lists)
    o, lse = pl.pallas_call(
        partial(_fwd_kernel, scale=scale, window=window, bq=bq, bk=bk, sparse=None if lists is None else sb),
        grid=(T // bq, B, H),
        in_specs=[_specs_q(bq, D), full_kv, full_kv, per_head, per_head] + list_specs,
        out_specs=[_specs_q(bq, D), pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, T), _acc(q.dtype))],
        compiler_params=_params(D),
        interpret=interpret,
        name="doge_dma_forward",
    )(q, k, v, dt, e, *list_args)
    return o, lse


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def _dma(q, k, v, dt, e, lists, scale, window, bq, bk, sb, interpret):
    return _forward(q, k, v, dt, e, lists, scale, window, bq, bk, sb, interpret)[0]


def _dma_fwd(q, k, v, dt, e, lists, scale, window, bq, bk, sb, interpret):
    o, lse = _forward(q, k, v, dt, e, lists, scale, window, bq, bk, sb, interpret)
    return o, (q, k, v, dt, e, lists, o, lse)


def _dma_bwd(scale, window, bq, bk, sb, interpret, res, do):
    q, k, v, dt, e, lists, o, lse = res
    B, H, T, D = q.shape
    G = k.shape[1]
    r = H // G
    f = _acc(q.dtype)
    delta = jnp.sum(o.astype(f) * do.astype(f), axis=-1)
    params = _params(D)
    full_kv = pl.BlockSpec((None, None, T, D), lambda i, b, h: (b, h // r, 0, 0))
    per_head = pl.BlockSpec((None, None, T), lambda i, b, h: (b, h, 0))
    row = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    list_specs, list_args = _query_side_lists(lists)
    dq = pl.pallas_call(
        partial(_dq_kernel, scale=scale, window=window, bq=bq, bk=bk, sparse=None if lists is None else sb),
        grid=(T // bq, B, H),
        in_specs=[_specs_q(bq, D), full_kv, full_kv, per_head, per_head] + list_specs + [_specs_q(bq, D), row, row],
        out_specs=_specs_q(bq, D),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="doge_dma_dq",
    )(q, k, v, dt, e, *list_args, do, lse, delta)
    bq2 = min(bq, BLOCK_Q_DKV)
    if lists is not None:
        return (dq,) + _dkv_sparse(q, k, v, dt, e, lists, do, lse, delta, scale, window, bq2, bk, sb, interpret,
                                   params) + (None,)
    group_rows = pl.BlockSpec((None, r, T, D), lambda i, b, g: (b, g, 0, 0))
    group_vec = pl.BlockSpec((None, r, T), lambda i, b, g: (b, g, 0))
    kv_block = pl.BlockSpec((None, None, bk, D), lambda i, b, g: (b, g, i, 0))
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
    return dq, dk, dv, ddt.astype(dt.dtype), None, None


def _dkv_sparse(q, k, v, dt, e, lists, do, lse, delta, scale, window, bq, bk, sb, interpret, params):
    """dk, dv, d(dt) by the sparse key-side kernel: float32 sums (one spare row for interpret mode's unmasked
    atomics) passed in as zeros and aliased to the outputs, then cast."""
    B, H, T, D = q.shape
    G = k.shape[1]
    r = H // G
    idx, cnt, _ = lists
    ns, lmax = idx.shape[2:]
    f = _acc(q.dtype)
    rows = pl.BlockSpec((None, None, T, D), lambda c, s, bh: (bh // H, bh % H, 0, 0))
    kv_rows = pl.BlockSpec((None, None, T, D), lambda c, s, bh: (bh // H, (bh % H) // r, 0, 0))
    vec = pl.BlockSpec((None, None, T), lambda c, s, bh: (bh // H, bh % H, 0))
    sums = [jnp.zeros((B, G, T + bk, D), f), jnp.zeros((B, G, T + bk, D), f), jnp.zeros((B, H, T + bk), f)]
    sum_kv = pl.BlockSpec((None, None, T + bk, D), lambda c, s, bh: (bh // H, (bh % H) // r, 0, 0))
    sum_vec = pl.BlockSpec((None, None, T + bk), lambda c, s, bh: (bh // H, bh % H, 0))
    dk, dv, ddt = pl.pallas_call(
        partial(_dkv_sparse_kernel, scale=scale, window=window, bq=bq, bk=bk, sb=sb, tp=T, interpret=interpret),
        grid=(lmax // bk, ns, B * H),
        in_specs=[rows, kv_rows, kv_rows, vec, vec,
                  pl.BlockSpec((None, None, ns, lmax), lambda c, s, bh: (bh // H, bh % H, 0, 0)),
                  pl.BlockSpec((None, None, ns), lambda c, s, bh: (bh // H, bh % H, 0)),
                  rows, vec, vec, sum_kv, sum_kv, sum_vec],
        out_specs=[sum_kv, sum_kv, sum_vec],
        out_shape=[jax.ShapeDtypeStruct(x.shape, f) for x in sums],
        input_output_aliases={10: 0, 11: 1, 12: 2},
        compiler_params=params,
        interpret=interpret,
        name="doge_dma_dkv_sparse",
    )(q, k, v, dt, e, idx, cnt, do, lse, delta, *sums)
    return dk[:, :, :T].astype(k.dtype), dv[:, :, :T].astype(v.dtype), ddt[:, :, :T].astype(dt.dtype), None


_dma.defvjp(_dma_fwd, _dma_bwd)

SUPERBLOCK = 256


def use_sparse(T: int, keep: int | None) -> bool:
    """Whether `dma_pallas` takes the sparse kernels by default: from T >= 2 * keep_window on (as doge_torch's
    Triton kernels; a guess to be tuned on a GPU with benchmarks/kernel_tune.py)."""
    return keep is not None and T >= 2 * keep


def dma_pallas(q, k, v, dt, e, window: int | None = None, block_q: int | None = None, block_k: int | None = None,
               interpret: bool | None = None, keep: int | None = None, sparse: bool | None = None,
               superblock: int = SUPERBLOCK) -> jax.Array:
    """q [B, H, T, D], k/v [B, G, T, D], dt [B, n, T] (n = G or H), e [B, n, T] int32 expiry slots (0 = padding
    key). Returns [B, H, T, D]; differentiable in q, k, v, dt. T is padded to a multiple of the blocks; D must be
    a power of two >= 16 (Triton tiles).

    `keep` (the keep window e was made with: at most `keep` keys alive per query) allows the sparse kernels: per
    superblock of `superblock` queries (a multiple of block_q) the keys alive somewhere in it are listed and
    gathered, about keep + superblock keys per query block instead of every earlier key (as doge_torch's Triton
    kernels). `sparse` forces them on or off; by default they run from T >= 2 * keep on. An e that lets more than
    `keep` keys live raises when e is concrete and gives NaN outputs when traced."""
    B, H, T, D = q.shape
    n = dt.shape[1]
    if D < 16 or D & (D - 1):
        raise ValueError(f"pallas attention needs a power-of-two head dim >= 16, got {D}")
    bq0, bk0 = default_blocks(D, jnp.dtype(q.dtype).itemsize)
    block_q, block_k = block_q or bq0, block_k or bk0
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b < 16 or b & (b - 1):  # as dma_triton: blocks must nest (the padded length is a multiple of both)
            raise ValueError(f"pallas attention: {name}={b} must be a power of two >= 16")
    blk = max(block_q, block_k)
    Tp = -(-T // blk) * blk
    # the Triton lowering addresses each array with 32-bit offsets: q/o, and the sparse kernels' float32 key-side
    # sums (kv heads, with a spare row)
    if max(B * H * Tp * D, B * k.shape[1] * (Tp + block_k) * D) >= 2 ** 31:
        raise ValueError(f"pallas attention: B*H*T*D = {B * H * T * D} needs 64-bit offsets; split the batch")
    sparse = use_sparse(T, keep) if sparse is None else sparse
    if sparse and (keep is None or keep < 1 or superblock % block_q):
        raise ValueError(f"the sparse kernels need keep >= 1 and a superblock that is a multiple of block_q, got "
                         f"keep={keep}, superblock={superblock}, block_q={block_q}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if window is not None:
        window = min(window, Tp)  # the same mask; keeps the kernels' int32 index sums from overflowing
    if n != H:
        dt, e = jnp.repeat(dt, H // n, axis=1), jnp.repeat(e, H // n, axis=1)
    pad = ((0, 0), (0, 0), (0, Tp - T))
    q, k, v = (jnp.pad(x, pad + ((0, 0),)) for x in (q, k, v))
    dt = jnp.pad(dt.astype(_acc(q.dtype)), pad)
    e = jnp.pad(jnp.minimum(e, Tp).astype(jnp.int32), pad)  # padding keys: expired before they exist
    lists = overflow = None
    if sparse:
        *lists, overflow = key_lists(e, keep, window, superblock, block_q, block_k)
        lists = tuple(lists)
        try:
            bad = bool(overflow.any())
        except jax.errors.ConcretizationTypeError:  # traced: NaN outputs below
            bad = False
        if bad:
            raise ValueError(f"more than keep={keep} keys alive for some query: e does not follow the keep-window "
                             "rule")
    o = _dma(q, k, v, dt, e, lists, D ** -0.5, window, block_q, block_k, superblock, interpret)[:, :, :T]
    if overflow is not None:
        o = jnp.where(overflow[:, :, None, None], jnp.nan, o)
    return o
