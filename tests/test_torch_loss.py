"""doge_torch.loss: the chunked linear + cross-entropy used for training (`return_logits=False`), against autograd
through the plain logits path and a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from doge_jax.config import DogeConfig
from doge_torch import loss as L
from doge_torch.loss import linear_cross_entropy_sum
from doge_torch.model import DogeForCausalLM

CFG = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, keep_window_size=64)
MOE = dict(is_moe=True, num_experts=16, num_experts_per_tok=4, output_router_logits=True)


@pytest.fixture
def small_chunks(monkeypatch):
    """16 tokens per chunk, so the model-level tests cross chunk boundaries (and end on a partial chunk)."""
    monkeypatch.setattr(L, "chunk_rows", lambda vocab_size: 16)


@pytest.mark.parametrize("dtype,autocast", [(torch.float64, False), (torch.float32, True)])
def test_compiled_chunk_function_gives_the_eager_values(monkeypatch, dtype, autocast):
    """The per-chunk function that runs compiled on CUDA (`_chunk_softmax_grad`): here run as a plain function and
    as dynamo's fullgraph capture (aot_eager: the graph inductor would get, no breaks), it gives the eager ops'
    loss and gradients: float64, and float32 under bf16 autocast (bitwise: the same ops in the same dtypes)."""
    torch.manual_seed(0)
    x = torch.randn(70, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 50, (70,))
    t[[3, 40, 69]] = -100

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = linear_cross_entropy_sum(x, w, t, chunk=32)
        return (out.detach(), *torch.autograd.grad(out * 0.3, (x, w)))

    want = run()  # eager ops (the CPU's path)
    captured = torch.compile(L._chunk_softmax_grad, backend="aot_eager", dynamic=False, fullgraph=True)
    for fn in (L._chunk_softmax_grad, captured):
        monkeypatch.setattr(L, "_chunk_fn", lambda device, fn=fn: fn)
        for a, b in zip(run(), want):
            assert torch.equal(a, b) if autocast else torch.allclose(a, b, rtol=1e-13, atol=1e-15)


def test_chunk_compile_failure_falls_back_to_eager(monkeypatch):
    """Where the chunk function cannot be compiled (no working Triton for the GPU, say) the loss warns once, gives
    the same values through the plain function, and stops trying (COMPILE_CHUNKS False)."""
    torch.manual_seed(0)
    x = torch.randn(70, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (70,))
    want = (linear_cross_entropy_sum(x, w, t, chunk=32).detach(),)
    want += torch.autograd.grad(linear_cross_entropy_sum(x, w, t, chunk=32), (x, w))

    def broken(*a):
        raise RuntimeError("Cannot find a working triton installation")

    monkeypatch.setattr(L, "COMPILE_CHUNKS", True)
    monkeypatch.setattr(L, "_compiled_chunk", broken)
    monkeypatch.setattr(L, "_chunk_fn", lambda device: L._run_compiled if L.COMPILE_CHUNKS else None)
    with pytest.warns(UserWarning, match="compiling the loss's chunk function failed .*triton.*eager ops"):
        out = linear_cross_entropy_sum(x, w, t, chunk=32)
    got = (out.detach(), *torch.autograd.grad(out, (x, w)))
    assert L.COMPILE_CHUNKS is False
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # ~15 s: an inductor compile
def test_inductor_compiled_chunk_function(monkeypatch):
    """`_chunk_softmax_grad` compiled by inductor (the CPU's; CUDA compiles the same graph to Triton) through the
    loss under bf16 autocast: the eager ops' loss and gradients."""
    torch.manual_seed(0)
    x = torch.randn(70, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (70,))
    t[[3, 40, 69]] = -100

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = linear_cross_entropy_sum(x, w, t, chunk=32)
        return (out.detach(), *torch.autograd.grad(out * 0.3, (x, w)))

    want = run()
    compiled = torch.compile(L._chunk_softmax_grad, dynamic=False, fullgraph=True)
    monkeypatch.setattr(L, "_chunk_fn", lambda device: compiled)
    for a, b in zip(run(), want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradients_exact_in_float64_across_chunks():
    torch.manual_seed(0)
    x = torch.randn(70, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (70,))
    t[[3, 40, 69]] = -100  # ignored targets, one in each chunk
    assert torch.autograd.gradcheck(lambda x, w: linear_cross_entropy_sum(x, w, t, chunk=32), (x, w))
    want = F.cross_entropy(x @ w.t(), t, ignore_index=-100, reduction="sum")
    for chunk in (1, 7, 32, 1000):  # the chunking changes nothing but the order of the sums
        got = linear_cross_entropy_sum(x, w, t, chunk=chunk).detach()
        assert got.dtype == torch.float64 and abs(float(got - want.detach())) <= 1e-12 * abs(float(want.detach()))
    gx, gw = torch.autograd.grad(want * 0.3, (x, w))
    fx, fw = torch.autograd.grad(linear_cross_entropy_sum(x, w, t, chunk=7) * 0.3, (x, w))  # the incoming grad
    assert torch.allclose(fx, gx, rtol=1e-12, atol=1e-14) and torch.allclose(fw, gw, rtol=1e-12, atol=1e-14)


def test_gradients_only_where_needed(monkeypatch):
    """No gradient work under no_grad or for an input that does not need it (a frozen head or trunk); no second
    derivative (the gradients are constants of the forward): double backward raises instead of being wrong."""
    calls = []
    apply = L._LinearCrossEntropy.apply
    monkeypatch.setattr(L._LinearCrossEntropy, "apply", lambda *a: calls.append(a[4:]) or apply(*a))
    torch.manual_seed(0)
    x = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 30, (40,))
    want = F.cross_entropy(x @ w.t(), t, reduction="sum")
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy_sum(x, w, t, chunk=16), want)
    with torch.inference_mode():
        linear_cross_entropy_sum(x, w, t, chunk=16)
    wf = w.detach().requires_grad_(False)
    (gx,) = torch.autograd.grad(linear_cross_entropy_sum(x, wf, t, chunk=16), (x,))
    assert torch.allclose(gx, torch.autograd.grad(want, (x,))[0], rtol=1e-12)
    assert calls == [(False, False), (False, False), (True, False)]
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(linear_cross_entropy_sum(x, w, t, chunk=16) * s, (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice|doesn't support double backward"):
        g.sum().backward()


def _grads(model, ids, labels, **kw):
    model.zero_grad()
    out = model(ids, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(model64, ids, labels, num_items):
    """Loss and gradients of the float64 model, the cross-entropy in float64 too (causal_lm_loss computes it in
    float32), MoE aux term included."""
    model64.zero_grad()
    out = model64(ids)
    target = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), target, ignore_index=-100, reduction="sum")
    loss = ce / (num_items if num_items is not None else (target != -100).sum())
    if model64.config.is_moe:
        aux = model64(ids, labels=labels, output_router_logits=True).aux_loss
        loss = loss + model64.config.router_aux_loss_coef * aux
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model64.named_parameters()
                                  if p.grad is not None}


