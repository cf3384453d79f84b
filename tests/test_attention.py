"""Dynamic Mask Attention implementations (doge_jax.attention): blockwise and fused against the dense reference
(forward and gradients, float32, `highest` precision), the key-expiry rule against its definition, and whole
models with each implementation against transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MOE, hf_logits, left_pad_mask, make_hf_model, max_abs_diff, save_hf, unique_ids
from flax import nnx

from doge_jax.attention import (
    MaskInfo,
    attention,
    attention_blockwise,
    attention_fused,
    attention_reference,
    choose_impl,
    key_expiry,
)
from doge_jax.model import DogeCache, DogeForCausalLM, with_attention_impl

jax.config.update("jax_default_matmul_precision", "highest")


def _inputs(B=2, H=4, G=2, n=2, S=70, T=70, D=8, ties=False, pad=(0, 5), seed=0):
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.normal(size=s), jnp.float32) for s in ((B, H, S, D), (B, G, T, D), (B, G, T, D)))
    dt = r.normal(size=(B, n, T))
    if ties:  # many equal dt values: the lower index must win, in every implementation
        dt = np.round(dt * 2) / 2
    dt = jnp.asarray(np.exp(dt), jnp.float32)
    km = np.ones((B, T), bool)
    for b, p in enumerate(pad):
        km[b, :p] = False
    w = jnp.asarray(r.normal(size=(B, H, S, D)), jnp.float32)
    return (q, k, v, dt), jnp.asarray(km), w


def _compare(f_new, args, mask, w, kw):
    def ref(*a):
        return attention_reference(*a, mask, kw)

    @jax.jit
    def new(*a):  # values and gradients of sum(f_new * w) in one compiled program (one compile, not two)
        o, vjp = jax.vjp(f_new, *a)
        return o, vjp(w)

    o_ref, vjp_ref = jax.vjp(ref, *args)
    g_ref = vjp_ref(w)
    o_new, g_new = new(*args)
    assert max_abs_diff(o_new, o_ref) <= 2e-6
    for name, a, b in zip("q k v dt".split(), g_new, g_ref):
        scale = float(jnp.max(jnp.abs(b))) + 1e-6
        assert max_abs_diff(a, b) <= 2e-6 * max(scale, 1.0), name


# (n, S, T, keep_window, ties, q_offset, num_keys, sliding_window, pad)
BLOCK_CASES = {
    "native_expiry": (2, 70, 70, 16, False, 0, None, None, (0, 5)),
    "small_doge_ties_pad": (4, 70, 70, 16, True, 0, None, None, (3, 20)),
    "ties_all_rows": (2, 100, 100, 7, True, 0, None, None, (10, 0)),
    "no_expiry": (2, 70, 70, 100, False, 0, None, None, (0, 5)),
    "fully_padded_row": (2, 70, 70, 16, False, 0, None, None, (0, 70)),
    "window_le_keep": (2, 70, 70, 16, True, 0, None, 8, (0, 5)),
    "window_short_seq": (2, 70, 70, 100, True, 0, None, 20, (0, 5)),
    "cache_decode": (2, 1, 64, 16, False, 40, 41, None, (0, 3)),
    "cache_chunk_ties": (4, 5, 64, 8, True, 40, 45, None, (0, 3)),
    "cache_prefill": (2, 64, 64, 8, True, 0, 30, None, (0, 3)),
}


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_blockwise_equals_reference(case):
    n, S, T, kw, ties, off, nk, win, pad = BLOCK_CASES[case]
    args, km, w = _inputs(n=n, S=S, T=T, ties=ties, pad=pad)
    mask = MaskInfo(km, off, nk, win)
    # small tiles, so that several query and key blocks (and skipped dead tiles) are exercised
    _compare(lambda *a: attention_blockwise(*a, mask, kw, block_q=16, block_k=16), args, mask, w, kw)


@pytest.mark.parametrize("fold", ["qk", "v"])
@pytest.mark.parametrize("n,win,pad", [(2, None, (0, 5)), (4, 9, (3, 70)), (2, None, None), (4, 30, None),
                                       (4, None, (3, 70))])
def test_fused_equals_reference(monkeypatch, n, win, pad, fold):
    """The folded-bias causal attention (padding as a large negative bias or a zero value weight, fully padded rows
    uniform) = reference, with the bias folded into q/k or into the values (FUSED_FOLD)."""
    import doge_jax.attention as da

    monkeypatch.setattr(da, "FUSED_FOLD", fold)
    args, km, w = _inputs(n=n, pad=pad or (0, 0))
    mask = MaskInfo(None if pad is None else km, 0, None, win)
    _compare(lambda *a: attention_fused(*a, mask, 100), args, mask, w, 100)


def test_value_fold_falls_back_past_its_spread(monkeypatch):
    """The value fold's weights exp(b - max b) would underflow for a bias spanning too much: past V_FOLD_MAX_SPREAD
    the q/k fold runs (the same values as the reference); within it the value fold, which equals the q/k fold."""
    import doge_jax.attention as da

    args, km, w = _inputs(n=2, pad=(0, 5))
    mask = MaskInfo(km, 0, None, None)
    q, k, v, dt = args
    wide = dt.at[:, :, 3].add(2 * da.V_FOLD_MAX_SPREAD)  # one key far above the rest
    _, ok = da.fold_bias_v(v, dt, km.astype(bool))
    _, ok_wide = da.fold_bias_v(v, wide, km.astype(bool))
    assert bool(ok) and not bool(ok_wide)
    monkeypatch.setattr(da, "FUSED_FOLD", "v")
    _compare(lambda *a: attention_fused(*a, mask, 100), (q, k, v, wide), mask, w, 100)
    by_v = jax.jit(lambda *a: attention_fused(*a, mask, 100))(*args)
    monkeypatch.setattr(da, "FUSED_FOLD", "qk")
    by_qk = jax.jit(lambda *a: attention_fused(*a, mask, 100))(*args)
    assert max_abs_diff(by_v, by_qk) <= 2e-6


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_padding_key_bias_is_finite(dtype):
    """The q/k fold's padding-key column is finite in every dtype (float16's -2**40 would be -inf, and the flash
    backward multiplies that column by zero gradients: NaN) and far below any logit."""
    from doge_jax.attention import fold_bias, pad_bias

    (q, k, v, dt), km, _ = _inputs(n=2, pad=(0, 5))
    ka = fold_bias(*(x.astype(dtype) for x in (q, k, v)), dt, km.astype(bool))[1]
    D = q.shape[-1]
    assert bool(jnp.isfinite(ka).all()) and bool((ka[1, :, :5, D] == pad_bias(dtype)).all())
    assert pad_bias(dtype) <= -30000


def test_value_fold_padding_key_far_above_the_valid_ones(monkeypatch):
    """A padding key scoring far above the valid keys (here 225) must not take the softmax mass that the value fold
    divides by (o'[D] underflowing to 0 gave a zero row): padding keys are zeroed, so their score is 0."""
    import doge_jax.attention as da

    monkeypatch.setattr(da, "FUSED_FOLD", "v")
    D, T = 16, 4
    q = jnp.zeros((1, 1, T, D)).at[..., 0].set(30.0)
    k = jnp.zeros((1, 1, T, D)).at[0, 0, 0, 0].set(30.0)  # key 0 pads
    v = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1, T, D)), jnp.float32)
    dt = jnp.ones((1, 1, T))
    mask = MaskInfo(jnp.asarray([[False, False, True, True]]), 0, None, None)
    got = attention_fused(q, k, v, dt, mask, 64)
    want = attention_reference(q, k, v, dt, mask, 64)
    assert max_abs_diff(got, want) <= 1e-6 and max_abs_diff(got[0, 0, 2], v[0, 0, 2]) <= 1e-6


