"""transformers' remaining logits processors in both packages: sequence_bias, bad_words_ids (one token and sequences),
suppress_tokens, begin_suppress_tokens, forced_bos_token_id, forced_eos_token_id, exponential_decay_length_penalty,
remove_invalid_values: transformers' very tokens, as generate arguments and from generation_config.json."""

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

    d = save_hf(make_hf_model(), tmp_path_factory.mktemp("proc") / "m")
    return (d, transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval(),
            doge_torch.DogeForCausalLM.from_pretrained(d).eval(), DogeForCausalLM.from_pretrained(d))


CASES = [
    dict(bad_words_ids=[[50], [24, 85], [81, 65, 34, 39], [5]], eos_token_id=5),  # [5]: an EOS, not banned
    dict(suppress_tokens=[50, 35, 85], begin_suppress_tokens=[88, 122]),
    dict(forced_eos_token_id=[7, 8], eos_token_id=[7, 8], repetition_penalty=1.3),
    dict(exponential_decay_length_penalty=(2, 1.7), eos_token_id=EOS),
    dict(remove_invalid_values=True, min_new_tokens=4, eos_token_id=EOS, no_repeat_ngram_size=2),
    dict(bad_words_ids=[[50], [24, 85]], num_beams=3, eos_token_id=EOS, forced_eos_token_id=5),
    dict(sequence_bias=[[[19], -5.0], [[56], 3.0], [[24, 85], -4.0], [[85, 106], 6.0], [[81, 65, 34], 7.5]]),
    dict(sequence_bias={(50,): -10.0, (3, 27): 2.0}, num_beams=3, eos_token_id=EOS),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_processors_as_transformers(models, case):
    """Greedy (both packages, cached and not, doge_torch's static cache for one case), sampled from one torch seed
    (doge_torch) and beam search: transformers' tokens; each rule changes the greedy output here."""
    _, ref, tm, jm = models
    kw = CASES[case]
    ids = np.random.default_rng(0).integers(0, 128, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, :3] = 0
    t_ids, t_mask = torch.as_tensor(ids), torch.as_tensor(mask)
    with torch.no_grad():
        plain = ref.generate(t_ids, attention_mask=t_mask, max_new_tokens=10, do_sample=False,
                             eos_token_id=kw.get("eos_token_id")).numpy()
        want = ref.generate(t_ids, attention_mask=t_mask, max_new_tokens=10, do_sample=False, **kw).numpy()
    assert not np.array_equal(want[:, :plain.shape[1]], plain) or want.shape != plain.shape
    got = {"torch": tm.generate(t_ids, t_mask, max_new_tokens=10, **kw).numpy(),
           "torch no cache": tm.generate(t_ids, t_mask, max_new_tokens=10, use_cache=False, **kw).numpy(),
           "jax": np.asarray(jm.generate(ids, mask, max_new_tokens=10, **kw)),
           "jax no cache": np.asarray(jm.generate(ids, mask, max_new_tokens=10, use_cache=False, **kw))}
    if case == 0:
        got["torch static"] = tm.generate(t_ids, t_mask, max_new_tokens=10, cache_implementation="static",
                                          **kw).numpy()
    for name, out in got.items():
        np.testing.assert_array_equal(out, want, err_msg=name)
    if "num_beams" not in kw:
        torch.manual_seed(4)
        with torch.no_grad():
            want = ref.generate(t_ids, attention_mask=t_mask, max_new_tokens=10, do_sample=True, top_k=0,
                                **kw).numpy()
        torch.manual_seed(4)
        np.testing.assert_array_equal(tm.generate(t_ids, t_mask, max_new_tokens=10, do_sample=True, top_k=0,
                                                  **kw).numpy(), want)


def test_forced_bos_and_begin_suppress_on_a_one_token_prompt(models):
    """forced_bos_token_id acts where the row holds one token, and begin_suppress_tokens then moves one step
    later, as transformers; on a longer prompt forced BOS does nothing."""
    _, ref, tm, jm = models
    for prompt in ([[3]], [[3, 4]]):
        p = np.array(prompt)
        with torch.no_grad():
            want = ref.generate(torch.as_tensor(p), attention_mask=torch.ones_like(torch.as_tensor(p)),
                                max_new_tokens=5, do_sample=False, forced_bos_token_id=11,
                                begin_suppress_tokens=[50, 85, 36]).numpy()
        kw = dict(max_new_tokens=5, forced_bos_token_id=11, begin_suppress_tokens=[50, 85, 36])
        np.testing.assert_array_equal(tm.generate(torch.as_tensor(p), **kw).numpy(), want)
        np.testing.assert_array_equal(np.asarray(jm.generate(p, **kw)), want)
        assert (want[0, len(prompt[0])] == 11) == (len(prompt[0]) == 1)


def test_processors_from_generation_config_json(models, tmp_path):
    """The fields read from generation_config.json (no "ignored" warning any more), written back as read; bad ids
    named."""
    import warnings

    import transformers

    d = str(tmp_path / "m")
    shutil.copytree(models[0], d)
    gen = {"bad_words_ids": [[50], [24, 85]], "suppress_tokens": [35], "forced_eos_token_id": 7,
           "exponential_decay_length_penalty": [2, 1.5], "eos_token_id": EOS, "sequence_bias": [[[19], -2.5]]}
    json.dump(gen, open(f"{d}/generation_config.json", "w"))
    ref = transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(0, 128, (3, 9))
    with torch.no_grad():
        want = ref.generate(torch.as_tensor(ids), max_new_tokens=10, do_sample=False).numpy()
    for m, conv in ((DogeForCausalLM.from_pretrained(d), np.asarray),
                    (doge_torch.DogeForCausalLM.from_pretrained(d), torch.as_tensor)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_array_equal(np.asarray(m.generate(conv(ids), max_new_tokens=10)), want)
        m.save_pretrained(str(tmp_path / "saved"))
        assert json.load(open(tmp_path / "saved" / "generation_config.json")) == gen
        for bad, msg in ((dict(bad_words_ids=[5]), "a non-empty list of non-empty lists"),
                         (dict(suppress_tokens=[500]), r"token ids must be integers in \[0, vocab_size=128\)"),
                         (dict(exponential_decay_length_penalty=3), r"\(start_index, decay_factor\)"),
                         (dict(remove_invalid_values="yes"), "must be True or False"),
                         (dict(sequence_bias=[[5, 1.0]]), r"a non-empty list of \[token ids, bias\] pairs"),
                         (dict(sequence_bias=[[[500], 1.0]]), r"token ids must be integers in \[0, vocab_size"),
                         (dict(sequence_bias=[[[5], "x"]]), r"a non-empty list of \[token ids, bias\] pairs")):
            with pytest.raises(ValueError, match=msg):
                m.generate(conv(ids), max_new_tokens=2, **bad)


def test_processor_edge_cases(models, tmp_path, capsys):
    """The review's cases: the EOS bonus with no EOS id in the vocabulary (--no-eos) is a no-op, not a crash; a
    bonus past float32's range is inf, as transformers' cast (not an OverflowError up front); an empty forced-EOS
    list is refused, named; several forced-BOS ids, and ids given as arrays, as transformers; with
    remove_invalid_values the recorded scores hold float32's lowest value where transformers has it; the command
    line with return_dict_in_generate in the file prints the sequences."""
    d, ref, tm, jm = models
    ids = np.random.default_rng(0).integers(0, 128, (2, 6))
    t_ids = torch.as_tensor(ids)
    plain = np.asarray(jm.generate(ids, max_new_tokens=6, eos_token_id=-1))
    for m, conv in ((tm, torch.as_tensor), (jm, np.asarray)):
        np.testing.assert_array_equal(np.asarray(m.generate(conv(ids), max_new_tokens=6, eos_token_id=-1,
                                                            exponential_decay_length_penalty=(1, 1.5))), plain)
        with pytest.raises(ValueError, match=r"forced_eos_token_id=\[\]: a token id or a non-empty list"):
            m.generate(conv(ids), max_new_tokens=2, forced_eos_token_id=[])
    kw = dict(max_new_tokens=40, eos_token_id=[5], exponential_decay_length_penalty=(0, 1e10))
    with torch.no_grad():
        want = ref.generate(t_ids, attention_mask=torch.ones_like(t_ids), do_sample=False, **kw).numpy()
    np.testing.assert_array_equal(tm.generate(t_ids, **kw).numpy(), want)
    np.testing.assert_array_equal(np.asarray(jm.generate(ids, **kw)), want)
    one = np.array([[3]])
    kw = dict(max_new_tokens=4, forced_bos_token_id=[11, 12], suppress_tokens=np.array([36, 44]),
              return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        want = ref.generate(torch.as_tensor(one), attention_mask=torch.ones(1, 1, dtype=torch.long),
                            do_sample=False, **kw)
    for out in (tm.generate(torch.as_tensor(one), **kw), jm.generate(one, **kw)):
        np.testing.assert_array_equal(np.asarray(out.sequences), want.sequences.numpy())
        np.testing.assert_array_equal(np.asarray(out.scores[0]), want.scores[0].numpy())  # 0 at both BOS ids
    kw = dict(max_new_tokens=5, eos_token_id=[5, 9], min_new_tokens=3, remove_invalid_values=True,
              return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        want = ref.generate(t_ids, attention_mask=torch.ones_like(t_ids), do_sample=False, **kw)
    for out in (tm.generate(t_ids, **kw), jm.generate(ids, **kw), jm.generate(ids, use_cache=False, **kw)):
        for a, b in zip(out.scores, want.scores):
            np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=2e-5)  # (finite: float32's lowest at EOS)
    from doge_jax.generate import main

    d2 = str(tmp_path / "m")
    shutil.copytree(d, d2)
    json.dump({"return_dict_in_generate": True, "output_scores": True}, open(f"{d2}/generation_config.json", "w"))
    for flags in (["--num-beams", "2"], ["--do-sample", "--num-return-sequences", "2"], []):
        assert main(["--model", d2, "--prompt-ids", "3", "14", "15", "--max-new-tokens", "4", *flags]) == 0
        assert capsys.readouterr().out.startswith("3 14 15 | ")
