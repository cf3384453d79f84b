"""doge_torch static-cache decoding (`generate(..., cache_implementation="static")`, doge_torch.decode): the same
tokens as the growing-cache path (itself tested against transformers in test_torch_model.py) and as decoding
without a cache (the keep window's key-expiry form), one compiled step reused across calls, the eager fallback.
The step compiles with dynamo's eager backend here (inductor's CPU compile: the slow test)."""

import pytest
import torch
from conftest import TINY, TINY_MOE, left_pad_mask, perturb_, unique_ids

import doge_torch.decode as dd
from doge_torch import DogeConfig, DogeForCausalLM


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo's recompile limit (8 per code object) counts every model and shape
    of the process."""
    torch._dynamo.reset()
    dd._compiled.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def eager_backend(monkeypatch):
    monkeypatch.setattr(dd, "COMPILE_BACKEND", "eager")


def _model(**overrides):
    cfg = DogeConfig(**{**TINY, "keep_window_size": 8, **overrides})
    torch.manual_seed(0)
    model = DogeForCausalLM(cfg).eval()
    perturb_(model)
    return model


CASES = {
    "plain": {},
    "moe": dict(TINY_MOE),
    "dynamic_rope": {"rope_type": "dynamic", "rope_factor": 4.0, "max_position_embeddings": 12},
    "sliding_window": {"sliding_window": 6},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_static_cache_gives_the_growing_cache_tokens(eager_backend, case):
    """Greedy tokens, left-padded batch, well past keep_window (8): the static cache's compiled step = the growing
    cache = no cache (the prompt and the generated tokens re-run every step, the keep window in its expiry form;
    not with dynamic RoPE, whose scaling then changes for the cached keys too, nor CDMoE, whose router quirk mixes
    the positions of a call, spec §3.8: both differ between the two in transformers too)."""
    model = _model(**CASES[case])
    ids = torch.as_tensor(unique_ids(2, 6, TINY["vocab_size"], seed=3))
    mask = torch.as_tensor(left_pad_mask(2, 6, [2, 0]))
    kw = dict(attention_mask=mask, max_new_tokens=18, pad_token_id=0, eos_token_id=-1)
    want = model.generate(ids, **kw)
    if case not in ("dynamic_rope", "moe"):
        assert torch.equal(model.generate(ids, **kw, use_cache=False), want)
    assert torch.equal(model.generate(ids, **kw, cache_implementation="static"), want)


def test_compiled_step_is_reused_across_calls(monkeypatch):
    """One graph for every call whose prompt + new tokens fit the same multiple of SLOTS (64) and batch size, and one
    cache kept on the model for them; a longer call compiles once more; sampled decoding runs through the same step
    (same seed, same tokens)."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(dd, "COMPILE_BACKEND", counting)
    model = _model()
    ids = torch.as_tensor(unique_ids(1, 5, TINY["vocab_size"], seed=4))
    caches = []
    for new in (4, 20, 50):  # 9, 25, 55 slots: one 64-slot cache
        out = model.generate(ids, max_new_tokens=new, eos_token_id=-1, cache_implementation="static")
        assert torch.equal(out, model.generate(ids, max_new_tokens=new, eos_token_id=-1))
        caches.append(model._doge_static_cache)
    assert len(graphs) == 1
    # the buffers stay (refilled in place: a CUDA graph replays their addresses)
    assert caches[0] is caches[1] is caches[2] and caches[0].max_len == 64
    kw = dict(max_new_tokens=12, do_sample=True, top_k=20, seed=5, eos_token_id=-1)
    sampled = model.generate(ids, **kw, cache_implementation="static")
    assert torch.equal(sampled, model.generate(ids, **kw)) and len(graphs) == 1
    model.generate(ids, max_new_tokens=70, eos_token_id=-1, cache_implementation="static")  # 75: 128 slots
    assert len(graphs) == 2 and model._doge_static_cache is not caches[0] and model._doge_static_cache.max_len == 128


