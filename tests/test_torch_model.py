"""doge_torch against transformers' DogeForCausalLM (spec §2-§4): logits, losses, generation, checkpoint I/O."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from conftest import (
    TINY,
    TINY_MOE,
    left_pad_mask,
    make_hf_model,
    max_abs_diff,
    perturb_,
    random_ids,
    save_hf,
    to_legacy_name,
    unique_ids,
)

from doge_jax.hf_names import CheckpointError, rename_legacy
from doge_torch import DogeConfig, DogeForCausalLM
from doge_torch.generate import generate
from doge_torch.model import dynamic_mask_bias, with_attention_impl

TOL = 1e-5
DYNAMIC_ROPE = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}


def ours_from_hf(hf, **overrides) -> DogeForCausalLM:
    """doge_torch model with the config and (in-memory) weights of a transformers model."""
    cfg = DogeConfig.from_hf_dict(hf.config.to_dict()).replace(**overrides)
    model = DogeForCausalLM(cfg)
    model.load_state_dict(hf.state_dict(), strict=True)  # (tied: lm_head.weight too, as transformers' holds it)
    return model.eval()


def test_tied_state_dict_keys_as_transformers():
    """A tied model's state_dict() has transformers' keys, lm_head.weight included (the embedding's tensor), and
    load_state_dict() takes either package's state dict, or one without the tied key (as HF files hold it)."""
    hf = make_hf_model(tie_word_embeddings=True)
    ours = ours_from_hf(hf)
    sd = ours.state_dict()
    assert list(sd) == list(hf.state_dict())
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]
    assert len(list(ours.parameters())) == len(list(hf.parameters()))  # one Parameter: AdamW steps it once
    hf.load_state_dict(sd, strict=True)  # (it failed: missing lm_head.weight)
    ours.load_state_dict({k: v for k, v in sd.items() if k != "lm_head.weight"}, strict=True)
    ids = torch.as_tensor(unique_ids(2, 8, TINY["vocab_size"], seed=1))
    with torch.no_grad():
        assert max_abs_diff(ours(ids).logits, hf(ids).logits) <= TOL
    untied = ours_from_hf(make_hf_model(tie_word_embeddings=False))
    assert list(untied.state_dict()) == list(make_hf_model(tie_word_embeddings=False).state_dict())
    with pytest.raises(RuntimeError, match="lm_head.weight differs from model.embed_tokens.weight, but this model "
                                           "ties them"):  # (an untied model's head is not dropped silently)
        ours.load_state_dict(untied.state_dict())


def both_logits(hf, ours, ids, mask=None):
    ids_t = torch.as_tensor(ids)
    mask_t = None if mask is None else torch.as_tensor(mask)
    with torch.no_grad():
        a = hf(input_ids=ids_t, attention_mask=mask_t).logits
        b = ours(ids_t, attention_mask=mask_t).logits
    return a.float().numpy(), b.float().numpy()


def ours_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids), attention_mask=None if mask is None else torch.as_tensor(mask)
                     ).logits.float().numpy()


# ---- logits -----------------------------------------------------------------------------------------------------

LOGIT_CASES = {
    "gqa": dict(),
    "mha": dict(num_key_value_heads=4),
    "moe": dict(TINY_MOE),
    "moe_norm_topk": dict(TINY_MOE, norm_topk_prob=True),
    "tied": dict(tie_word_embeddings=True),
    "untied_moe_mha": dict(TINY_MOE, num_key_value_heads=4, tie_word_embeddings=False),
    "biases": dict(attention_bias=True, mlp_bias=True),
    "head_dim": dict(head_dim=32),  # H*D = 128 != hidden_size
    "eps": dict(rms_norm_eps=1e-2),  # large enough to move the logits: an ignored eps fails
}


@pytest.mark.parametrize("case", sorted(LOGIT_CASES))
def test_logits_match_transformers(case):
    hf = make_hf_model(**LOGIT_CASES[case])
    ours = ours_from_hf(hf)
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    a, b = both_logits(hf, ours, random_ids(2, 16, TINY["vocab_size"], seed=1))
    assert max_abs_diff(a, b) <= TOL


@pytest.mark.parametrize("variant", ["native", "small_doge"])
def test_dynamic_dt_is_transformers_bit_for_bit(variant):
    """dt as transformers computes it (softplus in the [B, T, n] layout, then transposed), bit for bit at lengths
    that are not a multiple of a vector width: softplus on a transposed copy rounded some values differently on an
    AVX-512 CPU (6e-8), which broke bit-parity of the logits for some models."""
    import torch.nn.functional as F

    from doge_torch.model import DogeAttention

    cfg = DogeConfig(**{**TINY, "variant": variant})
    torch.manual_seed(0)
    attn = DogeAttention(cfg, 0)
    with torch.no_grad():
        attn.A.normal_()
        attn.dt_proj.weight.mul_(40.0)  # softplus inputs over a wide range (its exp/log1p and linear parts)
    for T in (37, 129, 1000):
        v_flat = torch.randn(3, T, attn.dt_proj.in_features)
        want = torch.exp(attn.A * F.softplus(attn.dt_proj(v_flat))).transpose(-1, -2)
        got = attn.dynamic_dt(v_flat)
        assert got.shape == want.shape and torch.equal(got, want), T


def test_with_attention_impl_switches_every_layer(monkeypatch):
    """doge_torch.model.with_attention_impl (the config is frozen, so assigning the field raised): each layer runs
    the chosen path (sdpa calls counted), the logits stay transformers', and a bad name is refused by name."""
    import torch.nn.functional as F

    from doge_jax.config import ConfigError

    hf = make_hf_model()
    ours = ours_from_hf(hf)
    ids = random_ids(2, 16, TINY["vocab_size"], seed=3)
    calls, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    for impl, sdpa_calls in (("reference", 0), ("blockwise", ours.config.num_hidden_layers)):
        assert with_attention_impl(ours, impl) is ours and ours.config.attention_impl == impl
        calls.clear()
        a, b = both_logits(hf, ours, ids)
        assert len(calls) == sdpa_calls and max_abs_diff(a, b) <= TOL, impl
    with pytest.raises(ConfigError, match="attention_impl"):
        with_attention_impl(ours, "flash")


def test_left_padding_all_positions():
    """Fully masked (pad) query rows are uniform softmaxes in both models: every position is compared."""
    hf = make_hf_model()
    ours = ours_from_hf(hf)
    ids = random_ids(3, 12, TINY["vocab_size"], seed=2)
    mask = left_pad_mask(3, 12, [0, 4, 11])
    a, b = both_logits(hf, ours, ids, mask)
    assert max_abs_diff(a, b) <= TOL
    # the mask matters: the non-padded positions of padded rows differ from the unmasked forward
    c = ours_logits(ours, ids)
    assert max_abs_diff(b[1, 4:], c[1, 4:]) > 1e-4


def test_dynamic_rope_past_max_positions():
    T = 2 * TINY["max_position_embeddings"]
    hf = make_hf_model(rope_parameters=DYNAMIC_ROPE, keep_window_size=4 * T)
    ours = ours_from_hf(hf)
    assert ours.config.rope_type == "dynamic" and ours.config.rope_factor == 4.0
    ids = random_ids(1, T, TINY["vocab_size"], seed=3)
    a, b = both_logits(hf, ours, ids)
    assert max_abs_diff(a, b) <= TOL
    plain = ours_logits(ours_from_hf(hf, rope_type="default", rope_factor=None), ids)
    assert max_abs_diff(b, plain) > 1e-4  # the NTK rescaling is active


