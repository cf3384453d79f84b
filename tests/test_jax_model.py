"""doge_jax against transformers 5.23 (logits, losses, generation, checkpoints) and doge_torch (gradients,
small-doge variant). float32 with `highest` matmul precision."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import (
    TINY,
    TINY_MOE,
    hf_logits,
    left_pad_mask,
    make_hf_model,
    max_abs_diff,
    random_ids,
    save_hf,
    unique_ids,
    write_legacy_checkpoint,
)
from flax import nnx

from doge_jax import DogeConfig
from doge_jax.hf import flat_params, to_hf_arrays
from doge_jax.hf_names import CheckpointError
from doge_jax.model import DogeCache, DogeForCausalLM, with_attention_impl

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4  # issue 2: doge_jax logits within 1e-4 of transformers

CASES = {
    "gqa": {},
    "mha": dict(num_key_value_heads=4),
    "moe": TINY_MOE,
    "moe_norm_topk": dict(TINY_MOE, norm_topk_prob=True),
    "tied": dict(tie_word_embeddings=True),
    "bias": dict(attention_bias=True, mlp_bias=True),
    "head_dim": dict(head_dim=32),  # H*D = 128 != hidden_size
    "eps": dict(rms_norm_eps=1e-2),  # large enough to move the logits: an ignored eps fails
}


def _load(hf, tmp_path, name="m"):
    return DogeForCausalLM.from_pretrained(save_hf(hf, tmp_path / name))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    hf = make_hf_model(**CASES[case])
    model = _load(hf, tmp_path)
    ids = unique_ids(2, 24, 128, seed=1)
    assert max_abs_diff(model(ids).logits, hf_logits(hf, ids)) <= TOL


def test_restarting_position_ids(tmp_path):
    """Packed documents: position_ids that restart mid-row (RoPE only; attention stays causal over the row), as
    transformers computes them."""
    hf = make_hf_model()
    model = _load(hf, tmp_path)
    ids = unique_ids(2, 20, 128, seed=4)
    pos = np.stack([np.r_[np.arange(12), np.arange(8)], np.r_[np.arange(5), np.arange(15)]]).astype(np.int32)
    got = model(ids, position_ids=pos).logits
    assert max_abs_diff(got, hf_logits(hf, ids, position_ids=torch.as_tensor(pos, dtype=torch.long))) <= TOL
    assert max_abs_diff(got, model(ids).logits) > 1e-3  # the restart changes them


def test_left_padding(tmp_path):
    hf = make_hf_model()
    model = _load(hf, tmp_path)
    ids, mask = unique_ids(3, 20, 128, seed=2), left_pad_mask(3, 20, [0, 5, 19])
    assert max_abs_diff(model(ids, attention_mask=mask).logits, hf_logits(hf, ids, mask)) <= TOL


@pytest.mark.parametrize("impl", ["auto", "reference", "blockwise"])
def test_sliding_window_wider_than_keep_window(tmp_path, impl):
    """A sliding window wider than keep_window with T > keep_window: both the window and the keep-window top-k
    apply (left padding too), against transformers."""
    hf = make_hf_model(sliding_window=12, keep_window_size=8)
    model = with_attention_impl(_load(hf, tmp_path), impl)
    ids, mask = unique_ids(2, 30, 128, seed=13), left_pad_mask(2, 30, [0, 4])
    assert max_abs_diff(model(ids, attention_mask=mask).logits, hf_logits(hf, ids, mask)) <= TOL


def test_dynamic_rope_past_max_positions(tmp_path):
    rope = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    hf = make_hf_model(rope_parameters=rope, keep_window_size=512)
    model = _load(hf, tmp_path)
    assert model.config.rope_type == "dynamic" and model.config.rope_factor == 4.0
    ids = unique_ids(1, 128, 128, seed=3)  # 2 x max_position_embeddings
    assert max_abs_diff(model(ids).logits, hf_logits(hf, ids)) <= TOL


@pytest.mark.parametrize("moe", [False, True])
def test_keep_window_topk(tmp_path, moe):
    hf = make_hf_model(keep_window_size=8, **(TINY_MOE if moe else {}))
    model = _load(hf, tmp_path)
    ids, mask = unique_ids(2, 40, 128, seed=4), left_pad_mask(2, 40, [0, 3])
    assert max_abs_diff(model(ids, attention_mask=mask).logits, hf_logits(hf, ids, mask)) <= TOL


def test_sliding_window(tmp_path):
    hf = make_hf_model(sliding_window=6)
    model = _load(hf, tmp_path)
    assert model.config.sliding_window == 6
    ids = unique_ids(2, 30, 128, seed=5)
    assert max_abs_diff(model(ids).logits, hf_logits(hf, ids)) <= TOL


def test_logits_to_keep(tmp_path):
    hf = make_hf_model()
    model = _load(hf, tmp_path)
    ids = unique_ids(2, 16, 128, seed=6)
    full = np.asarray(model(ids).logits)
    assert np.array_equal(np.asarray(model(ids, logits_to_keep=3).logits), full[:, -3:])


@pytest.mark.parametrize("num_items", [None, 37])
def test_loss_matches_transformers(tmp_path, num_items):
    hf = make_hf_model()
    model = _load(hf, tmp_path)
    ids = unique_ids(2, 20, 128, seed=7)
    labels = ids.copy()
    labels[0, :4] = -100
    labels[1, 10] = -100
    with torch.no_grad():
        kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
        ref = hf(input_ids=torch.as_tensor(ids), labels=torch.as_tensor(labels), **kw).loss.item()
    ours = float(model(ids, labels=labels, num_items_in_batch=num_items).loss)
    assert abs(ours - ref) <= 1e-5 * abs(ref)


@pytest.mark.parametrize("experts", [TINY_MOE, dict(TINY_MOE, num_experts=64, num_experts_per_tok=3)],
                         ids=["k=K", "k<K"])
@pytest.mark.parametrize("masked", [False, True])
def test_moe_aux_loss(tmp_path, masked, experts):
    hf = make_hf_model(**experts, output_router_logits=True)
    model = _load(hf, tmp_path)
    ids = unique_ids(2, 12, 128, seed=8)
    mask = left_pad_mask(2, 12, [0, 4]) if masked else None
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(ids), labels=torch.as_tensor(ids),
                 attention_mask=None if mask is None else torch.as_tensor(mask))
    ours = model(ids, attention_mask=mask, labels=ids)
    assert abs(float(ours.aux_loss) - out.aux_loss.item()) <= 1e-5 * out.aux_loss.item()
    assert abs(float(ours.loss) - out.loss.item()) <= 1e-5 * out.loss.item()


@pytest.mark.parametrize("use_cache, case", [(True, "gqa"), (True, "moe"), (False, "gqa"),
                                             pytest.param(False, "moe", marks=pytest.mark.slow)])
def test_greedy_generation_matches_transformers(tmp_path, case, use_cache):
    hf = make_hf_model(**CASES[case])
    model = _load(hf, tmp_path)
    ids, mask = unique_ids(2, 10, 128, seed=9), left_pad_mask(2, 10, [3, 0])
    new = 32 if use_cache else 10  # without a cache every length compiles anew (the MoE case took ~25 s at 32)
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                          max_new_tokens=new, pad_token_id=0, use_cache=use_cache).numpy()
    ours = model.generate(ids, mask, max_new_tokens=new, use_cache=use_cache)
    assert ours.shape == (2, 10 + new)
    np.testing.assert_array_equal(ours, ref)


def test_prefill_plus_decode_equals_full_forward(tmp_path):
    hf = make_hf_model()
    model = _load(hf, tmp_path)
    ids = unique_ids(2, 20, 128, seed=10)
    full = np.asarray(model(ids).logits)
    cache = DogeCache.init(model.config, 2, 64)
    out = model(ids[:, :12], cache=cache)
    parts = [np.asarray(out.logits)]
    for t in range(12, 20):
        out = model(ids[:, t:t + 1], cache=out.cache)
        parts.append(np.asarray(out.logits))
    assert max_abs_diff(np.concatenate(parts, axis=1), full) <= 1e-5


def test_sampling_and_eos(tmp_path):
    hf = make_hf_model()
    model = _load(hf, tmp_path)
    ids = unique_ids(2, 6, 128, seed=11)
    a = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    b = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    c = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # top_k=1 sampling is greedy
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=8, do_sample=True, top_k=1),
                                  model.generate(ids, max_new_tokens=8))
    greedy = model.generate(ids[:1], max_new_tokens=12)
    eos = int(greedy[0, 6 + 3])  # the 4th new token: generation must stop right there
    stopped = model.generate(ids[:1], max_new_tokens=12, eos_token_id=eos)
    first = 6 + int(np.argmax(greedy[0, 6:] == eos))
    np.testing.assert_array_equal(stopped[0], greedy[0, :first + 1])


def _torch_grads(tmodel, ids, labels):
    tmodel.zero_grad()
    tmodel(torch.as_tensor(ids), labels=torch.as_tensor(labels)).loss.backward()
    return {k: p.grad.double().numpy() for k, p in tmodel.named_parameters()}


def _jax_grads(model, ids, labels):
    grads = nnx.grad(lambda m: m(ids, labels=labels).loss)(model)
    flat = {tuple(str(p) for p in k): np.asarray(v[...], np.float64) for k, v in nnx.to_flat_state(grads)}
    return to_hf_arrays(flat)


def _grad_setup(tmp_path, case):
    import doge_torch

    if case == "small_doge":
        cfg = DogeConfig(variant="small_doge", vocab_size=128, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, keep_window_size=16)
        tmodel = doge_torch.DogeForCausalLM(cfg)
        with torch.no_grad():
            for n, p in tmodel.named_parameters():
                if n.endswith(".A"):
                    p.normal_()
        path = save_hf(tmodel, tmp_path / "sd")
    else:
        path = save_hf(make_hf_model(**CASES[case]), tmp_path / "hf")
    ids = unique_ids(2, 24, 128, seed=12)
    labels = ids.copy()
    labels[:, :3] = -100
    return path, ids, labels


def _rel(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("case", ["gqa", "moe", "bias", "small_doge"])
def test_gradients_match_doge_torch(tmp_path, case):
    """float32 loss gradients of every parameter, doge_jax vs doge_torch, relative error <= 1e-4.

    The gradients of A and dt_proj.bias are ill-conditioned: they sum dL/dbias over keys, and those sum to zero
    in every query row (softmax), so float32 rounding alone moves them by 1e-5..1e-3 relative, depending on the
    order of operations. Every parameter is therefore held to 1e-4 against doge_torch float32, or, where float32
    itself cannot resolve 1e-4, to no more than 3x torch's float32 error against the float64 truth. doge_jax here
    runs its reference attention (transformers' op order, what `auto` picks at these sizes on CPU); torch's error
    is the larger of its two float32 paths': the one compared against (the default folded-bias sdpa) and the eager
    reference path. Either alone can be the lucky one: on an AVX2 machine (no AVX-512) layer 0's A gradient was
    1.6e-5 from the truth on the reference path, 6.4e-5 on sdpa and 4.6e-5 in doge_jax, so doge_jax and sdpa,
    both within float32's reach, differed by 1.1e-4.
    The float64 test below holds every parameter, A included, to 1e-4."""
    import doge_torch

    path, ids, labels = _grad_setup(tmp_path, case)
    tmodel = doge_torch.DogeForCausalLM.from_pretrained(path)
    t32 = _torch_grads(tmodel, ids, labels)
    t64 = _torch_grads(tmodel.double(), ids, labels)
    tref = doge_torch.DogeForCausalLM.from_pretrained(path, config=tmodel.config.replace(attention_impl="reference"))
    ref32 = _torch_grads(tref, ids, labels)
    ours = _jax_grads(with_attention_impl(DogeForCausalLM.from_pretrained(path), "reference"), ids, labels)
    assert set(ours) == set(t32)
    loose = []
    for k, g in t32.items():
        rel = _rel(ours[k], g)
        if rel > 1e-4:
            torch_err = max(_rel(ref32[k], t64[k]), _rel(g, t64[k]))
            assert torch_err > 3e-5 and _rel(ours[k], t64[k]) <= 3 * torch_err, (k, rel, torch_err)
            loose.append(k)
    assert all(k.endswith((".A", ".dt_proj.bias")) for k in loose), loose


@pytest.mark.parametrize("case", ["moe", "small_doge"])
def test_gradients_match_doge_torch_float64(tmp_path, case):
    """float64 parameters (RMSNorm, RoPE and the loss still run in float32, as the spec says): every gradient,
    A and dt_proj.bias included, within 1e-4 relative."""
    import doge_torch

    path, ids, labels = _grad_setup(tmp_path, case)
    ref = _torch_grads(doge_torch.DogeForCausalLM.from_pretrained(path, dtype=torch.float64), ids, labels)
    with jax.enable_x64(True):
        ours = _jax_grads(DogeForCausalLM.from_pretrained(path, dtype=jnp.float64), ids, labels)
    for k, g in ref.items():
        assert _rel(ours[k], g) <= 1e-4, (k, _rel(ours[k], g))


def test_save_pretrained_loads_in_transformers(tmp_path):
    import transformers

    hf = make_hf_model(**TINY_MOE)
    model = _load(hf, tmp_path)
    out = str(tmp_path / "ours")
    model.save_pretrained(out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert "rope_parameters" in cfg and cfg["model_type"] == "doge"
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = unique_ids(2, 16, 128, seed=13)
    assert max_abs_diff(hf_logits(back, ids), hf_logits(hf, ids)) == 0.0  # weights round-trip bit for bit
    assert max_abs_diff(model(ids).logits, hf_logits(back, ids)) <= TOL


def test_sharded_save_roundtrip(tmp_path):
    hf = make_hf_model()
    model = _load(hf, tmp_path)
    out = str(tmp_path / "sharded")
    model.save_pretrained(out, max_shard_size="100KB")
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    again = DogeForCausalLM.from_pretrained(out)
    for k, a in flat_params(model).items():
        assert np.array_equal(np.asarray(a), np.asarray(flat_params(again)[k])), k
    # a shard size below one byte is refused (0 and -1 wrote one shard per tensor), as a malformed one is
    for bad in (0, -1, "0MB", "lots"):
        with pytest.raises(ValueError, match="bad size"):
            model.save_pretrained(str(tmp_path / "bad"), max_shard_size=bad)
    assert not os.path.exists(tmp_path / "bad")


def test_bf16_load(tmp_path):
    hf = make_hf_model()
    model = DogeForCausalLM.from_pretrained(save_hf(hf, tmp_path / "m"), dtype="bfloat16")
    assert all(a.dtype == jnp.bfloat16 for a in flat_params(model).values())
    ids = unique_ids(1, 16, 128, seed=14)
    ours, ref = np.asarray(model(ids).logits, np.float32), hf_logits(hf, ids)
    assert model(ids).logits.dtype == jnp.bfloat16
    assert max_abs_diff(ours, ref) <= 2e-2 * np.abs(ref).max()  # the spec's bf16 tolerance (seen: 1.1e-2)


def test_softplus_matches_torch_in_bf16():
    """Spec §9.3/§9.9: softplus of a bf16 dt_proj output equals torch's bit for bit (torch computes in float32 and
    rounds once; rounding exp and log1p to bf16 each moved 430 of these 2689 values by up to 0.03)."""
    from doge_jax.model import softplus_torch

    x = torch.arange(-30, 30, 2 ** -6, dtype=torch.float32).to(torch.bfloat16).unique()
    ref = torch.nn.functional.softplus(x).float().numpy()
    ours = np.asarray(softplus_torch(jnp.asarray(x.float().numpy(), jnp.bfloat16)).astype(jnp.float32))
    assert softplus_torch(jnp.zeros(2, jnp.bfloat16)).dtype == jnp.bfloat16
    assert np.array_equal(ours, ref), int((ours != ref).sum())


def test_float64_softplus_and_loss_stay_float64():
    """A float64 model's softplus and loss run in float64, as doge_torch's do (float32 islands there moved the
    float64 gradient of A, an ill-conditioned sum, by 1e-4 relative against doge_torch's)."""
    from doge_jax.model import causal_lm_loss, softplus_torch
    from doge_torch.loss import causal_lm_loss as torch_loss
    from doge_torch.loss import causal_lm_loss_fused

    rng = np.random.default_rng(0)
    x = rng.normal(scale=8, size=4096)
    with jax.enable_x64(True):
        ours = np.asarray(softplus_torch(jnp.asarray(x)))
        assert ours.dtype == np.float64
        np.testing.assert_allclose(ours, torch.nn.functional.softplus(torch.as_tensor(x)).numpy(), rtol=1e-14)
        h, w = rng.normal(size=(2, 9, 16)), rng.normal(size=(40, 16))
        labels = rng.integers(0, 40, size=(2, 9))
        labels[0, :3] = -100
        loss = causal_lm_loss(jnp.asarray(h @ w.T), jnp.asarray(labels))
        assert loss.dtype == jnp.float64
        # the training loss without logits too (chunks of 4 tokens), value and gradients
        from doge_jax.loss import causal_lm_loss_chunked

        jh, jw, jl = jnp.asarray(h), jnp.asarray(w), jnp.asarray(labels)
        chunked, g_chunked = jax.value_and_grad(lambda a, b: causal_lm_loss_chunked(a, b, jl, None, True, 4),
                                                argnums=(0, 1))(jh, jw)
        plain, g_plain = jax.value_and_grad(lambda a, b: causal_lm_loss(a @ b.T, jl), argnums=(0, 1))(jh, jw)
        assert chunked.dtype == jnp.float64 and abs(float(chunked) - float(plain)) <= 1e-13 * abs(float(plain))
        for a, b in zip(g_chunked, g_plain):
            assert a.dtype == jnp.float64 and float(jnp.max(jnp.abs(a - b))) <= 1e-13 * float(jnp.max(jnp.abs(b)))
    th, tw, tl = torch.as_tensor(h), torch.as_tensor(w), torch.as_tensor(labels)
    fused = causal_lm_loss_fused(th, tw, tl)
    plain = torch_loss(th @ tw.T, tl)
    assert fused.dtype == plain.dtype == torch.float64
    for ref in (float(fused), float(plain)):
        assert abs(float(loss) - ref) <= 1e-13 * abs(ref), (float(loss), ref)


def test_bf16_keep_window_matches_doge_torch_and_transformers(tmp_path, monkeypatch):
    """A bf16 model past its keep window (T 16 > keep 6, top-k active): doge_jax, doge_torch and transformers (its
    topk made the stable lower-index rule of spec §9.1, as bf16 dt values tie) agree to bf16 round-off. With
    softplus rounded twice doge_jax picked other keys: 0.25 off on a logit scale of 0.6."""
    import doge_torch

    path = save_hf(make_hf_model(keep_window_size=6), tmp_path / "m")
    ids = unique_ids(2, 16, 128, seed=1)
    ours = np.asarray(DogeForCausalLM.from_pretrained(path, dtype="bfloat16")(ids).logits.astype(jnp.float32))
    with torch.no_grad():
        tl = doge_torch.DogeForCausalLM.from_pretrained(path, dtype="bfloat16")(torch.as_tensor(ids)).logits
        hf16 = transformers.DogeForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                            dtype=torch.bfloat16).eval()

        def stable(x, k, dim=-1, largest=True, sorted=True):
            assert dim == -1 and largest
            return torch.return_types.topk(doge_torch.model.stable_topk(x, k))
        monkeypatch.setattr(torch, "topk", stable)
        ref = hf16(input_ids=torch.as_tensor(ids)).logits.float().numpy()
    scale = np.abs(ref).max()
    assert max_abs_diff(tl.float().numpy(), ref) <= TOL  # same ops as transformers, bf16 included (seen: 0)
    assert max_abs_diff(ours, ref) <= 2e-2 * scale  # the spec's bf16 tolerance (seen: 0.8%; was 41%)


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_bf16_forward_reduces_in_float32(impl):
    """Spec §9.6-7 and §3.9: in a bf16 forward the softmax, RMSNorm and loss reductions run in float32. No
    numeric tolerance at these sizes tells a bf16 softmax or an RMSNorm without the upcast from bf16 noise, so the
    program itself is checked: no floating reduction (sum, max) of a dense model, nor RMSNorm's rsqrt, is in bf16."""
    import re

    cfg = DogeConfig(**{**TINY, "keep_window_size": 8})  # T 16 > keep_window: the top-k path too
    model = with_attention_impl(DogeForCausalLM(cfg, rngs=nnx.Rngs(0)), impl)
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(
        lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, state))
    ids = unique_ids(2, 16, cfg.vocab_size, seed=3)
    text = str(jax.make_jaxpr(lambda i: model(i, labels=i).loss)(jnp.asarray(ids)))
    reductions = re.findall(r"\w+:(\w+)\[[^\]]*\] = (reduce_sum|reduce_max|rsqrt)", text)  # rsqrt: RMSNorm
    assert {op for d, op in reductions if d == "f32"} == {"reduce_sum", "reduce_max", "rsqrt"} and "bf16" in text
    assert not [r for r in reductions if r[0] in ("bf16", "f16")], reductions


