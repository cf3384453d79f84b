"""The byte-saving variants of doge_jax's training step (off by default until a GPU times them; gpu_check --probes
"[fewer bytes]"; bytes by benchmarks/hlo_traffic.py) compute what the default code does: loss.ONE_PASS_LSE,
model.FUSED_GATE_UP, attention.FUSED_V_UNPADDED (its cuDNN call replaced here by an exact stand-in: no GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax import nnx

from doge_jax import attention, loss, model
from doge_jax.attention import MaskInfo
from doge_jax.config import DogeConfig


def _grads(fn, *args):
    """(value, grads) of fn, compiled afresh (the flags are read when traced; op by op took ~15 s a test)."""
    with jax.default_matmul_precision("highest"):
        return jax.jit(jax.value_and_grad(lambda *a: fn(*a), argnums=tuple(range(len(args)))))(*args)


def test_one_pass_logsumexp(monkeypatch):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((5, 300)) * 20, jnp.float32)
    x = x.at[1, ::3].set(-jnp.inf).at[2].set(-jnp.inf)  # -inf entries weigh nothing; an all -inf row gives -inf
    got, want = loss._logsumexp(x), jax.nn.logsumexp(x, axis=-1)
    assert np.isneginf(got[2]) and np.isneginf(want[2])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    h = jnp.asarray(rng.standard_normal((70, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 50)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 50, 70)).at[::7].set(loss.IGNORE)
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(loss, "ONE_PASS_LSE", on)
        runs[on] = _grads(lambda h, w: loss.chunked_ce_sum(h, w, t, False, 32), h, w)  # (traced anew each time)
    (l0, g0), (l1, g1) = runs[False], runs[True]
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_fused_gate_up(monkeypatch):
    cfg = DogeConfig(**TINY, attention_impl="reference")
    m = model.DogeForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, TINY["vocab_size"], (2, 12)))
    graphdef, params = nnx.split(m, nnx.Param)

    def lossf(p):
        return model.causal_lm_loss(nnx.merge(graphdef, p)(ids).logits, ids)

    runs = {}
    for on in (False, True):
        monkeypatch.setattr(model, "FUSED_GATE_UP", on)
        runs[on] = _grads(lossf, params)
    (l0, (g0,)), (l1, (g1,)) = runs[False], runs[True]
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("padded", [False, True])
def test_unpadded_v_fold(monkeypatch, padded):
    """On a GPU in bf16 the q/k fold calls cuDNN with q', k' 136 wide and v 128 (no v padding, no output slice):
    with an exact stand-in for that call, the output and the gradients of q, k, v, dt are the float32 fused path's
    within bf16's tolerance (spec §9: 2e-2 of the largest value), and the stand-in saw v unpadded."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    seen = []

    def stand_in(q, k, v, scale, mask_type, qkv_layout, sliding_window_length=None):  # BTNH, GQA, causal
        seen.append((q.shape[-1], v.shape[-1]))
        rep = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
        T = q.shape[1]
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v.astype(jnp.float32))
        return o.astype(q.dtype)

    monkeypatch.setattr(cudnn, "dot_product_attention", stand_in)
    B, H, G, T, D = 2, 4, 2, 24, 16
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((B, H, T, D), (B, G, T, D), (B, G, T, D)))
    dt = jnp.asarray(rng.standard_normal((B, G, T)), jnp.float32)
    key_mask = jnp.asarray(np.arange(T)[None, :] >= np.array([[0], [5]])) if padded else None
    mask = MaskInfo(key_mask, 0, None, None)

    def f(q, k, v, dt):
        return jnp.sum(attention.attention_fused(q, k, v, dt, mask, T) * jnp.cos(jnp.arange(D)))

    (want, gw) = _grads(f, q, k, v, dt)
    monkeypatch.setattr(attention, "platform", lambda: "gpu")
    monkeypatch.setattr(attention, "FUSED_V_UNPADDED", True)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v, dt)]
    (got, gg) = _grads(lambda *a: f(*a).astype(jnp.float32), *bf)
    assert seen and all(dv == D and dq == 24 for dq, dv in seen), seen  # q'/k' D + 1 padded to 24; v as it is
    o_want = attention.attention_fused(q, k, v, dt, mask, T)
    with jax.default_matmul_precision("highest"):
        o_got = attention.attention_fused(*bf, mask, T).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(o_got - o_want))) <= 2e-2 * float(jnp.max(jnp.abs(o_want)))
    for a, b in zip(gw, gg):
        err = float(jnp.linalg.norm(b.astype(jnp.float32) - a) / jnp.linalg.norm(a))
        assert err <= 2e-2, err