@pytest.mark.parametrize("extra", [{}, {"tie_word_embeddings": True}, MOE], ids=["untied", "tied", "moe"])
@pytest.mark.parametrize("num_items", [None, 97])
def test_model_loss_without_logits_as_accurate_as_with(small_chunks, extra, num_items):
    """`return_logits=False`: the same loss and gradients as the logits path, float32 and under bf16 autocast,
    across chunk boundaries, both measured against the float64 model: the fused path is never less accurate."""
    torch.manual_seed(0)
    model = DogeForCausalLM(DogeConfig(**CFG, **extra)).train()
    with torch.no_grad():  # nonzero A (its init is 0): the dynamic-mask path gets gradients too
        for layer in model.model.layers:
            layer.self_attn.A.copy_(torch.randn_like(layer.self_attn.A))
    ref64 = DogeForCausalLM(DogeConfig(**CFG, **extra)).double().train()
    ref64.load_state_dict(model.state_dict())
    ids = torch.randint(3, 300, (3, 40))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[2, 20:] = -100
    want, g64 = _reference(ref64, ids, labels, num_items)
    # floor: the dtype's rounding level; tol: the project's float32 parity tolerance and spec §9's bf16 one
    for autocast, floor, tol in ((False, 1e-6, 1e-4), (True, 1e-3, 2e-2)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            plain, gp = _grads(model, ids, labels, num_items_in_batch=num_items)
            fused, gf = _grads(model, ids, labels, num_items_in_batch=num_items, return_logits=False)
        assert fused.logits is None and plain.logits.shape == (3, 40, 300)
        assert abs(float(fused.loss.detach()) - want) <= floor * want + abs(float(plain.loss.detach()) - want)
        # the same products as F.linear (in autocast's dtype under autocast): the same loss up to summation order
        assert abs(float(fused.loss.detach()) - float(plain.loss.detach())) <= 1e-6 * want
        assert set(gf) == set(gp) == set(g64)
        names = [n for n in g64 if g64[n].norm() > 0]

        def err(g, ns):
            return float(torch.cat([g[n].flatten() - g64[n].flatten() for n in ns]).norm()
                         / torch.cat([g64[n].flatten() for n in ns]).norm())

        # the whole gradient: no less accurate (both errors are rounding noise of the same size)
        assert err(gf, names) <= 1.5 * err(gp, names) + floor, (autocast, err(gf, names), err(gp, names))
        for n in names:  # no parameter singled out: a wrong term is off by O(1). (Per parameter, rounding noise
            # alone differs several-fold between the two paths: 8-element norms in bf16, A's ill-conditioned
            # gradient in float32.)
            assert err(gf, [n]) <= max(2 * err(gp, [n]), tol), (autocast, n, err(gf, [n]), err(gp, [n]))


def test_no_target_gives_nan_loss_and_zero_gradients():
    """A micro-batch whose labels are all ignored: NaN loss and zero (not NaN) gradients, as through the logits, so
    it cannot poison gradients accumulated from other micro-batches."""
    torch.manual_seed(0)
    model = DogeForCausalLM(DogeConfig(**CFG))
    ids = torch.randint(3, 300, (2, 10))
    labels = torch.full_like(ids, -100)
    labels[:, 0] = ids[:, 0]  # position 0 is never a target (shifted)
    for return_logits in (True, False):
        out, grads = _grads(model, ids, labels, return_logits=return_logits)
        assert torch.isnan(out.loss) and all(torch.count_nonzero(g) == 0 for g in grads.values()), return_logits


def test_return_logits_false_only_with_labels():
    torch.manual_seed(0)
    model = DogeForCausalLM(DogeConfig(**CFG))
    ids = torch.randint(3, 300, (2, 10))
    assert model(ids, return_logits=False).logits.shape == (2, 10, 300)  # no labels: logits as usual
    out = model(ids, labels=ids, return_logits=False)
    assert out.logits is None and torch.allclose(out.loss, model(ids, labels=ids).loss, rtol=1e-6, atol=0)


def test_compiles_once_for_any_length_within_a_chunk():
    """torch.compile(dynamic=True): batches of other lengths (within one chunk) reuse the compiled graph."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = DogeForCausalLM(DogeConfig(**CFG)).train()
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, dynamic=True)
    for T in (8, 12, 20, 33):
        ids = torch.randint(3, 300, (2, T))
        compiled(ids, labels=ids, return_logits=False).loss.backward()
    assert counter.frame_count == 1