def test_small_doge_and_legacy_match_doge_torch(tmp_path):

    import doge_torch

    cfg = DogeConfig(variant="small_doge", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, keep_window_size=8,
                     is_moe=True, num_experts=16, num_experts_per_tok=4, tie_word_embeddings=True)
    tmodel = doge_torch.DogeForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in tmodel.named_parameters():
            if n.endswith(".A"):
                p.normal_()
    path = save_hf(tmodel, tmp_path / "sd")
    model = DogeForCausalLM.from_pretrained(path)
    assert model.config.variant == "small_doge"
    assert not hasattr(model.model.layers.self_attn, "q_norm")
    ids = unique_ids(2, 30, 128, seed=15)
    with torch.no_grad():
        ref = tmodel(torch.as_tensor(ids)).logits.numpy()
    assert max_abs_diff(model(ids).logits, ref) <= TOL
    # legacy names (spec §2.2 c), plus a router bias per layer that loading drops
    legacy = write_legacy_checkpoint(tmodel, tmp_path / "legacy")
    lmodel = DogeForCausalLM.from_pretrained(legacy)
    assert lmodel.config.variant == "small_doge"
    assert max_abs_diff(lmodel(ids).logits, model(ids).logits) == 0.0


def test_bad_token_ids(tmp_path):
    model = _load(make_hf_model(), tmp_path)
    for bad in (-1, 128):
        ids = unique_ids(1, 5, 128)
        ids[0, 2] = bad
        with pytest.raises(ValueError, match="vocab_size=128"):
            model(ids)
        with pytest.raises(ValueError, match="vocab_size=128"):
            model.generate(ids, max_new_tokens=2)