def test_value_fold_not_in_float16(monkeypatch):
    """float16 takes the q/k fold under FUSED_FOLD = "v": its range is too small for the value fold's weights (a key
    20 below a later one would get weight e^-20, 0 in float16, and a query that sees only that key 0 / 0). Checked
    by tracing (XLA on the CPU has no float16 dot with float32 accumulation to run it)."""
    import doge_jax.attention as da

    (q, k, v, dt), _, _ = _inputs(n=2, pad=(0, 0), S=24, T=24)
    mask = MaskInfo(None, 0, None, None)
    monkeypatch.setattr(da, "FUSED_FOLD", "v")
    used = []
    fold_v = da.fold_bias_v
    monkeypatch.setattr(da, "fold_bias_v", lambda *a: used.append(1) or fold_v(*a))
    h = [x.astype(jnp.float16) for x in (q, k, v)]
    out = jax.eval_shape(lambda *a: attention_fused(*a, mask, 100), *h, dt)
    assert not used and out.dtype == jnp.float16
    jax.eval_shape(lambda *a: attention_fused(*a, mask, 100), q, k, v, dt)  # float32: the value fold
    assert used


# (n, T, keep_window, ties, sliding_window, pad): interpret mode on CPU, 16x16 tiles (T not a multiple of them)
PALLAS_CASES = {
    "native_expiry": (2, 70, 16, False, None, (0, 5)),
    "small_doge_ties_pad": (4, 70, 16, True, None, (3, 20)),
    "no_expiry": (2, 40, 64, False, None, (0, 0)),
    "fully_padded_row": (2, 40, 16, False, None, (0, 40)),
    "window_le_keep": (2, 70, 16, True, 8, (0, 5)),
    "increasing_dt": (2, 100, 16, "increasing", None, (0, 5)),  # keys expire kw slots later: early loop exits
}


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("case", list(PALLAS_CASES))
def test_pallas_equals_reference(case, sparse):
    """The Pallas kernel (forward, dq, dk/dv/d(dt) kernels) in interpret mode = the reference, values and grads;
    dense, and sparse (key lists per superblock of 32 queries: several per row)."""
    from doge_jax.pallas_attention import dma_pallas

    n, T, kw, ties, win, pad = PALLAS_CASES[case]
    args, km, w = _inputs(n=n, S=T, T=T, D=16, ties=ties is True, pad=pad)
    if ties == "increasing":
        ramp = jnp.linspace(0.5, 3.0, T) + 0.01 * jax.random.uniform(jax.random.key(0), (2, n, T))
        args = args[:3] + (ramp.astype(jnp.float32),)
    mask = MaskInfo(km, 0, None, win)

    def f(q, k, v, dt):
        valid = mask.valid_keys(q.shape[0], T)
        if T > kw and win is None:
            e = key_expiry(dt, valid, kw)
        else:
            e = jnp.broadcast_to(jnp.where(valid, jnp.iinfo(jnp.int32).max, 0)[:, None, :], dt.shape)
        o = dma_pallas(q, k, v, dt, e.astype(jnp.int32), window=win, block_q=16, block_k=16, keep=kw,
                       sparse=sparse, superblock=32)
        B, H, S, D = q.shape
        G = k.shape[1]
        from doge_jax.attention import _fill_masked_rows

        og = _fill_masked_rows(o.reshape(B, G, H // G, S, D), q.reshape(B, G, H // G, S, D), k, v, mask)
        return og.reshape(B, H, S, D)

    _compare(f, args, mask, w, kw)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("T,window", [(4096, None), (3000, 256)])
def test_pallas_lowers_to_triton_for_cuda(T, window, sparse):
    """The kernels pass Pallas' Triton lowering for CUDA (block shapes, dtypes, loop bounds, gathers, atomics) at
    Doge-160M's head shape in bf16, forward and backward, without a GPU: three Triton calls (forward, dq,
    dk/dv/d(dt)), dense or sparse (key lists for keep_window 1024)."""
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    from doge_jax.pallas_attention import dma_pallas

    B, H, G, D = 1, 6, 3, 128

    def f(q, k, v, dt, e):
        o = dma_pallas(q, k, v, dt, e, window=window, interpret=False, keep=1024, sparse=sparse)
        return jnp.sum(o.astype(jnp.float32))

    sds = jax.ShapeDtypeStruct
    args = (sds((B, H, T, D), jnp.bfloat16), sds((B, G, T, D), jnp.bfloat16), sds((B, G, T, D), jnp.bfloat16),
            sds((B, G, T), jnp.float32), sds((B, G, T), jnp.int32))
    # jax >= 0.11 reads the GPU's compute capability from the device (none here): name an H200
    gpu = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H200", num_cores=None,
                                                                   platform="cuda"))
    with use_abstract_mesh(gpu):
        text = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_pallas_default_16bit_tiles(sparse):
    """The 128 x 64 tiles 16-bit inputs get by default (forward and dq kernels; 32-query dk/dv steps; the default
    superblock of 256 queries), float32 here in interpret mode: values and gradients = the reference."""
    from doge_jax.attention import _fill_masked_rows
    from doge_jax.pallas_attention import default_blocks, dma_pallas

    T, keep = 300, 40
    assert default_blocks(128, 2) == (128, 64)
    args, km, w = _inputs(n=2, S=T, T=T, D=16, pad=(0, 5))
    mask = MaskInfo(km)
    valid = mask.valid_keys(2, T)

    def f(q, k, v, dt):
        o = dma_pallas(q, k, v, dt, key_expiry(dt, valid, keep), block_q=128, block_k=64, keep=keep, sparse=sparse)
        return _fill_masked_rows(o.reshape(2, 2, 2, T, 16), q.reshape(2, 2, 2, T, 16), k, v, mask).reshape(q.shape)

    _compare(f, args, mask, w, keep)


