"""transformers' sampling warpers (temperature, top-k, top-p, min-p, typical_p, epsilon and eta cutoffs) in both
packages: the same tokens dropped, with min_tokens_to_keep as beam sampling uses it, and doge_torch's sampled
tokens equal to transformers' from one torch seed."""

from __future__ import annotations

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_hf_model, save_hf
from transformers.generation import logits_process as lp

import doge_torch
from doge_jax.generate import _filter_logits, main
from doge_jax.model import DogeForCausalLM
from doge_torch.generate import warp


def _transformers_warpers(T, k, p, m, typical, eps, eta, keep):
    procs = [lp.TemperatureLogitsWarper(T)]
    if k:
        procs.append(lp.TopKLogitsWarper(k, min_tokens_to_keep=keep))
    if p:
        procs.append(lp.TopPLogitsWarper(p, min_tokens_to_keep=keep))
    if m:
        procs.append(lp.MinPLogitsWarper(m, min_tokens_to_keep=keep))
    if typical:
        procs.append(lp.TypicalLogitsWarper(typical, min_tokens_to_keep=keep))
    if eps:
        procs.append(lp.EpsilonLogitsWarper(eps, min_tokens_to_keep=keep))
    if eta:
        procs.append(lp.EtaLogitsWarper(eta, min_tokens_to_keep=keep))
    return lp.LogitsProcessorList(procs)


@pytest.mark.parametrize("settings", [
    (0.7, 3, None, None, None, None, None, 5), (1.0, None, 0.3, None, None, None, None, 4),
    (1.3, None, None, 0.6, None, None, None, 3), (0.9, 8, 0.6, 0.2, None, None, None, 6),
    (1.0, None, None, None, 0.4, None, None, 1), (0.8, None, None, None, 0.9, None, None, 3),
    (1.0, None, None, None, None, 0.02, None, 1), (1.0, None, None, None, None, 0.05, None, 4),
    (1.0, None, None, None, None, None, 0.02, 1), (1.2, None, None, None, None, None, 0.3, 2),
    (0.9, 20, 0.9, 0.05, 0.7, 0.01, 0.01, 2)])
def test_warpers_drop_what_transformers_drops(settings):
    """Each warper alone and all chained, with min_tokens_to_keep 1 (sampling) and more (beam sampling): the same
    tokens dropped and the same values kept as transformers' LogitsProcessorList."""
    T, k, p, m, typical, eps, eta, keep = settings
    scores = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * 3
    scores[0, :40] = -30.0  # a peaked row: the entropy-based warpers keep few tokens
    want = _transformers_warpers(T, k, p, m, typical, eps, eta, keep)(None, scores.clone()).numpy()
    cutoffs = (typical, eps, eta) if (typical or eps or eta) else None
    got_t = warp(scores.clone(), T, k, p, m, min_keep=keep, cutoffs=cutoffs).numpy()
    got_j = np.asarray(_filter_logits(jnp.asarray(scores.numpy()), T, k, p, m, min_keep=keep, neg=-jnp.inf,
                                      cutoffs=cutoffs))
    for name, got in (("torch", got_t), ("jax", got_j)):
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=name)
        np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6, err_msg=name)
    assert np.isinf(want).any() and (~np.isinf(want)).sum(-1).min() >= keep


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_hf(make_hf_model(), tmp_path_factory.mktemp("warp") / "m")