def test_checkpoint_errors_list_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_hf(make_hf_model(), tmp_path / "m")
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    sd.pop("model.layers.1.self_attn.k_norm.weight")
    sd["model.layers.0.extra"] = torch.zeros(2)
    sd["model.norm.weight"] = torch.zeros(3)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        DogeForCausalLM.from_pretrained(path)
    msg = str(e.value)
    assert "model.layers.1.self_attn.k_norm.weight" in msg and "model.layers.0.extra" in msg
    assert "model.norm.weight: expected (64,), got (3,)" in msg
    with open(f, "r+b") as fh:
        fh.truncate(200)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        DogeForCausalLM.from_pretrained(path)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import doge_jax.hf_io as hf_io

    model = _load(make_hf_model(), tmp_path)
    out = tmp_path / "out"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "write_safetensors", boom)
    with pytest.raises(OSError):
        model.save_pretrained(str(out))
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_dropout_training_mode(tmp_path):
    cfg = DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                     hidden_dropout=0.2, attention_dropout=0.2)
    model = DogeForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = unique_ids(1, 10, 64)
    a = np.asarray(model(ids).logits)
    assert np.array_equal(a, np.asarray(model(ids).logits))
    b = np.asarray(model(ids, dropout_rng=jax.random.key(1)).logits)
    c = np.asarray(model(ids, dropout_rng=jax.random.key(2)).logits)
    assert not np.allclose(a, b) and not np.allclose(b, c)