def test_keep_window_topk():
    """T > keep_window_size: unique ids and random nonzero A, so the top-k has no ties (spec §9.1)."""
    hf = make_hf_model(keep_window_size=8)
    assert all(bool((layer.self_attn.A != 0).all()) for layer in hf.model.layers)
    ours = ours_from_hf(hf)
    ids = unique_ids(2, 24, TINY["vocab_size"], seed=4)
    a, b = both_logits(hf, ours, ids)
    assert max_abs_diff(a, b) <= TOL
    no_window = ours_logits(ours_from_hf(hf, keep_window_size=64), ids)
    assert max_abs_diff(b[:, :8], no_window[:, :8]) <= TOL  # T <= 8 rows keep every key
    assert max_abs_diff(b, no_window) > 1e-4  # the window is active


def test_sliding_window():
    hf = make_hf_model(sliding_window=5)
    ours = ours_from_hf(hf)
    ids = random_ids(2, 16, TINY["vocab_size"], seed=5)
    mask = left_pad_mask(2, 16, [0, 3])
    a, b = both_logits(hf, ours, ids, mask)
    assert max_abs_diff(a, b) <= TOL
    assert max_abs_diff(b, ours_logits(ours_from_hf(hf, sliding_window=None), ids, mask)) > 1e-4


@pytest.mark.parametrize("window,keep", [(6, 8), (8, 8), (12, 8)])
def test_sliding_window_past_the_keep_window(window, keep):
    """T > keep_window with a sliding window: when window <= keep_window every row keeps all its keys (before, the
    key-expiry form read the valid keys off the last row only, masked every earlier key and let early queries see
    future tokens); wider windows keep the top-k. Full forward with padding, and cached greedy decoding."""
    hf = make_hf_model(sliding_window=window, keep_window_size=keep)
    ours = ours_from_hf(hf)
    ids = unique_ids(2, 20, TINY["vocab_size"], seed=6)
    mask = left_pad_mask(2, 20, [0, 3])
    a, b = both_logits(hf, ours, ids, mask)
    assert max_abs_diff(a, b) <= TOL
    changed = ids.copy()
    changed[:, -1] = (changed[:, -1] + 1) % TINY["vocab_size"]
    c = ours_logits(ours, changed, mask)
    # causal (padding query rows attend uniformly to everything, as in transformers: not checked)
    assert max_abs_diff(b[0, :-1], c[0, :-1]) == 0.0 and max_abs_diff(b[1, 3:-1], c[1, 3:-1]) == 0.0
    prompt = torch.as_tensor(ids[:1, :10])
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8,
                           eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(ours, prompt, max_new_tokens=8, eos_token_id=-1), want)


def test_labels_and_logits_to_keep_as_transformers():
    """Labels must match input_ids (before: a shorter target was silently used by the fused loss); logits_to_keep may
    be a tensor of positions, as in transformers."""
    hf = make_hf_model()
    ours = ours_from_hf(hf)
    ids = torch.as_tensor(unique_ids(2, 12, TINY["vocab_size"], seed=7))
    for kw in (dict(labels=ids[:, :8]), dict(labels=ids[:1]), dict(labels=ids, logits_to_keep=1)):
        for return_logits in (True, False):
            with pytest.raises(ValueError, match="labels shape"):
                ours(ids, return_logits=return_logits, **kw)
    keep = torch.tensor([0, 5, 11])
    with torch.no_grad():
        a, b = hf(input_ids=ids, logits_to_keep=keep).logits, ours(ids, logits_to_keep=keep).logits
    assert a.shape == b.shape == (2, 3, TINY["vocab_size"]) and max_abs_diff(a.numpy(), b.numpy()) <= TOL
    # a label count of 0 or below (the loss sum's divisor) raises where it is known without a device sync
    for n in (0, -1, torch.tensor(0)):
        for return_logits in (True, False):
            with pytest.raises(ValueError, match="num_items_in_batch=.*> 0"):
                ours(ids, labels=ids, num_items_in_batch=n, return_logits=return_logits)
    with pytest.raises(TypeError, match="input_ids: a torch.Tensor"):  # (was AttributeError: 'list' ... 'ndim')
        ours(ids.tolist())


def test_keep_window_ties_keep_lower_index():
    """Our own deterministic tie rule (spec §9.1): among equal dt the lower key index is kept."""
    T, W = 10, 4
    dt = torch.ones(1, 2, T)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    bias = dynamic_mask_bias(dt, allowed, W, torch.float32)
    kept = bias > torch.finfo(torch.float32).min
    expect = allowed[0, 0] & (torch.arange(T)[None, :] < W)
    assert torch.equal(kept[0, 0], expect) and torch.equal(kept[0, 1], expect)
    assert torch.equal(bias[kept], torch.ones(int(kept.sum())))


# ---- losses -----------------------------------------------------------------------------------------------------

def _labels(ids: np.ndarray) -> torch.Tensor:
    labels = torch.as_tensor(ids).clone()
    labels[0, 3:6] = -100
    labels[1, :2] = -100
    labels[1, -1] = -100
    return labels


@pytest.mark.parametrize("num_items", [None, 37, "tensor"])
def test_loss_matches_transformers(num_items):
    hf = make_hf_model()
    ours = ours_from_hf(hf)
    ids = random_ids(2, 14, TINY["vocab_size"], seed=6)
    labels = _labels(ids)
    kw = {}
    if num_items is not None:
        kw["num_items_in_batch"] = torch.tensor(37) if num_items == "tensor" else num_items
    with torch.no_grad():
        a = hf(input_ids=torch.as_tensor(ids), labels=labels, **kw).loss
        b = ours(torch.as_tensor(ids), labels=labels, **kw).loss
    assert abs(a.item() - b.item()) <= TOL * max(1.0, abs(a.item()))


@pytest.mark.parametrize("experts", [TINY_MOE, dict(TINY_MOE, num_experts=64, num_experts_per_tok=3)],
                         ids=["k=K", "k<K"])
@pytest.mark.parametrize("masked", [False, True])
def test_moe_aux_loss(masked, experts):
    hf = make_hf_model(**experts)
    ours = ours_from_hf(hf)
    ids = torch.as_tensor(random_ids(2, 12, TINY["vocab_size"], seed=7))
    mask = torch.as_tensor(left_pad_mask(2, 12, [0, 5])) if masked else None
    labels = _labels(ids.numpy())
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        b = ours(ids, attention_mask=mask, labels=labels, output_router_logits=True)
        no_aux = ours(ids, attention_mask=mask, labels=labels)
    assert a.aux_loss is not None and b.aux_loss is not None and no_aux.aux_loss is None
    assert abs(a.aux_loss.item() - b.aux_loss.item()) <= TOL
    assert abs(a.loss.item() - b.loss.item()) <= TOL
    coef = hf.config.router_aux_loss_coef
    assert abs(b.loss.item() - (no_aux.loss.item() + coef * b.aux_loss.item())) <= TOL
    assert max_abs_diff(a.logits, b.logits) <= TOL
    # transformers' count without embeddings leaves out the expert embeddings too (they are nn.Embedding there)
    assert ours.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)


# ---- generation -------------------------------------------------------------------------------------------------