def test_compile_failure_falls_back_to_eager(monkeypatch):
    """A step that fails to compile (here: a backend that raises) warns once and decodes eagerly, same tokens."""
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(dd, "COMPILE_BACKEND", broken)
    model = _model()
    ids = torch.as_tensor(unique_ids(2, 5, TINY["vocab_size"], seed=6))
    with pytest.warns(UserWarning, match="torch.compile failed.*decoding eagerly") as rec:
        got = model.generate(ids, max_new_tokens=10, eos_token_id=-1, cache_implementation="static")
    assert len([w for w in rec if "decoding eagerly" in str(w.message)]) == 1
    assert torch.equal(got, model.generate(ids, max_new_tokens=10, eos_token_id=-1))


def test_recompile_limit_falls_back_with_a_clear_warning(eager_backend, monkeypatch):
    """Past dynamo's recompile limit (set to 1 here: a second batch size) the warning names the limit and what
    counts, and the step runs eagerly, same tokens."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    model = _model()
    for B in (1, 2):
        ids = torch.as_tensor(unique_ids(B, 5, TINY["vocab_size"], seed=B))
        kw = dict(max_new_tokens=6, eos_token_id=-1)
        if B == 1:
            got = model.generate(ids, **kw, cache_implementation="static")
        else:
            with pytest.warns(UserWarning, match=r"recompile limit \(torch._dynamo.config.recompile_limit = 1\).*"
                                                 r"each batch size and slot count"):
                got = model.generate(ids, **kw, cache_implementation="static")
        assert torch.equal(got, model.generate(ids, **kw))


def test_static_cache_arguments_are_checked():
    model = _model()
    ids = torch.as_tensor(unique_ids(1, 4, TINY["vocab_size"]))
    with pytest.raises(ValueError, match="cache_implementation='offloaded'"):
        model.generate(ids, max_new_tokens=2, cache_implementation="offloaded")
    with pytest.raises(ValueError, match="needs use_cache=True"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static", use_cache=False)


def _decoded_logits(model, ids, kw, monkeypatch, compile_: bool):
    """(tokens, per-step logits of the static step) of a static-cache greedy run, the step compiled or eager."""
    import doge_torch.generate as dg

    logits, real = [], dd.run_step

    def spy(*a):
        out = real(*a)
        logits.append(out[0])
        return out

    monkeypatch.setattr(dg, "run_step", spy)
    monkeypatch.setattr(dd, "COMPILE", compile_)
    return model.generate(ids, **kw, cache_implementation="static"), logits


@pytest.mark.slow
def test_static_cache_inductor_on_cpu(monkeypatch):
    """The step compiled by inductor (~30 s on 2 cores): the growing cache's greedy tokens in float32; for a bf16
    model (inductor told to round where eager does) each step's logits within bf16's tolerance of the eager step's
    (2e-2 of max |logit|, spec §9) up to the first token where one-ulp differences flip a near-tie."""
    model = _model(keep_window_size=64)
    ids = torch.as_tensor(unique_ids(2, 6, TINY["vocab_size"], seed=3))
    mask = torch.as_tensor(left_pad_mask(2, 6, [2, 0]))
    kw = dict(attention_mask=mask, max_new_tokens=40, pad_token_id=0, eos_token_id=-1)
    assert torch.equal(model.generate(ids, **kw, cache_implementation="static"), model.generate(ids, **kw))
    model = model.to(torch.bfloat16)
    want, want_logits = _decoded_logits(model, ids, kw, monkeypatch, False)
    got, got_logits = _decoded_logits(model, ids, kw, monkeypatch, True)
    same = int((got == want).all(0).long().cumprod(0).sum()) - 6  # new tokens before the first difference
    assert same >= 10, same
    for step in range(min(same, len(got_logits))):  # (step i's inputs: tokens both runs agree on)
        a, b = got_logits[step], want_logits[step]
        assert (a - b).abs().max().item() <= 2e-2 * b.abs().max().item(), step
