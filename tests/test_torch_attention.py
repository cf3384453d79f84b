"""doge_torch attention fast paths against the dense-bias path: the folded-bias causal sdpa (T <= keep_window) and
FlexAttention's block mask in key-expiry form (T > keep_window). FlexAttention has no backward on CPU, so here the
forward and the block structure are tested; benchmarks/gpu_check.py checks its gradients on a GPU."""

import pytest
import torch

from doge_jax.config import DogeConfig
from doge_torch.model import allowed_mask, dma_attention, expiry_block_mask, flex_dma, fold_bias, key_expiry


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo's recompile limit (8 per code object) counts every model, shape and
    fold setting compiled in the process, and this file's compiled models and lambdas run many of them."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _cfg(H, G, D, keep, variant="native", impl="auto"):
    return DogeConfig(vocab_size=64, hidden_size=H * D, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=H, num_key_value_heads=G, keep_window_size=keep, variant=variant,
                      attention_impl=impl)


@pytest.fixture
def calls(monkeypatch):
    """Counts of the eager calls to doge_torch.model's fold helpers (fold_bias, _by_values, _by_keys) during a test
    (not counted while dynamo traces: torch.cond's branches may not mutate outside state)."""
    import doge_torch.model as dm

    counts = {}

    def counting(name, fn):
        def counted(*a, **kw):
            if not torch.compiler.is_compiling():
                counts[name] = counts.get(name, 0) + 1
            return fn(*a, **kw)

        return counted

    for name in ("fold_bias", "_by_values", "_by_keys"):
        monkeypatch.setattr(dm, name, counting(name, getattr(dm, name)))
    return counts