GEN_CASES = {
    "dense": dict(),
    "moe": dict(TINY_MOE),
    # prompt 48 + 32 new tokens runs past max_position_embeddings=64: NTK frequencies change every step
    "dynamic_rope": dict(rope_parameters=DYNAMIC_ROPE, keep_window_size=1024),
    # transformers keeps a sliding-window cache (only the last keys); we keep all keys and mask (same function)
    "sliding_window": dict(sliding_window=6),
}


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("case", sorted(GEN_CASES))
def test_greedy_generation_matches_transformers(case, use_cache):
    hf = make_hf_model(**GEN_CASES[case])
    ours = ours_from_hf(hf)
    P = 48 if case == "dynamic_rope" else 10
    ids = torch.as_tensor(random_ids(2, P, TINY["vocab_size"], seed=8))
    mask = torch.as_tensor(left_pad_mask(2, P, [0, 3]))
    # eos/pad are None in the config; pad_token_id only silences transformers (no row ever finishes)
    ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32, pad_token_id=0,
                      use_cache=use_cache)
    got = generate(ours, ids, mask, max_new_tokens=32, use_cache=use_cache)
    assert ref.shape == (2, P + 32)
    assert torch.equal(got, ref), (got[:, P:], ref[:, P:])


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_eos_matches_transformers(use_cache):
    """Rows that emit EOS are padded with pad_token_id; generation stops when every row is done."""
    hf = make_hf_model()
    ours = ours_from_hf(hf)
    ids = torch.as_tensor(random_ids(2, 10, TINY["vocab_size"], seed=8))
    mask = torch.as_tensor(left_pad_mask(2, 10, [0, 3]))
    free = generate(ours, ids, mask, max_new_tokens=32)
    eos = int(free[0, 13])  # the 4th new token of row 0
    ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32, pad_token_id=0,
                      eos_token_id=eos, use_cache=use_cache)
    got = generate(ours, ids, mask, max_new_tokens=32, eos_token_id=eos, pad_token_id=0, use_cache=use_cache)
    assert torch.equal(got, ref), (got[:, 10:], ref[:, 10:])
    assert bool((got[0, 14:] == 0).all())
    # the bound method (pad falls back to EOS) stops once the single row is done
    one = ours.generate(ids[:1], max_new_tokens=32, eos_token_id=eos)
    first = int((free[0, 10:] == eos).nonzero()[0, 0]) + 10
    assert torch.equal(one, free[:1, : first + 1])


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 10, 0.9), (1.3, None, 0.5), (1.0, 5, None), (0.5, 0, 1.0)])
def test_sampling_distribution_matches_transformers_warpers(monkeypatch, temperature, top_k, top_p):
    """do_sample: the distribution generate hands to multinomial (warp's softmax) equals transformers'
    temperature -> top-k -> top-p."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from doge_torch.generate import warp

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    seen = {}
    real = torch.multinomial

    def spy(probs, n, generator=None):
        seen["p"] = probs
        return real(probs, n, generator=generator)

    monkeypatch.setattr(torch, "multinomial", spy)
    tok = torch.multinomial(warp(logits, temperature, top_k, top_p).softmax(-1), 1,
                            generator=torch.Generator().manual_seed(0))[:, 0]
    procs = [TemperatureLogitsWarper(temperature)]
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    ref = LogitsProcessorList(procs)(None, logits.clone()).softmax(-1)
    assert max_abs_diff(seen["p"], ref) <= 1e-7
    assert bool((ref.gather(-1, tok[:, None]) > 0).all())


def test_sampling_is_seeded():
    ours = ours_from_hf(make_hf_model())
    ids = torch.as_tensor(random_ids(2, 6, TINY["vocab_size"], seed=3))
    a = ours.generate(ids, max_new_tokens=12, do_sample=True, seed=1)
    assert torch.equal(a, ours.generate(ids, max_new_tokens=12, do_sample=True, seed=np.int64(1)))  # (as doge_jax)
    with pytest.raises(ValueError, match="seed=-1: must be None"):
        ours.generate(ids, max_new_tokens=2, do_sample=True, seed=-1)
    assert not torch.equal(a, ours.generate(ids, max_new_tokens=12, do_sample=True, seed=2))
    greedy = ours.generate(ids, max_new_tokens=12)
    assert torch.equal(greedy, ours.generate(ids, max_new_tokens=12, do_sample=True, top_k=1, seed=5))


def test_gradients_match_transformers():
    """Training-mode backward of CE + aux loss through MoE, biases and the keep-window top-k (unique ids)."""
    hf = make_hf_model(**TINY_MOE, attention_bias=True, mlp_bias=True, keep_window_size=8)
    ours = ours_from_hf(hf)
    hf.train()
    ours.train()
    ids = torch.as_tensor(unique_ids(2, 16, TINY["vocab_size"], seed=2))
    mask = torch.as_tensor(left_pad_mask(2, 16, [0, 3]))
    la = hf(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True).loss
    lb = ours(ids, attention_mask=mask, labels=ids, output_router_logits=True).loss
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) <= TOL
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert max_abs_diff(p.grad, theirs[name].grad) <= TOL, name


# ---- checkpoints ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["tied", "moe_dynamic"])
def test_save_load_roundtrip_with_transformers(tmp_path, case):
    over = dict(tie_word_embeddings=True) if case == "tied" else dict(TINY_MOE, rope_parameters=DYNAMIC_ROPE)
    hf = make_hf_model(**over)
    ids = random_ids(2, 12, TINY["vocab_size"], seed=10)
    ref = ours_logits(ours_from_hf(hf), ids)
    # transformers -> doge_torch
    ours = DogeForCausalLM.from_pretrained(save_hf(hf, tmp_path / "hf"))
    assert max_abs_diff(ours_logits(ours, ids), ref) <= TOL
    # doge_torch -> transformers
    ours.save_pretrained(str(tmp_path / "ours"))
    files = set(os.listdir(tmp_path / "ours"))
    assert {"config.json", "model.safetensors", "generation_config.json"} <= files
    hf2 = transformers.DogeForCausalLM.from_pretrained(str(tmp_path / "ours"), attn_implementation="eager").eval()
    with torch.no_grad():
        got = hf2(input_ids=torch.as_tensor(ids)).logits.numpy()
    assert max_abs_diff(got, ref) <= TOL
    assert hf2.config.rope_parameters["rope_type"] == ("dynamic" if case == "moe_dynamic" else "default")
    if case == "tied":
        with safetensors.safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()


def test_from_pretrained_is_in_eval_mode_as_transformers(tmp_path):
    """A loaded model runs without dropout (transformers calls .eval() too); before, a config with hidden_dropout
    gave a different forward pass, and different greedy tokens, on each call."""
    hf = make_hf_model(hidden_dropout=0.3)
    ours = DogeForCausalLM.from_pretrained(save_hf(hf, tmp_path / "hf"))
    assert not ours.training and not any(m.training for m in ours.modules())
    ids = torch.as_tensor(random_ids(1, 8, TINY["vocab_size"], seed=3))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ours(ids).logits)
    ours.train()
    with torch.no_grad():
        assert not torch.equal(ours(ids).logits, ours(ids).logits)  # dropout is live again after .train()


def test_from_pretrained_names_what_the_path_is(tmp_path):
    """A missing path, a file and a doge_jax run each get their own message (before: all three "no
    model.safetensors ... found")."""
    with pytest.raises(CheckpointError, match="nosuch: no such file or directory"):
        DogeForCausalLM.from_pretrained(str(tmp_path / "nosuch"))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="a file; pass the model directory"):
        DogeForCausalLM.from_pretrained(str(tmp_path / "model.safetensors"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    save_hf(make_hf_model(), tmp_path / "hf")
    (tmp_path / "run" / "config.json").write_bytes((tmp_path / "hf" / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match=r"doge_jax \(orbax\) checkpoint: convert it first"):
        DogeForCausalLM.from_pretrained(str(tmp_path / "run"))
    (tmp_path / "run" / "checkpoints" / "7" / "params").mkdir(parents=True)  # its checkpoints/ folder: named
    with pytest.raises(CheckpointError, match=r"checkpoints: no model.safetensors.*; it is a doge_jax.train run's "
                       r"checkpoints/ folder: pass the run, .*run, or one step, .*checkpoints/7 \(doge_torch: "):
        DogeForCausalLM.from_pretrained(str(tmp_path / "run" / "checkpoints"))
    with pytest.raises(ValueError, match="torch.int8: a model's weights are floating point"):
        DogeForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.int8)
    # save_pretrained onto a file refuses and keeps it, as transformers does (before: replaced by the model)
    (tmp_path / "notes.txt").write_text("notes")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        DogeForCausalLM.from_pretrained(str(tmp_path / "hf")).save_pretrained(str(tmp_path / "notes.txt"))
    assert (tmp_path / "notes.txt").read_text() == "notes"
    with pytest.raises(OSError, match="^/proc/doge_nope: cannot write there"):  # the target named, not a temp name
        DogeForCausalLM.from_pretrained(str(tmp_path / "hf")).save_pretrained("/proc/doge_nope")


def test_sharded_save(tmp_path):
    hf = make_hf_model()
    ours = ours_from_hf(hf)
    out = tmp_path / "sharded"
    ours.save_pretrained(str(out), max_shard_size="40KB")
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files and len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours.state_dict()) and set(index["weight_map"].values()) == set(shards)
    back = DogeForCausalLM.from_pretrained(str(out))
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    hf2 = transformers.DogeForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    ids = random_ids(2, 10, TINY["vocab_size"], seed=11)
    assert max_abs_diff(ours_logits(back, ids), ours_logits(ours, ids)) <= TOL
    assert max_abs_diff(both_logits(hf2, back, ids)[0], ours_logits(ours, ids)) <= TOL
    os.remove(out / shards[-1])
    with pytest.raises(CheckpointError, match=shards[-1]):
        DogeForCausalLM.from_pretrained(str(out))


def _failing_writer(*args, **kwargs):
    """Stands in for safetensors' save_file: writes a partial file, then fails like a full disk."""
    filename = args[1] if len(args) > 1 else kwargs["filename"]
    with open(filename, "wb") as f:
        f.write(b"\x00" * 64)
    raise OSError("simulated write failure")


def test_failed_save_is_atomic(tmp_path, monkeypatch):
    ours = ours_from_hf(make_hf_model())
    existing = tmp_path / "existing"
    ours.save_pretrained(str(existing))
    before = {f: (existing / f).read_bytes() for f in os.listdir(existing)}
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_writer)
    with pytest.raises(OSError, match="simulated"):
        ours.save_pretrained(str(tmp_path / "fresh"))
    with pytest.raises(OSError, match="simulated"):
        ours.save_pretrained(str(existing))
    with pytest.raises(OSError, match="simulated"):
        ours.save_pretrained(str(tmp_path / "fresh_sharded"), max_shard_size="40KB")
    assert sorted(os.listdir(tmp_path)) == ["existing"]  # no partial or temporary directories
    assert {f: (existing / f).read_bytes() for f in os.listdir(existing)} == before
    monkeypatch.undo()
    assert max_abs_diff(ours_logits(DogeForCausalLM.from_pretrained(str(existing)), [[1, 2, 3]]),
                        ours_logits(ours, [[1, 2, 3]])) == 0.0


