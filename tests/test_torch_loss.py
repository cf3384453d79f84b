"""doge_torch.loss: the chunked linear + cross-entropy used for training (`return_logits=False`), against autograd
through the plain logits path and a float64 reference."""

from __future__ import annotations

import pytest
import torch

from doge_jax.config import DogeConfig
from doge_torch.loss import linear_cross_entropy_sum
from doge_torch.model import DogeForCausalLM

CFG = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, keep_window_size=64)


def test_gradients_exact_in_float64_across_chunks():
    torch.manual_seed(0)
    x = torch.randn(70, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (70,))
    t[[3, 40, 69]] = -100  # ignored targets, one in each chunk
    assert torch.autograd.gradcheck(lambda x, w: linear_cross_entropy_sum(x, w, t, chunk=32), (x, w))
    want = torch.nn.functional.cross_entropy(x @ w.t(), t, ignore_index=-100, reduction="sum")
    for chunk in (1, 7, 32, 1000):  # the chunking changes nothing but the order of the sums
        got = linear_cross_entropy_sum(x, w, t, chunk=chunk).detach()
        assert abs(float(got - want.detach())) <= 1e-12 * abs(float(want.detach()))
    gx, gw = torch.autograd.grad(want * 0.3, (x, w))
    fx, fw = torch.autograd.grad(linear_cross_entropy_sum(x, w, t, chunk=7) * 0.3, (x, w))  # the incoming grad
    assert torch.allclose(fx, gx, rtol=1e-12, atol=1e-14) and torch.allclose(fw, gw, rtol=1e-12, atol=1e-14)


def _grads(model, ids, labels, **kw):
    model.zero_grad()
    out = model(ids, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("num_items", [None, 97])
def test_model_loss_without_logits_as_accurate_as_with(tied, num_items):
    """`return_logits=False`: the same loss and gradients as the logits path, float32 and under bf16 autocast, both
    measured against the float64 model: the fused path is never less accurate (per parameter, relative L2)."""
    torch.manual_seed(0)
    model = DogeForCausalLM(DogeConfig(**CFG, tie_word_embeddings=tied)).train()
    with torch.no_grad():  # nonzero A (its init is 0): the dynamic-mask path gets gradients too
        for layer in model.model.layers:
            layer.self_attn.A.copy_(torch.randn_like(layer.self_attn.A))
    ref64 = DogeForCausalLM(DogeConfig(**CFG, tie_word_embeddings=tied)).double().train()
    ref64.load_state_dict(model.state_dict())
    ids = torch.randint(3, 300, (3, 40))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[2, 20:] = -100
    ref, g64 = _grads(ref64, ids, labels, num_items_in_batch=num_items)
    want = float(ref.loss.detach())
    # floor: the dtype's rounding level; tol: the project's float32 parity tolerance and spec §9's bf16 one
    for autocast, floor, tol in ((False, 1e-6, 1e-4), (True, 1e-3, 2e-2)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            plain, gp = _grads(model, ids, labels, num_items_in_batch=num_items)
            fused, gf = _grads(model, ids, labels, num_items_in_batch=num_items, return_logits=False)
        assert fused.logits is None and plain.logits.shape == (3, 40, 300)
        assert abs(float(fused.loss.detach()) - want) <= floor * want + abs(float(plain.loss.detach()) - want)
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

def test_return_logits_false_only_with_labels():
    torch.manual_seed(0)
    model = DogeForCausalLM(DogeConfig(**CFG))
    ids = torch.randint(3, 300, (2, 10))
    assert model(ids, return_logits=False).logits.shape == (2, 10, 300)  # no labels: logits as usual
    out = model(ids, labels=ids, return_logits=False)
    assert out.logits is None and torch.allclose(out.loss, model(ids, labels=ids).loss, rtol=1e-6, atol=0)