def _inputs(B, H, G, n, T, D, dt_kind="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((B, H, T, D), (B, G, T, D), (B, G, T, D)))
    if dt_kind == "increasing":  # each key is beaten by every later one: keys expire keep_window slots later
        dt = torch.linspace(0.1, 3.0, T, dtype=torch.float64).expand(B, n, T).clone()
    else:
        dt = torch.randn(B, n, T, generator=g, dtype=torch.float64).exp()
    return q, k, v, dt


def _dense_keep(dt, H, T, keep):
    """[B, H, T, T] bool: the keep-window rule by definition (top-keep of the causal row, lower index on ties)."""
    B, n, _ = dt.shape
    bias = dt[:, :, None, :].expand(B, n, T, T).clone()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    bias = bias.masked_fill(~causal, float("-inf"))
    k = min(keep, T)
    order = torch.sort(-bias, dim=-1, stable=True).indices[..., :k]
    m = torch.zeros_like(bias, dtype=torch.bool).scatter(-1, order, True) & causal
    return m.repeat_interleave(H // n, dim=1)


@pytest.fixture
def v_fold(monkeypatch):
    import doge_torch.model as dm

    monkeypatch.setattr(dm, "FUSED_FOLD", "v")
    return dm


def _fast_equals_dense(cfg, args, valid):
    """dma_attention with allowed None or the [B, T] key mask `valid` (the fast paths) = the dense-bias path with
    the full mask, in float64 values (1e-12) and gradients of q, k, v, dt (1e-11)."""
    B, _, T, _ = args[0].shape
    got = dma_attention(cfg, *args, valid, torch.float64)
    want = dma_attention(cfg, *args, allowed_mask(cfg, B, T, 0, valid, torch.device("cpu")), torch.float64)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    w = torch.randn_like(got)
    g_got = torch.autograd.grad((got * w).sum(), args)
    g_want = torch.autograd.grad((want * w).sum(), args)
    for name, a, b in zip("q k v dt".split(), g_got, g_want):
        assert torch.allclose(a, b, atol=1e-11, rtol=0), name


@pytest.mark.parametrize("fold", ["qk", "v"])
@pytest.mark.parametrize("variant,H,G", [("native", 4, 2), ("small_doge", 4, 2), ("native", 2, 2)])
def test_fold_bias_equals_dense_bias(monkeypatch, calls, fold, variant, H, G):
    """Folded-bias causal sdpa = sdpa with the explicit dt bias, in value and in the gradients (dt included), with
    the bias folded into q/k or (FUSED_FOLD = "v") into the values, q and k keeping head dim D ("fused": the sdpa
    paths on the CPU in float64 too, where "auto" runs the eager reference)."""
    import doge_torch.model as dm

    monkeypatch.setattr(dm, "FUSED_FOLD", fold)
    D, T = 12, 33
    cfg = _cfg(H, G, D, 64, variant, impl="fused")
    args = [x.requires_grad_() for x in _inputs(2, H, G, cfg.num_dt_heads, T, D)]
    _fast_equals_dense(cfg, args, None)
    if fold == "qk":
        assert calls == {"_by_keys": 1, "fold_bias": 1}
        qa, ka, va = fold_bias(*args)
        assert qa.shape[-1] % 8 == 0 and qa.shape[-1] > D and ka.shape[-1] == va.shape[-1] == qa.shape[-1]
    else:
        assert calls == {"_by_values": 1}
        assert dm.fold_bias_v(args[2], args[3]).shape[-1] == 16  # D + 1 padded to a multiple of 8


def _padding(B, T, kind):
    """[B, T] bool key masks: left padding (rows before the first valid key see none: the reference's uniform rows),
    right padding, holes, all ones."""
    m = torch.ones(B, T, dtype=torch.bool)
    if kind == "left":
        m[0, :5], m[1, :T - 2] = False, False
    elif kind == "right":
        m[0, T - 7:] = False
    elif kind == "holes":
        m[0, 3:9], m[1, ::3] = False, False
    return m


@pytest.mark.parametrize("fold", ["qk", "v"])
@pytest.mark.parametrize("kind", ["left", "right", "holes", "ones"])
@pytest.mark.parametrize("variant,H,G", [("native", 4, 2), ("small_doge", 4, 2)])
def test_fold_with_padding_keys_equals_dense_bias(monkeypatch, calls, fold, kind, variant, H, G):
    """A [B, T] key mask takes the folded sdpa paths (padding keys: zero weight; rows before a row's first valid key:
    the reference's uniform rows, `fill_masked_rows`) and gives the dense-bias path's values and gradients (dt
    included) in float64."""
    import doge_torch.model as dm

    monkeypatch.setattr(dm, "FUSED_FOLD", fold)
    D, T, B = 12, 33, 2
    cfg = _cfg(H, G, D, 64, variant, impl="fused")
    args = [x.requires_grad_() for x in _inputs(B, H, G, cfg.num_dt_heads, T, D)]
    _fast_equals_dense(cfg, args, _padding(B, T, kind))
    assert calls == ({"_by_keys": 1, "fold_bias": 1} if fold == "qk" else {"_by_values": 1})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_padding_key_bias_is_finite_and_vanishes(dtype):
    """The q/k fold's padding-key column is finite in every dtype (float16's -2**40 would be -inf, and a flash
    kernel's backward multiplies that column by zero gradients: NaN) and its softmax weight is exactly 0."""
    from doge_torch.model import pad_bias

    q, k, v, dt = (x.to(dtype) for x in _inputs(1, 2, 2, 2, 6, 8))
    valid = torch.tensor([[False, True, True, False, True, True]])
    ka = fold_bias(q, k, v, dt, valid)[1]
    assert torch.isfinite(ka).all() and (ka[0, :, ~valid[0], 8] == pad_bias(dtype)).all()
    assert torch.exp(torch.tensor(pad_bias(dtype) + 1e4, dtype=torch.float32)) == 0


def test_padding_key_bias_under_float16_autocast():
    """Under float16 autocast k is float32 but sdpa runs in float16: the padding column takes float16's finite
    value, not float32's -2**40 (which the cast would make -inf)."""
    from doge_torch.model import pad_bias

    q, k, v, dt = (x.float() for x in _inputs(1, 2, 2, 2, 6, 8))
    valid = torch.tensor([[False, True, True, False, True, True]])
    with torch.autocast("cpu", dtype=torch.float16):
        ka = fold_bias(q, k, v, dt, valid)[1]
    assert (ka[0, :, ~valid[0], 8] == pad_bias(torch.float16)).all() and torch.isfinite(ka.half()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("padded", [False, True])
def test_fold_built_in_the_autocast_dtype(dtype, padded):
    """Under autocast the q/k fold comes out in autocast's dtype, equal to the float32 fold cast by autocast (sdpa's
    inputs unchanged; no float32 copies of the [B, H, S, D + 8] folds for the compiled graph to write and read),
    gradients included."""
    valid = torch.tensor([[False, True, True, False, True, True]]) if padded else None
    q, k, v, dt = (x.float().requires_grad_() for x in _inputs(1, 4, 2, 2, 6, 8))
    ref = fold_bias(q, k, v, dt, valid)
    with torch.autocast("cpu", dtype=dtype):
        got = fold_bias(q, k, v, dt, valid)
    expect = [x.detach().to(dtype) for x in ref]
    if padded:  # (the padding column: the autocast dtype's finite value, not float32's -2**40 cast to -inf)
        from doge_torch.model import pad_bias

        expect[1][0, :, ~valid[0], 8] = max(pad_bias(torch.float32), pad_bias(dtype))
    for a, b in zip(got, expect):
        assert a.dtype == dtype and torch.equal(a, b)
    gs = [torch.randn(x.shape) for x in ref]
    want = torch.autograd.grad([x.to(dtype) for x in ref], [q, k, v, dt], [g.to(dtype) for g in gs])
    for a, b in zip(torch.autograd.grad(got, [q, k, v, dt], [g.to(dtype) for g in gs]), want):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_value_fold_padding_key_far_above_the_valid_ones(v_fold):
    """A padding key scoring far above the valid keys (here 225) must not take the softmax mass that the value
    fold divides by (o'[D] underflowing to 0 gave a zero row): padding keys are zeroed, so their score is 0."""
    H = G = 1
    D, T = 16, 4
    cfg = _cfg(H, G, D, 64, impl="fused")
    q, k = torch.zeros(1, H, T, D), torch.zeros(1, G, T, D)
    v, dt = torch.randn(1, G, T, D, generator=torch.Generator().manual_seed(0)), torch.ones(1, 1, T)
    q[..., 0], k[0, 0, 0, 0] = 30.0, 30.0  # key 0 pads
    valid = torch.tensor([[False, False, True, True]])
    got = dma_attention(cfg, q, k, v, dt, valid, torch.float32)
    want = dma_attention(cfg, q, k, v, dt, allowed_mask(cfg, 1, T, 0, valid, q.device), torch.float32)
    assert torch.allclose(got, want, atol=1e-6, rtol=0) and torch.allclose(got[0, 0, 2], v[0, 0, 2], atol=1e-6)


def test_value_side_fold_with_head_counts_changing(v_fold, calls):
    """One process, other head counts and groupings call after call (eager torch.cond traced both branches with
    dynamo and failed once the head counts had become dynamic), and float16, which takes the q/k fold (its range
    would let the value fold's weights underflow)."""
    D, T = 8, 20
    for variant, H, G in [("native", 4, 2), ("native", 6, 3), ("native", 8, 8), ("small_doge", 4, 2)]:
        cfg = _cfg(H, G, D, 64, variant, impl="fused")
        args = _inputs(1, H, G, cfg.num_dt_heads, T, D, seed=H + G)
        got = dma_attention(cfg, *args, None, torch.float64)
        want = dma_attention(cfg, *args, allowed_mask(cfg, 1, T, 0, None, torch.device("cpu")), torch.float64)
        assert torch.allclose(got, want, atol=1e-12, rtol=0), (variant, H, G)
    assert calls == {"_by_values": 4}
    cfg = _cfg(4, 2, D, 64, impl="fused")
    q, k, v, dt = _inputs(1, 4, 2, 2, T, D)
    got = dma_attention(cfg, q.half(), k.half(), v.half(), dt.float(), None, torch.float16)
    want = dma_attention(cfg, q, k, v, dt, allowed_mask(cfg, 1, T, 0, None, torch.device("cpu")), torch.float64)
    assert calls == {"_by_values": 4, "_by_keys": 1, "fold_bias": 1} and (got.double() - want).abs().max().item() < 1e-2


def test_value_side_fold_falls_back_on_wide_bias(v_fold, calls):
    """Where dt spans more than V_FOLD_MAX_SPREAD the q/k fold runs instead: with a key 200 below the others its
    float32 weight exp(-200) is 0 and the value fold alone gives 0 for the first query (which sees only that key;
    its denominator underflows to 0 and is guarded), not that key's value; through dma_attention (eager, and compiled
    with autograd) the result and the gradients match the dense-bias path."""
    H, G, D, T = 4, 2, 8, 24
    cfg = _cfg(H, G, D, 64, impl="fused")
    q, k, v, dt = (x.float() for x in _inputs(2, H, G, cfg.num_dt_heads, T, D))
    dt[1, 0, 0] = -200.0
    assert (v_fold._by_values(q, k, v, dt, True)[1, :, 0] == 0).all(-1).any()
    calls.clear()
    args = [x.requires_grad_() for x in (q, k, v, dt)]
    got = dma_attention(cfg, *args, None, torch.float32)
    want = dma_attention(cfg, *args, allowed_mask(cfg, 2, T, 0, None, torch.device("cpu")), torch.float32)
    assert (got - want).abs().max().item() <= 1e-5
    g_got = torch.autograd.grad(got.square().sum(), args)
    g_want = torch.autograd.grad(want.square().sum(), args)
    for name, a, b in zip("q k v dt".split(), g_got, g_want):
        assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item(), name
    assert calls == {"_by_keys": 1, "fold_bias": 1}
    # compiled with autograd (aot_eager: the joint graph of both branches), either branch
    fn = torch.compile(lambda *a: dma_attention(cfg, *a, None, torch.float32), backend="aot_eager", fullgraph=True)
    for spread in (200.0, 0.0):
        with torch.no_grad():
            args[3][1, 0, 0] = -spread
        want = dma_attention(cfg, *args, allowed_mask(cfg, 2, T, 0, None, torch.device("cpu")), torch.float32)
        got = fn(*args)
        assert (got - want).abs().max().item() <= 1e-5, spread
        g_got = torch.autograd.grad(got.square().sum(), args)
        g_want = torch.autograd.grad(want.square().sum(), args)
        for name, a, b in zip("q k v dt".split(), g_got, g_want):
            assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item(), (spread, name)


@pytest.mark.parametrize("variant,H,G", [("native", 2, 1), ("native", 4, 1), ("small_doge", 4, 1), ("native", 4, 4)])
@pytest.mark.parametrize("padded", [False, True])
def test_value_side_fold_compiled_one_kv_head(v_fold, variant, H, G, padded):
    """Compiled with autograd (aot_eager, fullgraph), one kv head (Doge-20M, tiny): k's gradient [B, 1, T, D] left
    the two torch.cond branches with different strides on its size-1 dimension and the compile failed; now either
    branch gives the dense-bias path's values and gradients."""
    D, T, B = 8, 24, 2
    cfg = _cfg(H, G, D, 64, variant, impl="fused")
    args = [x.float().requires_grad_() for x in _inputs(B, H, G, cfg.num_dt_heads, T, D)]
    valid = _padding(B, T, "left") if padded else None
    extra = (valid,) if padded else (None,)
    fn = torch.compile(lambda *a: dma_attention(cfg, *a, torch.float32), backend="aot_eager", fullgraph=True,
                       dynamic=False)  # (head counts change between the cases: no automatic dynamic shapes)
    for spread in (0.0, 200.0):  # the value fold, then the q/k fold (a valid key 200 below the others)
        with torch.no_grad():
            args[3][0, 0, T - 1] = args[3][0, 0, 0] - spread if spread else args[3][0, 0, T - 1]
        want = dma_attention(cfg, *args, allowed_mask(cfg, B, T, 0, valid, torch.device("cpu")), torch.float32)
        got = fn(*args, *extra)
        assert (got - want).abs().max().item() <= 1e-5, spread
        g_got = torch.autograd.grad(got.square().sum(), args)
        g_want = torch.autograd.grad(want.square().sum(), args)
        for name, a, b in zip("q k v dt".split(), g_got, g_want):
            assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item(), (spread, name)


@pytest.mark.parametrize("fold", ["qk", "v"])
@pytest.mark.parametrize("H,G", [(4, 2), (4, 1), (4, 4)])
def test_compiled_training_step_gradients_both_folds(monkeypatch, fold, H, G):
    """A whole model compiled with autograd (aot_eager: the real aten kernels behind AOT's traced backward) gives
    the eager model's loss and gradients with either fold. With the value fold every head layout failed before:
    dt reached torch.cond as a transposed view, softplus_backward then returned strides its meta function does not
    predict, and the backward graph's view raised at run time; with one kv head the compile itself failed."""
    import doge_torch.model as dm
    from doge_torch.model import DogeForCausalLM

    monkeypatch.setattr(dm, "FUSED_FOLD", fold)
    cfg = _cfg(H, G, 16, 64, impl="fused").replace(num_hidden_layers=2)
    torch.manual_seed(0)
    model = DogeForCausalLM(cfg).train()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.A.normal_()
    _compiled_equals_eager(model, "aot_eager", a_tol=1e-4)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_value_fold_with_remat_compiles(v_fold, policy):
    """torch.utils.checkpoint's dispatch modes take no torch.cond (NotImplementedError at compile time): compiled
    with remat, the value fold's setting gives the q/k fold, with the eager model's loss and gradients (eager
    still takes the value fold)."""
    from doge_torch.model import DogeForCausalLM

    cfg = _cfg(4, 2, 16, 64, impl="fused").replace(num_hidden_layers=2, remat=policy)
    torch.manual_seed(0)
    _compiled_equals_eager(DogeForCausalLM(cfg).train(), "aot_eager", a_tol=1e-4)


def _compiled_equals_eager(model, backend: str, a_tol: float) -> None:
    """The model's loss and every gradient, compiled (fullgraph, static shapes) = eager: loss within 1e-5, each
    gradient within 1e-4 of its largest element (A's within a_tol)."""
    ids = torch.randint(3, 64, (2, 24))
    grads = []
    for run in (model, torch.compile(model, backend=backend, fullgraph=True, dynamic=False)):
        model.zero_grad()
        loss = run(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    assert abs(float(l0 - l1)) <= 1e-5 * float(l0)
    for n in g0:
        tol = a_tol if n.endswith(".A") else 1e-4
        assert (g0[n] - g1[n]).abs().max().item() <= tol * g0[n].abs().max().item() + 1e-7, n


@pytest.mark.slow
@pytest.mark.parametrize("H,G", [(4, 2), (4, 1)])
def test_value_fold_model_compiled_by_inductor(v_fold, H, G):
    """Inductor (the GPU's compiler, here its CPU code) lowers torch.cond's branches itself: with one kv head their
    gradients' strides still differed in the size-1 dimension there until q, k, v, dt and the output crossed the
    cond flat. Loss and gradients = eager (A's, ill-conditioned, within 3e-4 of its largest element)."""
    from doge_torch.model import DogeForCausalLM

    cfg = _cfg(H, G, 16, 64, impl="fused").replace(num_hidden_layers=2)
    torch.manual_seed(0)
    model = DogeForCausalLM(cfg).train()
    _compiled_equals_eager(model, "inductor", a_tol=3e-4)


def test_value_side_fold_with_padding_compiled(v_fold, calls):
    """Compiled with autograd (aot_eager, fullgraph: torch.cond with the key mask as an operand), padded batches
    give the dense-bias path's values and gradients on either branch: the spread is taken over the valid keys only
    (a padding key 200 below the rest keeps the value fold), a valid one that far takes the q/k fold."""
    H, G, D, T, B = 4, 2, 8, 24, 2
    cfg = _cfg(H, G, D, 64, impl="fused")
    args = [x.float().requires_grad_() for x in _inputs(B, H, G, cfg.num_dt_heads, T, D)]
    valid = _padding(B, T, "left")
    fn = torch.compile(lambda *a: dma_attention(cfg, *a, torch.float32), backend="aot_eager", fullgraph=True)
    for low_key, want_fold in ((0, "_by_values"), (T - 1, "_by_keys")):  # row 1: keys 0..T-3 pad
        with torch.no_grad():
            args[3].copy_(_inputs(B, H, G, cfg.num_dt_heads, T, D)[3])
            args[3][1, 0, low_key] = -200.0
        for run in ("eager", "compiled"):
            want = dma_attention(cfg, *args, allowed_mask(cfg, B, T, 0, valid, torch.device("cpu")), torch.float32)
            calls.clear()
            got = fn(*args, valid) if run == "compiled" else dma_attention(cfg, *args, valid, torch.float32)
            assert (got - want).abs().max().item() <= 1e-5, (low_key, run)
            g_got = torch.autograd.grad(got.square().sum(), args)
            g_want = torch.autograd.grad(want.square().sum(), args)
            for name, a, b in zip("q k v dt".split(), g_got, g_want):
                assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item(), (low_key, run, name)
            if run == "eager":
                assert want_fold in calls, calls


def test_value_side_fold_bf16_autocast_and_compiled(v_fold, calls, monkeypatch):
    """Under bf16 autocast (attention_impl "fused": sdpa on the CPU) the value fold is as close to the float32
    reference as the q/k fold and the eager reference in bf16 are, with dt spanning several units per row (so the
    weights matter), and a fullgraph-compiled model (dynamo, eager backend) gives the reference's logits."""
    from doge_torch.model import DogeAttention, DogeForCausalLM, with_attention_impl

    cfg = _cfg(4, 2, 16, 64)
    cfg = DogeConfig(**{**cfg.__dict__, "attention_impl": "fused", "num_hidden_layers": 2})
    torch.manual_seed(0)
    model = DogeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".A"):
                p.fill_(0.5)
            if name.endswith("dt_proj.weight"):  # dt = exp(A softplus(dt_proj(v))) spans 2.3-25 per row here
                p.normal_(0.0, 3.0)
    spreads = []
    dynamic_dt = DogeAttention.dynamic_dt

    def recorded(self, v_flat):
        dt = dynamic_dt(self, v_flat)
        if not torch.compiler.is_compiling():
            spreads.append((dt.amax(-1) - dt.amin(-1)).float())
        return dt

    monkeypatch.setattr(DogeAttention, "dynamic_dt", recorded)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ref = with_attention_impl(model, "reference")(ids).logits  # (in place)
        errs = {}
        for fold in ("reference", "qk", "v"):  # the eager reference in bf16: the error bf16 itself brings
            with_attention_impl(model, "reference" if fold == "reference" else "fused")
            v_fold.FUSED_FOLD = fold
            with torch.autocast("cpu", dtype=torch.bfloat16):
                errs[fold] = (model(ids).logits.float() - ref).abs().max().item() / ref.abs().max().item()
        compiled = torch.compile(model, backend="eager", fullgraph=True)(ids).logits
    spread = torch.stack(spreads)
    assert spread.min() > 2.0 and spread.max() < v_fold.V_FOLD_MAX_SPREAD, spread
    # (dt spanning up to 25 costs bf16 ~3e-2 of max|logit| on every path, the reference's too)
    assert errs["v"] <= 1.5 * errs["reference"] and errs["v"] <= 1.5 * errs["qk"], errs
    assert torch.allclose(compiled, ref, atol=1e-5, rtol=0)
    assert calls == {"_by_values": 2, "_by_keys": 2, "fold_bias": 2}  # (eager bf16: each fold once per layer)


@pytest.mark.parametrize("T,keep,block,dt_kind", [(300, 40, 32, "random"), (256, 32, 16, "increasing"),
                                                 (200, 150, 16, "random"), (64, 8, 16, "increasing")])
@pytest.mark.parametrize("n_eq_h", [False, True])
def test_expiry_block_mask_covers_the_rule(T, keep, block, dt_kind, n_eq_h):
    """Every allowed (query, key) lies in a listed tile; full tiles hold only allowed entries; and the tests include
    skipped tiles and full tiles (increasing dt: keys live exactly keep_window slots, a diagonal band)."""
    B, H, G = 2, 4, 2
    n = H if n_eq_h else G
    _, _, _, dt = _inputs(B, H, G, n, T, 8, dt_kind)
    e = key_expiry(dt, torch.ones(B, T, dtype=torch.bool), keep).clamp_max(T)
    bm = expiry_block_mask(e, H, T, T, block=block)
    want = _dense_keep(dt, H, T, keep)
    nb = -(-T // block)
    pad = nb * block - T
    wp = torch.nn.functional.pad(want, (0, pad, 0, pad)).view(B, H, nb, block, nb, block)
    any_tile = wp.any(dim=(3, 5))  # [B, H, nq, nk]
    listed = torch.zeros_like(any_tile)
    full = torch.zeros_like(any_tile)
    for b in range(B):
        for h in range(H):
            for qb in range(nb):
                listed[b, h, qb, bm.kv_indices[b, h, qb, : bm.kv_num_blocks[b, h, qb]].long()] = True
                full[b, h, qb, bm.full_kv_indices[b, h, qb, : bm.full_kv_num_blocks[b, h, qb]].long()] = True
    assert not (listed & full).any()
    assert not (any_tile & ~(listed | full)).any(), "an allowed entry lies in a skipped tile"
    all_tile = wp.all(dim=(3, 5))
    assert not (full & ~all_tile).any(), "a full tile holds a masked entry"
    # the mask_mod on the listed tiles gives exactly the rule
    qi = torch.arange(T)[:, None]
    kj = torch.arange(T)[None, :]
    for b in range(B):
        for h in range(H):
            got = bm.mask_mod(torch.tensor(b), torch.tensor(h), qi, kj)
            assert torch.equal(got, want[b, h])
    if dt_kind == "increasing":  # a band keep_window wide: tiles far below the diagonal are skipped
        assert (~(listed | full)).tril(-1).any()
        assert full.any() == (keep >= 2 * block)


@pytest.mark.parametrize("variant", ["native", "small_doge"])
def test_flex_forward_equals_dense_bias(variant):
    """FlexAttention DMA (score_mod bias + expiry block mask) = the dense-bias path beyond keep_window (forward:
    torch has no FlexAttention backward on CPU)."""
    H, G, D, T, keep = 4, 2, 16, 300, 40
    cfg = _cfg(H, G, D, keep, variant)
    q, k, v, dt = (x.float() for x in _inputs(2, H, G, cfg.num_dt_heads, T, D))
    got = flex_dma(cfg, q, k, v, dt)
    want = dma_attention(cfg, q, k, v, dt, allowed_mask(cfg, 2, T, 0, None, q.device), torch.float32)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("padded", [False, True])
def test_flex_probe_takes_short_sequences(monkeypatch, padded):
    """FUSED_FOLD = "flex" (a GPU probe): T <= keep_window goes to FlexAttention instead of a fold where it is
    available (made available on the CPU here; forward only), with the dense-bias path's values; without it, and
    with dropout, the folds as before."""
    import doge_torch.model as dm

    H, G, D, T = 4, 2, 16, 40
    cfg = _cfg(H, G, D, 64, impl="fused")
    q, k, v, dt = (x.float() for x in _inputs(2, H, G, cfg.num_dt_heads, T, D))
    valid = _padding(2, T, "left") if padded else None
    ran, real = [], dm.flex_dma
    monkeypatch.setattr(dm, "FUSED_FOLD", "flex")
    monkeypatch.setattr(dm, "flex_dma", lambda *a: ran.append(1) or real(*a))
    want = dma_attention(cfg, q, k, v, dt, allowed_mask(cfg, 2, T, 0, valid, q.device), torch.float32)
    got = dma_attention(cfg, q, k, v, dt, valid, torch.float32)  # flex unavailable: the q/k fold
    assert ran == [] and (got - want).abs().max().item() <= 1e-5
    monkeypatch.setattr(dm, "flex_available", lambda device: True)
    got = dma_attention(cfg, q, k, v, dt, valid, torch.float32)
    assert ran == [1] and (got - want).abs().max().item() <= 1e-5
    torch.manual_seed(0)
    dma_attention(cfg, q, k, v, dt, valid, torch.float32, dropout=0.1)  # dropout: a fold
    assert ran == [1]


@pytest.mark.parametrize("kind", ["left", "holes"])
def test_flex_with_padding_keys_equals_dense_bias(monkeypatch, kind):
    """Beyond keep_window a [B, T] key mask takes FlexAttention (made available on the CPU here; forward only:
    torch has no FlexAttention backward on CPU, gpu_check's padded parity rows check the gradients on CUDA): padding
    keys expire before they exist, rows with no valid key get the reference's uniform rows; values as the dense-bias
    path's."""
    import doge_torch.model as dm

    H, G, D, T, keep = 4, 2, 16, 120, 24
    cfg = _cfg(H, G, D, keep, impl="fused")
    q, k, v, dt = (x.float() for x in _inputs(2, H, G, cfg.num_dt_heads, T, D))
    valid = _padding(2, T, kind)
    ran, real = [], dm.flex_dma
    monkeypatch.setattr(dm, "flex_available", lambda device: True)
    monkeypatch.setattr(dm, "flex_dma", lambda *a: ran.append(1) or real(*a))
    got = dma_attention(cfg, q, k, v, dt, valid, torch.float32)
    want = dma_attention(cfg, q, k, v, dt, allowed_mask(cfg, 2, T, 0, valid, q.device), torch.float32)
    assert ran == [1] and (got - want).abs().max().item() <= 1e-5


def test_sdpa_backend_priority(monkeypatch, capsys):
    """set_sdpa_backends: unknown names raise naming them; a chosen order is in force inside doge_torch's sdpa calls
    only (torch's global order is unchanged after them); values are unchanged (no cuDNN on CPU: the next backend
    runs); None restores torch's own order; the training CLI refuses a bad list."""
    import torch.nn.functional as F

    import doge_torch.model as dm
    from doge_torch.train import main

    with pytest.raises(ValueError, match="bogus"):
        dm.set_sdpa_backends(["cudnn", "bogus"])
    default = torch._C._get_sdp_priority_order()
    cfg = _cfg(4, 2, 16, 64)
    q, k, v, dt = (x.float() for x in _inputs(1, 4, 2, 2, 24, 16))
    want = dma_attention(cfg, q, k, v, dt, None, torch.float32)
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(torch._C._get_sdp_priority_order()) or real(*a, **kw))
    try:
        dm.set_sdpa_backends(["cudnn", "flash"])
        got = dma_attention(cfg, q, k, v, dt, None, torch.float32)
    finally:
        dm.set_sdpa_backends(None)
    from torch.nn.attention import SDPBackend

    assert [SDPBackend(b) for b in seen[0][:2]] == [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    assert torch._C._get_sdp_priority_order() == default
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    dma_attention(cfg, q, k, v, dt, None, torch.float32)
    assert seen[-1] == default
    with pytest.raises(SystemExit):
        main(["--config", "configs/tiny.yaml", "--data", "x.npy", "--sdpa-backends", "cudnn,nope"])
    assert "--sdpa-backends" in capsys.readouterr().err


def test_flex_wrapper_is_built_on_first_use():
    """Importing doge_torch builds no torch.compile wrapper (that imports dynamo and inductor: ~1.6 s for every
    user); the eager CUDA-side wrapper is built on first use and equals flex_attention; inside a compiled region
    flex_attention is called directly."""
    import subprocess
    import sys

    code = ("import sys, doge_torch.model as m\n"
            "assert m._flex_compiled is None\n"
            "assert 'torch._inductor.compile_fx' not in sys.modules, 'inductor imported at import time'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    import doge_torch.model as dm

    # distinct q, k, v: torch 2.11's CPU flex lowering refuses one buffer passed as all three
    q, k, v = torch.randn(3, 1, 2, 128, 16, generator=torch.Generator().manual_seed(0)).unbind(0)
    q, k, v = q.clone(), k.clone(), v.clone()
    want = dm.flex_attention(q, k, v)
    torch.testing.assert_close(dm._flex_cuda(q, k, v), want, rtol=1e-5, atol=1e-5)
    assert dm._flex_compiled is not None
    traced = torch.compile(lambda q: dm._flex_cuda(q, k, v), fullgraph=True, backend="eager")(q)
    torch.testing.assert_close(traced, want, rtol=0, atol=0)