@pytest.mark.parametrize("bad", [-1, TINY["vocab_size"], 10**6])
def test_bad_token_ids(bad):
    ours = ours_from_hf(make_hf_model())
    ids = torch.tensor([[1, 2, bad, 3]])
    with pytest.raises(ValueError, match="vocab"):
        ours(ids)
    with pytest.raises(ValueError, match="vocab"):
        ours.generate(ids, max_new_tokens=2)
    good = torch.tensor([[1, 2, 4, 3]])
    for return_logits in (True, False):  # both loss paths; -100 is fine (before: IndexError / RuntimeError)
        with pytest.raises(ValueError, match=rf"labels outside \[0, vocab_size={TINY['vocab_size']}\).*\[{bad}\]"):
            ours(good, labels=ids, return_logits=return_logits)
        assert torch.isfinite(ours(good, labels=torch.tensor([[1, -100, 4, 3]]), return_logits=return_logits).loss)


def _rewrite_weights(path, edit) -> None:
    f = os.path.join(path, "model.safetensors")
    sd = safetensors.torch.load_file(f)
    edit(sd)
    safetensors.torch.save_file(sd, f, metadata={"format": "pt"})


def test_checkpoint_key_errors(tmp_path):
    path = save_hf(make_hf_model(), tmp_path / "ck")

    def edit(sd):
        del sd["model.layers.1.self_attn.k_norm.weight"]
        sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
        sd["model.layers.0.self_attn.A"] = torch.zeros(5)

    _rewrite_weights(path, edit)
    with pytest.raises(CheckpointError) as e:
        DogeForCausalLM.from_pretrained(path)
    msg = str(e.value)
    assert "missing keys" in msg and "model.layers.1.self_attn.k_norm.weight" in msg
    assert "unexpected keys" in msg and "model.layers.0.self_attn.extra.weight" in msg
    assert "wrong shapes" in msg and "model.layers.0.self_attn.A" in msg and "(2,)" in msg and "(5,)" in msg


@pytest.mark.parametrize("keep", [0.5, 16])
def test_truncated_safetensors(tmp_path, keep):
    path = save_hf(make_hf_model(), tmp_path / "ck")
    f = os.path.join(path, "model.safetensors")
    size = os.path.getsize(f)
    n = int(size * keep) if isinstance(keep, float) else keep
    with open(f, "r+b") as fh:
        fh.truncate(n)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        DogeForCausalLM.from_pretrained(path)


def test_native_checkpoint_refuses_small_doge_variant(tmp_path):
    path = save_hf(make_hf_model(), tmp_path / "ck")
    with pytest.raises(CheckpointError, match="q_norm"):
        DogeForCausalLM.from_pretrained(path, variant="small_doge")


# ---- small-doge variant (spec §2.1 b) and legacy names (§2.2 c) -------------------------------------------------

def make_small_doge(seed: int = 0, **overrides) -> DogeForCausalLM:
    cfg = DogeConfig(**{**TINY, **overrides, "variant": "small_doge"})
    torch.manual_seed(seed)
    model = DogeForCausalLM(cfg)
    model.init_weights(seed=seed)
    perturb_(model, seed)
    return model.eval()


def test_small_doge_shapes():
    m = make_small_doge()
    H, G, D = TINY["num_attention_heads"], TINY["num_key_value_heads"], TINY["hidden_size"] // 4
    attn = m.model.layers[0].self_attn
    assert attn.A.shape == (H,)
    assert attn.dt_proj.weight.shape == (H, G * D)
    assert not hasattr(attn, "q_norm") and not hasattr(attn, "k_norm")
    assert not any("q_norm" in k or "k_norm" in k for k in m.state_dict())
    native = ours_from_hf(make_hf_model())
    assert native.model.layers[0].self_attn.A.shape == (G,)


@pytest.mark.parametrize("moe", [False, True])
def test_small_doge_roundtrip(tmp_path, moe):
    m = make_small_doge(**(TINY_MOE if moe else {}))
    ids = random_ids(2, 12, TINY["vocab_size"], seed=12)
    m.save_pretrained(str(tmp_path / "sd"))
    cfg_json = json.loads((tmp_path / "sd" / "config.json").read_text())
    back = DogeForCausalLM.from_pretrained(str(tmp_path / "sd"))
    assert back.config == m.config
    assert max_abs_diff(ours_logits(back, ids), ours_logits(m, ids)) == 0.0
    # detection from the weight names alone (config.json without our variant hint)
    cfg_json.pop("doge_variant")
    (tmp_path / "sd" / "config.json").write_text(json.dumps(cfg_json))
    assert DogeForCausalLM.from_pretrained(str(tmp_path / "sd")).config.variant == "small_doge"


