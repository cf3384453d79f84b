"""doge_jax generation: streaming, prompt bucketing, the command line (`python -m doge_jax.generate`), and the
doge_torch sdpa / key-expiry attention path."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_MOE, left_pad_mask, make_hf_model, save_hf, unique_ids
from flax import nnx

from doge_jax.generate import main
from doge_jax.model import DogeForCausalLM


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return save_hf(make_hf_model(), tmp_path_factory.mktemp("gen") / "m")


def test_streamed_tokens_equal_returned(model_dir):
    model = DogeForCausalLM.from_pretrained(model_dir)
    ids = unique_ids(2, 7, 128, seed=3)
    seen = []
    out = model.generate(ids, max_new_tokens=10, on_token=lambda step, toks: seen.append((step, toks.copy())))
    assert [s for s, _ in seen] == list(range(out.shape[1] - 7))
    np.testing.assert_array_equal(np.stack([t for _, t in seen], axis=1), out[:, 7:])
    # prompts of different lengths in one 32-bucket share a compiled program and give their own greedy tokens
    np.testing.assert_array_equal(model.generate(ids[:, 2:], max_new_tokens=10), model.generate(
        ids[:, 2:], max_new_tokens=10, use_cache=False))
    # use_cache=False streams the same tokens (on_token was never called there)
    again = []
    model.generate(ids, max_new_tokens=10, use_cache=False, on_token=lambda step, toks: again.append((step, toks)))
    assert [s for s, _ in again] == [s for s, _ in seen]
    np.testing.assert_array_equal(np.stack([t for _, t in again], axis=1), out[:, 7:])


def test_cli_with_tokenizer(model_dir, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "[UNK] the quick brown fox jumps over lazy dog".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert main(["--model", model_dir, "--tokenizer", str(tmp_path), "--prompt", "the fox",
                 "--max-new-tokens", "6", "--no-eos"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the fox") and captured.out.endswith("\n")  # (it ended mid-line)
    assert "6 new tokens" in captured.err and "tokens/s" in captured.err
    # ids the tokenizer lacks (its 9 words; the model has 128 ids) printed nothing, silently: now a note names them
    ids = DogeForCausalLM.from_pretrained(model_dir).generate(np.array([tok.encode("the fox").ids]), max_new_tokens=6,
                                                              eos_token_id=-1)[0].tolist()
    unknown = sorted({i for i in ids if i >= len(words)})
    assert unknown and f"token id(s) {unknown} are not in the tokenizer's vocabulary (9 tokens" in captured.err


def test_text_stream_equals_decoding_everything():
    """The CLI's streamed text (a sliding window of tokens) is what decoding the whole output gives, for byte-level
    BPE, Metaspace and WordLevel tokenizers, random ids, multi-byte characters, and a run of special tokens that
    decode to nothing (a window of only those dropped the next word's space with a Metaspace decoder)."""
    import io
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from doge_jax.generate import TextStream

    text = "Hello world, the quick brown fox jumps over the lazy dog. Grüße aus Köln! 東京 " * 20
    toks = []
    for pre, dec in ((pre_tokenizers.ByteLevel(), decoders.ByteLevel()),
                     (pre_tokenizers.Metaspace(), decoders.Metaspace())):
        t = Tokenizer(models.BPE())
        t.pre_tokenizer, t.decoder = pre, dec
        t.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"]))
        toks.append(t)
    words = "</s> the quick brown fox".split()
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="the"))
    wl.pre_tokenizer, wl.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    wl.add_special_tokens(["</s>"])
    toks.append(wl)
    rng = random.Random(0)
    for t in toks:
        eos = t.token_to_id("</s>")
        cases = [(t.encode("Hello world").ids, t.encode("Hello").ids + [eos] * 40 + t.encode(" the quick fox").ids),
                 (t.encode(text[:50]).ids, t.encode(text[50:400]).ids)]
        cases += [([rng.randrange(t.get_vocab_size()) for _ in range(5)],
                   [rng.randrange(t.get_vocab_size()) for _ in range(120)]) for _ in range(20)]
        for prompt, new in cases:
            out = io.StringIO()
            stream = TextStream(t, prompt, out)
            for tok in new:
                stream.push(tok)
            stream.finish()
            whole = t.decode(prompt + new)
            base = t.decode(prompt)
            if whole.startswith(base):  # (else the fallback prints the text anew after a newline, both ways)
                assert out.getvalue() == whole[len(base):], (prompt, new)


