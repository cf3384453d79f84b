"""Beam search and num_return_sequences: transformers' very sequences from doge_torch (dynamic, static and no
cache) and doge_jax (compiled cached loop, and the recompute path), on tie-free random models."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import TINY_MOE, make_hf_model, save_hf

import doge_torch
from doge_jax.model import DogeForCausalLM

EOS = [5, 9, 17, 33, 77]  # several EOS ids: beams end at different lengths (the fill shows)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import transformers

    out = {}
    for name, kw in (("dense", {}), ("expiry", dict(keep_window_size=8)), ("moe", TINY_MOE)):
        d = save_hf(make_hf_model(**kw), tmp_path_factory.mktemp("beam") / name)
        out[name] = (d, transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval(),
                     doge_torch.DogeForCausalLM.from_pretrained(d).eval(), DogeForCausalLM.from_pretrained(d))
    return out


def _prompts(B=3, P=9):
    ids = np.random.default_rng(0).integers(0, 128, (B, P))
    mask = np.ones((B, P), np.int64)
    mask[1, :3] = 0  # a left-padded row
    return ids, mask


CASES = [  # (model, max_new_tokens, generate arguments)
    ("dense", 12, dict(num_beams=4, num_return_sequences=3, eos_token_id=EOS)),
    ("dense", 12, dict(num_beams=3, length_penalty=0.7, early_stopping=True, eos_token_id=EOS, pad_token_id=0)),
    ("dense", 9, dict(num_beams=4, early_stopping="never", length_penalty=2.0, num_return_sequences=4,
                      eos_token_id=EOS)),
    ("dense", 10, dict(num_beams=3, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=4,
                       eos_token_id=EOS)),
    ("dense", 1, dict(num_beams=2)),
    ("dense", 10, dict(num_beams=3, eos_token_id=[200, *EOS])),  # fill: the first EOS id, out of the vocabulary
    ("dense", 10, dict(num_beams=3, eos_token_id=EOS, pad_token_id=-1)),  # a fill id only: any integer
    ("expiry", 12, dict(num_beams=4, num_return_sequences=3, eos_token_id=EOS)),
    ("expiry", 12, dict(num_beams=3, length_penalty=-10.0, eos_token_id=EOS)),  # scores under the -1e9 sentinel
    ("moe1", 8, dict(num_beams=4, num_return_sequences=4)),
    ("moe", 8, dict(num_beams=3, num_return_sequences=2, eos_token_id=EOS)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_beam_search_equals_transformers(models, case):
    """length_penalty (fractional too: the float64 power rounded once, as transformers divides), early_stopping
    True / False / "never", several EOS ids (beams end at different lengths; pad id 0 fills with the first EOS, as
    transformers does), the logits processors on log-probabilities, left padding, a CDMoE model; no cache gives the
    same. Where transformers' torch.topk orders ties as it happens to, doge_torch's and doge_jax's paths (lower
    index wins) must agree with each other: past keep_window (cache rows reordered with their keep-window counters)
    the beams repeat tokens, whose layer-0 dt tie; a length_penalty that sinks finished scores to the -1e9 sentinel
    ties them there; a one-row MoE prompt's beams are identical rows, whose CDMoE router scores tie (transformers
    pairs them in its [2, N, K] reshape, spec §3.8)."""
    name, new, kw = CASES[case]
    _, ref, tm, jm = models["moe" if name == "moe1" else name]
    ids, mask = _prompts() if name != "moe1" else (_prompts()[0][:1], _prompts()[1][:1])
    with torch.no_grad():
        if name in ("expiry", "moe1") or kw.get("length_penalty", 1) < -5:
            want = tm.generate(torch.as_tensor(ids), torch.as_tensor(mask), max_new_tokens=new, **kw).numpy()
        else:
            want = ref.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=new,
                                do_sample=False, **kw).numpy()
    n = kw.get("num_return_sequences", 1)
    assert want.shape[0] == len(ids) * n and len({tuple(r) for r in want}) > 1
    t_ids, t_mask = torch.as_tensor(ids), torch.as_tensor(mask)
    got = {"torch": tm.generate(t_ids, t_mask, max_new_tokens=new, **kw).numpy(),
           "torch no cache": tm.generate(t_ids, t_mask, max_new_tokens=new, use_cache=False, **kw).numpy(),
           "jax": np.asarray(jm.generate(ids, mask, max_new_tokens=new, **kw)),
           "jax no cache": np.asarray(jm.generate(ids, mask, max_new_tokens=new, use_cache=False, **kw))}
    if case == 0:
        got["torch static"] = tm.generate(t_ids, t_mask, max_new_tokens=new, cache_implementation="static",
                                          **kw).numpy()
    if name == "moe1":  # (a CDMoE model's cached decoding is not its full-sequence forward, spec §3.8: the tied
        # one-row beams part there; each way, the two packages agree)
        np.testing.assert_array_equal(got.pop("jax no cache"), got.pop("torch no cache"))
    for which, out in got.items():
        np.testing.assert_array_equal(out, want, err_msg=which)


def test_beam_search_differs_from_greedy_and_ends_early(models):
    """The search is not greedy decoding in disguise: some row's best beam differs from the greedy row, and with
    EOS ids some returned sequences end early (filled after EOS) while the output is as long as the longest."""
    _, ref, tm, jm = models["dense"]
    ids, mask = _prompts()
    greedy = np.asarray(jm.generate(ids, mask, max_new_tokens=12))
    beams = np.asarray(jm.generate(ids, mask, max_new_tokens=12, num_beams=4, num_return_sequences=4,
                                   eos_token_id=EOS, pad_token_id=3))
    assert not np.array_equal(beams[::4, :greedy.shape[1]], greedy)
    new = beams[:, 9:]
    ended = [r for r in new if np.isin(r, EOS).any()]
    assert ended and any((r[list(np.isin(r, EOS)).index(True) + 1:] == 3).all() and r[-1] == 3 for r in ended)


def test_num_return_sequences_when_sampling(models):
    """Sampling with num_return_sequences n repeats each row n times, as transformers: doge_torch draws its very
    tokens from the same torch seed; doge_jax returns n different samples per row."""
    _, ref, tm, jm = models["dense"]
    ids, mask = _prompts()
    kw = dict(max_new_tokens=8, do_sample=True, top_k=0, num_return_sequences=3)
    torch.manual_seed(7)
    with torch.no_grad():
        want = ref.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), **kw).numpy()
    torch.manual_seed(7)
    np.testing.assert_array_equal(tm.generate(torch.as_tensor(ids), torch.as_tensor(mask), **kw).numpy(), want)
    out = np.asarray(jm.generate(ids, mask, seed=1, **kw))
    assert out.shape == (9, 17)
    np.testing.assert_array_equal(out[:, :9], np.repeat(ids, 3, axis=0))
    assert len({tuple(r) for r in out[:3, 9:]}) == 3


def test_beam_settings_of_generation_config_json_and_errors(models, tmp_path):
    """num_beams / num_return_sequences / length_penalty / early_stopping from generation_config.json (or a call's
    generation_config) are used as transformers uses them (they were warned about and ignored) and written back;
    what transformers refuses is refused, named."""
    import transformers

    d = str(tmp_path / "m")
    shutil.copytree(models["dense"][0], d)
    ids, mask = _prompts()
    gen = {"num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.5, "early_stopping": True,
           "eos_token_id": EOS}
    json.dump(gen, open(f"{d}/generation_config.json", "w"))
    ref = transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    with torch.no_grad():
        want = ref.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=10).numpy()
    assert want.shape[0] == 6
    for name, cls, conv in (("jax", DogeForCausalLM, np.asarray),
                            ("torch", doge_torch.DogeForCausalLM, torch.as_tensor)):
        m = cls.from_pretrained(d)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing "ignored" any more
            np.testing.assert_array_equal(np.asarray(m.generate(conv(ids), conv(mask), max_new_tokens=10)), want,
                                          err_msg=name)
        m.save_pretrained(str(tmp_path / name))
        assert json.load(open(tmp_path / name / "generation_config.json")) == gen, name
        # a call's generation_config (transformers' GenerationConfig) overrides the file's settings
        one = m.generate(conv(ids), conv(mask), max_new_tokens=4,
                         generation_config=transformers.GenerationConfig(num_beams=2, num_return_sequences=1))
        assert np.asarray(one).shape[0] == 3, name
        for kw, msg in ((dict(num_beams=2, num_return_sequences=3), r"num_return_sequences=3 > num_beams=2"),
                        (dict(num_beams=1, num_return_sequences=2), "greedy search returns one sequence"),
                        (dict(num_beams=0), "num_beams=0: must be an integer >= 1"),
                        (dict(early_stopping="always"), "early_stopping='always': must be True, False or "
                                                        "'never'"),
                        (dict(length_penalty="long"), "length_penalty='long': must be a number"),
                        (dict(streamer=transformers.TextStreamer(None)), "streamer cannot be used with beam"),
                        (dict(num_beams=2, eos_token_id=list(range(200))),
                         "keeps 201 candidates per beam each step, more than the vocabulary's 128 tokens")):
            with pytest.raises(ValueError, match=msg):
                m.generate(conv(ids), conv(mask), max_new_tokens=3, **kw)
    with pytest.raises(ValueError, match="on_token cannot be used with beam search"):
        DogeForCausalLM.from_pretrained(d).generate(ids, mask, max_new_tokens=3, on_token=print)
    json.dump({"early_stopping": "soon"}, open(f"{d}/generation_config.json", "w"))
    from doge_jax.config import ConfigError

    with pytest.raises(ConfigError, match="early_stopping='soon': must be true, false or \"never\""):
        DogeForCausalLM.from_pretrained(d)


def test_command_line_beam_search_and_several_samples(models, capsys):
    """`python -m doge_jax.generate --num-beams 4 --num-return-sequences 2` prints transformers' two best beams,
    each up to its EOS; several samples are printed too (not streamed); bad values are named."""
    from doge_jax.generate import main

    d, ref, _, _ = models["dense"]
    prompt = [5, 6, 7, 8, 9]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                            max_new_tokens=10, do_sample=False, num_beams=4, num_return_sequences=2,
                            length_penalty=0.5, eos_token_id=EOS).numpy()
    args = ["--model", d, "--prompt-ids", *map(str, prompt), "--max-new-tokens", "10"]
    # (--no-eos: the file has no EOS; the beams' EOS ids come from a generation config written for the test)
    gen = json.load(open(f"{d}/generation_config.json"))
    json.dump({**gen, "eos_token_id": EOS}, open(f"{d}/generation_config.json", "w"))
    try:
        assert main([*args, "--num-beams", "4", "--num-return-sequences", "2", "--length-penalty", "0.5"]) == 0
    finally:
        json.dump(gen, open(f"{d}/generation_config.json", "w"))
    captured = capsys.readouterr()
    lines = captured.out.split("\n")[:2]
    for line, row in zip(lines, want):
        new = [int(t) for t in row[5:]]
        end = next((i + 1 for i, t in enumerate(new) if t in EOS), len(new))
        assert line == "5 6 7 8 9 | " + " ".join(map(str, new[:end]))
    assert "beam search, 4 beams: 2 sequence(s)" in captured.err
    assert main([*args, "--do-sample", "--num-return-sequences", "3", "--seed", "3"]) == 0
    rows = capsys.readouterr().out.split("\n")[:3]
    assert len(set(rows)) == 3 and all(r.startswith("5 6 7 8 9 | ") for r in rows)
    for flags, msg in ((["--num-beams", "2", "--num-return-sequences", "3"], "num_return_sequences=3 > num_beams=2"),
                       (["--early-stopping", "soon"], "invalid choice: 'soon'"),
                       (["--do-sample", "--typical-p", "0"], "typical_p=0.0: must be in (0, 1]")):
        with pytest.raises(SystemExit) as exit_info:  # the flags' own values: a usage error before the model loads
            main([*args, *flags])
        assert exit_info.value.code == 2 and msg in capsys.readouterr().err, flags


def test_beam_sampling(models):
    """do_sample with num_beams (beam sampling): doge_torch draws transformers' very sequences from the same torch
    seed (the warpers on log-probabilities keeping 1 + number of EOS ids tokens, candidates drawn without
    replacement); doge_jax's cached loop equals its recompute path for one seed, and at a tiny temperature gives
    beam search's sequences (its Gumbel draws follow the scores; torch.multinomial, transformers' too, draws the
    zero-probability rest in index order there)."""
    _, ref, tm, jm = models["dense"]
    ids, mask = _prompts()
    t_ids, t_mask = torch.as_tensor(ids), torch.as_tensor(mask)
    for kw in (dict(num_beams=4, num_return_sequences=2, top_k=3, temperature=0.7, eos_token_id=EOS),
               dict(num_beams=3, top_p=0.5, min_p=0.3, top_k=0, eos_token_id=EOS)):
        torch.manual_seed(3)
        with torch.no_grad():
            want = ref.generate(t_ids, attention_mask=t_mask, max_new_tokens=10, do_sample=True, **kw).numpy()
        for cache in (True, False):
            torch.manual_seed(3)
            got = tm.generate(t_ids, t_mask, max_new_tokens=10, do_sample=True, use_cache=cache, **kw).numpy()
            np.testing.assert_array_equal(got, want, err_msg=f"{kw} use_cache={cache}")
        runs = [np.asarray(jm.generate(ids, mask, max_new_tokens=10, do_sample=True, seed=s, use_cache=c, **kw))
                for s, c in ((5, True), (5, False), (6, True))]
        np.testing.assert_array_equal(runs[0], runs[1])
        assert runs[0].shape[0] == 3 * kw.get("num_return_sequences", 1)
    kw = dict(num_beams=3, num_return_sequences=3, eos_token_id=EOS, max_new_tokens=10)
    beams = np.asarray(jm.generate(ids, mask, **kw))
    np.testing.assert_array_equal(np.asarray(jm.generate(ids, mask, do_sample=True, temperature=1e-4, top_k=0,
                                                         **kw)), beams)



def test_one_compiled_search_serves_every_num_return_sequences(models, monkeypatch):
    """num_return_sequences only picks the returned rows: doge_jax's compiled search is not traced again for
    another value (it recompiled the whole loop)."""
    import doge_jax.beam as beam

    _, _, _, jm = models["dense"]
    ids, mask = _prompts()
    traces, real = [], beam.beam_update
    monkeypatch.setattr(beam, "beam_update", lambda *a, **k: traces.append(1) or real(*a, **k))
    one = np.asarray(jm.generate(ids, mask, max_new_tokens=11, num_beams=3, eos_token_id=EOS))
    first = len(traces)
    three = np.asarray(jm.generate(ids, mask, max_new_tokens=11, num_beams=3, num_return_sequences=3,
                                   eos_token_id=EOS))
    assert first > 0 and len(traces) == first
    np.testing.assert_array_equal(three[::3, :one.shape[1]], one)


def test_command_line_takes_beams_from_generation_config_json(models, tmp_path, capsys):
    """A generation_config.json with num_beams 3 (or num_return_sequences 2 with sampling): the command line runs
    the search and prints the sequences (the token stream cannot carry beams: it crashed)."""
    from doge_jax.generate import main

    d = str(tmp_path / "m")
    shutil.copytree(models["dense"][0], d)
    args = ["--model", d, "--prompt-ids", "5", "6", "7", "--max-new-tokens", "6"]
    for gen, rows in (({"num_beams": 3, "num_return_sequences": 2}, 2),
                      ({"do_sample": True, "num_return_sequences": 2}, 2), ({"num_beams": 3}, 1)):
        json.dump(gen, open(f"{d}/generation_config.json", "w"))
        assert main(args) == 0, gen
        out = capsys.readouterr().out.strip().split("\n")
        assert len(out) == rows and all(line.startswith("5 6 7 | ") for line in out), (gen, out)
    want = np.asarray(DogeForCausalLM.from_pretrained(d).generate(np.array([[5, 6, 7]]), max_new_tokens=6))
    assert out[0] == "5 6 7 | " + " ".join(map(str, want[0, 3:]))
    # --num-beams 1 decodes greedily also where the file asks for 2 sequences (it failed: greedy returns one), and
    # an error a flag causes does not dump the file (it printed all of generation_config.json)
    json.dump({"num_beams": 3, "num_return_sequences": 2}, open(f"{d}/generation_config.json", "w"))
    assert main([*args, "--num-beams", "1"]) == 0
    greedy = np.asarray(DogeForCausalLM.from_pretrained(d).generate(np.array([[5, 6, 7]]), max_new_tokens=6,
                                                                    num_beams=1, num_return_sequences=1))
    assert capsys.readouterr().out.strip() == "5 6 7 | " + " ".join(map(str, greedy[0, 3:]))
    json.dump({"num_return_sequences": 2}, open(f"{d}/generation_config.json", "w"))
    assert main(args) == 2  # the file's own bad setting: the file named, with that setting only
    err = capsys.readouterr().err
    assert "num_return_sequences=2: greedy search" in err and "the model generation_config.json sets " \
        "{'num_return_sequences': 2}" in err, err
    json.dump({}, open(f"{d}/generation_config.json", "w"))
    assert main([*args, "--num-return-sequences", "2"]) == 2
    err = capsys.readouterr().err
    assert "num_return_sequences=2: greedy search" in err and "generation_config.json" not in err, err


def test_command_line_ctrl_c_during_beam_search_and_the_files_beams_overridden(models, tmp_path):
    """Ctrl-C during a long beam search ends the command line at once (exit 130; the compiled search cannot see
    the signal: it ran to the end), and `--num-beams 1` streams greedily where generation_config.json sets beams
    (it crashed: the stream's callback met the file's num_beams)."""
    import signal
    import subprocess
    import sys
    import time

    d = str(tmp_path / "m")
    shutil.copytree(models["dense"][0], d)
    json.dump({"num_beams": 4}, open(f"{d}/generation_config.json", "w"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [sys.executable, "-m", "doge_jax.generate", "--model", d, "--prompt-ids", "3", "4"]
    done = subprocess.run([*args, "--max-new-tokens", "5", "--num-beams", "1"], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and len(done.stdout.split("|")[1].split()) == 5, done.stderr[-2000:]
    proc = subprocess.Popen([*args, "--max-new-tokens", "100000", "--no-eos"], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:  # (a failed check must not leave a 100000-token search running)
        line = ""
        while "beam search, 4 beams" not in line:  # the beam-search note: the search starts
            line = proc.stderr.readline()
            assert line, "no beam-search note"
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        t0 = time.perf_counter()
        err = proc.communicate(timeout=120)[1]
        assert proc.returncode == 130 and time.perf_counter() - t0 < 20, err[-2000:]
        assert err.rstrip().endswith("interrupted") and "Traceback" not in err, err[-2000:]
    finally:
        proc.kill()
        proc.wait()