def test_legacy_checkpoint_loads_as_small_doge(tmp_path):
    m = make_small_doge(rope_type="dynamic", rope_factor=4.0, tie_word_embeddings=True, **TINY_MOE)
    sd = {to_legacy_name(k): v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    assert all(rename_legacy(k) in m.state_dict() for k in sd)  # our renaming is the inverse of the table
    assert "model.layers.0.feed_forward.router_gate.weight" in sd and "model.layers.1.pre_residual.weight" in sd
    for i in range(TINY["num_hidden_layers"]):  # Mar-Apr 2025 MoE checkpoints carried a router bias
        sd[f"model.layers.{i}.feed_forward.router_gate.bias"] = torch.randn(8)
    out = tmp_path / "legacy"
    out.mkdir()
    safetensors.torch.save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    legacy_cfg = {
        "architectures": ["DogeForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_doge.DogeConfig",
                     "AutoModelForCausalLM": "modeling_doge.DogeForCausalLM"},
        "model_type": "doge", "transformers_version": "4.47.1", "torch_dtype": "float32",
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
        "hidden_bias": False, "dynamic_mask_ratio": 0.0, "hidden_dropout": 0.0, "hidden_act": "silu",
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 2048},
        "attention_dropout": 0.0, "norm_topk_prob": False, "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        **{k: v for k, v in TINY.items()}, **TINY_MOE,
    }
    (out / "config.json").write_text(json.dumps(legacy_cfg))
    loaded = DogeForCausalLM.from_pretrained(str(out))
    c = loaded.config
    assert c.variant == "small_doge" and c.rope_type == "dynamic" and c.rope_factor == 4.0
    assert not c.attention_bias and not c.mlp_bias and c.is_moe and c.tie_word_embeddings
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (0, 1, 2)
    for T in (12, 2 * TINY["max_position_embeddings"]):  # T=128 also exercises the dynamic RoPE
        ids = random_ids(2, T, TINY["vocab_size"], seed=13)
        assert max_abs_diff(ours_logits(loaded, ids), ours_logits(m, ids)) == 0.0


# ---- training-mode dropout, bf16 --------------------------------------------------------------------------------

def test_dropout_train_vs_eval():
    hf = make_hf_model(hidden_dropout=0.1)
    ours = ours_from_hf(hf)
    ids = random_ids(2, 10, TINY["vocab_size"], seed=14)
    ours.train()
    assert max_abs_diff(ours_logits(ours, ids), ours_logits(ours, ids)) > 1e-4
    ours.eval()
    assert max_abs_diff(ours_logits(ours, ids), ours_logits(ours, ids)) == 0.0
    a, b = both_logits(hf, ours, ids)
    assert max_abs_diff(a, b) <= TOL


@pytest.mark.parametrize("moe", [False, True])
def test_bf16(tmp_path, moe):
    path = save_hf(make_hf_model(**(TINY_MOE if moe else {})), tmp_path / "ck")
    ids = torch.as_tensor(random_ids(2, 16, TINY["vocab_size"], seed=15))
    ours32 = DogeForCausalLM.from_pretrained(path)
    ours16 = DogeForCausalLM.from_pretrained(path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in ours16.parameters())
    hf16 = transformers.DogeForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                        dtype=torch.bfloat16).eval()
    with torch.no_grad():
        l32 = ours32(ids).logits
        l16 = ours16(ids).logits
        ref16 = hf16(input_ids=ids).logits
    assert l16.dtype == torch.bfloat16 and ref16.dtype == torch.bfloat16
    # same ops in the same order as transformers: bf16 results agree to fp32 round-off of the few fp32 steps
    assert max_abs_diff(l16.float().numpy(), ref16.float().numpy()) <= TOL
    # bf16 vs fp32: a few bf16 ulps (2^-8 relative) of the logit scale
    scale = float(l32.abs().max())
    assert max_abs_diff(l16.float().numpy(), l32.numpy()) <= 3e-2 * scale


# ---- torch.compile, autocast (CUDA readiness; exercised on CPU) ------------------------------------------------

def _compile_case(moe: bool = False):
    """Tiny model exercising the keep-window expiry mask (T > keep_window), dynamic RoPE past max positions and
    GQA (and optionally CDMoE with its rematerialised experts); unique token ids so no dt ties."""
    cfg = DogeConfig(**{**TINY, "keep_window_size": 8, "max_position_embeddings": 8, "rope_type": "dynamic",
                        "rope_factor": 4.0, **(dict(TINY_MOE, num_experts=64, num_experts_per_tok=3) if moe else {})})
    torch.manual_seed(0)
    model = DogeForCausalLM(cfg)
    perturb_(model)
    ids = torch.as_tensor(unique_ids(2, 16, TINY["vocab_size"], seed=21))
    return model.train(), ids


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops run while active, by name."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("moe", [False, True])
def test_remat_policies_same_gradients_and_recompute(moe):
    """config.remat (shared with doge_jax; doge_torch ignored it): "full" recomputes each layer in the backward,
    "dots_saveable" recomputes the layer but not its matmuls; gradients are bit-identical to no remat; eval,
    no_grad and cached calls never checkpoint. transformers' gradient_checkpointing_enable / _disable set "full"."""
    import torch._dynamo

    model, ids = _compile_case(moe)
    runs = {}
    for policy in ("none", "full", "dots_saveable"):
        model.config = model.config.replace(remat=policy)
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        with _OpCounter() as bwd:
            loss.backward()
        runs[policy] = (loss.detach(), {n: q.grad.clone() for n, q in model.named_parameters()}, bwd.counts)
    ref_loss, ref_grads, ref_ops = runs["none"]
    for policy in ("full", "dots_saveable"):
        got_loss, grads, ops = runs[policy]
        assert torch.equal(got_loss, ref_loss), policy
        for n, g in ref_grads.items():
            assert torch.equal(grads[n], g), (policy, n)
    mm = lambda ops: sum(ops.get(k, 0) for k in ("mm", "addmm", "bmm"))  # noqa: E731
    elementwise = lambda ops: ops.get("mul", 0) + ops.get("rsqrt", 0)  # noqa: E731
    assert mm(runs["full"][2]) > mm(ref_ops)  # the layers' matmuls ran again
    assert mm(runs["dots_saveable"][2]) == mm(ref_ops)  # saved, not recomputed
    assert elementwise(runs["dots_saveable"][2]) > elementwise(ref_ops)  # the rest recomputed
    model.config = model.config.replace(remat="none")
    assert not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and model.config.remat == "full"
    model.gradient_checkpointing_enable({"use_reentrant": False})
    with pytest.raises(ValueError, match="use_reentrant=True"):
        model.gradient_checkpointing_enable({"use_reentrant": True})
    import doge_torch.model as M

    calls = []
    real = M.remat_layer
    try:
        M.remat_layer = lambda *a: calls.append(1) or real(*a)
        with torch.no_grad():
            model(ids)
        model.eval()
        model(ids)
        model.train()
        model(ids, use_cache=True)
        assert calls == []
        model(ids)
        assert len(calls) == model.config.num_hidden_layers
    finally:
        M.remat_layer = real
    model.gradient_checkpointing_disable()
    assert model.config.remat == "none"
    if not moe:  # torch.compile traces both policies as one graph (a lambda context_fn was an error under dynamo)
        for policy in ("full", "dots_saveable"):
            model.config = model.config.replace(remat=policy)
            torch._dynamo.reset()
            ex = torch._dynamo.explain(lambda i: model(i, labels=i, return_logits=False).loss)(ids)
            assert ex.graph_break_count == 0 and ex.graph_count == 1, (policy, [b.reason for b in ex.break_reasons])
        torch._dynamo.reset()