def _cli_stream(model_dir, **kw):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen([sys.executable, "-m", "doge_jax.generate", "--model", model_dir, "--prompt-ids", "3", "4",
                             "--max-new-tokens", "100000", "--no-eos"], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def test_cli_ctrl_c_stops_the_stream_at_once(model_dir):
    """Ctrl-C while the compiled decode loop streams: Python runs its handler only between the main thread's
    bytecodes, so every token was still made (8000: ~12 s later); the stream's callback now reads the signal from
    a wakeup pipe and ends the loop."""
    import signal
    import time

    proc = _cli_stream(model_dir)
    try:
        proc.stdout.read(40)  # the prompt and the first tokens: the loop runs
        proc.send_signal(signal.SIGINT)
        t0 = time.perf_counter()
        err = proc.communicate(timeout=120)[1].decode()
        assert proc.returncode == 130 and time.perf_counter() - t0 < 30, err[-2000:]
        assert err.rstrip().endswith("interrupted") and "Traceback" not in err, err[-2000:]
    finally:
        proc.kill()  # (a failed check must not leave a 100000-token stream running)
        proc.wait()


def test_cli_output_closed_by_its_reader_is_quiet(model_dir):
    """`... | head -c 20`: the reader goes away; a quiet exit 141 (SIGPIPE's), not two tracebacks and exit 1."""
    proc = _cli_stream(model_dir)
    try:
        proc.stdout.read(20)
        proc.stdout.close()
        err = proc.communicate(timeout=120)[1].decode()
        assert proc.returncode == 141 and "Traceback" not in err and "Error" not in err, err[-2000:]
    finally:
        proc.kill()
        proc.wait()


def test_cli_prompt_ids_and_missing_tokenizer(model_dir, tmp_path, capsys):
    assert main(["--model", model_dir, "--prompt-ids", "5", "6", "7", "--max-new-tokens", "4", "--no-eos"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("5 6 7 |") and len(out.split("|")[1].split()) == 4
    assert main(["--model", model_dir, "--prompt", "hello"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    # a doge_torch.train run directory without a tokenizer: the wrong --model is what is said (was: no tokenizer)
    (tmp_path / "trun" / "checkpoint-3").mkdir(parents=True)
    assert main(["--model", str(tmp_path / "trun"), "--prompt", "hello"]) == 2
    assert "it is a doge_torch.train run directory" in capsys.readouterr().err


def _word_tokenizer(path, metaspace: bool = False):
    """A WordLevel tokenizer over ids 0..127 ("w0".."w127"); Metaspace = the SentencePiece word-boundary style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"\u2581w{i}" if metaspace else f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="\u2581w0" if metaspace else "w0"))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    else:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return tok


def test_cli_takes_the_files_max_length(model_dir, tmp_path, capsys):
    """Without --max-new-tokens the command line's length is the file's max_new_tokens, else its max_length (prompt
    included, as transformers; it used to be ignored: 128 new tokens), else 128; a max_length not above the prompt
    is an error naming it. Fields generate ignores are a note before the output."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    path = d / "generation_config.json"
    gen = json.load(open(path)) if path.exists() else {}
    json.dump({**gen, "max_length": 10}, open(path, "w"))
    assert main(["--model", str(d), "--prompt-ids", "5", "6", "7", "--no-eos"]) == 0
    assert len(capsys.readouterr().out.split("|")[1].split()) == 7
    assert main(["--model", str(d), "--prompt-ids", "5", "6", "7", "--max-new-tokens", "4", "--no-eos"]) == 0
    assert len(capsys.readouterr().out.split("|")[1].split()) == 4
    json.dump({**gen, "max_length": 10, "max_new_tokens": 5}, open(path, "w"))
    assert main(["--model", str(d), "--prompt-ids", "5", "6", "7", "--no-eos"]) == 0
    assert len(capsys.readouterr().out.split("|")[1].split()) == 5
    json.dump({**gen, "max_length": 3}, open(path, "w"))
    assert main(["--model", str(d), "--prompt-ids", "5", "6", "7", "--no-eos"]) == 2
    assert "max_length=3 (the generation config's): must be an int above the prompt's 3 tokens" in (
        capsys.readouterr().err)
    # a field generate ignores: one note before the output (its warning used to land inside the streamed tokens)
    json.dump({**gen, "diversity_penalty": 0.5}, open(path, "w"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["--model", str(d), "--prompt-ids", "5", "6", "7", "--max-new-tokens", "3", "--no-eos"]) == 0
    got = capsys.readouterr()
    assert len(got.out.split("|")[1].split()) == 3
    assert got.err.startswith("note: the model's generation_config.json sets diversity_penalty=0.5: not implemented")


def test_cli_prompt_ids_with_a_tokenizer_and_metaspace_stream(model_dir, tmp_path, capsys):
    """--prompt-ids next to a tokenizer.json printed the (absent) text prompt and crashed; the streamed text of a
    SentencePiece-style tokenizer lost the space between prompt and continuation."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    tok = _word_tokenizer(d / "tokenizer.json", metaspace=True)
    assert main(["--model", str(d), "--prompt-ids", "5", "6", "7", "--max-new-tokens", "5", "--no-eos"]) == 0
    out = capsys.readouterr().out
    ids = DogeForCausalLM.from_pretrained(str(d)).generate(np.array([[5, 6, 7]]), max_new_tokens=5,
                                                           eos_token_id=-1)[0].tolist()
    assert out.rstrip("\n") == tok.decode(ids) and out.startswith("w5 w6 w7 w")
    assert main(["--model", str(d), "--prompt", "w5 w6 w7", "--max-new-tokens", "5", "--no-eos"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(ids)
    # several texts (which may hold newlines) each after a header line; one alone has none
    assert main(["--model", str(d), "--prompt", "w5 w6 w7", "--max-new-tokens", "5", "--no-eos", "--do-sample",
                 "--num-return-sequences", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "=== 1/2 ===" and lines[2] == "=== 2/2 ===" and len(lines) == 4
    assert lines[1].startswith("w5 w6 w7 w") and lines[3].startswith("w5 w6 w7 w")


def test_tokenizer_of_a_step_directory_only(model_dir, tmp_path, capsys):
    """RUN/checkpoints/N finds RUN's tokenizer; any other model directory never looks two levels up (an unrelated,
    here unreadable, tokenizer.json there broke even --prompt-ids)."""
    import shutil

    from doge_jax.init import find_tokenizer

    (tmp_path / "run" / "checkpoints" / "7").mkdir(parents=True)
    (tmp_path / "run" / "tokenizer.json").write_text("{}")
    assert find_tokenizer(str(tmp_path / "run" / "checkpoints" / "7")) == str(tmp_path / "run")
    (tmp_path / "gp" / "models").mkdir(parents=True)
    shutil.copytree(model_dir, tmp_path / "gp" / "models" / "hf")
    (tmp_path / "gp" / "tokenizer.json").write_text("not json")
    assert find_tokenizer(str(tmp_path / "gp" / "models" / "hf")) is None
    assert main(["--model", str(tmp_path / "gp" / "models" / "hf"), "--prompt-ids", "5", "--max-new-tokens",
                 "2"]) == 0
    assert capsys.readouterr().out.startswith("5 |")


def test_cli_rejects_bad_input_in_one_line(model_dir, tmp_path, capsys):
    """A bad model path, an empty or unfinished run, out-of-range ids: one `error:` line (exit 2), no traceback
    and no usage block; a run's step directory finds the run's tokenizer."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for model, argv, want in ((str(tmp_path / "nope"), ["--prompt", "hi"], "no such file or directory"),
                              (model_dir, ["--prompt", "hi", "--tokenizer", str(tmp_path / "nope.json")],
                               "--tokenizer " + str(tmp_path / "nope.json") + ": no such file or directory"),
                              (str(tmp_path / "empty"), ["--prompt-ids", "5"], f"--model {tmp_path / 'empty'}: "),
                              (str(tmp_path / "run"), ["--prompt-ids", "5"], f"--model {tmp_path / 'run'}: "),
                              (model_dir, ["--prompt-ids", "5", "999"],
                               "prompt ids outside [0, vocab_size=128): [999]"),
                              # an unusable --tokenizer is an error, not silently dropped (before: rc 0, raw ids)
                              (model_dir, ["--prompt-ids", "5", "--tokenizer", str(tmp_path / "empty")],
                               f"--tokenizer {tmp_path / 'empty'}: no tokenizer.json in that directory"),
                              (model_dir, ["--prompt-ids", "5", "--tokenizer", os.path.join(model_dir, "config.json")],
                               "config.json: not a readable tokenizer.json"),
                              # a weight file (before, with --prompt: "no tokenizer.json in .../model.safetensors")
                              (os.path.join(model_dir, "model.safetensors"), ["--prompt", "hi"],
                               "model.safetensors: a file; pass the model's directory")):
        assert main(["--model", model, *argv]) == 2
        err = capsys.readouterr().err
        assert want in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert err.count(model) == 1 or model == model_dir, err  # (was "--model P: P: no config.json")
    assert main(["--model", model_dir, "--prompt-ids", "5", "--max-new-tokens", "64"]) == 0
    assert "> max_position_embeddings" in capsys.readouterr().err


def test_cli_prompt_holding_the_pad_id_is_not_padding(tmp_path, capsys):
    """One command-line prompt is never padded: its pad-id tokens are tokens (before: masked out, with a warning
    about right padding the user never asked for)."""
    import warnings

    d = save_hf(make_hf_model(), tmp_path / "m")
    gen = json.load(open(f"{d}/generation_config.json"))
    json.dump({**gen, "pad_token_id": 2}, open(f"{d}/generation_config.json", "w"))
    model = DogeForCausalLM.from_pretrained(d)
    ids = np.array([[5, 9, 2]])
    want = model.generate(ids, np.ones_like(ids), max_new_tokens=4, eos_token_id=-1)[0, 3:].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["--model", d, "--prompt-ids", "5", "9", "2", "--max-new-tokens", "4", "--no-eos"]) == 0
    assert capsys.readouterr().out.split("|")[1].split() == [str(t) for t in want]


def test_cli_rejects_bad_arguments_cleanly(model_dir, capsys):
    for argv, want in ((["--prompt-ids", "5", "--max-new-tokens", "0"], "max_new_tokens=0: must be an integer >= 1"),
                       (["--prompt-ids", "5", "--do-sample", "--temperature", "0"], "temperature=0.0: must be > 0"),
                       (["--prompt-ids", "5", "--do-sample", "--top-k", "-3"], "top_k=-3"),
                       # (ran with the warper off, silently, where --help says "in (0, 1)")
                       (["--prompt-ids", "5", "--do-sample", "--epsilon-cutoff", "1.5"], "--epsilon-cutoff 1.5: must"),
                       (["--prompt-ids", "5", "--do-sample", "--eta-cutoff", "0"], "--eta-cutoff 0.0: must be in"),
                       (["--prompt-ids", "5", "--do-sample", "--typical-p", "1.5"], "--typical-p 1.5: must be in"),
                       # typed out of range also when greedy (which ignores them): ran, silently
                       (["--prompt-ids", "5", "--top-p", "2"], "top_p=2.0: must be in (0, 1]"),
                       (["--prompt-ids", "5", "--min-p", "3"], "min_p=3.0: must be in [0, 1]"),
                       (["--prompt-ids", "5", "--top-k", "-1"], "top_k=-1: must be an integer >= 0")):
        with pytest.raises(SystemExit) as e:
            main(["--model", model_dir, *argv])
        assert e.value.code == 2 and want in capsys.readouterr().err
    # greedy ignores the temperature, as transformers does, and says which flags it did not use (it was silent)
    assert main(["--model", model_dir, "--prompt-ids", "5", "--temperature", "0", "--top-k", "5", "--length-penalty",
                 "2", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "note: --temperature, --top-k not used: decoding is greedy (--do-sample samples)" in err, err
    assert "note: --length-penalty not used: no beam search" in err, err


def test_cli_out_of_memory_is_one_line(monkeypatch, capsys):
    """An absurd --max-new-tokens (its cache did not fit: 128 GB for 1e9 tokens here) ends in one error line naming
    the flag, exit 1 (it was a JaxRuntimeError traceback); other runtime errors pass through."""
    import jax

    import doge_jax.generate as G

    def oom(argv):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 128000016384 bytes.")

    monkeypatch.setattr(G, "_main", oom)
    assert G.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of device memory (RESOURCE_EXHAUSTED") and "--max-new-tokens" in err, err
    monkeypatch.setattr(G, "_main", lambda argv: (_ for _ in ()).throw(jax.errors.JaxRuntimeError("INTERNAL: x")))
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        G.main([])


def test_generate_input_checks_and_pads(model_dir):
    """Ids are checked before the int32 cast (2**32 + 7 and 7.9 became 7); an out-of-range pad id raises; without a
    valid pad or EOS the prompt padding and finished rows still use a real token (before: NaN logits and id V)."""
    model = DogeForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="outside"):
        model.generate(np.array([[5, 6, 2**32 + 7]], np.int64), max_new_tokens=2)
    with pytest.raises(ValueError, match="integer token ids"):
        model.generate(np.array([[5.0, 6.0, 7.9]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="pad_token_id=500"):
        model.generate(np.array([[5, 6, 7]]), max_new_tokens=2, pad_token_id=500)
    with pytest.raises(ValueError, match=r"expected \[batch, length >= 1\]"):
        model.generate(np.zeros((1, 0), np.int32), max_new_tokens=2)
    ids, mask = unique_ids(2, 5, 128, seed=1), left_pad_mask(2, 5, [0, 2])
    want = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=-1)
    assert want.max() < 128
    # eos -1 (no EOS, as --no-eos) and a config without pad id: the prompt bucket padding is masked anyway
    np.testing.assert_array_equal(want, model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[-1],
                                                       pad_token_id=None))
    # a 1-D prompt with a 1-D mask
    np.testing.assert_array_equal(model.generate(ids[1], attention_mask=mask[1], max_new_tokens=3),
                                  model.generate(ids[1:], attention_mask=mask[1:], max_new_tokens=3))


def test_eos_of_generation_config_json_stops(tmp_path):
    """transformers stops at generation_config.json's EOS; so do both our loaders (before: config.json only)."""

    import doge_torch

    d = save_hf(make_hf_model(), tmp_path / "m")
    model = DogeForCausalLM.from_pretrained(d)
    ids = unique_ids(1, 6, 128, seed=2)
    free = model.generate(ids, max_new_tokens=8, eos_token_id=-1)[0, 6:].tolist()
    eos = free[3]
    gen = json.load(open(f"{d}/generation_config.json"))
    json.dump({**gen, "eos_token_id": eos}, open(f"{d}/generation_config.json", "w"))
    first = free.index(eos)
    got = DogeForCausalLM.from_pretrained(d).generate(ids, max_new_tokens=8)[0, 6:].tolist()
    assert got == free[:first + 1]
    tm = doge_torch.DogeForCausalLM.from_pretrained(d).eval()
    assert tm.generation_config.eos_token_id == eos and tm.config.eos_token_id is None  # config.json's stays
    assert tm.generate(torch.as_tensor(ids), max_new_tokens=8)[0, 6:].tolist() == free[:first + 1]


def test_generation_config_ids_stay_out_of_the_model_config(tmp_path):
    """generation_config.json's ids are generate's, as in transformers; the model keeps config.json's (before, its
    pad id became the model's: the embedding's pad row froze in training and config.json changed on save or
    convert). A generation_config.json without a pad id means none for generate (config.json's is not taken):
    a prompt holding config.json's pad id is attended whole, as by transformers."""

    import transformers

    import doge_torch
    from convert.cli import main as convert_main

    hf = make_hf_model(pad_token_id=3, eos_token_id=1)
    d = save_hf(hf, tmp_path / "m")
    json.dump({"eos_token_id": 1, "pad_token_id": 5}, open(f"{d}/generation_config.json", "w"))
    jm, tm = DogeForCausalLM.from_pretrained(d), doge_torch.DogeForCausalLM.from_pretrained(d)
    for m in (jm, tm):
        assert (m.config.pad_token_id, m.generation_config.pad_token_id) == (3, 5)
    assert tm.model.embed_tokens.padding_idx == 3
    from doge_jax.config import GenerationConfig

    g = GenerationConfig(eos_token_id=[5, 6])  # as transformers writes them: a tuple (a static, hashed attribute)
    assert g.eos_token_id == (5, 6) and hash(g) == hash(GenerationConfig(eos_token_id=(5, 6)))
    tm.train()
    ids = torch.tensor([[5, 9, 5, 3, 11]])
    tm(ids, labels=ids).loss.backward()
    grad = tm.model.embed_tokens.weight.grad
    assert grad[5].abs().sum() > 0 and grad[3].abs().sum() == 0  # as transformers: padding_idx is config.json's
    for name, m in (("jax", jm), ("torch", tm)):
        m.save_pretrained(str(tmp_path / name))
        assert json.load(open(tmp_path / name / "config.json"))["pad_token_id"] == 3
        assert json.load(open(tmp_path / name / "generation_config.json"))["pad_token_id"] == 5
    assert convert_main([d, str(tmp_path / "conv"), "--to", "jax"]) in (0, None)
    assert json.load(open(tmp_path / "conv" / "config.json"))["pad_token_id"] == 3
    back = DogeForCausalLM.from_pretrained(str(tmp_path / "conv"))  # an orbax checkpoint: the same two ids
    assert (back.config.pad_token_id, back.generation_config.pad_token_id) == (3, 5)
    # no pad id in generation_config.json: none for generate, whatever config.json says
    json.dump({"eos_token_id": 1}, open(f"{d}/generation_config.json", "w"))
    ids = unique_ids(1, 7, 128, seed=8)
    ids[ids < 4] = 90
    ids[0, :2] = 3  # config.json's pad id, leading
    ref = transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    with torch.no_grad():
        want = ref.generate(torch.as_tensor(ids), do_sample=False, max_new_tokens=4).numpy()
        masked = ref.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor((ids != 3).astype(np.int64)),
                              do_sample=False, max_new_tokens=4).numpy()
    assert not np.array_equal(want, masked)  # transformers attended the 3s
    jm, tm = DogeForCausalLM.from_pretrained(d), doge_torch.DogeForCausalLM.from_pretrained(d)
    assert jm.generation_config.pad_token_id is None and jm.config.pad_token_id == 3
    np.testing.assert_array_equal(jm.generate(ids, max_new_tokens=4), want)
    np.testing.assert_array_equal(tm.generate(ids, max_new_tokens=4).numpy(), want)


def test_sampling_defaults_follow_transformers(model_dir):
    """do_sample with no other knob: top_k 50 as transformers' GenerationConfig (before: the whole vocabulary)."""
    model = DogeForCausalLM.from_pretrained(model_dir)
    ids = unique_ids(1, 6, 128, seed=2)
    a = model.generate(ids, max_new_tokens=10, do_sample=True, seed=7)
    np.testing.assert_array_equal(a, model.generate(ids, max_new_tokens=10, do_sample=True, seed=7, top_k=50))
    assert not np.array_equal(a, model.generate(ids, max_new_tokens=10, do_sample=True, seed=7, top_k=0))


def test_sampling_settings_of_generation_config_json_as_transformers(tmp_path, capsys):
    """generation_config.json's do_sample / temperature / top_k / top_p are generate's defaults, as in
    transformers (before: greedy, top_k 50, whatever the file said): doge_torch samples transformers' very tokens
    from the same seed; an argument given wins; save_pretrained keeps the settings; bad ones are named."""

    import transformers

    import doge_torch
    from doge_jax.config import ConfigError

    d = save_hf(make_hf_model(), tmp_path / "m")
    settings = {"do_sample": True, "temperature": 1.7, "top_k": 20, "top_p": 0.95}
    json.dump({"bos_token_id": 0, "eos_token_id": 1, **settings}, open(f"{d}/generation_config.json", "w"))
    ids = unique_ids(2, 6, 128, seed=2)
    ref = transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    torch.manual_seed(11)
    with torch.no_grad():
        want = ref.generate(torch.as_tensor(ids), attention_mask=torch.ones(2, 6, dtype=torch.long),
                            max_new_tokens=12).numpy()
        greedy = ref.generate(torch.as_tensor(ids), attention_mask=torch.ones(2, 6, dtype=torch.long),
                              max_new_tokens=12, do_sample=False).numpy()
    assert not np.array_equal(want, greedy)
    tm = doge_torch.DogeForCausalLM.from_pretrained(d).eval()
    np.testing.assert_array_equal(tm.generate(torch.as_tensor(ids), max_new_tokens=12, seed=11).numpy(), want)
    # no seed: torch's global generator, as transformers (it was a fixed seed 0: every call the same sample)
    torch.manual_seed(11)
    first = tm.generate(torch.as_tensor(ids), max_new_tokens=12).numpy()
    np.testing.assert_array_equal(first, want)
    assert not np.array_equal(tm.generate(torch.as_tensor(ids), max_new_tokens=12).numpy(), first)
    np.testing.assert_array_equal(tm.generate(torch.as_tensor(ids), max_new_tokens=12, do_sample=False).numpy(),
                                  greedy)
    jm = DogeForCausalLM.from_pretrained(d)
    np.testing.assert_array_equal(jm.generate(ids, max_new_tokens=12, seed=5),
                                  jm.generate(ids, max_new_tokens=12, seed=5, **settings))
    np.testing.assert_array_equal(jm.generate(ids, max_new_tokens=12, do_sample=False), greedy)
    for name, m in (("jax", jm), ("torch", tm)):
        m.save_pretrained(str(tmp_path / name))
        saved = json.load(open(tmp_path / name / "generation_config.json"))
        assert {k: saved.get(k) for k in settings} == settings, (name, saved)
    # the command line says it samples, and --greedy decodes greedily
    assert main(["--model", d, "--prompt-ids", *map(str, ids[0]), "--max-new-tokens", "12", "--greedy"]) == 0
    assert capsys.readouterr().out.split("|")[1].split() == [str(t) for t in greedy[0, 6:]]
    assert main(["--model", d, "--prompt-ids", "5", "--max-new-tokens", "2"]) == 0
    assert "note: sampling, as the model's generation_config.json says (temperature 1.7" in capsys.readouterr().err
    # a value generate cannot sample with is refused when it is used, as transformers does: greedy still works
    json.dump({"do_sample": True, "temperature": 0.0}, open(f"{d}/generation_config.json", "w"))
    for cls, conv in ((DogeForCausalLM, np.asarray), (doge_torch.DogeForCausalLM, torch.as_tensor)):
        m = cls.from_pretrained(d)
        with pytest.raises(ValueError, match="temperature=0.0: must be > 0"):
            m.generate(conv(ids), max_new_tokens=2)
        np.testing.assert_array_equal(np.asarray(m.generate(conv(ids), max_new_tokens=12, do_sample=False)), greedy)
    assert main(["--model", d, "--prompt-ids", "5", "--max-new-tokens", "2"]) == 2
    assert "--greedy" in capsys.readouterr().err
    assert main(["--model", d, "--prompt-ids", "5", "--max-new-tokens", "2", "--greedy"]) == 0
    # a setting of the wrong type is named when the model loads
    for bad, field in (({"top_k": "5"}, "top_k='5'"), ({"do_sample": "yes"}, "do_sample='yes'")):
        json.dump(bad, open(f"{d}/generation_config.json", "w"))
        for load in (DogeForCausalLM.from_pretrained, doge_torch.DogeForCausalLM.from_pretrained):
            with pytest.raises(ConfigError, match=f"generation_config.json: {field}"):
                load(d)


def test_generation_config_argument_as_transformers(tmp_path):
    """generate(generation_config=...) as transformers takes it (was a TypeError): a transformers GenerationConfig
    or a dict overrides the model's generation_config.json for the fields it sets, its max_length counts the
    prompt, arguments of the call win; doge_torch samples transformers' tokens; bad values are named."""
    import dataclasses
    import warnings

    import transformers

    import doge_torch
    from doge_jax.config import ConfigError

    d = save_hf(make_hf_model(), tmp_path / "m")
    json.dump({"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 1.7, "top_k": 20},
              open(f"{d}/generation_config.json", "w"))
    ids = unique_ids(2, 6, 128, seed=4)
    ref = transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    mask = torch.ones(2, 6, dtype=torch.long)
    calls = {  # name: (generation_config, call arguments)
        "greedy_penalty": (transformers.GenerationConfig(do_sample=False, repetition_penalty=1.4,
                                                         max_new_tokens=9), {}),
        "top_p_from_file": (transformers.GenerationConfig(top_p=0.9, max_length=13), {}),
        "call_wins": (transformers.GenerationConfig(max_new_tokens=4, temperature=0.5), {"max_new_tokens": 7}),
    }
    want = {}
    with torch.no_grad():
        for name, (gc, kw) in calls.items():
            torch.manual_seed(21)
            want[name] = ref.generate(torch.as_tensor(ids), attention_mask=mask, generation_config=gc, **kw).numpy()
    assert want["top_p_from_file"].shape == (2, 13) and want["call_wins"].shape == (2, 13)
    assert want["greedy_penalty"].shape == (2, 15)
    tm = doge_torch.DogeForCausalLM.from_pretrained(d).eval()
    jm = DogeForCausalLM.from_pretrained(d)
    for name, (gc, kw) in calls.items():
        got = tm.generate(torch.as_tensor(ids), generation_config=gc, seed=21, **kw).numpy()
        np.testing.assert_array_equal(got, want[name], err_msg=name)
        as_dict = {k: v for k, v in gc.to_dict().items() if v is not None}
        np.testing.assert_array_equal(tm.generate(torch.as_tensor(ids), generation_config=as_dict, seed=21, **kw),
                                      got, err_msg=name)
    greedy = want["greedy_penalty"]
    np.testing.assert_array_equal(jm.generate(ids, generation_config=calls["greedy_penalty"][0]), greedy)
    ours = dataclasses.replace(jm.generation_config, do_sample=False, repetition_penalty=1.4, max_new_tokens=9)
    np.testing.assert_array_equal(jm.generate(ids, generation_config=ours), greedy)
    assert jm.generation_config.do_sample  # the model's own config is unchanged
    for m, conv in ((jm, np.asarray), (tm, torch.as_tensor)):
        with pytest.raises(ConfigError, match=r"generation_config: temperature='hot': must be a number"):
            m.generate(conv(ids), generation_config={"temperature": "hot"})
        with pytest.raises(ConfigError, match=r"generation_config: .*eos_token_id=500: must be in \[0, vocab_size="):
            m.generate(conv(ids), generation_config={"eos_token_id": 500})
        with pytest.raises(ConfigError, match=r"generation_config: temperature='hot'"):  # ours is checked too
            m.generate(conv(ids), generation_config=dataclasses.replace(jm.generation_config, temperature="hot"))
        with pytest.raises(ValueError, match=r"generation_config output_hidden_states=True: not supported"):
            m.generate(conv(ids), generation_config=transformers.GenerationConfig(return_dict_in_generate=True,
                                                                                  output_hidden_states=True))
        with pytest.raises(TypeError, match="generation_config: expected a transformers or doge_jax "
                                            "GenerationConfig or a dict, got str"):
            m.generate(conv(ids), generation_config="greedy")
        with pytest.raises(ValueError, match=r"max_length=6 \(the generation config's\): must be an int above"):
            m.generate(conv(ids), generation_config={"max_length": 6})
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m.generate(conv(ids), generation_config={"diversity_penalty": 0.5, "do_sample": False}, max_new_tokens=2)
        assert [str(x.message) for x in w if "diversity_penalty" in str(x.message)] == [
            "generation_config sets diversity_penalty=0.5: not implemented by this generate, ignored (transformers' "
            "output may differ)"]
        beams = m.generate(conv(ids), generation_config={"num_beams": 3, "num_return_sequences": 2, "do_sample": False},
                           max_new_tokens=2)  # (beam search: tests/test_beam_search.py)
        assert np.asarray(beams).shape[0] == 2 * np.asarray(ids).shape[0]


def test_length_fields_as_transformers(tmp_path):
    """The output length and the EOS floor as transformers: generation_config.json's max_length (prompt + new
    tokens) applies when no max_new_tokens is set, also under a generation_config that does not set one (it was
    warned about and ignored, or applied only when passed in); an explicit max_new_tokens=None clears the file's;
    min_new_tokens (0 too) replaces min_length instead of the larger of the two applying."""

    import transformers

    import doge_torch

    GC = transformers.GenerationConfig
    d = save_hf(make_hf_model(), tmp_path / "m")
    ids = unique_ids(2, 6, 128, seed=8)
    mask = torch.ones(2, 6, dtype=torch.long)
    cases = [  # (generation_config.json, generate arguments)
        ({"eos_token_id": 1, "max_length": 14}, {}),
        ({"eos_token_id": 1, "max_length": 14}, {"generation_config": GC(do_sample=False)}),
        ({"eos_token_id": 1, "max_length": 14}, {"max_length": 9}),
        ({"eos_token_id": 1, "max_new_tokens": 9}, {"max_new_tokens": None, "generation_config": GC(max_length=10)}),
        ({"eos_token_id": 1, "max_new_tokens": 9}, {"max_length": 10}),  # the file's max_new_tokens wins
        ({"eos_token_id": list(range(64)), "min_length": 15}, {"min_new_tokens": 2, "max_new_tokens": 12}),
        ({"eos_token_id": list(range(64)), "min_length": 15}, {"generation_config": GC(min_new_tokens=0),
                                                               "max_new_tokens": 12}),
        ({"eos_token_id": list(range(64)), "min_length": 15}, {"max_new_tokens": 12}),
    ]
    for i, (file, kw) in enumerate(cases):
        json.dump(file, open(f"{d}/generation_config.json", "w"))
        ref = transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
        with torch.no_grad():
            want = ref.generate(torch.as_tensor(ids), attention_mask=mask, **kw).numpy()
        tm = doge_torch.DogeForCausalLM.from_pretrained(d).eval()
        jm = DogeForCausalLM.from_pretrained(d)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing is "not implemented" here
            np.testing.assert_array_equal(tm.generate(torch.as_tensor(ids), **kw).numpy(), want, err_msg=str(i))
            np.testing.assert_array_equal(jm.generate(ids, **kw), want, err_msg=str(i))
    assert want.shape[1] > 6 + 9  # (the min_length case: EOS was kept off for 9 new tokens)
    json.dump({"max_length": 6}, open(f"{d}/generation_config.json", "w"))
    for m, conv in ((DogeForCausalLM.from_pretrained(d), np.asarray),
                    (doge_torch.DogeForCausalLM.from_pretrained(d), torch.as_tensor)):
        with pytest.raises(ValueError, match=r"max_length=6 \(the generation config's\): must be an int above the "
                                             r"prompt's 6 tokens"):
            m.generate(conv(ids))
        assert m.generate(conv(ids), max_new_tokens=2).shape == (2, 8)


def test_default_length_capped_at_max_position_embeddings(tmp_path):
    """No length anywhere (call, generation_config, file): transformers makes it prompt + 20 tokens capped at
    max_position_embeddings, and refuses a prompt that leaves no room; both packages gave 20 new tokens past it."""
    import transformers

    import doge_torch

    d = save_hf(make_hf_model(max_position_embeddings=12), tmp_path / "m")
    ref = transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    tm = doge_torch.DogeForCausalLM.from_pretrained(d).eval()
    jm = DogeForCausalLM.from_pretrained(d)
    ids = unique_ids(2, 6, 128, seed=8)
    with torch.no_grad():
        want = ref.generate(torch.as_tensor(ids), attention_mask=torch.ones(2, 6, dtype=torch.long),
                            eos_token_id=None).numpy()
    assert want.shape == (2, 12)
    np.testing.assert_array_equal(tm.generate(torch.as_tensor(ids), eos_token_id=None).numpy(), want)
    np.testing.assert_array_equal(jm.generate(ids, eos_token_id=None), want)
    long = unique_ids(1, 12, 128, seed=9)
    with pytest.raises(ValueError, match="max_length` is set to 12"):
        ref.generate(torch.as_tensor(long), attention_mask=torch.ones(1, 12, dtype=torch.long))
    for m, conv in ((jm, np.asarray), (tm, torch.as_tensor)):
        with pytest.raises(ValueError, match=r"the prompt's 12 tokens leave no room: .*max_position_embeddings=12"):
            m.generate(conv(long))
        assert m.generate(conv(long), max_new_tokens=3).shape == (1, 15)  # an explicit length goes past it


def test_cache_overflow_raises(model_dir):
    from doge_jax.model import DogeCache

    model = DogeForCausalLM.from_pretrained(model_dir)
    cache = DogeCache.init(model.config, 1, 8, np.float32)
    out = model(unique_ids(1, 6, 128), cache=cache)
    with pytest.raises(ValueError, match=r"cache overflow: 6 cached \+ 4 new tokens > capacity 8"):
        model(unique_ids(1, 4, 128), cache=out.cache)


# ---- the lean decode step (doge_jax/decode.py) --------------------------------------------------------------------

def _random_jax_model(**overrides):
    """A tiny doge_jax model with random nonzero A, biases and norm weights (no transformers needed)."""
    import jax

    from doge_jax.config import DogeConfig

    cfg = DogeConfig(**{**TINY, **overrides})

    @nnx.jit  # built and perturbed as one compiled program (op by op, every eager op compiled on its own)
    def build():
        model = DogeForCausalLM(cfg, nnx.Rngs(0))
        state = nnx.state(model, nnx.Param)
        keys = iter(jax.random.split(jax.random.key(1), 1000))

        def perturb(path, v):
            name = str(path[-1])
            noise = jax.random.normal(next(keys), v.shape, v.dtype)
            if name == "A":
                return noise
            if name == "bias":
                return noise * 0.02
            if name in ("weight", "input_residual", "post_attention_residual"):
                return v + 0.1 * noise
            return v

        nnx.update(model, jax.tree_util.tree_map_with_path(perturb, state))
        return model

    return build()


@pytest.mark.parametrize("overrides, B", [
    (dict(keep_window_size=8), 2),  # GQA, keep-window top-k beyond 8 keys, left padding
    (dict(num_key_value_heads=1), 1),  # B * G = 1: the cache layout without a leading axis
    (dict(variant="small_doge", attention_bias=True, mlp_bias=True, keep_window_size=8), 2),
    (dict(sliding_window=6, keep_window_size=4), 2),
    (dict(rope_type="dynamic", rope_factor=4.0, max_position_embeddings=16), 2),  # no RoPE table (NTK switches on)
    (dict(rope_type="dynamic", rope_factor=4.0), 1),  # RoPE table
    (dict(tie_word_embeddings=True, **TINY_MOE), 2),
])
def test_decode_step_equals_cached_forward(overrides, B):
    """decode_step (joined q/k/v and gate/up matmuls, RoPE table, transposed flat key cache) gives the logits and
    cache of the model's own cached forward, step by step."""
    import jax.numpy as jnp

    from doge_jax.decode import DecodeCache, _flat_heads, decode_step, prepare_decode, use_counters
    from doge_jax.model import DogeCache

    model = _random_jax_model(**overrides)
    cfg = model.config
    P, N, C = 7, 17, 32
    ids = unique_ids(B, P + N, 128, seed=5)
    mask = left_pad_mask(B, P, [0, 3][:B]).astype(bool)
    pos = np.where(mask, np.cumsum(mask, axis=1) - 1, 0)
    ref = nnx.jit(lambda m, i, k, p, c: m(i, attention_mask=k, position_ids=p, cache=c))(  # (one compile)
        model, ids[:, :P], mask, pos, DogeCache.init(cfg, B, C).unstacked())
    cache = ref.cache
    prep = prepare_decode(model, C)
    assert (prep["rope"] is None) == (cfg.rope_type == "dynamic" and C > cfg.max_position_embeddings)
    dec = DecodeCache.from_cache(cache, counters=use_counters(cfg, C))  # as generate builds it

    # each side compiled once (as generate traces decode_step), not dispatched op by op for every step
    @nnx.jit
    def cached_forward(model, tok, pos, cache):
        out = model(tok[:, None], attention_mask=jnp.ones((B, 1), bool), position_ids=pos[:, None], cache=cache)
        return out.logits[:, -1], out.cache

    @nnx.jit
    def step(model, tok, pos, dec):
        return decode_step(model, prepare_decode(model, C), tok, pos, dec)

    next_pos = jnp.asarray(pos.max(axis=1) + 1)
    for t in range(P, P + N):
        tok = jnp.asarray(ids[:, t])
        ref_logits, cache = cached_forward(model, tok, next_pos, cache)
        logits, dec = step(model, tok, next_pos, dec)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=0, atol=1e-5)
        next_pos = next_pos + 1
    assert int(dec.index) == int(cache.index) and np.array_equal(dec.key_mask, cache.key_mask)
    for (k_t, v, dt), lc in zip(dec.layers, cache.layers):
        np.testing.assert_allclose(k_t, _flat_heads(jnp.swapaxes(lc.k, -1, -2)), rtol=0, atol=1e-6)
        np.testing.assert_allclose(v, _flat_heads(lc.v), rtol=0, atol=1e-6)
        np.testing.assert_allclose(dt, lc.dt, rtol=0, atol=1e-6)


def test_batch1_single_kv_head_greedy_matches_transformers(tmp_path):
    """Batch 1 with one kv head (the Doge-20M layout, cache without a leading axis) against transformers."""
    hf = make_hf_model(num_key_value_heads=1, keep_window_size=16)
    model = DogeForCausalLM.from_pretrained(save_hf(hf, tmp_path / "m"))
    ids = unique_ids(1, 9, 128, seed=4)
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(ids), attention_mask=torch.ones(1, 9, dtype=torch.long), do_sample=False,
                          max_new_tokens=24, pad_token_id=0).numpy()
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=24), ref)


def test_all_padding_prompt_row_as_transformers(tmp_path):
    """A row whose prompt is all padding (mask zeros): its queries see no key, so their attention is the mean over
    every slot (transformers' uniform rows). The cached generate padded such prompts to the 32-token bucket, and the
    padding slots joined that mean: other tokens than transformers', silently (greedy and beams)."""
    hf = make_hf_model(seed=5)
    model = DogeForCausalLM.from_pretrained(save_hf(hf, tmp_path / "m"))
    ids = unique_ids(2, 5, 128, seed=6)
    mask = np.array([[0] * 5, [1] * 5])
    for beams in (1, 2):
        with torch.no_grad():
            ref = hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                              num_beams=beams, max_new_tokens=3, pad_token_id=0, output_scores=True,
                              return_dict_in_generate=True)
        for cache in (True, False):  # (without the cache the future slots of the fixed buffer joined that mean)
            out = model.generate(ids, attention_mask=mask, num_beams=beams, max_new_tokens=3, use_cache=cache,
                                 output_scores=True, return_dict_in_generate=True)
            np.testing.assert_array_equal(out.sequences, ref.sequences.numpy(), err_msg=f"{beams} {cache}")
            np.testing.assert_allclose(out.scores[0], ref.scores[0].numpy(), atol=2e-5, err_msg=f"{beams} {cache}")