def test_pallas_forward_and_dkv_blocks_differ():
    """64-query blocks in the forward and dq kernels, 32 in the dk/dv/d(dt) kernel (BLOCK_Q_DKV): same function."""
    from doge_jax.pallas_attention import dma_pallas

    args, km, w = _inputs(n=2, S=100, T=100, D=16, pad=(0, 5))
    mask = MaskInfo(km)
    valid = mask.valid_keys(2, 100)

    def f(q, k, v, dt):
        from doge_jax.attention import _fill_masked_rows

        o = dma_pallas(q, k, v, dt, key_expiry(dt, valid, 16), block_q=64, block_k=16)
        return _fill_masked_rows(o.reshape(2, 2, 2, 100, 16), q.reshape(2, 2, 2, 100, 16), k, v, mask).reshape(
            q.shape)

    _compare(f, args, mask, w, 16)



def test_pallas_huge_window_is_no_window():
    """A window wider than the sequence is no window (clamped: no int32 overflow in the kernels' index sums);
    float32 at head dim 256 gets 32 x 32 tiles by default (sm_90 shared memory), 16-bit inputs at head dim 128
    128 x 64 (timed faster on an H200), 64 x 64 otherwise."""
    from doge_jax.pallas_attention import default_blocks, dma_pallas

    (q, k, v, dt), km, _ = _inputs(n=2, S=40, T=40, D=16, pad=(0, 0))
    e = key_expiry(dt, km, 8)

    def run(window):  # values and q/k/v/dt gradients (an unclamped window broke only the backward)
        f = lambda *a: jnp.sum(jnp.sin(dma_pallas(*a, e, window=window, block_q=16, block_k=16)))  # noqa: E731
        return jax.value_and_grad(f, argnums=(0, 1, 2, 3))(q, k, v, dt)

    for a, b in zip(jax.tree.leaves(run(2 ** 31 - 2)), jax.tree.leaves(run(None))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert default_blocks(128, 4) == default_blocks(256, 2) == (64, 64) and default_blocks(256, 4) == (32, 32)
    assert default_blocks(128, 2) == (128, 64) and default_blocks(64, 2) == (64, 64)  # D 64: 128 x 64 spills

def test_pallas_sparse_lists_and_bad_expiry():
    """The key lists equal doge_torch's; an e that lets more than keep keys live raises (concrete) or gives NaN
    (traced) instead of dropping keys."""
    import torch

    from doge_jax.pallas_attention import dma_pallas, key_lists
    from doge_torch.triton_attention import key_lists as torch_key_lists

    T, keep = 96, 16
    args, km, _ = _inputs(n=2, S=T, T=T, D=16, pad=(0, 5))
    e = key_expiry(args[3], MaskInfo(km).valid_keys(2, T), keep)
    e = jnp.repeat(jnp.minimum(e, T), 2, axis=1)  # per query head, as dma_pallas passes it
    for window in (None, 7):
        got = key_lists(e, keep, window, 32, 16, 16)
        grouped = key_lists(e, keep, window, 32, 16, 16, max_elements=2 * 4 * T * 2)  # 2 superblocks at a time
        for a, b in zip(got, grouped):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        want = torch_key_lists(torch.as_tensor(np.array(e)), keep, window, 32, 16, 16)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), b.numpy())
        assert not got[3].any()
    never = jnp.full(args[3].shape, T, jnp.int32)  # nothing expires: lists of up to 96 keys > keep + 32
    with pytest.raises(ValueError, match="keep=16"):
        dma_pallas(*args, never, keep=keep, sparse=True, superblock=32, block_q=16, block_k=16)
    o = jax.jit(lambda *a: dma_pallas(*a, keep=keep, sparse=True, superblock=32, block_q=16, block_k=16))(*args,
                                                                                                          never)
    assert bool(jnp.isnan(o).all())


