"""generate(return_dict_in_generate=True, output_scores=..., output_logits=...): transformers' GenerateOutput
fields (sequences, scores, logits; beam search: sequences_scores, beam_indices) from both packages."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_hf_model, save_hf

import doge_torch
from doge_jax.model import DogeForCausalLM

EOS = [5, 9, 17, 33, 77]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import transformers

    d = save_hf(make_hf_model(), tmp_path_factory.mktemp("out") / "m")
    return (d, transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval(),
            doge_torch.DogeForCausalLM.from_pretrained(d).eval(), DogeForCausalLM.from_pretrained(d))


def _same(got, want, name):
    """Fields equal (ids, beam indices) or close (scores, logits: -inf where transformers has it)."""
    assert list(got.keys()) == [k for k in want.keys() if k != "past_key_values"], name
    np.testing.assert_array_equal(np.asarray(got.sequences), want.sequences.numpy(), err_msg=name)
    for k in ("scores", "logits"):
        if getattr(want, k, None) is None:
            continue
        assert len(getattr(got, k)) == len(getattr(want, k)), (name, k)
        for a, b in zip(getattr(got, k), getattr(want, k)):
            a, b = np.asarray(a), b.numpy()
            np.testing.assert_array_equal(np.isinf(a), np.isinf(b), err_msg=f"{name} {k}")
            np.testing.assert_allclose(a[~np.isinf(a)], b[~np.isinf(b)], atol=2e-5, err_msg=f"{name} {k}")
    if getattr(want, "beam_indices", None) is not None:
        np.testing.assert_array_equal(np.asarray(got.beam_indices), want.beam_indices.numpy(), err_msg=name)
    if getattr(want, "sequences_scores", None) is not None:
        np.testing.assert_allclose(np.asarray(got.sequences_scores), want.sequences_scores.numpy(), atol=2e-5,
                                   err_msg=name)


@pytest.mark.parametrize("kw", [
    dict(output_scores=True, output_logits=True),
    dict(output_scores=True, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3, eos_token_id=EOS),
    dict(output_scores=True, output_logits=True, num_beams=3, num_return_sequences=2, eos_token_id=EOS),
    dict(output_logits=True, num_beams=4, length_penalty=0.5, eos_token_id=EOS),
    dict(output_scores=True, do_sample=True, top_k=5, temperature=0.8, typical_p=0.9),
    dict(output_scores=True, do_sample=True, num_beams=3, eos_token_id=EOS),
], ids=["greedy", "processors", "beams", "beam-logits", "sampled", "beam-sampled"])
def test_generate_output_fields_as_transformers(models, kw):
    """Each step's processed scores (greedy: after the processors; sampled: after the warpers too, dropped tokens at
    -inf; beam search: the log-probabilities) and raw logits, the final beam scores and beam indices: transformers'
    in doge_torch (sampled: from one torch seed) and, where it decodes the same tokens (not sampled), in doge_jax,
    cached and not; `compute_transition_scores` takes ours. Without return_dict_in_generate, only the ids."""
    _, ref, tm, jm = models
    ids = np.random.default_rng(0).integers(0, 128, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, :3] = 0
    t_ids, t_mask = torch.as_tensor(ids), torch.as_tensor(mask)
    torch.manual_seed(0)
    with torch.no_grad():
        want = ref.generate(t_ids, attention_mask=t_mask, max_new_tokens=8, return_dict_in_generate=True,
                            **{"do_sample": False, **kw})
    torch.manual_seed(0)
    _same(tm.generate(t_ids, t_mask, max_new_tokens=8, return_dict_in_generate=True, **kw), want, "torch")
    if not kw.get("do_sample"):
        for cache in (True, False):
            _same(jm.generate(ids, mask, max_new_tokens=8, return_dict_in_generate=True, use_cache=cache, **kw),
                  want, f"jax use_cache={cache}")
    else:  # doge_jax samples with its own generator: the recorded scores keep the drawn tokens, are -inf elsewhere
        out = jm.generate(ids, mask, max_new_tokens=8, return_dict_in_generate=True, **kw)
        assert len(out.scores) == out.sequences.shape[1] - 9
        if "num_beams" not in kw:
            for i, s in enumerate(out.scores):
                assert np.isfinite(s[np.arange(3), out.sequences[:, 9 + i]]).all() and np.isinf(s).any()
    if kw.get("output_scores"):  # transformers' compute_transition_scores, and the models' own
        torch.manual_seed(0)
        ours = tm.generate(t_ids, t_mask, max_new_tokens=8, return_dict_in_generate=True, **kw)
        beams = ours.beam_indices if "num_beams" in kw else None
        for norm in (False, True):
            expected = ref.compute_transition_scores(want.sequences, want.scores, getattr(want, "beam_indices", None),
                                                     normalize_logits=norm).numpy()
            np.testing.assert_allclose(ref.compute_transition_scores(ours.sequences, ours.scores, beams,
                                                                     normalize_logits=norm).numpy(), expected,
                                       atol=2e-5)
            got = tm.compute_transition_scores(ours.sequences, ours.scores, beams, normalize_logits=norm)
            assert isinstance(got, torch.Tensor)
            np.testing.assert_allclose(got.numpy(), expected, atol=2e-5)
            if not kw.get("do_sample"):
                j = jm.generate(ids, mask, max_new_tokens=8, return_dict_in_generate=True, **kw)
                np.testing.assert_allclose(jm.compute_transition_scores(j.sequences, j.scores, j.beam_indices,
                                                                        normalize_logits=norm), expected, atol=2e-5)
    plain = np.asarray(jm.generate(ids, mask, max_new_tokens=8, **{k: v for k, v in kw.items()
                                                                   if not k.startswith("output_")}))
    assert isinstance(plain, np.ndarray)


def test_return_dict_from_generation_config_json(models, tmp_path):
    """return_dict_in_generate / output_scores from generation_config.json (as transformers) and a call's False
    over them; written back by save_pretrained; output_hidden_states is still refused, named."""
    d = str(tmp_path / "m")
    shutil.copytree(models[0], d)
    gen = {"return_dict_in_generate": True, "output_scores": True}
    json.dump(gen, open(f"{d}/generation_config.json", "w"))
    ids = np.array([[5, 6, 7, 8]])
    for m, conv in ((DogeForCausalLM.from_pretrained(d), np.asarray),
                    (doge_torch.DogeForCausalLM.from_pretrained(d), torch.as_tensor)):
        out = m.generate(conv(ids), max_new_tokens=3)
        assert list(out.keys()) == ["sequences", "scores"] and len(out.scores) == 3
        assert out.get("scores") is out.scores and out.get("logits") is None and out.get("logits", 1) == 1
        assert np.asarray(m.generate(conv(ids), max_new_tokens=3, return_dict_in_generate=False)).shape == (1, 7)
        m.save_pretrained(str(tmp_path / "saved"))
        assert json.load(open(tmp_path / "saved" / "generation_config.json")) == gen
        with pytest.raises(ValueError, match="output_hidden_states=True: not supported"):
            m.generate(conv(ids), max_new_tokens=3, output_hidden_states=True)
    json.dump({"output_scores": "yes"}, open(f"{d}/generation_config.json", "w"))
    from doge_jax.config import ConfigError

    with pytest.raises(ConfigError, match="output_scores='yes': must be true or false"):
        DogeForCausalLM.from_pretrained(d)