def test_generate_loop_has_no_cache_copies():
    """The compiled decode loop updates the caches in place (a degenerate [B, G] cache layout made XLA copy the
    value cache three times per layer and step)."""
    import re

    import jax
    import jax.numpy as jnp

    from doge_jax.generate import _generate_cached
    from doge_jax.model import DogeCache

    model = _random_jax_model(num_key_value_heads=1)
    cfg = model.config
    ids = jnp.zeros((1, 32), jnp.int32)
    hlo = _generate_cached.lower(model, ids, jnp.ones((1, 32), bool), jnp.arange(32, dtype=jnp.int32)[None],
                                 DogeCache.init(cfg, 1, 128), jnp.asarray([-1], jnp.int32), jnp.int32(0),
                                 jax.random.key(0), max_new_tokens=8, do_sample=False, temperature=1.0, top_k=None,
                                 top_p=None).compile().as_text()
    body = re.search(r"body=(%?[\w.\-]+)", hlo).group(1)
    text = hlo[hlo.index(f"\n{body} "):]
    text = text[: text.index("\n}\n")]
    D, C = cfg.head_size, 128
    cache_shape = re.compile(rf"\[(\d+,)*({C},{D}|{D},{C})\]")
    big_copies = [ln for ln in text.splitlines() if " copy(" in ln and cache_shape.search(ln)]
    assert not big_copies, big_copies[:3]