@pytest.mark.parametrize("return_logits,moe,chunks", [(True, False, False), (False, False, False),
                                                      (False, True, False), (False, False, True)])
def test_compile_fullgraph_no_graph_breaks(return_logits, moe, chunks, monkeypatch):
    """The whole forward (+ loss) traces as ONE graph, with and without explicit position_ids (dynamic RoPE from
    max(position) without a host sync), also with the training loss that stores no logits (doge_torch.loss, an
    autograd.Function, here over 3 chunks; `chunks`: with its per-chunk function compiled as on CUDA, which the
    outer trace takes in as plain ops); dynamo's eager backend runs it with the same results as eager."""
    import torch._dynamo

    from doge_torch import loss

    monkeypatch.setattr(loss, "chunk_rows", lambda vocab_size: 12)  # 32 tokens: chunks of 12, 12 and 8
    if chunks:  # (eager calls: dynamo's eager backend instead of an inductor compile on the CPU)
        monkeypatch.setattr(loss, "COMPILE_DEVICES", ("cpu",))
        monkeypatch.setattr(loss, "_compiled_chunk", torch.compile(loss._chunk_softmax_grad, backend="eager",
                                                                   dynamic=False, fullgraph=True))
    model, ids = _compile_case(moe)
    pos = torch.arange(16)[None].expand(2, 16) + 3

    def fwd(ids, pos):
        out = model(ids, labels=ids, position_ids=pos, return_logits=return_logits)
        return out.logits, out.loss

    for p in (None, pos):
        torch._dynamo.reset()
        ex = torch._dynamo.explain(fwd)(ids, p)
        assert ex.graph_break_count == 0 and ex.graph_count == 1, [b.reason for b in ex.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    for p in (None, pos):
        out = compiled(ids, labels=ids, position_ids=p, return_logits=return_logits)
        out.loss.backward()
        got = {n: q.grad.clone() for n, q in model.named_parameters()}
        model.zero_grad()
        ref = model(ids, labels=ids, position_ids=p, return_logits=return_logits)
        ref.loss.backward()
        assert (out.logits is None) == (not return_logits)
        assert (not return_logits or torch.equal(out.logits, ref.logits)) and torch.equal(out.loss, ref.loss)
        assert all(torch.equal(got[n], q.grad) for n, q in model.named_parameters())
        model.zero_grad()


@pytest.mark.parametrize("fold", ["qk", "v"])
def test_compile_fullgraph_with_padding_mask(fold, monkeypatch):
    """A padded batch (T <= keep_window) takes the folded sdpa paths with the key mask and still traces as ONE
    graph (the value fold: torch.cond with the mask as an operand); compiled (dynamo, eager backend) it gives eager's
    logits, loss and gradients, and those agree with the dense-bias reference."""
    import torch._dynamo

    import doge_torch.model as dm

    monkeypatch.setattr(dm, "FUSED_FOLD", fold)
    filled, fill = [], dm.fill_masked_rows

    def counted(*a):  # (eager calls only: dynamo would break the graph on the append)
        if not torch.compiler.is_compiling():
            filled.append(1)
        return fill(*a)

    monkeypatch.setattr(dm, "fill_masked_rows", counted)
    cfg = DogeConfig(**{**TINY, "keep_window_size": 32, "attention_impl": "fused"})
    torch.manual_seed(0)
    model = DogeForCausalLM(cfg).train()
    perturb_(model)
    ids = torch.as_tensor(unique_ids(2, 16, TINY["vocab_size"], seed=21))
    mask = torch.as_tensor(left_pad_mask(2, 16, [5, 0]))
    labels = ids.masked_fill(mask == 0, -100)

    def fwd(ids, mask):
        out = model(ids, attention_mask=mask, labels=labels)
        return out.logits, out.loss

    torch._dynamo.reset()
    ex = torch._dynamo.explain(fwd)(ids, mask)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [b.reason for b in ex.break_reasons]
    torch._dynamo.reset()
    runs, ref = {}, with_attention_impl(copy.deepcopy(model), "reference")
    for name, m, owner in (("compiled", torch.compile(model, fullgraph=True, backend="eager"), model),
                           ("eager", model, model), ("reference", ref, ref)):
        out = m(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        runs[name] = (out.logits.detach(), out.loss.detach(),
                      {n: q.grad.clone() for n, q in owner.named_parameters()})
        owner.zero_grad()
    assert len(filled) == cfg.num_hidden_layers  # the eager run took the folds (the reference does not)
    (lc, sc, gc), (le, se, ge), (lr, sr, gr) = runs["compiled"], runs["eager"], runs["reference"]
    assert torch.equal(lc, le) and torch.equal(sc, se) and all(torch.equal(gc[n], ge[n]) for n in ge)
    assert max_abs_diff(le.numpy(), lr.numpy()) <= TOL and abs(float(se - sr)) <= TOL
    assert all(torch.allclose(ge[n], gr[n], atol=TOL, rtol=1e-4) for n in ge), [
        n for n in ge if not torch.allclose(ge[n], gr[n], atol=TOL, rtol=1e-4)]


def test_compile_still_validates_token_ids_in_eager():
    model, ids = _compile_case()
    with pytest.raises(ValueError, match="outside"):
        model(ids + 1000)


@pytest.mark.slow
@pytest.mark.parametrize("moe", [False, True])
def test_compile_inductor_fullgraph_matches_eager(moe):
    """torch.compile(model, fullgraph=True) with inductor (~2 minutes on 2 cores): logits and the loss gradient
    equal eager to float32 reordering noise (MoE: the rematerialised experts compile too)."""
    import torch._dynamo

    torch._dynamo.reset()
    model, ids = _compile_case(moe)
    out = torch.compile(model, fullgraph=True)(ids, labels=ids)
    out.loss.backward()
    got = torch.cat([q.grad.flatten() for q in model.parameters()])
    model.zero_grad()
    ref = model(ids, labels=ids)
    ref.loss.backward()
    want = torch.cat([q.grad.flatten() for q in model.parameters()])
    assert max_abs_diff(out.logits.detach().numpy(), ref.logits.detach().numpy()) <= TOL
    assert float((got - want).norm() / want.norm()) <= 1e-5
    model.zero_grad()  # the training loss without logits (doge_torch.loss): inductor compiles its autograd.Function
    out = torch.compile(model, fullgraph=True)(ids, labels=ids, return_logits=False)
    out.loss.backward()
    got = torch.cat([q.grad.flatten() for q in model.parameters()])
    assert abs(float(out.loss - ref.loss)) <= 1e-6 * float(ref.loss)
    assert float((got - want).norm() / want.norm()) <= 1e-5


def test_rope_tensor_length_equals_int_length():
    """Dynamic RoPE with a tensor length (no host sync) gives the same bits as the Python-int path, both below and
    past max_position_embeddings."""
    from doge_torch.model import rope_inv_freq

    cfg = DogeConfig(**{**TINY, "rope_type": "dynamic", "rope_factor": 4.0})
    for n in (1, 63, 64, 65, 128, 1000):
        assert torch.equal(rope_inv_freq(cfg, torch.tensor(n)), rope_inv_freq(cfg, n)), n
    assert not torch.equal(rope_inv_freq(cfg, 65), rope_inv_freq(cfg, 64))


def test_autocast_bf16_keeps_A_and_dt_float32():
    """Spec §9.9: under bf16 autocast A stays float32, so dt = exp(A * softplus(dt_proj v)) is float32."""
    model, ids = _compile_case()
    model = ours_from_hf(make_hf_model(), attention_impl="reference")  # T <= keep_window: no top-k flips in bf16
    attn = model.model.layers[0].self_attn
    v = torch.randn(2, 16, TINY["num_key_value_heads"] * 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attn.dt_proj(v).dtype == torch.bfloat16
        dt = attn.dynamic_dt(v)
        logits = model(ids).logits
    assert attn.A.dtype == torch.float32 and dt.dtype == torch.float32
    with torch.no_grad():
        ref = model(ids).logits
    assert max_abs_diff(logits.detach().float().numpy(), ref.numpy()) <= 2e-2 * float(ref.abs().max())


@pytest.mark.parametrize("impl", ["reference", "blockwise", "fused-v", "blockwise-window"])
def test_autocast_bf16_fully_masked_rows_are_finite(impl, monkeypatch):
    """Left padding under bf16 autocast: q is bf16 while the hidden states (and the mask's finfo.min) are float32.
    The dense-bias sdpa path ("-window": a sliding window, wider than T) clamps the mask to bf16's finfo.min (float32
    min rounds to -inf, and sdpa makes such rows 0 instead of uniform); the folds ("-v": the value fold) fill them
    as the reference; the padded rows are uniform and every row agrees with the float32 reference."""
    import doge_torch.model as dm

    if impl == "fused-v":
        monkeypatch.setattr(dm, "FUSED_FOLD", "v")
    hf = make_hf_model()
    ids = torch.as_tensor(random_ids(2, 12, TINY["vocab_size"], seed=22))
    mask = torch.as_tensor(left_pad_mask(2, 12, [4, 0]))
    window = {"sliding_window": 32} if impl.endswith("window") else {}
    ours = ours_from_hf(hf, attention_impl=impl.split("-")[0], **window)
    ref = ours_from_hf(hf, attention_impl="reference", **window)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours(ids, attention_mask=mask).logits.float()
        want = ref(ids, attention_mask=mask).logits
    assert torch.isfinite(got).all()
    assert max_abs_diff(got.numpy(), want.numpy()) <= 2e-2 * float(want.abs().max())


def test_model_generate_passes_pad_token_id():
    hf = make_hf_model()
    ours = ours_from_hf(hf)
    ids = torch.as_tensor(unique_ids(2, 6, TINY["vocab_size"], seed=23))
    first = ours.generate(ids, max_new_tokens=1)[:, -1]
    assert first[0] != first[1]
    out = ours.generate(ids, max_new_tokens=4, eos_token_id=int(first[0]), pad_token_id=7)
    assert out[0, 6] == first[0] and (out[0, 7:] == 7).all() and (out[1, 7:] != 7).any()


def test_forward_copies_no_cpu_tensor_to_the_device(monkeypatch):
    """On a GPU a CPU tensor copied into the forward is a blocking copy (it waits for the queued work): the RoPE
    table was built on the CPU (gpu_check's host-sync row would have counted one per micro-batch). Checked on the
    meta device: no op may take a non-scalar CPU tensor and produce a device tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from doge_torch.model import token_ids_checked

    class CpuIntoDevice(TorchDispatchMode):
        hits: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if any(t.device.type == "cpu" and t.dim() > 0 for t in ins) and any(t.is_meta for t in outs):
                self.hits.append(str(func))
            return out

    real = torch.is_autocast_enabled  # autocast has no meta device
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False if a and str(a[0]) == "meta" else real(*a))
    cfg = DogeConfig(**{**TINY, "rope_type": "dynamic", "rope_factor": 4.0, "keep_window_size": 8,
                        "max_position_embeddings": 16})
    model = DogeForCausalLM(cfg).to("meta")
    ids = torch.zeros(2, 24, dtype=torch.long, device="meta")
    with token_ids_checked(), CpuIntoDevice() as mode:
        out = model(ids, labels=ids)
    assert out.loss.is_meta and mode.hits == []


def test_attention_mask_must_cover_cached_and_new_tokens():
    """A [B, 1] mask while decoding would broadcast over the cached keys and drop the prompt's padding."""
    model = DogeForCausalLM(DogeConfig(**TINY)).eval()
    ids = torch.as_tensor(random_ids(2, 5, TINY["vocab_size"]))
    mask = torch.as_tensor(left_pad_mask(2, 5, [0, 2]))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        nxt = ids[:, :1]
        with pytest.raises(ValueError, match=r"attention_mask shape \(2, 1\).*\(2, 6\)"):
            model(nxt, attention_mask=torch.ones(2, 1, dtype=torch.long), past_key_values=out.past_key_values)
        with pytest.raises(ValueError, match="attention_mask shape"):
            model(ids, attention_mask=mask[:, 1:])
        full = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        model(nxt, attention_mask=full, past_key_values=out.past_key_values)  # the right shape still runs


def test_manual_decoding_loop_as_with_transformers():
    """A transformers-style loop (`out.past_key_values` passed back, no use_cache argument) gets the cache that
    config.use_cache asks for in eval mode, as transformers does: it got None, and the next call silently treated
    the new token as a fresh sequence. Training mode keeps no cache; a transformers cache object is refused."""
    hf = make_hf_model(keep_window_size=8)
    ours = ours_from_hf(hf)
    ids = torch.as_tensor(unique_ids(2, 20, TINY["vocab_size"]))
    with torch.no_grad():
        out = ours(ids[:, :-3])
        for t in range(17, 20):
            out = ours(ids[:, t:t + 1], past_key_values=out.past_key_values)
            ref = hf(input_ids=ids[:, :t + 1]).logits[:, -1]
            assert max_abs_diff(out.logits[:, -1].numpy(), ref.numpy()) <= TOL
        assert ours(ids, use_cache=False).past_key_values is None
        ours.config = ours.config.replace(use_cache=False)
        assert ours(ids).past_key_values is None
        ours.train()
        assert ours(ids).past_key_values is None
        with pytest.raises(TypeError, match="past_key_values: a doge_torch DogeCache .* got DynamicCache"):
            ours(ids, past_key_values=transformers.DynamicCache(config=hf.config))


def test_transformers_style_arguments_and_outputs(tmp_path, monkeypatch):
    """What transformers users write works, or is refused by name (before: TypeErrors, or errors from deep inside
    torch): ModelOutput indexing, return_dict=False, from_pretrained's torch_dtype / device_map /
    attn_implementation, .device / .dtype / get_*_embeddings / num_parameters, generate's max_length, uint8 ids and
    int32 labels; float labels, a wrong position_ids shape, hidden states, beam search, a Hub id, a cache of another
    batch and a wrong cache_position are named errors."""
    from doge_jax.hf_names import CheckpointError

    hf = make_hf_model(keep_window_size=8)
    path = save_hf(hf, tmp_path / "m")
    ours = DogeForCausalLM.from_pretrained(path, torch_dtype=torch.float32, device_map="cpu",
                                           attn_implementation="eager")
    ids = torch.as_tensor(unique_ids(2, 12, TINY["vocab_size"]))
    with torch.no_grad():
        out, ref = ours(ids, labels=ids), hf(input_ids=ids, labels=ids)
        assert out[0] is out.loss and out["logits"] is out.logits and out[1:2] == (out.logits,)
        assert list(out) == list(ref) == ["loss", "logits", "past_key_values"] and "logits" in out  # names, as a dict
        assert dict(out.items())["loss"] is out.loss and len(out) == 3
        assert len(out.to_tuple()) == len(ref.to_tuple()) == 3  # loss, logits, cache
        with pytest.raises(KeyError):
            out["aux_loss"]  # None: absent, as in a ModelOutput
        assert out.get("logits") is out.logits and out.get("aux_loss") is ref.get("aux_loss") is None
        assert out.get("aux_loss", 7) == ref.get("aux_loss", 7) == 7  # dict.get on the fields that are set
        tup = ours(ids, labels=ids, return_dict=False)
        assert isinstance(tup, tuple) and abs(float(tup[0]) - float(ref[0])) <= TOL
        assert max_abs_diff(ours(ids.to(torch.uint8)).logits.numpy(), ref.logits.numpy()) <= TOL
        assert abs(float(ours(ids, labels=ids.int()).loss) - float(ref.loss)) <= TOL
        for bad, msg in ((dict(labels=ids.float()), "labels must be integer"),
                         (dict(input_ids=ids.float() + 0.5), "input_ids must be integer"),  # (never truncated)
                         (dict(input_ids=ids[:0]), r"input_ids shape \(0, 12\)"),
                         (dict(position_ids=torch.arange(11)[None]), r"position_ids shape \(1, 11\)"),
                         (dict(output_attentions=True), "output_attentions=True: not supported"),
                         (dict(cache_position=torch.arange(3)), "cache_position")):
            with pytest.raises(ValueError, match=msg):
                ours(**{"input_ids": ids, **bad})
        with pytest.raises(ValueError, match="past_key_values hold batch 2, input batch 1"):
            ours(ids[:1, :1], past_key_values=out.past_key_values)
    assert ours.device == torch.device("cpu") and ours.dtype == torch.float32
    assert ours.get_input_embeddings() is ours.model.embed_tokens
    assert ours.get_output_embeddings().weight is ours.lm_weight() and ours.num_parameters() == hf.num_parameters()
    assert ours.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)
    four = ours.generate(ids[:, :5], max_new_tokens=4)
    assert torch.equal(ours.generate(ids[:, :5], max_length=9), four)
    assert torch.equal(ours.generate(ids[:, :5], max_length=9, max_new_tokens=None), four)  # None: not given
    tied = DogeForCausalLM(DogeConfig(**TINY, tie_word_embeddings=True))
    h = torch.randn(3, TINY["hidden_size"])
    assert torch.equal(tied.get_output_embeddings()(h), h @ tied.model.embed_tokens.weight.T)
    assert tied.get_output_embeddings().weight is tied.model.embed_tokens.weight
    for kw, msg in ((dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 > num_beams=2"),
                    (dict(num_return_sequences=2), "one sequence per row"),
                    (dict(max_length=5), "max_length=5: must be an int above the prompt's 5")):
        with pytest.raises(ValueError, match=msg):
            ours.generate(ids[:, :5], **kw)
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'"):
        DogeForCausalLM.from_pretrained(path, attn_implementation="flash_attention_2")
    assert DogeForCausalLM.from_pretrained(path, torch_dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="Hub id.*hf download SmallDoge/Doge-20M"):
        DogeForCausalLM.from_pretrained("SmallDoge/Doge-20M")
    monkeypatch.chdir(tmp_path)  # a typo below an existing local folder is no Hub id
    with pytest.raises(CheckpointError, match=r"m/nope: no such file or directory$"):
        DogeForCausalLM.from_pretrained("m/nope")


def test_moe_backward_keeps_no_full_sort_or_gathered_rows():
    """CDMoE's backward must keep neither an array per token of size K² (the pair scores or the sort's int64
    indices: 3.4 GiB extra per 2048-token row at Doge-480M-MoE's sizes) nor the gathered [tokens, k, d] expert rows
    (2 x 300 MB per layer there): the experts are rematerialised."""
    cfg = DogeConfig(**TINY, is_moe=True, num_experts=400, num_experts_per_tok=4)  # K = 20, K² = 400
    assert cfg.num_keys ** 2 > max(cfg.hidden_size, cfg.intermediate_size)
    layer = DogeForCausalLM(cfg).model.layers[0].mlp
    x = torch.randn(1, 20, cfg.hidden_size, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = layer(x)
    out.sum().backward()
    assert saved  # the hook sees the layer's saved tensors
    big = [s for s in saved if s[1][-1] >= cfg.num_keys ** 2 or s[1][-2:] == (4, cfg.hidden_size)]
    assert not big, big
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("mean_resizing", [True, False])
def test_resize_token_embeddings_as_transformers(tie, mean_resizing):
    """resize_token_embeddings keeps the old rows and draws the new ones from torch's generator as transformers
    does: the same seed gives transformers' very weights (grown with padding to a multiple, then shrunk)."""
    hf = make_hf_model(tie_word_embeddings=tie)
    ours = ours_from_hf(hf)
    ids = torch.as_tensor(unique_ids(2, 8, TINY["vocab_size"], seed=1))
    with torch.no_grad():
        before = ours(ids).logits
    for n, multiple in ((150, 16), (100, None)):
        torch.manual_seed(7)
        hf.resize_token_embeddings(n, pad_to_multiple_of=multiple, mean_resizing=mean_resizing)
        torch.manual_seed(7)
        emb = ours.resize_token_embeddings(n, pad_to_multiple_of=multiple, mean_resizing=mean_resizing)
        assert emb is ours.get_input_embeddings() and emb.num_embeddings == hf.config.vocab_size
        assert ours.config.vocab_size == hf.config.vocab_size == (160 if n == 150 else 100)
        for k, v in hf.state_dict().items():
            assert torch.equal(ours.state_dict()[k], v), k
        if n == 150:  # the old tokens' logits are unchanged; the new ones are scored too
            with torch.no_grad():
                after = ours(ids).logits
            assert after.shape[-1] == 160 and max_abs_diff(after[..., :TINY["vocab_size"]], before) <= 1e-6
            w = ours.get_input_embeddings().weight.detach()
            spread = (w[TINY["vocab_size"]:] - w[:TINY["vocab_size"]].mean(0)).abs().max()
            assert (spread < 1e-3) == mean_resizing  # near the old rows' mean, else normal(0, initializer_range)
    assert ours.get_output_embeddings().weight.shape == (100, TINY["hidden_size"])
    with pytest.raises(ValueError, match="outside"):
        ours(torch.tensor([[100]]))
    ours.train()
    ours(ids % 100, labels=ids % 100).loss.backward()  # the new Parameters train
    assert ours.get_input_embeddings().weight.grad is not None


def test_resize_token_embeddings_refusals_and_no_ops():
    """Bad arguments, or a size that would drop the pad/BOS/EOS id, are refused before anything changes; no
    size (or the same one) changes nothing, as in transformers."""
    ours = ours_from_hf(make_hf_model(pad_token_id=90))
    w = ours.get_input_embeddings().weight
    assert ours.resize_token_embeddings() is ours.get_input_embeddings()
    ours.resize_token_embeddings(TINY["vocab_size"])
    ours.resize_token_embeddings(pad_to_multiple_of=64)  # 128 is a multiple already
    assert ours.get_input_embeddings().weight is w
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="new_num_tokens must be a positive integer"):
            ours.resize_token_embeddings(bad)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive integer"):
        ours.resize_token_embeddings(200, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match=r"cannot resize the vocabulary to 64 tokens: DogeConfig.pad_token_id=90"):
        ours.resize_token_embeddings(64)
    assert ours.get_input_embeddings().weight is w and ours.config.vocab_size == TINY["vocab_size"]