def test_pallas_refuses_sizes_past_32bit_offsets():
    """The Triton lowering addresses arrays with 32-bit offsets: B*H*T*D >= 2**31 is refused, not mis-addressed."""
    from doge_jax.pallas_attention import dma_pallas

    sds = jax.ShapeDtypeStruct
    B, H, G, T, D = 16, 12, 6, 131072, 128
    args = (sds((B, H, T, D), jnp.bfloat16), sds((B, G, T, D), jnp.bfloat16), sds((B, G, T, D), jnp.bfloat16),
            sds((B, G, T), jnp.float32), sds((B, G, T), jnp.int32))
    with pytest.raises(ValueError, match="64-bit offsets"):
        jax.eval_shape(lambda *a: dma_pallas(*a, interpret=False), *args)


def test_pallas_through_attention_dispatch():
    """impl="pallas" runs the kernel for S == T and falls back to blockwise with a cache or an odd head dim."""
    m = MaskInfo()
    assert choose_impl("pallas", 64, 64, 16, m, False, head_dim=16) == "pallas"
    assert choose_impl("pallas", 64, 64, 16, m, False, head_dim=24) == "blockwise"
    assert choose_impl("pallas", 1, 64, 16, MaskInfo(None, 10, 11), False, head_dim=16) == "blockwise"
    args, km, w = _inputs(n=2, S=40, T=40, D=16, pad=(0, 3))
    mask = MaskInfo(km)
    o = jax.jit(lambda *a: attention(*a, mask, 16, impl="pallas"))(*args)
    assert max_abs_diff(o, attention_reference(*args, mask, 16)) <= 2e-6