# ---- doge_torch: sdpa and the key-expiry mask ---------------------------------------------------------------------

def test_torch_expiry_equals_stable_topk():
    from doge_torch.model import dynamic_mask_bias

    g = torch.Generator().manual_seed(0)
    for T, S, k in [(40, 40, 7), (40, 5, 7), (33, 1, 4), (64, 64, 1)]:
        dt = torch.round(torch.randn(3, 2, T, generator=g)) / 2  # many ties
        allowed = torch.ones(S, T, dtype=torch.bool).tril(T - S)[None, None].repeat(3, 1, 1, 1)
        allowed[1, ..., :5] = False
        allowed[2, ..., :T - 2] = False  # rows with no allowed key
        assert torch.equal(dynamic_mask_bias(dt, allowed, k, torch.float32),
                           dynamic_mask_bias(dt, allowed, k, torch.float32, expiry=True))


@pytest.mark.parametrize("overrides", [dict(keep_window_size=8), dict(keep_window_size=8, **TINY_MOE)])
def test_torch_sdpa_equals_eager(overrides, tmp_path):
    import dataclasses

    import doge_torch

    path = save_hf(make_hf_model(**overrides), tmp_path / "m")
    sdpa = doge_torch.DogeForCausalLM.from_pretrained(path).eval()
    cfg = dataclasses.replace(sdpa.config, attention_impl="reference")
    eager = doge_torch.DogeForCausalLM.from_pretrained(path, config=cfg).eval()
    ids = torch.as_tensor(unique_ids(2, 30, 128, seed=1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        a = sdpa(ids, attention_mask=mask).logits
        b = eager(ids, attention_mask=mask).logits
    assert float((a - b).abs().max()) <= 1e-5
    np.testing.assert_array_equal(sdpa.generate(ids[:, :6], max_new_tokens=8).numpy(),
                                  eager.generate(ids[:, :6], max_new_tokens=8).numpy())


def _brute_keep(dt: np.ndarray, valid: np.ndarray, i: int, k: int) -> np.ndarray:
    """The keep-window rule written out: row i keeps valid key j <= i iff fewer than k valid keys j' <= i beat it
    (larger dt, lower index on ties)."""
    B, n, _ = dt.shape
    out = np.zeros((B, n, i + 1), bool)
    for b in range(B):
        for h in range(n):
            d, ok = dt[b, h, : i + 1], valid[b, : i + 1]
            for j in np.flatnonzero(ok):
                out[b, h, j] = np.sum(ok & ((d > d[j]) | ((d == d[j]) & (np.arange(i + 1) < j)))) < k
    return out


def test_keep_window_counters_equal_top_k_with_ties_and_padding():
    """Decode-time keep-window counters (doge_jax.decode) keep exactly the keys the top-k rule keeps, step by
    step, including tied dt values (lower index wins) and padded keys; the oracle is the rule written out."""
    import jax.numpy as jnp

    from doge_jax.decode import beaten_by, update_beaten_by

    rng = np.random.default_rng(0)
    B, n, C, P, k = 3, 2, 40, 12, 5
    dt_np = rng.choice([0.5, 1.0, 1.5, 2.0], size=(B, n, C)).astype(np.float32)  # many ties
    dt = jnp.asarray(dt_np)
    valid = np.zeros((B, C), bool)
    valid[:, :P] = True
    valid[1, :4] = False  # left padding
    valid[2, :P] = False  # a fully padded prompt
    counts = beaten_by(dt, jnp.asarray(valid))
    for i in range(P, C):
        counts = update_beaten_by(counts, dt, jnp.asarray(valid), dt[:, :, i], i)
        valid[:, i] = True
        got = (np.asarray(counts) < k)[..., : i + 1] & valid[:, None, : i + 1]
        np.testing.assert_array_equal(got, _brute_keep(dt_np, valid, i, k), err_msg=f"step {i}")


def test_torch_generate_input_checks(model_dir):
    import doge_torch

    tm = doge_torch.DogeForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.as_tensor(unique_ids(1, 5, 128, seed=4))
    assert torch.equal(tm.generate(ids[0], max_new_tokens=3), tm.generate(ids, max_new_tokens=3))
    with pytest.raises(ValueError, match="pad_token_id=500"):
        tm.generate(ids, max_new_tokens=2, pad_token_id=500)
    with pytest.raises(ValueError, match="top_p=1.5"):
        tm.generate(ids, max_new_tokens=2, do_sample=True, top_p=1.5)
    assert tm.generate(ids, max_new_tokens=2, temperature=0.0).shape == (1, 7)  # greedy ignores it


def test_doge_torch_generation_and_training_import_no_jax():
    import subprocess
    import sys

    code = ("import sys, doge_torch, doge_torch.generate, doge_torch.train, doge_torch.io; "
            "assert not {'jax', 'flax'} & set(sys.modules), sorted(m for m in sys.modules if m.startswith('jax'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]



def test_right_padded_prompts_warn(model_dir):
    import doge_torch

    ids, mask = unique_ids(2, 6, 128, seed=5), np.ones((2, 6), bool)
    mask[1, -2:] = False
    with pytest.warns(UserWarning, match="pad prompts on the left"):
        DogeForCausalLM.from_pretrained(model_dir).generate(ids, attention_mask=mask, max_new_tokens=2)
    with pytest.warns(UserWarning, match="pad prompts on the left"):
        doge_torch.DogeForCausalLM.from_pretrained(model_dir).generate(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=2)


def test_prompt_padding_without_a_mask_is_inferred_as_transformers(tmp_path):
    """No attention_mask and a prompt holding the pad id: the mask is ids != pad, as transformers' generate infers
    it (before: the pads were attended as tokens, other greedy tokens); a pad id that is an EOS id is not inferred
    from, as in transformers; doge_torch takes lists and numpy arrays, as doge_jax does."""
    import doge_torch

    hf = make_hf_model(pad_token_id=0, eos_token_id=1)
    path = save_hf(hf, tmp_path / "m")
    ids = unique_ids(2, 7, 128, seed=8)
    ids[ids < 2] = 77 + np.arange((ids < 2).sum())  # no stray pad or EOS inside the prompt
    ids[0, :3] = 0  # row 0 left-padded
    with torch.no_grad():
        want = hf.generate(torch.as_tensor(ids), do_sample=False, max_new_tokens=5).numpy()
        masked = hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor((ids != 0).astype(np.int64)),
                             do_sample=False, max_new_tokens=5).numpy()
    np.testing.assert_array_equal(want, masked)  # transformers did infer it
    jm, tm = DogeForCausalLM.from_pretrained(path), doge_torch.DogeForCausalLM.from_pretrained(path)
    np.testing.assert_array_equal(jm.generate(ids, max_new_tokens=5), want)
    np.testing.assert_array_equal(tm.generate(ids, max_new_tokens=5).numpy(), want)
    np.testing.assert_array_equal(tm.generate(ids.tolist(), max_new_tokens=5).numpy(), want)
    one = ids.copy()
    one[1, 2] = 1  # the prompt holds id 1, which is both pad and EOS here: nothing inferred, every token attended
    for m, conv in ((jm, np.asarray), (tm, torch.as_tensor)):
        got = np.asarray(m.generate(conv(one), max_new_tokens=5, pad_token_id=1, eos_token_id=1))
        np.testing.assert_array_equal(got, np.asarray(m.generate(conv(one), attention_mask=conv(np.ones_like(one)),
                                                                 max_new_tokens=5, pad_token_id=1, eos_token_id=1)))
        assert not np.array_equal(got, np.asarray(m.generate(conv(one), attention_mask=conv((one != 1).astype(int)),
                                                             max_new_tokens=5, pad_token_id=1, eos_token_id=1)))
    # ids as a uint16 array (the token caches' dtype), EOS as an array or tensor, a bf16 mask: accepted as before
    np.testing.assert_array_equal(tm.generate(ids.astype(np.uint16), max_new_tokens=5).numpy(), want)
    np.testing.assert_array_equal(tm.generate(torch.as_tensor(ids), eos_token_id=torch.tensor([1]), max_new_tokens=5,
                                              attention_mask=torch.as_tensor(ids != 0).bfloat16()).numpy(), want)
    np.testing.assert_array_equal(jm.generate(ids, eos_token_id=np.array(1), max_new_tokens=5), want)


def test_explicit_none_pad_and_eos_as_transformers(tmp_path):
    """pad_token_id=None / eos_token_id=None given in the call are transformers' None, not "the file's" (as the
    sampling arguments): pad None is the first EOS id (no mask inferred from the file's pad id, rows filled with
    EOS after it), EOS None stops nowhere. Before, both fell back to generation_config.json: other tokens."""
    import doge_torch

    hf = make_hf_model(seed=7, pad_token_id=0, eos_token_id=1)
    ids = unique_ids(2, 7, 128, seed=9)
    ids[ids < 2] = 77 + np.arange((ids < 2).sum())
    ids[0, :3] = 0  # the file's pad id leading row 0
    with torch.no_grad():
        free = hf.generate(torch.as_tensor(ids), do_sample=False, max_new_tokens=6, eos_token_id=None,
                           pad_token_id=None).numpy()
    eos = int(free[0, 9])  # row 0's third new token (EOS from here on: row 0 ends early, is filled)
    hf.generation_config.eos_token_id = eos
    path = save_hf(hf, tmp_path / "m")
    jm, tm = DogeForCausalLM.from_pretrained(path), doge_torch.DogeForCausalLM.from_pretrained(path)
    for kw in (dict(pad_token_id=None), dict(eos_token_id=None), dict(pad_token_id=None, eos_token_id=None), {}):
        with torch.no_grad():
            want = hf.generate(torch.as_tensor(ids), do_sample=False, max_new_tokens=6, **kw).numpy()
        np.testing.assert_array_equal(jm.generate(ids, max_new_tokens=6, **kw), want, err_msg=str(kw))
        np.testing.assert_array_equal(tm.generate(ids, max_new_tokens=6, **kw).numpy(), want, err_msg=str(kw))
        if kw == dict(pad_token_id=None):
            assert (want[0, 10:] == eos).all() and not (want[1, 7:] == eos).all(), want  # filled with EOS
            assert not np.array_equal(want, free)  # (the file's pad id would have masked row 0's zeros)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_bad_generate_arguments_are_named(model_dir, framework):
    """Float ids, a bad mask value, a non-integer EOS, a bool top_k and an empty batch raise ValueError naming the
    argument in both packages (before, in doge_torch: RuntimeError/TypeError from torch; in doge_jax 5.5 and True
    silently became 5 and 1; and masks of 2 or 0.5 meant different things to the two)."""
    import doge_torch

    model = (DogeForCausalLM if framework == "jax" else doge_torch.DogeForCausalLM).from_pretrained(model_dir)
    conv = np.asarray if framework == "jax" else torch.as_tensor
    ids = unique_ids(1, 5, 128, seed=2)
    for kwargs, want in ((dict(input_ids=conv(ids.astype(np.float32))), "integer token ids"),
                         (dict(input_ids=conv(ids), attention_mask=conv(np.full_like(ids, 2))),
                          "attention_mask values must be 0 or 1"),
                         (dict(input_ids=conv(ids), attention_mask=conv(np.full(ids.shape, 0.5))),
                          "attention_mask values must be 0 or 1"),
                         (dict(input_ids=conv(ids), eos_token_id=5.5), "eos_token_id=5.5"),
                         (dict(input_ids=conv(ids), pad_token_id=2.7), "pad_token_id=2.7"),
                         (dict(input_ids=conv(ids), do_sample=True, top_k=True), "top_k=True"),
                         (dict(input_ids=conv(np.zeros((0, 4), np.int64))), "input_ids shape (0, 4)"),
                         (dict(input_ids=[[]]), "input_ids shape (1, 0)"),  # (torch: was "dtype torch.float64")
                         (dict(input_ids=[[3, 4, 5], [6, 7]]), "input_ids: rows of different lengths; left-pad"),
                         (dict(input_ids=ids, attention_mask=[[1, 1, 1, 1, 1], [1]]),
                          "attention_mask: rows of different lengths"),
                         # (a TypeError "missing 1 required positional argument" before)
                         (dict(inputs_embeds=np.zeros((1, 5, 64), np.float32)), "inputs_embeds: not supported"),
                         (dict(attention_mask=conv(np.ones_like(ids))), "input_ids: required")):
        with pytest.raises(ValueError, match=want.replace("(", r"\(").replace(")", r"\)")):
            model.generate(max_new_tokens=2, **kwargs)
    with pytest.raises(ValueError, match=r"input_ids shape \(5,\): expected \[batch >= 1, seq >= 1\]"):
        model(conv(ids[0]))
    # temperature=None is the default (1.0), as in transformers (before: TypeError)
    for do_sample in (False, True):
        a = model.generate(conv(ids), max_new_tokens=3, do_sample=do_sample, temperature=None, seed=3)
        b = model.generate(conv(ids), max_new_tokens=3, do_sample=do_sample, temperature=1.0, seed=3)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if framework == "jax":  # jax.random.key keeps a seed's low 32 bits: 2**32 sampled exactly what seed 0 does
        for seed in (2**32, -1, 1.5):
            with pytest.raises(ValueError, match=r"seed=.*must be an integer in \[0, 2\*\*32\)"):
                model.generate(conv(ids), max_new_tokens=2, do_sample=True, seed=seed)


def test_repetition_penalty_and_length_as_transformers(tmp_path, capsys):
    """repetition_penalty (argument, --repetition-penalty, generation_config.json) gives transformers' tokens,
    greedy and sampled, in both packages; the left padding of a prompt is not penalized (its slots hold the token
    the row would make first). generation_config.json's max_new_tokens is the default length; its fields that
    generate does not implement are named in a warning and kept by save_pretrained."""
    import warnings

    import transformers

    import doge_torch

    d = save_hf(make_hf_model(), tmp_path / "m")
    ref = transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    ids = unique_ids(2, 6, 128, seed=2)
    mask = np.ones((2, 6), np.int64)
    mask[1, :2] = 0

    def hf(pen, seed=0, **kw):
        torch.manual_seed(seed)
        with torch.no_grad():
            return ref.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=14,
                                repetition_penalty=pen, **kw).numpy()

    ids[1, :2] = hf(1.0)[1, 6]  # a penalized pad slot would change row 1's first token
    tm = doge_torch.DogeForCausalLM.from_pretrained(d).eval()
    jm = DogeForCausalLM.from_pretrained(d)
    plain = hf(1.0)
    for pen in (1.5, 0.7):
        want = hf(pen)
        assert not np.array_equal(want, plain), pen
        got = {"torch": tm.generate(torch.as_tensor(ids), torch.as_tensor(mask), max_new_tokens=14,
                                    repetition_penalty=pen).numpy(),
               "jax": jm.generate(ids, mask, max_new_tokens=14, repetition_penalty=pen),
               "jax no cache": jm.generate(ids, mask, max_new_tokens=14, repetition_penalty=pen, use_cache=False)}
        for name, out in got.items():
            np.testing.assert_array_equal(out, want, err_msg=f"{name} penalty {pen}")
    sampled = hf(1.5, seed=11, do_sample=True, temperature=1.5, top_k=20)
    assert not np.array_equal(sampled, hf(1.0, seed=11, do_sample=True, temperature=1.5, top_k=20))
    np.testing.assert_array_equal(tm.generate(torch.as_tensor(ids), torch.as_tensor(mask), max_new_tokens=14, seed=11,
                                              repetition_penalty=1.5, do_sample=True, temperature=1.5,
                                              top_k=20).numpy(), sampled)
    jkw = {"max_new_tokens": 14, "repetition_penalty": 1.5, "do_sample": True, "temperature": 1.5, "seed": 3}
    np.testing.assert_array_equal(jm.generate(ids, mask, **jkw), jm.generate(ids, mask, use_cache=False, **jkw))
    for m, conv in ((jm, np.asarray), (tm, torch.as_tensor)):
        for bad in (0, -1.0, float("nan"), "2"):
            with pytest.raises(ValueError, match="repetition_penalty=.*must be a number > 0"):
                m.generate(conv(ids), max_new_tokens=2, repetition_penalty=bad)

    # generation_config.json: repetition_penalty and max_new_tokens are defaults; other fields warned about, kept
    gen = {"bos_token_id": 0, "eos_token_id": 1, "repetition_penalty": 1.5, "max_new_tokens": 14,
           "diversity_penalty": 0.5, "num_beams": 1, "transformers_version": "5.23.0", "use_cache": True,
           "max_length": 20, "is_assistant": False, "return_legacy_cache": True, "generation_kwargs": {}}
    json.dump(gen, open(f"{d}/generation_config.json", "w"))
    ref = transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    for name, cls, conv in (("jax", DogeForCausalLM, np.asarray), ("torch", doge_torch.DogeForCausalLM,
                                                                      torch.as_tensor)):
        m = cls.from_pretrained(d)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = np.asarray(m.generate(conv(ids[:1])))  # the file's penalty and length
        assert [str(w.message) for w in caught] == [
            "the model's generation_config.json sets diversity_penalty=0.5: not implemented by this generate, "
            "ignored (transformers' output may differ)"], name
        np.testing.assert_array_equal(out, hf_row0(ref, ids, 1.5, 14), err_msg=name)
        assert np.asarray(m.generate(conv(ids[:1]), max_new_tokens=3, repetition_penalty=1.0)).shape == (1, 9)
        m.save_pretrained(str(tmp_path / name))  # (settings at their defaults, num_beams 1, are not written)
        assert json.load(open(tmp_path / name / "generation_config.json")) == {
            k: v for k, v in gen.items() if k != "num_beams"}, name
    # the command line: --repetition-penalty wins over the file; the file's max_new_tokens is the default length
    row = [str(t) for t in ids[0]]
    assert main(["--model", d, "--prompt-ids", *row, "--repetition-penalty", "0.7", "--no-eos"]) == 0
    assert capsys.readouterr().out.split("|")[1].split() == [str(t) for t in hf_row0(ref, ids, 0.7, 14)[0, 6:]]
    with pytest.raises(SystemExit) as exit_info:  # a bad argument: a usage error, before the model loads
        main(["--model", d, "--prompt-ids", *row, "--max-new-tokens", "3", "--repetition-penalty", "0"])
    assert exit_info.value.code == 2
    assert "repetition_penalty=0.0: must be a number > 0" in capsys.readouterr().err
    # max_length is implemented (test_length_fields_as_transformers); num_beam_groups 1 and the others change nothing
    from doge_jax.config import GenerationConfig
    from doge_jax.generation_args import unsupported_fields

    g = GenerationConfig(extra={"max_length": 20, "num_beam_groups": 1, "is_assistant": False, "generation_kwargs": {}})
    assert unsupported_fields(g) == {}
    json.dump({"repetition_penalty": "high"}, open(f"{d}/generation_config.json", "w"))
    from doge_jax.config import ConfigError

    with pytest.raises(ConfigError, match="generation_config.json: repetition_penalty='high': must be a number"):
        DogeForCausalLM.from_pretrained(d)


def hf_row0(ref, ids, pen, n):
    """transformers' greedy tokens for the first prompt row alone."""
    with torch.no_grad():
        return ref.generate(torch.as_tensor(ids[:1]), attention_mask=torch.ones(1, ids.shape[1], dtype=torch.long),
                            max_new_tokens=n, repetition_penalty=pen, do_sample=False).numpy()


def test_min_new_tokens_and_min_length_as_transformers(tmp_path, capsys):
    """min_new_tokens (argument or generation_config.json) and the file's min_length keep EOS out of the first new
    tokens, as transformers' two processors: the same tokens in doge_torch and doge_jax (cached and not), with an
    EOS id the rows would otherwise pick early."""

    import transformers

    import doge_torch

    d = save_hf(make_hf_model(), tmp_path / "m")
    ref = transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    ids = unique_ids(2, 6, 128, seed=2)
    mask = np.ones((2, 6), np.int64)
    mask[1, :2] = 0

    def hf(**kw):
        with torch.no_grad():
            return ref.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=10,
                                do_sample=False, **kw).numpy()

    eos = int(hf(eos_token_id=-1)[0, 7])  # row 0's second new token
    early = hf(eos_token_id=eos)
    want = hf(eos_token_id=eos, min_new_tokens=4)
    assert early[0, 7] == eos and eos not in want[0, 6:10], (early, want)
    tm = doge_torch.DogeForCausalLM.from_pretrained(d).eval()
    jm = DogeForCausalLM.from_pretrained(d)
    kw = {"max_new_tokens": 10, "eos_token_id": eos, "do_sample": False, "min_new_tokens": 4}
    np.testing.assert_array_equal(tm.generate(torch.as_tensor(ids), torch.as_tensor(mask), **kw).numpy(), want)
    np.testing.assert_array_equal(jm.generate(ids, mask, **kw), want)
    np.testing.assert_array_equal(jm.generate(ids, mask, use_cache=False, **kw), want)
    for m, conv in ((jm, np.asarray), (tm, torch.as_tensor)):
        with pytest.raises(ValueError, match="min_new_tokens=-1: must be an integer >= 0"):
            m.generate(conv(ids), max_new_tokens=2, min_new_tokens=-1)
    # the file's min_length (prompt included) and min_new_tokens are defaults
    for gen in ({"min_length": 6 + 3}, {"min_new_tokens": 3}):
        json.dump({"bos_token_id": 0, "eos_token_id": eos, **gen}, open(f"{d}/generation_config.json", "w"))
        ref = transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
        want = hf()
        assert eos not in want[0, 6:9] and not np.array_equal(want, early), gen
        for cls, conv in ((DogeForCausalLM, np.asarray), (doge_torch.DogeForCausalLM, torch.as_tensor)):
            m = cls.from_pretrained(d)
            got = np.asarray(m.generate(conv(ids), conv(mask), max_new_tokens=10, do_sample=False))
            np.testing.assert_array_equal(got, want, err_msg=f"{cls.__module__} {gen}")
    # the command line (one unpadded prompt; the file still says min_new_tokens 3: the flag wins)
    with torch.no_grad():
        row = ref.generate(torch.as_tensor(ids[:1]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                           max_new_tokens=10, do_sample=False, min_new_tokens=5).numpy()
    assert main(["--model", d, "--prompt-ids", *map(str, ids[0]), "--max-new-tokens", "10", "--greedy",
                 "--min-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.split("|")[1].split() == [str(t) for t in row[0, 6:]]


def test_min_p_as_transformers(tmp_path, capsys):
    """min_p (call argument, generation_config.json, --min-p) is transformers' MinPLogitsWarper after top-p:
    doge_torch samples transformers' very tokens from the same seed, doge_jax filters the same tokens (min_p 1:
    only the most likely token is left, so sampling is greedy decoding); bad values are named."""
    import jax.numpy as jnp
    import transformers
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    import doge_torch
    from doge_jax.config import ConfigError
    from doge_jax.generate import _filter_logits

    logits = np.random.default_rng(0).normal(0, 3, (4, 60)).astype(np.float32)
    for temperature, top_k, top_p, min_p in ((1.0, None, None, 0.1), (0.7, 20, 0.9, 0.05), (1.5, 0, None, 0.5)):
        procs = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
        procs += ([TopPLogitsWarper(top_p)] if top_p else []) + [MinPLogitsWarper(min_p)]
        want = np.isfinite(LogitsProcessorList(procs)(None, torch.as_tensor(logits)).numpy())
        got = np.asarray(_filter_logits(jnp.asarray(logits), temperature, top_k, top_p, min_p))
        np.testing.assert_array_equal(got > np.finfo(np.float32).min, want)
        assert 1 < want.sum(-1).max() < 60  # the filter keeps some, drops some

    d = save_hf(make_hf_model(), tmp_path / "m")
    settings = {"do_sample": True, "temperature": 0.2, "top_k": 0, "min_p": 0.3}  # (a tiny random model: flat)
    json.dump({"bos_token_id": 0, "eos_token_id": 1, **settings}, open(f"{d}/generation_config.json", "w"))
    ids = unique_ids(2, 6, 128, seed=2)
    ref = transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()

    def hf(**kw):
        torch.manual_seed(3)
        with torch.no_grad():
            return ref.generate(torch.as_tensor(ids), attention_mask=torch.ones(2, 6, dtype=torch.long),
                                max_new_tokens=12, **kw).numpy()

    want, unfiltered = hf(), hf(min_p=0.0)
    assert not np.array_equal(want, unfiltered)
    tm = doge_torch.DogeForCausalLM.from_pretrained(d).eval()
    np.testing.assert_array_equal(tm.generate(torch.as_tensor(ids), max_new_tokens=12, seed=3).numpy(), want)
    np.testing.assert_array_equal(tm.generate(torch.as_tensor(ids), max_new_tokens=12, seed=3, min_p=0.0).numpy(),
                                  unfiltered)
    jm = DogeForCausalLM.from_pretrained(d)
    greedy = jm.generate(ids, max_new_tokens=12, do_sample=False)
    np.testing.assert_array_equal(jm.generate(ids, max_new_tokens=12, seed=1, min_p=1.0), greedy)
    np.testing.assert_array_equal(jm.generate(ids, max_new_tokens=12, seed=1, min_p=1.0, use_cache=False), greedy)
    assert not np.array_equal(jm.generate(ids, max_new_tokens=12, seed=1, min_p=None), greedy)
    np.testing.assert_array_equal(tm.generate(torch.as_tensor(ids), max_new_tokens=12, seed=1, min_p=1.0).numpy(),
                                  greedy)
    jm.save_pretrained(str(tmp_path / "saved"))
    assert json.load(open(tmp_path / "saved" / "generation_config.json"))["min_p"] == 0.3
    for m in (jm, tm):
        for bad in (1.5, -0.1, "0.2"):
            with pytest.raises(ValueError, match=f"min_p={bad!r}: must be in \\[0, 1\\]"):
                m.generate(ids if m is jm else torch.as_tensor(ids), max_new_tokens=2, min_p=bad)
    json.dump({"min_p": "high"}, open(f"{d}/generation_config.json", "w"))
    with pytest.raises(ConfigError, match="min_p='high': must be a number or null"):
        DogeForCausalLM.from_pretrained(d)
    with pytest.raises(SystemExit):  # with --do-sample: checked before the model loads
        main(["--model", str(tmp_path / "saved"), "--prompt-ids", "5", "--min-p", "2", "--do-sample"])
    assert "min_p=2.0: must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # without it too (the file samples; greedy would ignore it, but it is a typo)
        main(["--model", str(tmp_path / "saved"), "--prompt-ids", "5", "--min-p", "2"])
    assert "min_p=2.0: must be in [0, 1]" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "saved"), "--prompt-ids", "5", "6", "--max-new-tokens", "3",
                 "--min-p", "1"]) == 0
    assert "min_p 1.0" in capsys.readouterr().err  # (sampling, as the file says)