def test_init_follows_spec():
    cfg = DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                     pad_token_id=5, initializer_range=0.02)
    p = flat_params(DogeForCausalLM(cfg, rngs=nnx.Rngs(0)))
    emb = np.asarray(p[("model", "embed_tokens", "embedding")])
    assert np.all(emb[5] == 0) and abs(emb.std() - 0.02) < 0.003
    assert np.all(np.asarray(p[("model", "layers", "self_attn", "A")]) == 0)
    assert np.all(np.asarray(p[("model", "layers", "input_residual")]) == 1)
    q = np.asarray(p[("model", "layers", "self_attn", "q_proj", "kernel")])
    assert q.shape == (3, 32, 32) and not np.array_equal(q[0], q[1])  # layers initialised independently


def test_orbax_checkpoint_roundtrip(tmp_path):
    from doge_jax.checkpoint import save_model

    model = _load(make_hf_model(**TINY_MOE), tmp_path)
    save_model(model, str(tmp_path / "orbax"))
    again = DogeForCausalLM.from_pretrained(str(tmp_path / "orbax"))
    assert again.config == model.config
    for k, a in flat_params(model).items():
        assert np.array_equal(np.asarray(a), np.asarray(flat_params(again)[k])), k
    half = DogeForCausalLM.from_pretrained(str(tmp_path / "orbax"), dtype="bfloat16")
    assert all(a.dtype == jnp.bfloat16 for a in flat_params(half).values())


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_gives_same_gradients(tmp_path, remat):
    path = save_hf(make_hf_model(), tmp_path / "m")
    ids = unique_ids(2, 16, 128, seed=16)
    plain = _jax_grads(DogeForCausalLM.from_pretrained(path), ids, ids)
    cfg = DogeForCausalLM.from_pretrained(path).config.replace(remat=remat)
    again = _jax_grads(DogeForCausalLM.from_pretrained(path, config=cfg), ids, ids)
    for k, g in plain.items():
        assert _rel(again[k], g) <= 1e-6, k


