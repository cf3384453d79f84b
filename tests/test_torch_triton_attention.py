"""The Triton DMA kernels (forward, dq, dk/dv/d(dt)) under the Triton interpreter on CPU against a dense float64
reference written from the definition: values and gradients, GQA with per-kv-head and per-query-head dt, key
expiry active or not, padding keys and a fully padded batch row, sliding windows, T not a multiple of the blocks,
unequal blocks. Most cases run the kernels in float64 (tight tolerance), some in float32 (the GPU accumulator).
conftest.py sets TRITON_INTERPRET=1 before triton is imported."""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import doge_torch.triton_attention as ta  # noqa: E402
from doge_torch.model import key_expiry  # noqa: E402

if not isinstance(ta._fwd_kernel, interpreter.InterpretedFunction):  # never silently skip the kernel tests
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1: run these tests through tests/conftest.py")



B, H, G, D = 2, 4, 2, 16


def _reference(q, k, v, dt, e, window):
    """Dense DMA from the definition: o [B, H, T, D] and live [B, H, T] (rows with at least one visible key)."""
    T = q.shape[2]
    kk, vv = (x.repeat_interleave(H // x.shape[1], 1) for x in (k, v))
    dth, eh = (x.repeat_interleave(H // x.shape[1], 1) for x in (dt, e))
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = (j <= i) & (i < eh[:, :, None, :])
    if window is not None:
        allowed = allowed & (i - j < window)
    live = allowed.any(-1)
    s = q @ kk.transpose(-1, -2) * q.shape[-1] ** -0.5 + dth[:, :, None, :]
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(~live[..., None], 0.0)  # dead rows: finite, excluded
    return torch.softmax(s, -1) @ vv, live


def _inputs(T, n, keep, pad, dt_kind, dtype, seed=0):
    """q, k, v, dt (float64, rounded through `dtype`) and e = key_expiry clamped to T as int32. pad = (b, p): the
    first p keys of batch row b are padding."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((B, H, T, D), (B, G, T, D), (B, G, T, D)))
    if dt_kind == "increasing":  # each key is beaten by every later one: keys expire keep slots later
        dt = torch.linspace(0.5, 3.0, T, dtype=torch.float64) + 0.01 * torch.rand(B, n, T, generator=g,
                                                                                  dtype=torch.float64)
    else:
        dt = torch.randn(B, n, T, generator=g, dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[pad[0], :pad[1]] = False
    e = key_expiry(dt, valid, keep).clamp(max=T).to(torch.int32)
    return [x.to(dtype).to(torch.float64) for x in (q, k, v, dt)], e


# name: (T, n, keep_window, pad (batch row, leading padding keys), sliding window, dt kind, block_q, block_k, dtype).
# Expiry with a sliding window is not the keep-window rule (key_expiry assumes none), but is the kernel's function.
CASES = {
    "gqa_dt_per_kv_head": (70, G, 16, (1, 5), None, "random", 16, 16, torch.float64),
    "dt_per_query_head": (70, H, 16, (0, 3), None, "random", 16, 16, torch.float64),
    "no_expiry": (40, G, 64, (1, 5), None, "random", 16, 16, torch.float64),
    "fully_padded_row": (40, H, 16, (1, 40), None, "random", 16, 16, torch.float64),
    "window_and_expiry": (70, G, 16, (1, 5), 8, "random", 16, 16, torch.float64),
    "window_no_expiry": (70, H, 100, (0, 0), 18, "random", 16, 16, torch.float64),
    "increasing_dt": (100, G, 16, (1, 5), None, "increasing", 16, 16, torch.float64),
    "bq_gt_bk": (70, H, 16, (1, 21), 24, "random", 32, 16, torch.float64),  # a whole padding key block
    "bq_lt_bk": (70, G, 16, (0, 20), None, "increasing", 16, 32, torch.float64),
    "bq64_dkv_bq32": (100, G, 16, (1, 5), None, "increasing", 64, 16, torch.float64),  # dk/dv steps 32 queries
    # the 16-bit default tiles (128 x 64; superblock 256: one per 2+ query blocks), with a window
    "bq128_bk64_default_tiles": (300, H, 40, (0, 70), 50, "random", 128, 64, torch.float64),
    "dt_shared_by_all_heads": (70, 1, 16, (1, 5), None, "random", 16, 16, torch.float64),  # n = 1 < G
    "float32": (70, G, 16, (1, 5), None, "random", 16, 16, torch.float32),
    "float32_window_per_query_head": (50, H, 16, (0, 7), 12, "increasing", 16, 16, torch.float32),
}


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_equals_reference(case, sparse):
    """Output on rows with a visible key and the q, k, v, dt gradients (upstream gradient zero on dead rows), by the
    dense kernels and by the SPARSE ones (key lists per superblock of max(32, block_q) queries: several per row)."""
    T, n, keep, pad, window, dt_kind, bq, bk, dtype = CASES[case]
    args, e = _inputs(T, n, keep, pad, dt_kind, dtype)
    assert ((e > 0) & (e < T)).any() == (keep < T)  # expiry active iff T > keep_window
    args = [x.requires_grad_() for x in args]
    want, live = _reference(*args, e, window)
    assert (~live).any() == (pad[1] > 0)  # padding keys leave dead rows; they are excluded below
    upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    upstream = (upstream * live[..., None]).to(dtype).to(torch.float64)
    g_want = torch.autograd.grad((want * upstream).sum(), args)

    targs = [x.detach().to(dtype).requires_grad_() for x in args]
    got = ta.dma_triton(*targs, e, window=window, block_q=bq, block_k=bk, keep=keep, sparse=sparse,
                        superblock=max(32, bq))
    assert got.shape == want.shape and got.dtype == dtype
    assert torch.isfinite(got).all()
    g_got = torch.autograd.grad((got * upstream.to(dtype)).sum(), targs)

    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    m = live[..., None].expand_as(want)
    for name, a, b in [("o", got[m], want[m])] + list(zip(("dq", "dk", "dv", "ddt"), g_got, g_want)):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        err = (a.double() - b.detach()).abs().max().item()
        assert err <= rtol * b.abs().max().item(), (name, err, b.abs().max().item())


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("case", ["gqa_dt_per_kv_head", "window_and_expiry", "no_expiry", "bq_gt_bk"])
def test_skip_full_tile_mask_is_the_same_function(monkeypatch, case, sparse):
    """SKIP_FULL_TILE_MASK (no per-element mask on tiles where every key is visible to every query): the same
    values and gradients as the reference, on tiles with and without expiry, windows and padding."""
    monkeypatch.setattr(ta, "SKIP_FULL_TILE_MASK", True)
    test_triton_equals_reference(case, sparse)


@pytest.mark.parametrize("window", [None, 9])
def test_key_lists_match_brute_force(window):
    """Each superblock's list holds exactly the keys some query of the superblock sees, in key order; cntq counts
    the ones at or before each query block's last query; no list outgrows keep + superblock."""
    T, keep, sb, bq, bk = 96, 16, 32, 16, 16
    _, e = _inputs(T, H, keep, (1, 5), "random", torch.float64)
    idx, cnt, cntq, overflow = ta.key_lists(e, keep, window, sb, bq, bk)
    assert not overflow.any()
    for grouped, whole in zip(ta.key_lists(e, keep, window, sb, bq, bk, max_elements=B * H * T * 2), (idx, cnt, cntq)):
        assert torch.equal(grouped, whole)  # two superblocks at a time: the same lists
    assert idx.shape[2:] == (T // sb, keep + sb) and cntq.shape[2] == T // bq
    i = torch.arange(T)
    for b in range(B):
        for m in range(H):
            sees = (i[None, :] <= i[:, None]) & (i[:, None] < e[b, m][None, :])  # [query, key]
            if window is not None:
                sees &= i[:, None] - i[None, :] < window
            for s in range(T // sb):
                want = sees[s * sb:(s + 1) * sb].any(0).nonzero().flatten()
                assert cnt[b, m, s] == len(want)
                assert torch.equal(idx[b, m, s, :len(want)].long(), want)
                for qb in range(s * sb // bq, (s + 1) * sb // bq):
                    assert cntq[b, m, qb] == (want <= qb * bq + bq - 1).sum()


def test_sparse_refuses_expiry_beyond_keep():
    """The sparse kernels' lists are sized for `keep`: expiry slots that let more keys live raise in eager mode and
    give NaN under torch.compile or unchecked (the lists are cut, the kernels never read past them), never a
    truncation."""
    T, keep = 64, 8
    args, e = _inputs(T, G, T, (0, 0), "random", torch.float64)  # nothing expires: the last list holds 64 keys
    kw = dict(keep=keep, sparse=True, superblock=16, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="keep=8"):
        ta.dma_triton(*args, e, **kw)
    o = torch.compile(lambda *a: ta.dma_triton(*a, e, **kw), fullgraph=True, backend="eager")(*args)
    assert torch.isnan(o).all()
    assert torch.isnan(ta.dma_triton(*args, e, check=False, **kw)).all()  # unchecked eager (no host sync): NaN too
    lists = torch.compile(lambda e: ta.key_lists(e, keep, None, 16, 16, 16), fullgraph=True, backend="eager")(e)
    assert lists[3].all() and lists[1].max() == lists[0].shape[-1] == 32  # flagged; counts cut at LMAX (24 -> 32)
    with pytest.raises(ValueError, match="superblock"):
        ta.dma_triton(*args, e, keep=keep, sparse=True, superblock=24, block_q=16, block_k=16)
    assert not ta.use_sparse(T, None) and not ta.use_sparse(2 * keep - 1, keep) and ta.use_sparse(2 * keep, keep)
    torch.use_deterministic_algorithms(True)
    try:  # the sparse kernels' float32 atomics are not deterministic: the dense kernels run instead
        assert not ta.use_sparse(2 * keep, keep)
    finally:
        torch.use_deterministic_algorithms(False)



def test_huge_window_is_no_window_and_default_blocks():
    """A window wider than the sequence is no window (clamped, so the kernels' int32 index sums cannot overflow);
    the default blocks keep float32 at head dim 256 within sm_90's shared memory (32 x 32 tiles); 16-bit inputs at
    head dim 128 get 128-query tiles (timed faster on an H200)."""
    args, e = _inputs(40, G, 16, (0, 0), "random", torch.float64)
    kw = dict(block_q=16, block_k=16, keep=16)
    torch.testing.assert_close(ta.dma_triton(*args, e, window=2 ** 31 - 2, **kw), ta.dma_triton(*args, e, **kw),
                               rtol=0, atol=0)
    assert ta.default_blocks(128, 2) == (128, 64) and ta.default_blocks(64, 2) == (64, 64)
    assert ta.default_blocks(128, 4) == ta.default_blocks(256, 2) == (64, 64) and ta.default_blocks(256, 4) == (32, 32)
    assert ta.num_stages("dq", 128, 4) == 1 and ta.num_stages("dq", 128, 2) == ta.num_stages("fwd", 128, 4) == 2

def test_bad_shapes_and_availability():
    """Head dims that are not powers of two >= 16 raise; the CPU is never 'available' (compiled kernels only)."""
    q = torch.zeros(1, 2, 8, 24)
    e = torch.full((1, 1, 8), 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="power-of-two head dim >= 16, got 24"):
        ta.dma_triton(q, q[:, :1], q[:, :1], torch.zeros(1, 1, 8), e)
    q8 = torch.zeros(1, 2, 8, 8)
    with pytest.raises(ValueError, match="power-of-two head dim >= 16, got 8"):
        ta.dma_triton(q8, q8[:, :1], q8[:, :1], torch.zeros(1, 1, 8), e)
    q16 = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="blocks must be powers of two >= 16, got 48, 32"):
        ta.dma_triton(q16, q16[:, :1], q16[:, :1], torch.zeros(1, 1, 8), e, block_q=48, block_k=32)
    assert not ta.triton_available("cpu")


def test_imports_without_triton():
    """The module imports where triton is missing (CPU wheels), and reports itself unavailable."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import doge_torch.triton_attention as ta\n"
            "assert ta.triton is None and not ta.triton_available('cpu')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_compiles_fullgraph_as_custom_ops(sparse):
    """torch.compile(fullgraph=True) captures the kernels as two opaque custom ops (no graph break; the sparse
    kernels' key lists are traced torch ops), with the same values and gradients as eager."""
    T, n, keep = 40, G, 16
    args, e = _inputs(T, n, keep, (1, 3), "random", torch.float32)
    args = [x.float() for x in args]

    def f(q, k, v, dt):
        return ta.dma_triton(q, k, v, dt, e, block_q=16, block_k=16, keep=keep, sparse=sparse, superblock=16)

    eager = [x.clone().requires_grad_() for x in args]
    comp = [x.clone().requires_grad_() for x in args]
    o1 = f(*eager)
    o2 = torch.compile(f, fullgraph=True, backend="eager")(*comp)
    assert torch.equal(o1, o2)
    w = torch.randn(o1.shape, generator=torch.Generator().manual_seed(3))
    for a, b in zip(torch.autograd.grad((o1 * w).sum(), eager), torch.autograd.grad((o2 * w).sum(), comp)):
        assert torch.equal(a, b)


def _eager_and_forced_triton(monkeypatch, cfg, impl):
    """(reference model, the same weights with attention_impl=impl, calls): random nonzero A; the Triton kernels
    forced available (the interpreter runs them, 16 x 16 tiles); `calls` gets each dma_triton call's kwargs."""
    import doge_torch.model as dm

    torch.manual_seed(0)
    ref = dm.DogeForCausalLM(cfg.replace(attention_impl="reference"))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(".A"):
                p.normal_()
    model = dm.DogeForCausalLM(cfg.replace(attention_impl=impl))
    model.load_state_dict(ref.state_dict())
    calls = []
    real = dm.dma_triton
    monkeypatch.setattr(dm, "triton_available", lambda device: True)
    monkeypatch.setattr(dm, "dma_triton", lambda *a, **k: calls.append(k) or real(*a, block_q=16, block_k=16,
                                                                                   superblock=16, **k))
    return ref, model, calls


@pytest.mark.parametrize("T,keep,padded", [(40, 16, False), (24, 32, False), (40, 24, False), (40, 16, True),
                                           (24, 32, True)])
def test_model_with_triton_kernel_equals_eager(monkeypatch, T, keep, padded):
    """doge_torch's model with attention_impl="pallas" routes batches through the kernel (forced on CPU: the
    interpreter; the sparse kernels from T >= 2 keep_window on), padded ones too (padding keys expired, the rows
    before a row's first valid key the reference's uniform rows), and matches the eager reference path in logits
    and in every parameter gradient."""
    from doge_jax.config import DogeConfig

    cfg = DogeConfig(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, keep_window_size=keep, max_position_embeddings=64)
    ref, fast, calls = _eager_and_forced_triton(monkeypatch, cfg, "pallas")
    ids = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:  # row 1: 7 left-padding tokens and a hole
        mask[1, :7] = 0
        mask[1, 12] = 0
    labels = ids.masked_fill(mask == 0, -100)
    kw = dict(attention_mask=mask if padded else None, labels=labels)
    out_r, out_f = ref(ids, **kw), fast(ids, **kw)
    assert len(calls) == cfg.num_hidden_layers
    assert (out_f.logits - out_r.logits).abs().max().item() <= 1e-5
    out_r.loss.backward()
    out_f.loss.backward()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        scale = b.grad.abs().max().item()
        assert (a.grad - b.grad).abs().max().item() <= 1e-4 * max(scale, 1e-3), name


@pytest.mark.parametrize("impl,T,D,want_calls", [("auto", 40, 16, 2), ("auto", 32, 16, 0), ("reference", 40, 16, 0),
                                                 ("auto", 40, 24, 0)])
def test_auto_runs_the_sparse_kernels_far_beyond_the_keep_window(monkeypatch, impl, T, D, want_calls):
    """attention_impl="auto" (on CUDA: forced here, the interpreter runs the kernels) takes the sparse Triton kernels
    only for T > TRITON_AUTO_MIN_WINDOWS * keep_window and a power-of-two head dim (else FlexAttention, or the folded
    sdpa below), with the eager reference's logits."""
    from doge_jax.config import DogeConfig

    keep = 8
    cfg = DogeConfig(vocab_size=64, hidden_size=4 * D, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, keep_window_size=keep, max_position_embeddings=64)
    assert cfg.head_size == D
    ref, model, calls = _eager_and_forced_triton(monkeypatch, cfg, impl)
    ids = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert len(calls) == want_calls and all(k["keep"] == keep for k in calls)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("padded", [False, True])
def test_pallas_with_a_head_dim_the_kernels_cannot_tile(monkeypatch, padded):
    """attention_impl="pallas" on CUDA (forced) with head dim 24: not a Triton tile size, so the sdpa paths run (as
    doge_jax's explicit impls outside their range), padded or not, with the reference's logits."""
    from doge_jax.config import DogeConfig

    cfg = DogeConfig(vocab_size=64, hidden_size=96, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, keep_window_size=16, max_position_embeddings=64)
    ref, model, calls = _eager_and_forced_triton(monkeypatch, cfg, "pallas")
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    kw = dict(attention_mask=mask if padded else None)
    with torch.no_grad():
        got, want = model(ids, **kw).logits, ref(ids, **kw).logits
    assert calls == [] and (got - want).abs().max().item() <= 1e-5


def test_custom_ops_pass_opcheck_on_strided_inputs():
    """torch.library.opcheck on transposed (non-contiguous) inputs, as the model passes them: the fake kernels give
    the real outputs' shapes, dtypes and strides (inductor asserts them), autograd registration and AOT dispatch."""
    T, n, keep = 32, G, 16
    args, e = _inputs(T, n, keep, (0, 0), "random", torch.float32)
    q, k, v, dt = (x.float().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in args)
    assert not q.is_contiguous()
    for lists in ([], list(ta.key_lists(e, keep, None, 16, 16, 16))[:3]):  # dense, sparse
        torch.library.opcheck(torch.ops.doge.dma_triton_fwd.default, (q, k, v, dt, e, lists, 0, 16, 16, 16))
        o, lse = torch.ops.doge.dma_triton_fwd(q, k, v, dt, e, lists, 0, 16, 16, 16)
        do = torch.randn_like(o).transpose(1, 2).contiguous().transpose(1, 2)
        torch.library.opcheck(torch.ops.doge.dma_triton_bwd.default,
                              (q.detach(), k.detach(), v.detach(), dt.detach(), e, lists, o.detach(), lse, do, 0, 16,
                               16, 16))