class _Recorder:
    """A transformers streamer that keeps what it is given (put: a tensor or array of ids; end)."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(np.asarray(value).tolist())

    def end(self):
        self.calls.append("end")


def test_streamer_and_transformers_arguments(tmp_path):
    """generate(streamer=...) calls put/end as transformers does (the prompt, each new token, end), in both
    packages and with TextStreamer; transformers arguments generate does not implement are refused by name where
    they would change the output, accepted where they change nothing; a misspelt one is Python's TypeError."""
    import transformers

    import doge_torch

    d = save_hf(make_hf_model(), tmp_path / "m")
    ref = transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    ids = unique_ids(1, 5, 128, seed=4)
    want = _Recorder()
    with torch.no_grad():
        ref.generate(torch.as_tensor(ids), attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=6,
                     do_sample=False, streamer=want)
    assert len(want.calls) == 8 and want.calls[-1] == "end"
    tm = doge_torch.DogeForCausalLM.from_pretrained(d).eval()
    jm = DogeForCausalLM.from_pretrained(d)
    runs = {"torch": lambda s, **kw: tm.generate(torch.as_tensor(ids), max_new_tokens=6, streamer=s, **kw),
            "jax": lambda s, **kw: jm.generate(ids, max_new_tokens=6, streamer=s, **kw),
            "jax no cache": lambda s, **kw: jm.generate(ids, max_new_tokens=6, streamer=s, use_cache=False, **kw)}
    for name, run in runs.items():
        got = _Recorder()
        run(got)
        assert got.calls == want.calls, name
        # what transformers callers pass with no effect is accepted; the rest is named
        run(None, logits_processor=None, stopping_criteria=None, output_scores=False, no_repeat_ngram_size=0,
            return_dict_in_generate=False, synced_gpus=False)
        with pytest.raises(ValueError, match="guidance_scale=1.5: not implemented by this generate"):
            run(None, guidance_scale=1.5)
        with pytest.raises(ValueError, match="output_attentions=True: not supported; generate returns the token"):
            run(None, output_attentions=True)
        with pytest.raises(TypeError, match="unexpected keyword argument 'max_new_token'"):
            run(None, max_new_token=3)
        # no effect at these values in transformers either (beam-only settings, its own no-op values)
        run(None, early_stopping=True, length_penalty=0.5, low_memory=True, guidance_scale=1.0, epsilon_cutoff=1.0,
            renormalize_logits=True, bos_token_id=1, trust_remote_code=True)
        with pytest.raises(ValueError, match="dola_layers='high': not implemented"):  # (DoLa decoding)
            run(None, dola_layers="high")
        # transformers' min_length (prompt included) as a call argument: EOS held back as transformers holds it
        eos = int(want.calls[2][0])  # the second greedy token
        with torch.no_grad():
            hf_min = ref.generate(torch.as_tensor(ids), attention_mask=torch.ones(1, 5, dtype=torch.long),
                                  max_new_tokens=6, do_sample=False, eos_token_id=eos, min_length=9)
        got = run(None, eos_token_id=eos, min_length=9)
        np.testing.assert_array_equal(np.asarray(got), hf_min.numpy())
        assert np.asarray(run(None, eos_token_id=eos)).shape[1] == 7 < hf_min.shape[1]
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_word_level_tokenizer(), eos_token="<eos>")
    printed = []
    streamer = transformers.TextStreamer(tok, skip_prompt=True)
    streamer.on_finalized_text = lambda text, stream_end=False: printed.append(text)
    out = jm.generate(ids, max_new_tokens=6, streamer=streamer)
    assert "".join(printed).split() == tok.decode(out[0, 5:]).split()