def test_unrolled_layers_equal_the_scan(tmp_path):
    """config.scan_layers=False runs the layers unrolled (no scan in the jaxpr) and gives the scan's logits, loss
    and MoE aux loss, gradients and cached decoding (a stacked cache); checkpoints keep the stacked layout. XLA
    fuses the unrolled layers differently, so the ill-conditioned gradients of A and dt_proj.bias
    (test_gradients_match_doge_torch) round differently: they are held to the float64 truth (doge_torch in
    float64) as closely as the scan's, within 3x; every other gradient to 1e-6."""
    import doge_torch

    path = save_hf(make_hf_model(**TINY_MOE, output_router_logits=True), tmp_path / "m")
    ids = unique_ids(2, 16, 128, seed=21)
    t64 = _torch_grads(doge_torch.DogeForCausalLM.from_pretrained(path).double(), ids, ids)
    scan = DogeForCausalLM.from_pretrained(path)
    flat = DogeForCausalLM.from_pretrained(path, config=scan.config.replace(scan_layers=False))

    def loops(model):
        text = str(jax.make_jaxpr(lambda i: model(i).logits)(ids))
        return text.count("scan[") + text.count("while[")

    @nnx.jit
    def forward_and_grads(model):  # jitted: eager dispatch of the unrolled MoE layers took ~30 s
        (_, out), grads = nnx.value_and_grad(lambda m: (lambda o: (o.loss, o))(m(ids, labels=ids)), has_aux=True)(
            model)
        return out, grads

    def grads_of(grads):
        return to_hf_arrays({tuple(str(p) for p in k): np.asarray(v[...], np.float64)
                             for k, v in nnx.to_flat_state(grads)})

    assert loops(scan) >= 1 and loops(flat) == 0
    with jax.default_matmul_precision("highest"):
        (a, ga), (b, gb) = forward_and_grads(scan), forward_and_grads(flat)
        assert max_abs_diff(np.asarray(a.logits), np.asarray(b.logits)) <= 1e-6
        assert abs(float(a.loss) - float(b.loss)) <= 1e-6 * abs(float(a.loss))
        assert abs(float(a.aux_loss) - float(b.aux_loss)) <= 1e-6 * abs(float(a.aux_loss))
        want, got = grads_of(ga), grads_of(gb)
        assert set(got) == set(want)
        for k, g in want.items():
            if k.endswith((".A", ".dt_proj.bias")):
                assert _rel(got[k], t64[k]) <= 3 * max(_rel(g, t64[k]), 1e-6), k
            else:
                assert _rel(got[k], g) <= 1e-6, k
        # prefill + one decoded token through a stacked cache (generate() always unstacks it)
        @nnx.jit
        def prefill_and_step(model):
            out = model(ids[:, :12], cache=DogeCache.init(model.config, 2, 16))
            return model(ids[:, 12:13], cache=out.cache).logits

        steps = [np.asarray(prefill_and_step(model)) for model in (scan, flat)]
        assert max_abs_diff(steps[0], steps[1]) <= 1e-6
    assert {k: v.shape for k, v in flat_params(flat).items()} == {k: v.shape for k, v in flat_params(scan).items()}


def test_labels_checked_and_logits_to_keep_positions(tmp_path):
    """Labels of another shape, with logits_to_keep, or outside the vocabulary (not -100) raise (before: broadcast,
    wrapped or NaN losses); logits_to_keep may be an array of positions and position_ids a list."""
    import torch

    from doge_jax.model import DogeForCausalLM

    hf = make_hf_model()
    model = DogeForCausalLM.from_pretrained(save_hf(hf, tmp_path / "m"))
    ids = unique_ids(2, 12, 128, seed=7)
    for kw, want in ((dict(labels=ids[:, :8]), "labels shape"), (dict(labels=ids[:1]), "labels shape"),
                     (dict(labels=ids, logits_to_keep=1), "labels shape"),
                     (dict(labels=np.where(ids == ids[0, 3], -1, ids)), "labels outside"),
                     (dict(labels=np.where(ids == ids[0, 3], 500, ids)), "labels outside")):
        with pytest.raises(ValueError, match=want):
            model(ids, **kw)
    keep = np.array([0, 5, 11])
    with torch.no_grad():
        want = hf(input_ids=torch.as_tensor(ids), logits_to_keep=torch.as_tensor(keep)).logits.numpy()
    got = np.asarray(model(ids, logits_to_keep=keep).logits)
    assert got.shape == want.shape == (2, 3, 128) and max_abs_diff(got, want) <= 1e-5
    # positions outside the sequence raise, as in torch (JAX's gather clamped them: position 11's logits for 12)
    for bad, msg in (([12], "position 12 out of range for 12 positions"), ([0, -13], "position -13 out of range"),
                     (np.array([1.0]), "integer positions, got float64")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            model(ids, logits_to_keep=bad)
    np.testing.assert_array_equal(np.asarray(model(ids, logits_to_keep=[-1]).logits), got[:, -1:])
    # a label count of 0 or below (the loss sum's divisor) raises: it gave an inf or a negative loss
    for n in (0, -1, np.int32(0)):
        with pytest.raises(ValueError, match="num_items_in_batch=.*> 0"):
            model(ids, labels=ids, num_items_in_batch=n)
    pos = [list(range(12))] * 2
    np.testing.assert_array_equal(np.asarray(model(ids, position_ids=pos).logits), np.asarray(model(ids).logits))



def test_attention_mask_shape_is_checked():
    """A mask that is not [B, S] (or [B, cached + S] with a cache, its cached columns as cached) raises instead of
    broadcasting or dropping columns."""
    cfg = DogeConfig(**TINY)
    model = DogeForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(random_ids(2, 5, cfg.vocab_size))
    for bad in (np.ones((2, 7), bool), np.ones((1, 5), bool), np.ones((5,), bool), np.ones((2, 4), bool)):
        with pytest.raises(ValueError, match="attention_mask shape"):
            model(ids, attention_mask=bad)
    cache = DogeCache.init(cfg, 2, 16)
    out = model(ids, attention_mask=np.ones((2, 5), bool), cache=cache)
    model(ids[:, :1], attention_mask=np.ones((2, 6), bool), cache=out.cache)  # HF style: cached + new
    model(ids[:, :1], attention_mask=np.ones((2, 1), bool), cache=out.cache)  # new tokens only
    # any other width was taken, its extra columns unused; cached columns other than the cache's were dropped
    for bad in (np.ones((2, 30), bool), np.ones((2, 2), bool)):
        with pytest.raises(ValueError, match=r"attention_mask shape \(2, (30|2)\) .* = \(2, 6\)"):
            model(ids[:, :1], attention_mask=bad, cache=out.cache)
    other = np.ones((2, 6), bool)
    other[:, 0] = False
    with pytest.raises(ValueError, match="columns for the cached tokens differ"):
        model(ids[:, :1], attention_mask=other, cache=out.cache)


def test_transformers_style_arguments_and_outputs(tmp_path):
    """As in doge_torch: ModelOutput indexing, return_dict=False, a torch dtype for from_pretrained, generate's
    max_length; batch 0, a cache of another batch, a wrong position_ids shape and hidden states are named errors
    (they were a ZeroDivisionError, reshape and broadcasting errors from inside JAX, a TypeError)."""
    path = save_hf(make_hf_model(), tmp_path / "m")
    model = DogeForCausalLM.from_pretrained(path)
    assert DogeForCausalLM.from_pretrained(path, dtype=torch.bfloat16).model.norm.weight.dtype == jnp.bfloat16
    # transformers' older name for dtype (was a TypeError), and the cache class at the package's top, as doge_torch's
    assert DogeForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).model.norm.weight.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="dtype or its older name torch_dtype, not both"):
        DogeForCausalLM.from_pretrained(path, dtype="float32", torch_dtype=torch.bfloat16)
    import doge_jax

    assert doge_jax.DogeCache is DogeCache and doge_jax.DogeForCausalLM is DogeForCausalLM
    # transformers users assign config fields: the frozen configs' error says what to do instead (both packages)
    import dataclasses

    import doge_torch

    tm = doge_torch.DogeForCausalLM.from_pretrained(path)
    for m in (model, tm):
        with pytest.raises(dataclasses.FrozenInstanceError, match=re.escape(
                "GenerationConfig is frozen; assign a changed copy, model.generation_config = "
                "dataclasses.replace(model.generation_config, max_new_tokens=...)")):
            m.generation_config.max_new_tokens = 3
        with pytest.raises(dataclasses.FrozenInstanceError, match=re.escape("config.replace(use_cache=...)")):
            m.config.use_cache = False
    before = model.generation_config
    model.generation_config = dataclasses.replace(before, max_new_tokens=3)  # ... which works
    tm.generation_config = dataclasses.replace(tm.generation_config, max_new_tokens=3)
    assert model.generate(np.array([[5, 6]])).shape == (1, 5)
    assert tuple(tm.generate(torch.tensor([[5, 6]])).shape) == (1, 5)
    model.generation_config = before
    ids = unique_ids(2, 12, TINY["vocab_size"])
    out = model(ids, labels=ids)
    assert out[0] is out.loss and out["logits"] is out.logits and len(out.to_tuple()) == 2
    tup = model(ids, labels=ids, return_dict=False)
    assert isinstance(tup, tuple) and float(tup[0]) == float(out.loss)
    assert list(out) == ["loss", "logits"] and "cache" not in out
    for bad, msg in ((dict(input_ids=np.zeros((0, 5), np.int32)), r"input_ids shape \(0, 5\)"),
                     (dict(input_ids=ids, labels=ids.astype(np.float32)), "labels must be integer"),
                     (dict(input_ids=ids, position_ids=np.arange(11)[None]), r"position_ids shape \(1, 11\)"),
                     (dict(input_ids=ids, output_attentions=True), "output_attentions=True: not supported"),
                     (dict(input_ids=ids[:1], cache=DogeCache.init(model.config, 2, 16)), "cache for batch 2")):
        with pytest.raises(ValueError, match=msg):
            model(**bad)
    four = model.generate(ids[:, :5], max_new_tokens=4)
    np.testing.assert_array_equal(model.generate(ids[:, :5], max_length=9), four)
    np.testing.assert_array_equal(model.generate(ids[:, :5], max_length=9, max_new_tokens=None), four)
    with pytest.raises(ValueError, match="greedy search returns one sequence per row"):
        model.generate(ids[:, :5], num_return_sequences=3)
    with pytest.raises(CheckpointError, match="Hub id"):
        DogeForCausalLM.from_pretrained("SmallDoge/Doge-20M")