def _expiry_brute(dt, valid, k):
    """e_j by definition: the smallest query slot i at which k valid keys <= i beat key j."""
    B, n, T = dt.shape
    e = np.zeros((B, n, T), np.int64)
    for b in range(B):
        for h in range(n):
            d = dt[b, h]
            for j in range(T):
                if not valid[b, j]:
                    continue
                beats = [i for i in range(T) if valid[b, i] and (d[i] > d[j] or (d[i] == d[j] and i < j))]
                e[b, h, j] = beats[k - 1] if len(beats) >= k else np.iinfo(np.int32).max
    return e


def test_key_expiry_matches_definition():
    r = np.random.default_rng(1)
    dt = np.round(r.normal(size=(2, 3, 45)), 1).astype(np.float32)  # plenty of ties
    valid = r.random((2, 45)) > 0.2
    for k in (1, 4, 9):
        np.testing.assert_array_equal(np.asarray(key_expiry(jnp.asarray(dt), jnp.asarray(valid), k)),
                                      _expiry_brute(dt, valid, k))


def test_choose_impl():
    m = MaskInfo()
    assert choose_impl("auto", 64, 64, 2048, m, False) == "reference"
    assert choose_impl("auto", 512, 512, 2048, m, False) == "reference"
    assert choose_impl("auto", 768, 768, 2048, m, False) == ("fused" if jax.default_backend() == "gpu" else "blockwise")
    assert choose_impl("auto", 8192, 8192, 2048, m, False) == (
        "pallas" if jax.default_backend() == "gpu" and jax.device_count() == 1 else "blockwise")
    # on a GPU: fused up to keep_window, the Pallas kernels beyond (timed on an H200; one device), blockwise where
    # neither runs
    gpu = dict(backend="gpu", devices=1)
    assert choose_impl("auto", 768, 768, 2048, m, False, **gpu) == "fused"
    assert choose_impl("auto", 8192, 8192, 2048, m, False, **gpu) == "pallas"
    assert choose_impl("auto", 8192, 8192, 2048, MaskInfo(np.ones((1, 8192), bool)), False, **gpu) == "pallas"
    assert choose_impl("auto", 8192, 8192, 2048, m, False, head_dim=96, **gpu) == "blockwise"
    assert choose_impl("auto", 64, 8192, 2048, MaskInfo(None, 8128, 8192), False, **gpu) == "blockwise"  # cache
    assert choose_impl("auto", 8192, 8192, 2048, m, True, **gpu) == "reference"  # dropout
    assert choose_impl("auto", 8192, 8192, 2048, m, False, backend="cpu") == "blockwise"
    assert choose_impl("auto", 8192, 8192, 2048, m, False, backend="gpu", devices=2) == "blockwise"  # a mesh
    # past the kernels' 32-bit offsets (dma_pallas would refuse): blockwise; just below them: pallas
    big = 64 * 8 * 32768 * 128  # B H T D
    assert choose_impl("auto", 32768, 32768, 2048, m, False, q_elements=big, **gpu) == "blockwise"
    assert choose_impl("auto", 32768, 32768, 2048, m, False, q_elements=big // 2 - 8 * 128 * 128, **gpu) == "pallas"
    assert choose_impl("blockwise", 64, 64, 2048, m, True) == "reference"  # dropout: reference only
    assert choose_impl("fused", 64, 64, 16, m, False) == "blockwise"  # beyond keep_window
    assert choose_impl("fused", 1, 64, 2048, MaskInfo(None, 10, 11), False) == "blockwise"  # cache
    wide = MaskInfo(None, 0, None, 32)
    assert choose_impl("blockwise", 64, 64, 16, wide, False) == "reference"  # window > keep_window < T
    with pytest.raises(ValueError, match="impl"):
        choose_impl("flash", 64, 64, 16, m, False)


def test_dispatch_accepts_dense_mask():
    args, km, _ = _inputs()
    mask = MaskInfo(km)
    dense = mask.dense(2, 70, 70)
    np.testing.assert_array_equal(attention(*args, dense, 16), attention(*args, mask, 16, impl="reference"))


# ---- whole models against transformers ------------------------------------------------------------------------

MODEL_CASES = {
    "gqa_pad": (dict(), 20, [0, 5]),
    "moe_pad": (TINY_MOE, 20, [0, 7]),
    "keep_window_pad": (dict(keep_window_size=8), 40, [0, 3]),
    "keep_window_moe": (dict(keep_window_size=8, **TINY_MOE), 40, [0, 3]),
    "sliding": (dict(sliding_window=6, keep_window_size=8), 30, [0, 4]),
}


@pytest.mark.parametrize("case,impl", [(c, "blockwise") for c in MODEL_CASES] + [("gqa_pad", "fused"),
                                                                                ("moe_pad", "fused")]
                         + [("keep_window_moe", "pallas"), ("sliding", "pallas")])
def test_model_logits_match_transformers(tmp_path, case, impl):
    overrides, T, pads = MODEL_CASES[case]
    hf = make_hf_model(**overrides)
    model = with_attention_impl(DogeForCausalLM.from_pretrained(save_hf(hf, tmp_path / "m")), impl)
    ids, mask = unique_ids(2, T, 128, seed=4), left_pad_mask(2, T, pads)
    assert max_abs_diff(model(ids, attention_mask=mask).logits, hf_logits(hf, ids, mask)) <= 1e-4


def test_blockwise_cache_decode_equals_full_forward(tmp_path):
    hf = make_hf_model(keep_window_size=8)
    model = with_attention_impl(DogeForCausalLM.from_pretrained(save_hf(hf, tmp_path / "m")), "blockwise")
    ids = unique_ids(2, 20, 128, seed=10)
    full = hf_logits(hf, ids)
    step = nnx.jit(lambda m, x, c: m(x, cache=c))
    out = step(model, jnp.asarray(ids[:, :12]), DogeCache.init(model.config, 2, 64))
    parts = [np.asarray(out.logits)]
    for t in range(12, 20):
        out = step(model, jnp.asarray(ids[:, t:t + 1]), out.cache)
        parts.append(np.asarray(out.logits))
    assert max_abs_diff(np.concatenate(parts, axis=1), full) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2])