def _word_level_tokenizer():
    """A word-level tokenizers.Tokenizer over 128 ids (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, 128)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return t


def test_no_repeat_ngram_size_as_transformers(tmp_path, capsys, monkeypatch):
    """no_repeat_ngram_size (argument, generation_config.json, --no-repeat-ngram-size): transformers' very tokens in
    doge_torch (dynamic and static cache) and doge_jax (cached and not), left padding included (transformers' rule
    reads the padded input_ids), n = 1, 2, 3 on prompts with repeated ids; it was a warning and ignored."""
    import transformers

    import doge_torch

    d = save_hf(make_hf_model(), tmp_path / "m")
    ref = transformers.DogeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    tm = doge_torch.DogeForCausalLM.from_pretrained(d).eval()
    jm = DogeForCausalLM.from_pretrained(d)
    ids = np.random.default_rng(0).integers(0, 8, (2, 7))  # few distinct ids: n-grams repeat
    mask = np.ones((2, 7), np.int64)
    mask[1, :2] = 0

    def hf(**kw):
        with torch.no_grad():
            return ref.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=20,
                                do_sample=False, **kw).numpy()

    plain = hf()
    for n in (1, 2, 3):
        want = hf(no_repeat_ngram_size=n)
        assert not np.array_equal(want, plain), n
        t_ids, t_mask = torch.as_tensor(ids), torch.as_tensor(mask)
        got = {"torch": tm.generate(t_ids, t_mask, max_new_tokens=20, no_repeat_ngram_size=n).numpy(),
               "jax": jm.generate(ids, mask, max_new_tokens=20, no_repeat_ngram_size=n),
               "jax no cache": jm.generate(ids, mask, max_new_tokens=20, no_repeat_ngram_size=n, use_cache=False)}
        if n == 2:
            got["torch static"] = tm.generate(t_ids, t_mask, max_new_tokens=20, no_repeat_ngram_size=n,
                                              cache_implementation="static").numpy()
        for name, out in got.items():
            np.testing.assert_array_equal(out, want, err_msg=f"{name} n={n}")
    # rows shorter than n, or just n - 1 long (doge_torch crashed there), and max_new_tokens 1
    for prompt, n, new in (([[5]], 2, 5), ([[5, 6]], 3, 6), ([[5, 6, 7]], 4, 4), ([[5]], 3, 6), ([[5, 5]], 2, 1)):
        with torch.no_grad():
            want = ref.generate(torch.tensor(prompt), attention_mask=torch.ones(1, len(prompt[0]), dtype=torch.long),
                                max_new_tokens=new, do_sample=False, no_repeat_ngram_size=n).numpy()
        for cache in (None, "static"):
            np.testing.assert_array_equal(tm.generate(torch.tensor(prompt), max_new_tokens=new, no_repeat_ngram_size=n,
                                                      cache_implementation=cache).numpy(), want)
        np.testing.assert_array_equal(jm.generate(np.array(prompt), max_new_tokens=new, no_repeat_ngram_size=n), want)
    # prompts of one 32-token bucket share doge_jax's compiled program with the rule on too (the history buffer
    # was as long as the prompt itself: a compile per prompt length)
    import doge_jax.generate as G

    traces, real = [], G._ban_ngrams
    monkeypatch.setattr(G, "_ban_ngrams", lambda *a, **k: traces.append(1) or real(*a, **k))
    jm.generate(ids, mask, max_new_tokens=17, no_repeat_ngram_size=2)  # (a length not compiled above)
    first = len(traces)
    assert first > 0
    jm.generate(ids[:, 1:], mask[:, 1:], max_new_tokens=17, no_repeat_ngram_size=2)
    assert len(traces) == first
    json.dump({"bos_token_id": 0, "eos_token_id": 1, "no_repeat_ngram_size": 2},
              open(f"{d}/generation_config.json", "w"))
    want = hf(no_repeat_ngram_size=2)
    for m, conv in ((DogeForCausalLM.from_pretrained(d), np.asarray), (doge_torch.DogeForCausalLM.from_pretrained(d),
                                                                        torch.as_tensor)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (no "not implemented" warning any more)
            np.testing.assert_array_equal(np.asarray(m.generate(conv(ids), conv(mask), max_new_tokens=20)), want)
        np.testing.assert_array_equal(np.asarray(m.generate(conv(ids), conv(mask), max_new_tokens=20,
                                                            no_repeat_ngram_size=0)), plain)
        with pytest.raises(ValueError, match="no_repeat_ngram_size=-1: must be an integer >= 0"):
            m.generate(conv(ids), max_new_tokens=2, no_repeat_ngram_size=-1)
    row = [str(t) for t in ids[0]]
    assert main(["--model", d, "--prompt-ids", *row, "--max-new-tokens", "20", "--no-eos",
                 "--no-repeat-ngram-size", "3"]) == 0
    assert capsys.readouterr().out.split("|")[1].split() == [str(t) for t in hf(no_repeat_ngram_size=3)[0, 7:]]