def test_moe_aux_loss_bf16_is_counted_in_float32():
    """bf16 router logits: expert counts past 256 (where a bf16 count stops growing) and the padding-mask sums are
    kept in float32 in both packages, so the aux loss equals that of the same values in float32. The logits are
    multiples of 1/8, so bf16 route sums are exact and both dtypes pick the same experts (ties: lower index)."""
    from doge_jax.model import load_balancing_loss, route
    from doge_torch.model import load_balancing_loss as torch_lbl
    from doge_torch.model import route as torch_route

    cfg = DogeConfig(**TINY, **TINY_MOE)  # 16 experts (4 keys), 4 per token
    L, B, S = 2, 2, 600  # ~600 choices per expert per layer
    vals = np.random.default_rng(0).integers(-24, 25, (L, 2, B * S, cfg.num_keys)) / 8
    mask = np.ones((B, S), np.int32)
    mask[1, :174] = 0
    r32 = jnp.asarray(vals, jnp.float32)
    for m in (None, mask):
        want = float(load_balancing_loss(r32, cfg, None if m is None else jnp.asarray(m)))
        got = float(load_balancing_loss(r32.astype(jnp.bfloat16), cfg, None if m is None else jnp.asarray(m)))
        assert abs(got - want) <= 1e-6 * want, (got, want)
        tm = None if m is None else torch.as_tensor(m)
        t32 = float(torch_lbl(tuple(torch.as_tensor(vals[i], dtype=torch.float32) for i in range(L)), cfg, tm))
        t16 = float(torch_lbl(tuple(torch.as_tensor(vals[i], dtype=torch.bfloat16) for i in range(L)), cfg, tm))
        assert abs(t16 - t32) <= 1e-6 * t32 and abs(t32 - want) <= 1e-6 * want, (t16, t32, want)
    # signed zeros tie as in torch's sort (lax.top_k alone ranks +0.0 above -0.0)
    z = np.array([[[-1.0, -0.0, 0.0, -2.0]], [[0.0, -0.0, -3.0, -4.0]]], np.float32)
    j = route(jnp.asarray(z), 4, 4)[1]
    t = torch_route(torch.as_tensor(z), 4, 4)[1]
    np.testing.assert_array_equal(np.asarray(j), t.numpy())
    # ... and exact zeros keep their gradient (a where() that zeroed them dropped it)
    w = np.arange(1.0, 5.0, dtype=np.float32)
    gj = jax.grad(lambda r: jnp.sum(route(r, 4, 4)[0] * w))(jnp.asarray(z))
    zt = torch.as_tensor(z).requires_grad_()
    (torch_route(zt, 4, 4)[0] * torch.as_tensor(w)).sum().backward()
    np.testing.assert_allclose(np.asarray(gj), zt.grad.numpy(), rtol=0, atol=1e-6)
    assert np.abs(np.asarray(gj)[:, 0, 1:3]).sum() > 0  # the zero entries have a gradient


