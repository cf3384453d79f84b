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
# The dk/dv/d(dt) kernel steps through the queries 32 at a time: with 64 (D = 128, 8 warps, bf16) ptxas needs 255
# registers and spills (benchmarks/triton_compile_check.py, sm_90); with 32 it needs 198 and does not.
BLOCK_Q_DKV = 32
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
def _tile_scores(q, k, dt, e, qi, kj, scale, window, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr):
    """Masked scores of one tile [BQ, BK] (natural-exp domain, as the reference)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale + dt[None, :]
    keep = (kj[None, :] <= qi[:, None]) & (qi[:, None] < e[None, :])
    if HAS_WINDOW:
        keep = keep & (qi[:, None] - kj[None, :] < window)
    return tl.where(keep, s, MASK)


@_jit
def _query_block(Tp, H, G, NDT, window, R: tl.constexpr, RDT: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr,
                 BK: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """This program's query block (grid: query block, batch, query head): its index, query slots, the base offsets
    of its query head's rows [Tp] (x D for q-shaped arrays), its kv head's [Tp, D] and its dt/e head's [Tp], and
    the key blocks it visits (from the first one the window allows to the causal diagonal)."""
    qb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    qi = qb * BQ + tl.arange(0, BQ)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(qb * BQ - window + 1, 0) // BK
    hi = ((qb + 1) * BQ + BK - 1) // BK  # causal: no key block past the diagonal
    return qi, (b * H + h) * Tp, (b * G + h // R) * Tp * D, (b * NDT + h // RDT) * Tp, lo, hi


@_jit
def _key_tile(K, V, DT, E, kv, dte, kb, q, qi, rd, scale, window, D: tl.constexpr, BK: tl.constexpr,
              HAS_WINDOW: tl.constexpr, PREC: tl.constexpr):
    """Key block kb of a query block's loop: its k, v [BK, D] and the masked scores [BQ, BK]."""
    kj = kb * BK + tl.arange(0, BK)
    k = tl.load(K + kv + kj[:, None] * D + rd[None, :])
    v = tl.load(V + kv + kj[:, None] * D + rd[None, :])
    s = _tile_scores(q, k, tl.load(DT + dte + kj), tl.load(E + dte + kj), qi, kj, scale, window, HAS_WINDOW, PREC)
    return k, v, s


