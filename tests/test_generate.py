"""doge_jax generation: streaming, prompt bucketing, the command line (`python -m doge_jax.generate`), and the
doge_torch sdpa / key-expiry attention path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_MOE, make_hf_model, save_hf, unique_ids

from doge_jax.generate import main
from doge_jax.model import DogeForCausalLM


@pytest.fixture(scope="module")
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


def test_cli_with_tokenizer(model_dir, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "[UNK] the quick brown fox jumps over lazy dog".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert main(["--model", model_dir, "--tokenizer", str(tmp_path), "--prompt", "the fox",
                 "--max-new-tokens", "6", "--no-eos"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the fox")
    assert "6 new tokens" in captured.err and "tokens/s" in captured.err


def test_cli_prompt_ids_and_missing_tokenizer(model_dir, capsys):
    assert main(["--model", model_dir, "--prompt-ids", "5", "6", "7", "--max-new-tokens", "4", "--no-eos"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("5 6 7 |") and len(out.split("|")[1].split()) == 4
    with pytest.raises(SystemExit):
        main(["--model", model_dir, "--prompt", "hello"])
    assert "no tokenizer.json" in capsys.readouterr().err


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
