"""Dynamic Mask Attention as Triton kernels for PyTorch on GPUs: flash attention with the per-key bias and the
keep-window rule in key-expiry form applied per tile, forward and backward. The same function and algorithm as the
JAX Pallas kernel (`doge_jax.pallas_attention`).

Function: s_ij = q_i . k_j * D**-0.5 + dt_j; query i sees key j iff j <= i < e_j (and i - j < window when a sliding
window is set), where e_j is the key's expiry slot (`doge_torch.model.key_expiry`); e_j = 0 marks a padding key.
q [B, H, T, D], k/v [B, G, T, D], dt/e [B, n, T] with n = G or n = H. Only S == T with no cache (training,
prefill). Rows with no visible key output a finite average (the caller replaces them).

Kernels (FlashAttention-2 layout): the forward and the dq kernel own a query block of one query head and loop over
the key blocks from the first one the window allows to the causal diagonal; the dk/dv/d(dt) kernel owns a key block
of one kv head and loops over the query heads of its group and the query blocks from the diagonal to the last query
any of its keys is alive for, so d(dt_j) = sum_i dS_ij is a per-block reduction with no atomics.

SPARSE kernels (T well past keep_window): the keep window leaves each query at most keep_window alive keys, spread
over the whole prefix (the best dt of it), so whole key blocks rarely expire and the dense loops visit every causal
tile. Instead, per superblock of queries (SUPERBLOCK), `key_lists` lists the keys alive for any of its queries (at
most keep_window + SUPERBLOCK - 1), and the forward and dq kernels gather their key tiles from that list: about
keep_window keys per query block instead of all earlier ones (a quarter of the causal tiles at T = 8 keep_window).
The key-side kernel takes one list chunk of one superblock and adds its dk, dv, d(dt) atomically into float32 sums
(a key is listed by every superblock it is alive in). Same per-element rule, so the same function.

Off GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, tests only).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # torch without triton (CPU wheels, macOS): the module imports, `triton_available` is False
    triton = tl = None

def _fix_interpreter_scalar_index() -> None:
    """Under TRITON_INTERPRET=1 only (CPU tests, gpu_check's CPU fallback): Triton <= 3.6's interpreter turns a scalar
    tensor into a Python int (loop bounds) with int() of a shape-(1,) array, which NumPy >= 2.4 refuses
    (triton-lang/triton#9171), so every loop bounded by program-id arithmetic fails. Convert through the element."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_scalar_index_fixed", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._scalar_index_fixed = True
    interpreter._patch_lang_tensor = patched


if triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_scalar_index()

BLOCK_Q = 64
BLOCK_K = 64
# 16-bit inputs at D = 128 take 128-query tiles (forward and dq kernels): on an H200 at T = 16384 (bf16, D 128,
# benchmarks/RESULTS.md, kernel_tune 2026-11-30) the sparse kernels' forward+backward took 4.09 ms vs 5.18 ms with
# 64 x 64 and the dense ones 9.11 ms vs 12.06 ms; sm_90 compiles them without spills in 99 KB of shared memory.
BLOCK_Q_16BIT = 128
# The dk/dv/d(dt) kernel steps through the queries 32 at a time: with 64 (D = 128, 8 warps, bf16) ptxas needs 255
# registers and spills (benchmarks/triton_compile_check.py, sm_90); with 32 it needs 198 and does not.
BLOCK_Q_DKV = 32
# queries per key list of the SPARSE kernels (a multiple of the query blocks)
SUPERBLOCK = 256
# Skip the per-element mask on tiles where every key is visible to every query (a runtime branch per tile). Off until
# timed on a GPU: the branch removes most of the mask's ALU work but changes how Triton pipelines the loop (on sm_90
# the forward's static code halves); benchmarks/kernel_tune.py times both.
SKIP_FULL_TILE_MASK = False
# sm_90 gives one block at most 227 KB (232,448 bytes) of shared memory; float32 tiles take twice bf16's.
# benchmarks/triton_compile_check.py reports each default config's use (bf16 and float32, D 128 and 256).
SMEM_LIMIT_SM90 = 232448


def default_blocks(D: int, itemsize: int) -> tuple[int, int]:
    """(block_q, block_k) for head dim D and input element size: BLOCK_Q_16BIT x BLOCK_K for 16-bit inputs at
    D = 128 (the size timed), BLOCK_Q x BLOCK_K otherwise, or 32 x 32 where 64-wide tiles would not fit in shared
    memory (float32 at D = 256)."""
    if D * itemsize > 512:
        return (32, 32)
    return (BLOCK_Q_16BIT if itemsize <= 2 and D == 128 else BLOCK_Q, BLOCK_K)


def num_stages(kernel: str, D: int, itemsize: int) -> int:
    """Software-pipelining depth of `kernel` (fwd, dq, dkv): 2, but 1 for dq with float32 tiles at D >= 128 (two
    stages of its tiles need 257 KB of shared memory on sm_90)."""
    return 1 if kernel == "dq" and D * itemsize >= 512 else 2


# masked scores: finite, so a tile whose row is fully masked gives no NaN (rescaled away by any live score)
_MASK_VALUE = -0.7 * torch.finfo(torch.float32).max
MASK = tl.constexpr(_MASK_VALUE) if tl is not None else _MASK_VALUE


def _jit(fn):
    """`triton.jit` when triton is importable (kernels are then never launched without it)."""
    return triton.jit(fn) if triton is not None else fn


def triton_available(device: torch.device | str) -> bool:
    """Whether `dma_triton` can run compiled on `device`: a CUDA device with triton importable."""
    return triton is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


@_jit
def _masked(s, e, qi, kj, window, HAS_WINDOW: tl.constexpr):
    """Scores with MASK where query i does not see key j (j <= i < e_j, and i - j < window)."""
    keep = (kj[None, :] <= qi[:, None]) & (qi[:, None] < e[None, :])
    if HAS_WINDOW:
        keep = keep & (qi[:, None] - kj[None, :] < window)
    return tl.where(keep, s, MASK)


@_jit
def _tile_scores(q, k, dt, e, qi, kj, scale, window, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr,
                 SKIP: tl.constexpr):
    """Masked scores of one tile [BQ, BK] (natural-exp domain, as the reference)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale + dt[None, :]
    if SKIP:
        # a tile whose every key is visible to every query (below the diagonal, none expired before its last query,
        # inside the window) skips the per-element mask: the common case, and the mask costs about as many ALU ops
        # per score as the exp; but a branch in the loop body changes Triton's pipelining (SKIP_FULL_TILE_MASK)
        q0 = tl.min(qi, 0)
        q1 = tl.max(qi, 0)
        full = (tl.max(kj, 0) <= q0) & (tl.min(e, 0) > q1)
        if HAS_WINDOW:
            full = full & (q1 - tl.min(kj, 0) < window)
        if not full:
            s = _masked(s, e, qi, kj, window, HAS_WINDOW)
        return s
    return _masked(s, e, qi, kj, window, HAS_WINDOW)


@_jit
def _query_block(CNTQ, Tp, H, G, NDT, NQB, NS, LMAX, window, R: tl.constexpr, RDT: tl.constexpr, D: tl.constexpr,
                 BQ: tl.constexpr, BK: tl.constexpr, SB: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 SPARSE: tl.constexpr):
    """This program's query block (grid: query block, batch, query head): its index, query slots, the base offsets
    of its query head's rows [Tp] (x D for q-shaped arrays), its kv head's [Tp, D] and its dt/e head's [Tp], and
    the key tiles it visits. Dense: the key blocks from the first one the window allows to the causal diagonal.
    SPARSE: the chunks of its superblock's key list (base offset `lst`) up to its own last query (`cnt` entries)."""
    qb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    qi = qb * BQ + tl.arange(0, BQ)
    m = b * NDT + h // RDT
    if SPARSE:
        lst = (m * NS + (qb * BQ) // SB) * LMAX
        cnt = tl.load(CNTQ + m * NQB + qb)
        lo = 0
        hi = (cnt + BK - 1) // BK
    else:
        lst = 0
        cnt = 0
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(qb * BQ - window + 1, 0) // BK
        hi = ((qb + 1) * BQ + BK - 1) // BK  # causal: no key block past the diagonal
    return qi, (b * H + h) * Tp, (b * G + h // R) * Tp * D, m * Tp, lst, cnt, lo, hi


@_jit
def _key_tile(K, V, DT, E, IDX, kv, dte, lst, cnt, c, q, qi, rd, scale, window, D: tl.constexpr, BK: tl.constexpr,
              HAS_WINDOW: tl.constexpr, SPARSE: tl.constexpr, PREC: tl.constexpr, SKIP: tl.constexpr):
    """Key tile c of a query block's loop: its k, v [BK, D] and the masked scores [BQ, BK]. Dense: key block c;
    SPARSE: entries c * BK.. of the key list (slots past `cnt` read key 0 and are masked as expired)."""
    if SPARSE:
        pos = c * BK + tl.arange(0, BK)
        inb = pos < cnt
        kj = tl.load(IDX + lst + pos, mask=inb, other=0)
        e = tl.where(inb, tl.load(E + dte + kj), 0)
    else:
        kj = c * BK + tl.arange(0, BK)
        e = tl.load(E + dte + kj)
    k = tl.load(K + kv + kj[:, None] * D + rd[None, :])
    v = tl.load(V + kv + kj[:, None] * D + rd[None, :])
    s = _tile_scores(q, k, tl.load(DT + dte + kj), e, qi, kj, scale, window, HAS_WINDOW, PREC, SKIP)
    return k, v, s


@_jit
def _fwd_kernel(Q, K, V, DT, E, IDX, CNTQ, O, LSE, scale, window, Tp, H, G, NDT, NQB, NS, LMAX,
                R: tl.constexpr, RDT: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                SB: tl.constexpr, HAS_WINDOW: tl.constexpr, SPARSE: tl.constexpr, ACC: tl.constexpr,
                PREC: tl.constexpr, SKIP: tl.constexpr):
    """One query block of one query head: o [BQ, D] and lse [BQ] by an online softmax over the key tiles."""
    qi, row, kv, dte, lst, cnt, lo, hi = _query_block(CNTQ, Tp, H, G, NDT, NQB, NS, LMAX, window, R, RDT, D, BQ, BK,
                                                      SB, HAS_WINDOW, SPARSE)
    rd = tl.arange(0, D)
    q = tl.load(Q + row * D + qi[:, None] * D + rd[None, :])
    m = tl.full((BQ,), float("-inf"), ACC)
    l = tl.zeros((BQ,), ACC)
    acc = tl.zeros((BQ, D), ACC)
    for c in range(lo, hi):
        _, v, s = _key_tile(K, V, DT, E, IDX, kv, dte, lst, cnt, c, q, qi, rd, scale, window, D, BK, HAS_WINDOW,
                            SPARSE, PREC, SKIP)
        m_new = tl.maximum(m, tl.max(s, 1))
        corr = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m = m_new
    # a query block with an empty key list (SPARSE: all its keys padding or expired) visited no tile: o = 0 and an
    # lse that keeps exp(s - lse) = 0 for masked scores in the backward
    m = tl.where(l > 0, m, 0.0)
    l = tl.where(l > 0, l, 1.0)
    tl.store(O + row * D + qi[:, None] * D + rd[None, :], (acc / l[:, None]).to(O.dtype.element_ty))
    tl.store(LSE + row + qi, m + tl.log(l))


@_jit
def _dq_kernel(Q, K, V, DT, E, IDX, CNTQ, DO, LSE, DELTA, DQ, scale, window, Tp, H, G, NDT, NQB, NS, LMAX,
               R: tl.constexpr, RDT: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
               SB: tl.constexpr, HAS_WINDOW: tl.constexpr, SPARSE: tl.constexpr, ACC: tl.constexpr,
               PREC: tl.constexpr, SKIP: tl.constexpr):
    """dq of one query block of one query head, over the same key tiles as the forward."""
    qi, row, kv, dte, lst, cnt, lo, hi = _query_block(CNTQ, Tp, H, G, NDT, NQB, NS, LMAX, window, R, RDT, D, BQ, BK,
                                                      SB, HAS_WINDOW, SPARSE)
    rd = tl.arange(0, D)
    q = tl.load(Q + row * D + qi[:, None] * D + rd[None, :])
    do = tl.load(DO + row * D + qi[:, None] * D + rd[None, :])
    lse = tl.load(LSE + row + qi)
    delta = tl.load(DELTA + row + qi)
    dq = tl.zeros((BQ, D), ACC)
    for c in range(lo, hi):
        k, v, s = _key_tile(K, V, DT, E, IDX, kv, dte, lst, cnt, c, q, qi, rd, scale, window, D, BK, HAS_WINDOW,
                            SPARSE, PREC, SKIP)
        p = tl.exp(s - lse[:, None])
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + row * D + qi[:, None] * D + rd[None, :], (dq * scale).to(DQ.dtype.element_ty))


@_jit
def _key_grads(Q, DO, LSE, DELTA, row, qb, k, v, dt, e, kj, rd, scale, window, dk, dv, ddt, D: tl.constexpr,
               BQ: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, SKIP: tl.constexpr):
    """The key-side kernels' step: query block qb of one query head (rows at `row`) added to a key tile's dk, dv
    (unscaled) and d(dt)."""
    qi = qb * BQ + tl.arange(0, BQ)
    q = tl.load(Q + row * D + qi[:, None] * D + rd[None, :])
    do = tl.load(DO + row * D + qi[:, None] * D + rd[None, :])
    lse = tl.load(LSE + row + qi)
    delta = tl.load(DELTA + row + qi)
    s = _tile_scores(q, k, dt, e, qi, kj, scale, window, HAS_WINDOW, PREC, SKIP)
    p = tl.exp(s - lse[:, None])
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
    ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    return dk, dv, ddt + tl.sum(ds, 0)


@_jit
def _dkv_kernel(Q, K, V, DT, E, DO, LSE, DELTA, DK, DV, DDT, scale, window, Tp, H, G, NDT,
                R: tl.constexpr, RDT: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, SKIP: tl.constexpr):
    """dk, dv of one key block of one kv head and d(dt) per query head of its group: loops over the R query heads
    and the query blocks that can see the block (from the diagonal to the last query any of its keys is alive for)."""
    kb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    g = tl.program_id(2).to(tl.int64)
    rd = tl.arange(0, D)
    kj = kb * BK + tl.arange(0, BK)
    kv = (b * G + g) * Tp * D
    k = tl.load(K + kv + kj[:, None] * D + rd[None, :])
    v = tl.load(V + kv + kj[:, None] * D + rd[None, :])
    dk = tl.zeros((BK, D), ACC)
    dv = tl.zeros((BK, D), ACC)
    lo = (kb * BK) // BQ
    for j in range(R):
        h = g * R + j
        row = (b * H + h) * Tp
        dte = (b * NDT + h // RDT) * Tp
        dt = tl.load(DT + dte + kj)
        e = tl.load(E + dte + kj)
        last = tl.max(e, 0)  # no query at or past the latest expiry sees this block
        if HAS_WINDOW:
            last = tl.minimum(last, kb * BK + BK - 1 + window)
        hi = (tl.minimum(last, Tp) + BQ - 1) // BQ
        ddt = tl.zeros((BK,), ACC)
        for qb in range(lo, hi):
            dk, dv, ddt = _key_grads(Q, DO, LSE, DELTA, row, qb, k, v, dt, e, kj, rd, scale, window, dk, dv, ddt, D,
                                     BQ, HAS_WINDOW, PREC, SKIP)
        tl.store(DDT + row + kj, ddt)
    tl.store(DK + kv + kj[:, None] * D + rd[None, :], (dk * scale).to(DK.dtype.element_ty))
    tl.store(DV + kv + kj[:, None] * D + rd[None, :], dv.to(DV.dtype.element_ty))


@_jit
def _dkv_sparse_kernel(Q, K, V, DT, E, IDX, CNT, DO, LSE, DELTA, DK, DV, DDT, scale, window, Tp, H, G, NDT, NS, LMAX,
                       R: tl.constexpr, RDT: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                       SB: tl.constexpr, HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                       SKIP: tl.constexpr):
    """SPARSE backward for keys: one chunk of BK entries of a superblock's key list (grid: chunk, superblock,
    batch x dt head). dk, dv and d(dt) of those keys over the superblock's queries of every query head using the
    dt head, added atomically into float32 (accumulator) buffers: a key is listed by every superblock it is alive in."""
    c = tl.program_id(0)
    sb = tl.program_id(1)
    bm = tl.program_id(2).to(tl.int64)
    b = bm // NDT
    m = bm % NDT
    cnt = tl.load(CNT + bm * NS + sb)
    if c * BK < cnt:
        rd = tl.arange(0, D)
        pos = c * BK + tl.arange(0, BK)
        inb = pos < cnt
        kj = tl.load(IDX + (bm * NS + sb) * LMAX + pos, mask=inb, other=0)
        kv = (b * G + (m * RDT) // R) * Tp * D  # the dt head's query heads share one kv head (n = G or n = H)
        k = tl.load(K + kv + kj[:, None] * D + rd[None, :])
        v = tl.load(V + kv + kj[:, None] * D + rd[None, :])
        dt = tl.load(DT + bm * Tp + kj)
        e = tl.where(inb, tl.load(E + bm * Tp + kj), 0)
        # queries of the superblock that can see a listed key: from the first key to the last expiry
        first = tl.maximum(sb * SB, tl.min(tl.where(inb, kj, Tp), 0))
        last = tl.minimum(tl.max(e, 0), sb * SB + SB)
        if HAS_WINDOW:
            last = tl.minimum(last, tl.max(kj, 0) + window)
        dk = tl.zeros((BK, D), ACC)
        dv = tl.zeros((BK, D), ACC)
        ddt = tl.zeros((BK,), ACC)
        for j in range(RDT):
            row = (b * H + m * RDT + j) * Tp
            for qb in range(first // BQ, (last + BQ - 1) // BQ):
                dk, dv, ddt = _key_grads(Q, DO, LSE, DELTA, row, qb, k, v, dt, e, kj, rd, scale, window, dk, dv,
                                         ddt, D, BQ, HAS_WINDOW, PREC, SKIP)
        tl.atomic_add(DK + kv + kj[:, None] * D + rd[None, :], dk * scale, mask=inb[:, None], sem="relaxed")
        tl.atomic_add(DV + kv + kj[:, None] * D + rd[None, :], dv, mask=inb[:, None], sem="relaxed")
        tl.atomic_add(DDT + bm * Tp + kj, ddt, mask=inb, sem="relaxed")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype: float32 (float64 for float64 inputs, used to check rounding in tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_args(q: torch.Tensor, k: torch.Tensor, dt: torch.Tensor, window: int | None, bq: int, bk: int,
                 sb: int, kernel: str = "fwd") -> dict:
    """Constexpr and launch keyword arguments shared by the kernels."""
    H, D = q.shape[1], q.shape[3]
    acc = _acc_dtype(q.dtype)
    return dict(
        R=H // k.shape[1], RDT=H // dt.shape[1], D=D, BQ=bq, BK=bk, SB=max(sb, bq), HAS_WINDOW=window is not None,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        # float32 on a GPU: 3xTF32 tensor-core products (about float32 accuracy; IEEE products there run on FMA
        # units and spill); IEEE under the interpreter and for float64
        PREC=("tf32x3" if q.dtype == torch.float32 and q.is_cuda else
              "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"),
        SKIP=SKIP_FULL_TILE_MASK, num_warps=8 if D >= 128 else 4, num_stages=num_stages(kernel, D, q.element_size()),
    )


def key_lists(e: torch.Tensor, keep: int, window: int | None, superblock: int, bq: int, bk: int,
              max_elements: int = 1 << 24, check: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SPARSE kernels' key lists: per (batch, dt head, superblock of `superblock` queries), the keys alive for
    some query of the superblock, in key order. e [B, n, Tp] int32 expiry slots (<= Tp; 0 marks padding keys);
    Tp a multiple of bq and superblock of bq. Returns idx [B, n, NS, LMAX] int32 (unused slots 0), cnt [B, n, NS]
    (listed keys) and cntq [B, n, Tp // bq] (listed keys up to each query block's last query: the list is in key
    order, so a query block stops there), and overflow [B, n]. With at most `keep` keys alive per query (the
    keep-window rule) a list holds at most keep + superblock - 1 keys: LMAX = that, rounded up to bk and capped at
    Tp. An e that breaks the rule raises in eager mode with `check` (a host sync); traced or unchecked, its lists
    are cut at LMAX and flagged in overflow.
    Superblocks are listed a group at a time, so the [B, n, group, Tp] temporaries stay near `max_elements`."""
    B, n, Tp = e.shape
    ns = -(-Tp // superblock)
    lmax = min(-(-(keep + superblock) // bk) * bk, Tp)
    group = max(1, min(ns, max_elements // (B * n * Tp)))
    j = torch.arange(Tp, device=e.device, dtype=torch.int32)
    idx = torch.zeros(B, n, ns, lmax + 1, dtype=torch.int32, device=e.device)
    cnt, cntq, overflow = [], [], []
    for g0 in range(0, ns, group):
        g1 = min(g0 + group, ns)
        s0 = torch.arange(g0, g1, device=e.device, dtype=torch.int32)[:, None] * superblock
        # key j is alive for some query i in [s0, s0 + superblock): j <= i < e_j, i.e. j < s0 + superblock and
        # e_j > max(s0, j); with a sliding window also i - j < window for i = s0 at the latest
        live = (j < s0 + superblock) & (e[:, :, None, :] > torch.maximum(s0, j))
        if window is not None:
            live = live & (j + window > s0)
        cs = live.cumsum(-1, dtype=torch.int32)
        overflow.append(cs[..., -1] > lmax)  # a list that does not fit (e breaks the keep-window rule)
        cs = cs.clamp_max(lmax)  # the kernels never read past a list, even for such an e (the caller poisons it)
        slot = torch.where(live, cs - 1, lmax).clamp_max(lmax).long()  # unlisted keys go to a discarded last slot
        idx[:, :, g0:g1].scatter_(-1, slot, j.expand(B, n, g1 - g0, Tp))
        qe = torch.arange(g0 * superblock + bq, min(g1 * superblock, Tp) + 1, bq, device=e.device) - 1
        cntq.append(cs[:, :, qe // superblock - g0, qe])  # each query block's last query
        cnt.append(cs[..., -1])
    over = torch.cat(overflow, -1).any(-1)  # [B, n]
    if check and not torch.compiler.is_compiling() and bool(over.any()):
        raise ValueError(f"more than keep={keep} keys alive for some query: e does not follow the keep-window rule")
    return idx[..., :lmax].contiguous(), torch.cat(cnt, -1), torch.cat(cntq, -1), over


def _sizes(q, k, dt, lists):
    """Shape arguments of the kernels: Tp, H, G, n, then NQB, NS, LMAX of the key lists (1s when dense)."""
    B, H, Tp, D = q.shape
    if lists:
        idx, _, cntq = lists
        return Tp, H, k.shape[1], dt.shape[1], cntq.shape[2], idx.shape[2], idx.shape[3]
    return Tp, H, k.shape[1], dt.shape[1], 1, 1, 1


# The kernels as two custom ops (forward -> o, lse; backward -> dq, dk, dv, ddt) with a registered autograd formula:
# torch.compile(fullgraph=True) sees one opaque op per direction instead of tracing Python launch code.
# Arguments are the padded tensors (T a multiple of both blocks): q [B, H, Tp, D], k/v [B, G, Tp, D], dt (accumulator
# dtype) and e (int32) [B, n, Tp]; `lists` is empty (dense kernels) or `key_lists`' (idx, cnt, cntq) (SPARSE
# kernels, `sb` queries per superblock); window 0 means none.
@torch.library.custom_op("doge::dma_triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor, e: torch.Tensor,
            lists: list[torch.Tensor], window: int, bq: int, bk: int, sb: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, dt, e = (x.contiguous() for x in (q, k, v, dt, e))
    B, H, Tp, D = q.shape
    idx, cntq = (lists[0], lists[2]) if lists else (e, e)  # unused by the dense kernels
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Tp), dtype=_acc_dtype(q.dtype), device=q.device)
    scale = D ** -0.5  # a float32 kernel argument (exact for D = 16, 64, 256)
    _fwd_kernel[(Tp // bq, B, H)](q, k, v, dt, e, idx, cntq, o, lse, scale, window, *_sizes(q, k, dt, lists),
                                  SPARSE=bool(lists), **_launch_args(q, k, dt, window or None, bq, bk, sb))
    return o, lse


# fakes describe the real outputs exactly, strides included (the ops make their inputs contiguous): inductor checks
@_fwd_op.register_fake
def _(q, k, v, dt, e, lists, window, bq, bk, sb):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:3], dtype=_acc_dtype(q.dtype)))


@torch.library.custom_op("doge::dma_triton_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor, e: torch.Tensor,
            lists: list[torch.Tensor], o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor, window: int, bq: int,
            bk: int, sb: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, dt, e, o, lse, do = (x.contiguous() for x in (q, k, v, dt, e, o, lse, do))
    B, H, Tp, D = q.shape
    G, n = k.shape[1], dt.shape[1]
    f = _acc_dtype(q.dtype)
    delta = (o.to(f) * do.to(f)).sum(-1)
    scale = D ** -0.5
    sizes = _sizes(q, k, dt, lists)
    kw = _launch_args(q, k, dt, window or None, bq, bk, sb, kernel="dq")
    idx, cnt, cntq = lists if lists else (e, e, e)
    dq = torch.empty_like(q)
    _dq_kernel[(Tp // bq, B, H)](q, k, v, dt, e, idx, cntq, do, lse, delta, dq, scale, window, *sizes,
                                 SPARSE=bool(lists), **kw)
    kw["BQ"], kw["num_stages"] = min(bq, BLOCK_Q_DKV), num_stages("dkv", D, q.element_size())
    if lists:  # keys are listed by several superblocks: atomic float32 sums, then cast
        dk, dv = torch.zeros(k.shape, dtype=f, device=q.device), torch.zeros(v.shape, dtype=f, device=q.device)
        ddt = torch.zeros((B, n, Tp), dtype=f, device=q.device)
        _dkv_sparse_kernel[(idx.shape[3] // bk, idx.shape[2], B * n)](
            q, k, v, dt, e, idx, cnt, do, lse, delta, dk, dv, ddt, scale, window, Tp, H, G, n, idx.shape[2],
            idx.shape[3], **kw)
        return dq, dk.to(k.dtype), dv.to(v.dtype), ddt.to(dt.dtype)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    ddt = torch.empty((B, H, Tp), dtype=f, device=q.device)
    del kw["SB"]
    _dkv_kernel[(Tp // bk, B, G)](q, k, v, dt, e, do, lse, delta, dk, dv, ddt, scale, window, Tp, H, G, n, **kw)
    ddt = ddt.view(B, n, H // n, Tp).sum(2)  # query head h uses dt head h // (H // n)
    return dq, dk, dv, ddt.to(dt.dtype)


@_bwd_op.register_fake
def _(q, k, v, dt, e, lists, o, lse, do, window, bq, bk, sb):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v, dt))


def _setup_context(ctx, inputs, output):
    q, k, v, dt, e, lists, window, bq, bk, sb = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, dt, e, o, lse, *lists)
    ctx.mark_non_differentiable(lse)
    ctx.window, ctx.bq, ctx.bk, ctx.sb = window, bq, bk, sb


def _backward(ctx, do, dlse):
    q, k, v, dt, e, o, lse, *lists = ctx.saved_tensors
    dq, dk, dv, ddt = _bwd_op(q, k, v, dt, e, lists, o, lse, do, ctx.window, ctx.bq, ctx.bk, ctx.sb)
    return dq, dk, dv, ddt, None, [None] * len(lists), None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _is_pow2(x: int, at_least: int = 16) -> bool:
    return x >= at_least and x & (x - 1) == 0


def use_sparse(T: int, keep: int | None) -> bool:
    """Whether `dma_triton` takes the SPARSE kernels by default: from T >= 2 * keep_window on (a guess: below it the
    lists save less than a quarter of the causal tiles; to be tuned on a GPU with benchmarks/kernel_tune.py), and
    not under torch.use_deterministic_algorithms (their key-side sums are atomic; the dense kernels are
    deterministic)."""
    return keep is not None and T >= 2 * keep and not torch.are_deterministic_algorithms_enabled()


def dma_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor, e: torch.Tensor,
               window: int | None = None, block_q: int | None = None, block_k: int | None = None,
               keep: int | None = None, sparse: bool | None = None, superblock: int = SUPERBLOCK,
               check: bool = True) -> torch.Tensor:
    """Dynamic Mask Attention by the Triton kernels, for S == T (training, prefill).

    q [B, H, T, D], k/v [B, G, T, D] (query head h uses kv head h // (H // G)), dt [B, n, T] float and e [B, n, T]
    integer expiry slots (n = G or H; query head h uses head h // (H // n); e = 0 marks a padding key, values >= T
    never expire). Returns o [B, H, T, D] in q's dtype, differentiable in q, k, v, dt. T is padded to a multiple
    of the blocks; D and the blocks must be powers of two >= 16 (Triton tiles; blocks default to `default_blocks`,
    which keeps every kernel within sm_90's shared memory). Rows with no visible key give a finite value to be
    replaced by the caller.

    `keep` (the keep window e was made with: at most `keep` keys alive per query) allows the SPARSE kernels, which
    visit per query block only the keys alive somewhere in its superblock (`superblock` queries, a multiple of
    block_q): about keep + superblock keys instead of every earlier key. `sparse` forces them on or off; by
    default they run from T >= 2 * keep on (`use_sparse`). An e that lets more than `keep` keys live raises in
    eager mode and gives NaN outputs under torch.compile or with `check=False` (for an e made by `key_expiry` with
    this keep, which cannot break the rule: the eager check waits for the device).
    """
    B, H, T, D = q.shape
    G, n = k.shape[1], dt.shape[1]
    if not _is_pow2(D):
        raise ValueError(f"triton attention needs a power-of-two head dim >= 16, got {D}")
    bq0, bk0 = default_blocks(D, q.element_size())
    block_q, block_k = block_q or bq0, block_k or bk0
    if not (_is_pow2(block_q) and _is_pow2(block_k)):
        raise ValueError(f"blocks must be powers of two >= 16, got {block_q}, {block_k}")
    kv_ok = k.shape == v.shape and k.shape[::2] == (B, T) and k.shape[3] == D and H % G == 0
    if not kv_ok or H % n or e.shape != dt.shape or dt.shape[::2] != (B, T):
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"dt {tuple(dt.shape)}, e {tuple(e.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    sparse = use_sparse(T, keep) if sparse is None else sparse
    if sparse and (keep is None or keep < 1 or superblock % block_q):
        raise ValueError(f"the sparse kernels need keep >= 1 and a superblock that is a multiple of block_q, got "
                         f"keep={keep}, superblock={superblock}, block_q={block_q}")
    blk = max(block_q, block_k)  # both powers of two: a multiple of each (the last superblock may be partial)
    pad = -(-T // blk) * blk - T
    if window is not None:
        window = min(window, T + pad)  # the same mask; keeps the kernels' int32 index sums from overflowing
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    dt = F.pad(dt.to(_acc_dtype(q.dtype)), (0, pad))
    e = F.pad(e.clamp(max=T + pad).to(torch.int32), (0, pad))  # padding keys: expired before they exist
    if sparse and n % G:  # the key-side kernel maps a dt head to one kv head: give each query head its own
        dt, e = dt.repeat_interleave(H // n, dim=1), e.repeat_interleave(H // n, dim=1)
    lists = list(key_lists(e, keep, window, superblock, block_q, block_k, check=check)) if sparse else []
    overflow = lists.pop() if lists else None
    o, _ = _fwd_op(q, k, v, dt, e, lists, window or 0, block_q, block_k, superblock)
    o = o[:, :, :T]
    if overflow is not None:  # (traced or unchecked: eager raised) NaN, never attention over a truncated key list
        over = overflow.repeat_interleave(H // overflow.shape[1], dim=1)[:, :, None, None]
        o = torch.where(over, torch.full_like(o, float("nan")), o)
    return o