def _full_grid_route(r: np.ndarray, K: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Spec §3.8 steps 2-4 written out: sort both halves (lower index first on ties), rank all K² sums in K x K
    order (earlier position first on ties), keep k."""
    sx_i = np.argsort(-r[0], axis=-1, kind="stable")
    sy_i = np.argsort(-r[1], axis=-1, kind="stable")
    sx, sy = np.take_along_axis(r[0], sx_i, -1), np.take_along_axis(r[1], sy_i, -1)
    grid = (sx[:, :, None] + sy[:, None, :]).reshape(len(sx), -1)
    idx = (sx_i[:, :, None] * K + sy_i[:, None, :]).reshape(len(sx), -1)
    pos = np.argsort(-grid, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(grid, pos, -1), np.take_along_axis(idx, pos, -1)


@pytest.mark.parametrize("K,k", [(8, 1), (8, 3), (8, 8), (4, 12)])
def test_route_corner_equals_full_grid_with_ties(K, k):
    """Both packages rank only the k x k corner of the sorted halves; on inputs full of ties (and signed zeros) the
    scores and experts equal the full K x K ranking of spec §3.8, including which tied expert wins."""
    from doge_jax.model import route
    from doge_torch.model import route as torch_route

    r = np.random.default_rng(k).integers(-3, 4, (2, 300, K)).astype(np.float32)
    r[r == 0] = np.where(np.random.default_rng(1).random((r == 0).sum()) < 0.5, -0.0, 0.0)
    want_s, want_e = _full_grid_route(r + 0.0, K, k)  # + 0.0: -0.0 ties +0.0 in the reference as in torch's sort
    js, je = route(jnp.asarray(r), K, k)
    ts, te = torch_route(torch.as_tensor(r), K, k)
    for s, e in ((np.asarray(js), np.asarray(je)), (ts.numpy(), te.numpy())):
        np.testing.assert_array_equal(e, want_e)
        np.testing.assert_array_equal(s, want_s)


def test_moe_backward_keeps_no_full_grid_or_gathered_rows(capsys):
    """CDMoE's backward keeps nothing of size K² per token (the ranked pair scores) and not the gathered
    [tokens, k, d] expert rows (2 x 300 MB per layer at Doge-480M-MoE, 2048 tokens): the experts are
    rematerialised."""
    from jax.ad_checkpoint import print_saved_residuals

    from doge_jax.model import DogeCDMoE

    cfg = DogeConfig(**TINY, is_moe=True, num_experts=400, num_experts_per_tok=4)  # K = 20, K² = 400
    assert cfg.num_keys ** 2 > max(cfg.hidden_size, cfg.intermediate_size)
    graphdef, state = nnx.split(DogeCDMoE(cfg, nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (1, 20, cfg.hidden_size))
    print_saved_residuals(lambda st, x: jnp.sum(nnx.merge(graphdef, st)(x)[0]), state, x)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "from the argument" not in ln]
    assert lines  # the activations the backward keeps
    big = [ln for ln in lines if f",{cfg.num_keys ** 2}]" in ln or f"[20,4,{cfg.hidden_size}]" in ln]
    assert not big, big


@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_value_and_gradient_match_transformers(masked):
    """The aux loss's mean router probability is a product of the two halves' softmaxes in both packages
    (transformers scatters a softmax over all K² sums); value and gradient wrt the router logits agree."""
    from transformers.models.doge.modeling_doge import load_balancing_loss_func

    from doge_jax.model import load_balancing_loss
    from doge_torch.model import load_balancing_loss as torch_lbl

    cfg = DogeConfig(**TINY, is_moe=True, num_experts=64, num_experts_per_tok=3)
    L, B, S, K = 3, 2, 10, cfg.num_keys
    r = np.random.default_rng(3).standard_normal((L, 2, B * S, K)).astype(np.float32)  # tie-free
    mask = left_pad_mask(B, S, [0, 4]) if masked else None
    rt = torch.as_tensor(r).requires_grad_()
    ref = load_balancing_loss_func(tuple(rt[i] for i in range(L)), cfg.num_experts, K, cfg.num_experts_per_tok,
                                   None if mask is None else torch.as_tensor(mask))
    ref.backward()
    jm = None if mask is None else jnp.asarray(mask)
    val, g = jax.value_and_grad(lambda x: load_balancing_loss(x, cfg, jm))(jnp.asarray(r))
    rt2 = torch.as_tensor(r).requires_grad_()
    tv = torch_lbl(tuple(rt2[i] for i in range(L)), cfg, None if mask is None else torch.as_tensor(mask))
    tv.backward()
    for v in (float(val), tv.item()):
        assert abs(v - ref.item()) <= 1e-6 * ref.item(), (v, ref.item())
    scale = rt.grad.abs().max().item()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(g), rt.grad.numpy(), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(rt2.grad.numpy(), rt.grad.numpy(), rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("tied", [False, True])
def test_pad_row_gets_no_lookup_gradient(tmp_path, tied):
    """Spec §9.14: as torch's Embedding(padding_idx), looking up the pad token gives the pad row no gradient (tied,
    lm_head still updates it). Before, doge_jax's pad row took a gradient ~1/sqrt(eps) larger than any other (a
    zero row through RMSNorm) and swamped the clipping norm of any run whose data holds the pad id (pad = eos)."""
    import doge_torch

    path = save_hf(make_hf_model(pad_token_id=5, tie_word_embeddings=tied), tmp_path / "hf")
    ids = unique_ids(2, 24, 128, seed=12)
    ids[0, 10:14] = 5
    ids[1, :6] = 5
    labels = np.where(ids == 5, -100, ids)
    want = _torch_grads(doge_torch.DogeForCausalLM.from_pretrained(path), ids, labels)
    ours = _jax_grads(with_attention_impl(DogeForCausalLM.from_pretrained(path), "reference"), ids, labels)
    emb = "model.embed_tokens.weight"
    if not tied:
        assert not ours[emb][5].any() and not want[emb][5].any()
    assert np.abs(ours[emb][5]).max() < 1.0  # before: ~1e3
    for k in (emb, "lm_head.weight") if not tied else (emb,):
        assert _rel(ours[k], want[k]) <= 1e-4, (k, _rel(ours[k], want[k]))


@pytest.mark.parametrize("case", ["gqa", "moe"])
def test_hidden_states_as_transformers(tmp_path, case):
    """output_hidden_states (was refused): doge_jax (scanned and unrolled layers) and doge_torch return
    transformers' num_hidden_layers + 1 hidden states (the embeddings, each layer's output, the last after the final
    norm) with padding and T > keep_window; an int or a list selects some (the others None), as transformers."""
    import doge_torch

    hf = make_hf_model(num_hidden_layers=3, **CASES[case])
    model = _load(hf, tmp_path)
    tm = doge_torch.DogeForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    B, T = 2, 72
    assert T > TINY["keep_window_size"]
    ids, mask = unique_ids(B, T, 128, seed=6), left_pad_mask(B, T, [0, 7])
    keep = mask.astype(bool)  # padded queries attend to nothing: compare the real positions
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_hidden_states=True)
        mine = tm(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_hidden_states=True)
    want = [h.numpy() for h in ref.hidden_states]
    assert len(want) == 4
    unrolled = DogeForCausalLM.from_pretrained(str(tmp_path / "m"), config=model.config.replace(scan_layers=False))
    for name, out in (("jax", model(ids, attention_mask=mask, output_hidden_states=True)),
                      ("jax unrolled", unrolled(ids, attention_mask=mask, output_hidden_states=True)),
                      ("torch", mine)):
        got = [np.asarray(h) for h in out.hidden_states]
        assert len(got) == 4, name
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape and max_abs_diff(g[keep], w[keep]) <= TOL, (name, i)
        assert list(out)[-1] == "hidden_states" and out.to_tuple()[-1] is out.hidden_states
    assert max_abs_diff(np.asarray(model(ids, attention_mask=mask).logits)[keep], ref.logits.numpy()[keep]) <= TOL
    for sel, present in ((-1, [3]), ([0, 2], [0, 2]), (1, [1]), (False, None)):
        with torch.no_grad():
            ref_sel = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                         output_hidden_states=sel)
        for m, conv in ((model, np.asarray), (tm, torch.as_tensor)):
            with torch.no_grad():
                out = m(conv(ids), attention_mask=conv(mask), output_hidden_states=sel)
            if present is None:
                assert out.hidden_states is None and ref_sel.hidden_states is None
                continue
            assert [i for i, h in enumerate(out.hidden_states) if h is not None] == present == [
                i for i, h in enumerate(ref_sel.hidden_states) if h is not None]
            for i in present:
                assert max_abs_diff(np.asarray(out.hidden_states[i])[keep], want[i][keep]) <= TOL
    for m, conv in ((model, np.asarray), (tm, torch.as_tensor)):
        for bad, msg in ((4, r"output_hidden_states=4: index 4 out of range for 4 hidden states"),
                         ("all", r"output_hidden_states='all': expected a bool, an int or a list of ints"),
                         ([], r"output_hidden_states=\[\]: an empty list selects no hidden state \(False for none\)")):
            with pytest.raises(ValueError, match=msg):
                m(conv(ids), output_hidden_states=bad)


def test_inputs_embeds_as_transformers(tmp_path):
    """inputs_embeds in place of input_ids (soft prompts): doge_jax and doge_torch give transformers' logits and
    loss (padding, T > keep_window so the keep-window top-k runs on the embeddings' dt); exactly one of the two."""
    import doge_torch

    hf = make_hf_model()
    model = _load(hf, tmp_path)
    tm = doge_torch.DogeForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    B, T, d = 2, 72, TINY["hidden_size"]
    assert T > TINY["keep_window_size"]
    emb = np.random.default_rng(3).normal(size=(B, T, d)).astype(np.float32)
    mask = left_pad_mask(B, T, [0, 5])
    labels = unique_ids(B, T, 128, seed=4)
    with torch.no_grad():
        ref = hf(inputs_embeds=torch.as_tensor(emb), attention_mask=torch.as_tensor(mask),
                 labels=torch.as_tensor(labels))
        mine = tm(inputs_embeds=torch.as_tensor(emb), attention_mask=torch.as_tensor(mask),
                  labels=torch.as_tensor(labels))
    ours = model(inputs_embeds=emb, attention_mask=mask, labels=labels)
    keep = mask.astype(bool)  # padded queries attend to nothing: compare the real positions
    assert max_abs_diff(np.asarray(ours.logits)[keep], ref.logits.numpy()[keep]) <= TOL
    assert max_abs_diff(mine.logits.numpy()[keep], ref.logits.numpy()[keep]) <= TOL
    assert abs(float(ours.loss) - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    assert abs(mine.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    ids = unique_ids(B, T, 128, seed=5)  # the embedding of ids is the same as the ids
    looked_up = np.asarray(model.model.embed_tokens.embedding[...])[ids]
    np.testing.assert_array_equal(np.asarray(model(inputs_embeds=looked_up).logits), np.asarray(model(ids).logits))
    for m, conv in ((model, np.asarray), (tm, torch.as_tensor)):
        with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
            m(conv(ids), inputs_embeds=conv(emb))
        with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
            m(attention_mask=conv(mask))
        with pytest.raises(ValueError, match=r"inputs_embeds shape \(2, 72, 3\): expected \[batch >= 1, seq >= 1, "):
            m(inputs_embeds=conv(emb[..., :3]))
    with pytest.raises(ValueError, match="inputs_embeds dtype int32: expected floating point"):  # (was a scan error)
        model(inputs_embeds=looked_up.astype(np.int32))


@pytest.mark.parametrize("tie", [True, False])
def test_resize_token_embeddings(tmp_path, tie):
    """As doge_torch / transformers: the old rows kept (the old tokens' logits unchanged), new rows near the old
    rows' mean (mean_resizing) or normal(0, initializer_range), config.vocab_size updated; the resized model saves,
    loads in transformers with the same logits, trains and generates; shrinking drops the last rows."""
    hf = make_hf_model(tie_word_embeddings=tie)
    model = _load(hf, tmp_path)
    V, n = TINY["vocab_size"], 150
    ids = jnp.asarray(unique_ids(2, 8, V, seed=1))
    before = np.asarray(model(ids).logits)
    emb = model.resize_token_embeddings(n, pad_to_multiple_of=16, seed=3)
    assert emb is model.model.embed_tokens and emb.num_embeddings == model.config.vocab_size == 160
    after = np.asarray(model(ids).logits)
    assert after.shape[-1] == 160 and max_abs_diff(after[..., :V], before) <= 1e-6
    w = np.asarray(model.model.embed_tokens.embedding[...])
    np.testing.assert_array_equal(w[:V], hf.model.embed_tokens.weight.detach().numpy())
    assert 0 < np.abs(w[V:] - w[:V].mean(0)).max() < 1e-3
    model.save_pretrained(tmp_path / "resized")
    back = transformers.DogeForCausalLM.from_pretrained(tmp_path / "resized").eval()
    with torch.no_grad():
        assert max_abs_diff(back(torch.as_tensor(np.array(ids))).logits, after) <= TOL
    new_ids = jnp.array([[1, 155, 3, 159]])
    loss, grads = nnx.value_and_grad(lambda m: m(new_ids, labels=new_ids).loss)(model)
    assert np.isfinite(float(loss)) and grads.model.embed_tokens.embedding[...].shape == (160, TINY["hidden_size"])
    assert model.generate(new_ids, max_new_tokens=3).shape == (1, 7)

    fresh = _load(hf, tmp_path)
    fresh.resize_token_embeddings(n, mean_resizing=False)
    w = np.asarray(fresh.model.embed_tokens.embedding[...])
    assert abs(w[V:].std() - fresh.config.initializer_range) < 0.2 * fresh.config.initializer_range
    fresh.resize_token_embeddings(100)
    assert fresh.config.vocab_size == 100 and np.asarray(fresh(ids % 100).logits).shape[-1] == 100
    np.testing.assert_array_equal(np.asarray(fresh.model.embed_tokens.embedding[...]), w[:100])
    with pytest.raises(ValueError, match="outside"):
        fresh(jnp.array([[100]]))
    with pytest.raises(ValueError, match="new_num_tokens must be a positive integer"):
        fresh.resize_token_embeddings(1.5)
    assert fresh.resize_token_embeddings() is fresh.model.embed_tokens and fresh.config.vocab_size == 100