@_jit
def _fwd_kernel(Q, K, V, DT, E, O, LSE, scale, window, Tp, H, G, NDT,
                R: tl.constexpr, RDT: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """One query block of one query head: o [BQ, D] and lse [BQ] by an online softmax over the key blocks."""
    qi, row, kv, dte, lo, hi = _query_block(Tp, H, G, NDT, window, R, RDT, D, BQ, BK, HAS_WINDOW)
    rd = tl.arange(0, D)
    q = tl.load(Q + row * D + qi[:, None] * D + rd[None, :])
    m = tl.full((BQ,), float("-inf"), ACC)
    l = tl.zeros((BQ,), ACC)
    acc = tl.zeros((BQ, D), ACC)
    for kb in range(lo, hi):
        _, v, s = _key_tile(K, V, DT, E, kv, dte, kb, q, qi, rd, scale, window, D, BK, HAS_WINDOW, PREC)
        m_new = tl.maximum(m, tl.max(s, 1))
        corr = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m = m_new
    tl.store(O + row * D + qi[:, None] * D + rd[None, :], (acc / l[:, None]).to(O.dtype.element_ty))
    tl.store(LSE + row + qi, m + tl.log(l))


@_jit
def _dq_kernel(Q, K, V, DT, E, DO, LSE, DELTA, DQ, scale, window, Tp, H, G, NDT,
               R: tl.constexpr, RDT: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
               HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """dq of one query block of one query head, over the same key blocks as the forward."""
    qi, row, kv, dte, lo, hi = _query_block(Tp, H, G, NDT, window, R, RDT, D, BQ, BK, HAS_WINDOW)
    rd = tl.arange(0, D)
    q = tl.load(Q + row * D + qi[:, None] * D + rd[None, :])
    do = tl.load(DO + row * D + qi[:, None] * D + rd[None, :])
    lse = tl.load(LSE + row + qi)
    delta = tl.load(DELTA + row + qi)
    dq = tl.zeros((BQ, D), ACC)
    for kb in range(lo, hi):
        k, v, s = _key_tile(K, V, DT, E, kv, dte, kb, q, qi, rd, scale, window, D, BK, HAS_WINDOW, PREC)
        p = tl.exp(s - lse[:, None])
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + row * D + qi[:, None] * D + rd[None, :], (dq * scale).to(DQ.dtype.element_ty))


@_jit
def _dkv_kernel(Q, K, V, DT, E, DO, LSE, DELTA, DK, DV, DDT, scale, window, Tp, H, G, NDT,
                R: tl.constexpr, RDT: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
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
            qi = qb * BQ + tl.arange(0, BQ)
            q = tl.load(Q + row * D + qi[:, None] * D + rd[None, :])
            do = tl.load(DO + row * D + qi[:, None] * D + rd[None, :])
            lse = tl.load(LSE + row + qi)
            delta = tl.load(DELTA + row + qi)
            s = _tile_scores(q, k, dt, e, qi, kj, scale, window, HAS_WINDOW, PREC)
            p = tl.exp(s - lse[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
            ddt += tl.sum(ds, 0)
        tl.store(DDT + row + kj, ddt)
    tl.store(DK + kv + kj[:, None] * D + rd[None, :], (dk * scale).to(DK.dtype.element_ty))
    tl.store(DV + kv + kj[:, None] * D + rd[None, :], dv.to(DV.dtype.element_ty))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype: float32 (float64 for float64 inputs, used to check rounding in tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_args(q: torch.Tensor, k: torch.Tensor, dt: torch.Tensor, window: int | None, bq: int, bk: int) -> dict:
    """Constexpr and launch keyword arguments shared by the three kernels."""
    H, D = q.shape[1], q.shape[3]
    acc = _acc_dtype(q.dtype)
    return dict(
        R=H // k.shape[1], RDT=H // dt.shape[1], D=D, BQ=bq, BK=bk, HAS_WINDOW=window is not None,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        # float32 on a GPU: 3xTF32 tensor-core products (about float32 accuracy; IEEE products there run on FMA
        # units and spill); IEEE under the interpreter and for float64
        PREC=("tf32x3" if q.dtype == torch.float32 and q.is_cuda else
              "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"),
        num_warps=8 if D >= 128 else 4, num_stages=2,
    )


# The kernels as two custom ops (forward -> o, lse; backward -> dq, dk, dv, ddt) with a registered autograd formula:
# torch.compile(fullgraph=True) sees one opaque op per direction instead of tracing Python launch code.
# Arguments are the padded tensors (T a multiple of both blocks): q [B, H, Tp, D], k/v [B, G, Tp, D], dt (accumulator
# dtype) and e (int32) [B, n, Tp]; window 0 means none.
@torch.library.custom_op("doge::dma_triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor, e: torch.Tensor, window: int,
            bq: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, dt, e = (x.contiguous() for x in (q, k, v, dt, e))
    B, H, Tp, D = q.shape
    G, n = k.shape[1], dt.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Tp), dtype=_acc_dtype(q.dtype), device=q.device)
    scale = D ** -0.5  # a float32 kernel argument (exact for D = 16, 64, 256)
    _fwd_kernel[(Tp // bq, B, H)](q, k, v, dt, e, o, lse, scale, window, Tp, H, G, n,
                                  **_launch_args(q, k, dt, window or None, bq, bk))
    return o, lse


# fakes describe the real outputs exactly, strides included (the ops make their inputs contiguous): inductor checks
@_fwd_op.register_fake
def _(q, k, v, dt, e, window, bq, bk):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:3], dtype=_acc_dtype(q.dtype)))


@torch.library.custom_op("doge::dma_triton_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor, e: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, do: torch.Tensor, window: int, bq: int, bk: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, dt, e, o, lse, do = (x.contiguous() for x in (q, k, v, dt, e, o, lse, do))
    B, H, Tp, D = q.shape
    G, n = k.shape[1], dt.shape[1]
    f = _acc_dtype(q.dtype)
    delta = (o.to(f) * do.to(f)).sum(-1)
    scale = D ** -0.5
    kw = _launch_args(q, k, dt, window or None, bq, bk)
    dq = torch.empty_like(q)
    _dq_kernel[(Tp // bq, B, H)](q, k, v, dt, e, do, lse, delta, dq, scale, window, Tp, H, G, n, **kw)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    ddt = torch.empty((B, H, Tp), dtype=f, device=q.device)
    kw["BQ"] = min(bq, BLOCK_Q_DKV)
    _dkv_kernel[(Tp // bk, B, G)](q, k, v, dt, e, do, lse, delta, dk, dv, ddt, scale, window, Tp, H, G, n, **kw)
    ddt = ddt.view(B, n, H // n, Tp).sum(2)  # query head h uses dt head h // (H // n)
    return dq, dk, dv, ddt.to(dt.dtype)


@_bwd_op.register_fake
def _(q, k, v, dt, e, o, lse, do, window, bq, bk):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v, dt))


def _setup_context(ctx, inputs, output):
    q, k, v, dt, e, window, bq, bk = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, dt, e, o, lse)
    ctx.mark_non_differentiable(lse)
    ctx.window, ctx.bq, ctx.bk = window, bq, bk


def _backward(ctx, do, dlse):
    q, k, v, dt, e, o, lse = ctx.saved_tensors
    dq, dk, dv, ddt = _bwd_op(q, k, v, dt, e, o, lse, do, ctx.window, ctx.bq, ctx.bk)
    return dq, dk, dv, ddt, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _is_pow2(x: int, at_least: int = 16) -> bool:
    return x >= at_least and x & (x - 1) == 0


def dma_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor, e: torch.Tensor,
               window: int | None = None, block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> torch.Tensor:
    """Dynamic Mask Attention by the Triton kernels, for S == T (training, prefill).

    q [B, H, T, D], k/v [B, G, T, D] (query head h uses kv head h // (H // G)), dt [B, n, T] float and e [B, n, T]
    integer expiry slots (n = G or H; query head h uses head h // (H // n); e = 0 marks a padding key, values >= T
    never expire). Returns o [B, H, T, D] in q's dtype, differentiable in q, k, v, dt. T is padded to a multiple
    of the blocks; D and the blocks must be powers of two >= 16 (Triton tiles). Rows with no visible key give a
    finite value to be replaced by the caller.
    """
    B, H, T, D = q.shape
    G, n = k.shape[1], dt.shape[1]
    if not _is_pow2(D):
        raise ValueError(f"triton attention needs a power-of-two head dim >= 16, got {D}")
    if not (_is_pow2(block_q) and _is_pow2(block_k)):
        raise ValueError(f"blocks must be powers of two >= 16, got {block_q}, {block_k}")
    kv_ok = k.shape == v.shape and k.shape[::2] == (B, T) and k.shape[3] == D and H % G == 0
    if not kv_ok or H % n or e.shape != dt.shape or dt.shape[::2] != (B, T):
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"dt {tuple(dt.shape)}, e {tuple(e.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    blk = max(block_q, block_k)  # both powers of two: a multiple of each
    pad = -(-T // blk) * blk - T
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    dt = F.pad(dt.to(_acc_dtype(q.dtype)), (0, pad))
    e = F.pad(e.clamp(max=T + pad).to(torch.int32), (0, pad))  # padding keys: expired before they exist
    o, _ = _fwd_op(q, k, v, dt, e, window or 0, block_q, block_k)
    return o[:, :, :T]