def test_blockwise_long_sequence(n):
    """Several 512-blocks, expiry active, left padding: default tiles against the dense reference."""
    args, km, w = _inputs(B=1, H=2, G=1, n=n, S=2100, T=2100, D=16, ties=True, pad=(37,))
    mask = MaskInfo(km)
    _compare(lambda *a: attention_blockwise(*a, mask, 300), args, mask, w, 300)


def test_float32_model_with_bf16_cache_stays_finite():
    """A float32 model decoding into a bfloat16 cache: the masked-key value is float32's finfo.min, which rounds to
    -inf in bf16, so a fully masked row (left padding) had a NaN softmax that spread to every position of the row.
    Every attention implementation must stay finite and agree with the blockwise one."""
    from doge_jax import DogeConfig

    cfg = DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, keep_window_size=8)
    ids = unique_ids(2, 6, 64, seed=4)
    mask = left_pad_mask(2, 6, [3, 0])
    outs = {}
    for impl in ("reference", "blockwise", "auto"):
        model = with_attention_impl(DogeForCausalLM(cfg, rngs=nnx.Rngs(0)), impl)
        cache = DogeCache.init(cfg, 2, 16, jnp.bfloat16)
        out = model(ids, attention_mask=mask, cache=cache)
        nxt = model(ids[:, :1], attention_mask=np.ones((2, 1), bool), cache=out.cache)
        outs[impl] = np.concatenate([np.asarray(out.logits[:, 3:]), np.asarray(nxt.logits)], 1)
        assert np.isfinite(outs[impl]).all(), impl
    assert max_abs_diff(outs["reference"], outs["blockwise"]) < 2e-2