def test_typical_and_cutoff_sampling_as_transformers(model_dir, tmp_path, capsys):
    """typical_p / epsilon_cutoff / eta_cutoff (call, generation_config.json, command line) were refused or warned
    about and ignored: doge_torch now samples transformers' very tokens from one torch seed, doge_jax samples from
    the same filtered distribution (only tokens the filter keeps: checked with a cutoff that keeps one token)."""
    import transformers

    ref = transformers.DogeForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    tm = doge_torch.DogeForCausalLM.from_pretrained(model_dir).eval()
    jm = DogeForCausalLM.from_pretrained(model_dir)
    ids = np.random.default_rng(0).integers(0, 128, (2, 7))
    t_ids = torch.as_tensor(ids)
    for kw in (dict(typical_p=0.5), dict(epsilon_cutoff=0.02, top_k=0), dict(eta_cutoff=0.01, temperature=0.8),
               dict(typical_p=0.8, eta_cutoff=0.003, top_p=0.9)):
        torch.manual_seed(1)
        with torch.no_grad():
            want = ref.generate(t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=12, do_sample=True,
                                **kw).numpy()
        torch.manual_seed(1)
        np.testing.assert_array_equal(tm.generate(t_ids, max_new_tokens=12, do_sample=True, **kw).numpy(), want,
                                      err_msg=str(kw))
        torch.manual_seed(1)
        plain = tm.generate(t_ids, max_new_tokens=12, do_sample=True).numpy()
        assert not np.array_equal(plain, want), kw  # (the warper changed the draw)
        assert np.asarray(jm.generate(ids, max_new_tokens=12, do_sample=True, **kw)).shape == (2, 19)
    # a cutoff keeping only the most likely token: sampling is greedy decoding (both packages)
    greedy = np.asarray(jm.generate(ids, max_new_tokens=12))
    for kw in (dict(epsilon_cutoff=0.999),):
        np.testing.assert_array_equal(np.asarray(jm.generate(ids, max_new_tokens=12, do_sample=True, **kw)), greedy)
        np.testing.assert_array_equal(np.asarray(jm.generate(ids, max_new_tokens=12, do_sample=True, use_cache=False,
                                                             **kw)), greedy)
        np.testing.assert_array_equal(tm.generate(t_ids, max_new_tokens=12, do_sample=True, **kw).numpy(), greedy)
    # from generation_config.json, no warning; saved back
    import shutil

    d = str(tmp_path / "m")
    shutil.copytree(model_dir, d)
    gen = {"do_sample": True, "typical_p": 0.5, "epsilon_cutoff": 0.001, "eta_cutoff": 0.002}
    json.dump(gen, open(f"{d}/generation_config.json", "w"))
    ref = transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    tm = doge_torch.DogeForCausalLM.from_pretrained(d).eval()
    torch.manual_seed(2)
    with torch.no_grad():
        want = ref.generate(t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=8).numpy()
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(tm.generate(t_ids, max_new_tokens=8).numpy(), want)
        DogeForCausalLM.from_pretrained(d).generate(ids, max_new_tokens=3)
    tm.save_pretrained(str(tmp_path / "saved"))
    assert json.load(open(tmp_path / "saved" / "generation_config.json")) == gen
    # errors named; the command line
    for m, conv in ((tm, torch.as_tensor), (jm, np.asarray)):
        with pytest.raises(ValueError, match=r"typical_p=0.0: must be in \(0, 1\]"):
            m.generate(conv(ids), max_new_tokens=2, do_sample=True, typical_p=0.0)
        with pytest.raises(ValueError, match="eta_cutoff='x': must be a number"):
            m.generate(conv(ids), max_new_tokens=2, do_sample=True, eta_cutoff="x")
    args = ["--model", model_dir, "--prompt-ids", "5", "6", "7", "--max-new-tokens", "4", "--do-sample"]
    assert main([*args, "--epsilon-cutoff", "0.999"]) == 0
    greedy3 = np.asarray(jm.generate(np.array([[5, 6, 7]]), max_new_tokens=4))[0, 3:]
    assert capsys.readouterr().out.split("|")[1].split() == [str(t) for t in greedy3]
    json.dump({"do_sample": True, "eta_cutoff": 0.001, "typical_p": 0.5}, open(f"{d}/generation_config.json", "w"))
    assert main(["--model", d, "--prompt-ids", "5", "6", "7", "--max-new-tokens", "4"]) == 0
    assert "note: sampling, as the model's generation_config.json says (temperature 1.0, top_k 50, top_p None, " \
           "typical_p 0.5, eta_cutoff 0.001)" in capsys.readouterr().err