def test_float64_dt_is_ranked_in_float64():
    """Key expiry ranks dt in its own precision when wider than float32, as the top-k path does: 1 + 1e-12 beats 1
    (in float32 they tied and the lower index won), in both frameworks."""
    import torch

    from doge_torch.model import key_expiry as torch_key_expiry

    dt = np.array([[[1.0, 1.0 + 1e-12, 0.5, 0.25]]])
    valid = np.ones((1, 4), bool)
    with jax.enable_x64(True):
        e = np.asarray(key_expiry(jnp.asarray(dt), jnp.asarray(valid), 1))
    et = torch_key_expiry(torch.as_tensor(dt), torch.as_tensor(valid), 1).numpy()
    assert e[0, 0, 0] == 1 and et[0, 0, 0] == 1, (e, et)  # key 0 expires at query 1, where key 1 beats it
    from doge_jax.decode import beaten_by

    with jax.enable_x64(True):  # the decode-time counters rank the same way
        counts = np.asarray(beaten_by(jnp.asarray(dt), jnp.asarray(valid)))
    assert counts[0, 0].tolist() == [1, 0, 2, 3], counts


def test_pallas_blocks_must_be_powers_of_two():
    """Blocks that do not nest (48 with 32) read past the padded arrays and dropped queries from the key-side
    backward: refused, as in dma_triton."""
    from doge_jax.pallas_attention import dma_pallas

    q = jnp.zeros((1, 1, 40, 16))
    dt = jnp.zeros((1, 1, 40))
    e = jnp.full((1, 1, 40), 10 ** 6, jnp.int32)
    for bad in (dict(block_q=48, block_k=32), dict(block_q=32, block_k=24), dict(block_q=8, block_k=16)):
        with pytest.raises(ValueError, match="power of two"):
            dma_pallas(q, q, q, dt, e, interpret=True, **bad)
