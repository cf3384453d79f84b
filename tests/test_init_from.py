"""`--init-from` (continue training from existing weights) and dense -> MoE continuation with the MoE warm-up freeze
(issue 6 items 3-4, spec §7).

The trick used throughout: with num_warmup_steps >= 1 the first update runs at lr * λ(0) = 0 (spec §6.1), so the
checkpoint after step 1 holds exactly the initial parameters of the run."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import TINY_ARGS, cache, corpus  # noqa: F401 - fixtures

from doge_jax import train as T
from doge_jax.checkpoint import TrainCheckpointer, list_steps, load_params, model_from_params
from doge_jax.config import ConfigError, DogeConfig
from doge_jax.init import merge_config
from doge_jax.metrics import read_metrics
from doge_jax.model import DogeCDMoE, DogeForCausalLM, DogeMLP

MOE = ["--model.is_moe", "true", "--model.num_experts", "16", "--model.num_experts_per_tok", "4"]
NEW = ("router_gate", "down_embed", "up_embed")
# one pytest-xdist worker runs the whole module; its fixtures are costly runs, built once (session-scoped: a module
# fixture is torn down whenever the worker next runs another module's test, and xdist interleaves modules)
pytestmark = pytest.mark.xdist_group("init_from")
# TINY_ARGS without its model fields: the model is the --init-from checkpoint's
TRAIN_ONLY = [a for i, a in enumerate(TINY_ARGS) if not (a.startswith("--model.") or
                                                         (i and TINY_ARGS[i - 1].startswith("--model.")))]


def run(corpus, cache, out, *extra) -> int:  # noqa: F811
    return T.main([*TINY_ARGS, "--data", corpus, "--out_dir", str(out), "--train.cache_dir", cache, *extra])


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def is_new(key: str) -> bool:
    return any(f"['{n}']" in key for n in NEW)


@pytest.fixture(scope="session")
def dense(corpus, cache, tmp_path_factory):  # noqa: F811
    """A finished 6-step dense run (the checkpoint to continue from) and its final parameters."""
    out = tmp_path_factory.mktemp("dense") / "run"
    assert run(corpus, cache, out) == 0
    return out, flat(load_params(str(out))[1])


@pytest.mark.parametrize("source", ["run_dir", "hf_dir"])
def test_init_from_starts_at_the_checkpoint(corpus, cache, dense, tmp_path, source):  # noqa: F811
    src, want = dense
    if source == "hf_dir":  # the same weights as an HF directory (with the run's tokenizer next to them)
        hf = tmp_path / "hf"
        DogeForCausalLM.from_pretrained(str(src)).save_pretrained(str(hf))
        shutil.copy(src / "tokenizer.json", hf / "tokenizer.json")
        gen = json.load(open(hf / "generation_config.json"))  # generate settings: the run keeps them (were lost)
        gen.update(do_sample=True, temperature=0.7, top_k=20, max_new_tokens=33, repetition_penalty=1.1)
        json.dump(gen, open(hf / "generation_config.json", "w"))
        src = hf
    out = tmp_path / "cont"
    assert run(corpus, cache, out, "--init-from", str(src), "--train.peak_lr", "1e-3", "--train.stop_after", "1") == 0
    if source == "hf_dir":
        assert json.load(open(out / "generation_config.json")) == gen
        assert DogeForCausalLM.from_pretrained(str(out)).generation_config.temperature == 0.7
        from convert import main as convert

        assert convert([str(out), str(tmp_path / "conv"), "--to", "hf"]) == 0
        assert json.load(open(tmp_path / "conv" / "generation_config.json")) == gen
    else:  # (the start run has no generation_config.json of its own)
        assert not (out / "generation_config.json").exists()
    cfg, params = load_params(str(out), step=1)
    assert cfg == DogeConfig.from_json_file(dense[0] / "config.json")
    got = flat(params)
    assert got.keys() == want.keys()
    for k in want:  # step 0 ran at lr 0: the checkpoint's weights, bit for bit
        assert np.array_equal(got[k], want[k]), k
    with open(out / "tokenizer.json") as a, open(dense[0] / "tokenizer.json") as b:
        assert a.read() == b.read()  # the checkpoint's tokenizer, not a new one
    # a fresh optimizer at the configured schedule, and a model that has already learnt something
    assert run(corpus, cache, out, "--init-from", str(src), "--train.peak_lr", "1e-3") == 0
    cont = [r for r in read_metrics(str(out)) if "loss" in r]
    fresh = [r for r in read_metrics(str(dense[0])) if "loss" in r]
    assert [r["step"] for r in cont] == [1, 2, 3, 4, 5, 6] and cont[1]["lr"] == pytest.approx(5e-4)
    assert cont[0]["loss"] < fresh[0]["loss"] - 0.5


def test_init_from_refuses_shape_changes(corpus, cache, dense, tmp_path, capsys):  # noqa: F811
    code = run(corpus, cache, tmp_path / "x", "--init-from", str(dense[0]), "--model.intermediate_size", "96")
    assert code == 2
    assert "model.intermediate_size=96: --init-from checkpoint has intermediate_size=64" in capsys.readouterr().err
    assert run(corpus, cache, tmp_path / "y", "--init-from", str(tmp_path / "nope")) == 2
    assert "no such file or directory" in capsys.readouterr().err
    # a folder that is no checkpoint (a data folder, --data and --init-from swapped) names the option too
    assert run(corpus, cache, tmp_path / "y", "--init-from", corpus) == 2
    assert f"error: --init-from {corpus!r}: not a checkpoint ({corpus}: no model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_merge_config_rules(capsys):
    base = DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, keep_window_size=32)
    m = merge_config(base, {"hidden_dropout": 0.1, "attention_dropout": 0.05, "max_position_embeddings": 64,
                            "eos_token_id": None, "num_experts": 9})
    assert (m.hidden_dropout, m.attention_dropout, m.max_position_embeddings) == (0.1, 0.05, 64)
    assert m.num_experts == base.num_experts  # irrelevant for a dense model: kept, and said so (--model.is_moe
    assert ("note: model.num_experts=9 not used: the model is dense (model.is_moe false); for dense -> MoE add "
            "--model.is_moe true") in capsys.readouterr().err  # true forgotten: a dense run without a word)
    merge_config(base, {"is_moe": False, "num_experts": 9})  # said dense (as every dense config file does): no note
    assert "not used" not in capsys.readouterr().err
    assert merge_config(base, {"num_key_value_heads": 1, "head_dim": 16}) == base  # same effective shapes
    for field, value in (("hidden_size", 64), ("num_hidden_layers", 3), ("vocab_size", 65), ("variant", "small_doge"),
                         ("tie_word_embeddings", True), ("num_key_value_heads", 2)):
        with pytest.raises(ConfigError, match=f"model.{field}="):
            merge_config(base, {field: value})
    with pytest.raises(ConfigError, match=r"resize the checkpoint first: m = .*; m.resize_token_embeddings\(N\); "
                       r"m.save_pretrained\(NEW\); then --init-from NEW with the new tokenizer"):
        merge_config(base, {"vocab_size": 65})
    moe = merge_config(base, {"is_moe": True, "num_experts": 16, "num_experts_per_tok": 4})
    assert (moe.is_moe, moe.num_experts, moe.num_experts_per_tok) == (True, 16, 4)
    with pytest.raises(ConfigError, match="model.num_experts=64"):
        merge_config(moe, {"num_experts": 64})
    with pytest.raises(ConfigError, match="model.is_moe=false"):
        merge_config(moe, {"is_moe": False})
    assert merge_config(moe, {"num_experts_per_tok": 2}).num_experts_per_tok == 2
    # transformers' "swish" is SiLU: a swish checkpoint takes the configs' "silu" (kept as stored)
    assert merge_config(base.replace(hidden_act="swish"), {"hidden_act": "silu"}).hidden_act == "swish"


def _routed_reference(x, router, down, up, top_k):
    """Spec §3.8 steps 1-6 in float64 numpy: the routed-experts term for x [B, S, d]."""
    B, S, d = x.shape
    N, K = B * S, router.shape[1] // 2
    xs = x.reshape(N, d).astype(np.float64)
    R = (xs @ router.astype(np.float64)).reshape(2, N, K)  # the memory-order quirk: flatten, reshape [2, N, K]
    out = np.zeros((N, d))
    for n in range(N):
        ix, iy = np.argsort(-R[0, n], kind="stable"), np.argsort(-R[1, n], kind="stable")
        scores = (R[0, n][ix][:, None] + R[1, n][iy][None, :]).ravel()
        idx = (ix[:, None] * K + iy[None, :]).ravel()
        pos = np.argsort(-scores, kind="stable")[:top_k]
        w = np.exp(scores[pos] - scores[pos].max())
        w /= w.sum()
        a = down[idx[pos]].astype(np.float64) @ xs[n]
        out[n] = (a / (1 + np.exp(-a)) * w) @ up[idx[pos]].astype(np.float64)
    return out.reshape(B, S, d)


def _layer0(params: dict, names) -> dict:
    return {n: jax.tree.map(lambda a: a[0], params["model"]["layers"]["mlp"][n]) for n in names}


def test_dense_to_moe_init_and_freeze(corpus, cache, dense, tmp_path, capsys):  # noqa: F811
    src, want = dense
    out = tmp_path / "moe"
    args = ["--init-from", str(src), *MOE, "--train.moe_freeze_steps", "2"]
    for stop in (1, 2, 3):  # the same command, stopped (and resumed) after steps 1, 2 and 3
        assert run(corpus, cache, out, *args, "--train.stop_after", str(stop)) == 0
    # another model config is refused, and the refusal says how the run was started
    other = [*MOE[:-1], "2", "--train.moe_freeze_steps", "2", "--train.stop_after", "4"]
    assert run(corpus, cache, out, *other) == 2
    assert f"the run started with --init-from {src}" in capsys.readouterr().err
    cfg, p1 = load_params(str(out), step=1)
    assert (cfg.is_moe, cfg.num_experts, cfg.num_experts_per_tok) == (True, 16, 4)
    dense_cfg = DogeConfig.from_json_file(src / "config.json")
    assert cfg == dense_cfg.replace(is_moe=True, num_experts=16, num_experts_per_tok=4)
    f1 = flat(p1)
    assert {k for k in f1 if k not in want} == {k for k in f1 if is_new(k)} and len(f1) == len(want) + 3
    for k in want:  # attention, norms, residuals, embeddings and the MLP (-> shared expert) copied exactly
        assert np.array_equal(f1[k], want[k]), k
    for k in (k for k in f1 if is_new(k)):  # fresh Normal(0, initializer_range)
        assert abs(f1[k].std() - cfg.initializer_range) < 0.1 * cfg.initializer_range and abs(f1[k].mean()) < 3e-3

    # step-0 model = dense model + the routed term
    dense_model, moe_model = DogeForCausalLM.from_pretrained(str(src)), model_from_params(cfg, p1)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 24)), jnp.int32)
    zeroed = jax.tree.map(lambda a: a, p1)
    zeroed["model"]["layers"]["mlp"]["up_embed"]["embedding"] = jnp.zeros_like(
        p1["model"]["layers"]["mlp"]["up_embed"]["embedding"])
    # up_embed = 0 removes the routed term: exactly the dense logits
    np.testing.assert_array_equal(model_from_params(cfg, zeroed)(ids).logits, dense_model(ids).logits)
    assert np.max(np.abs(moe_model(ids).logits - dense_model(ids).logits)) > 1e-4  # the routed term is not zero
    # one CDMoE layer = the dense MLP + the routed term computed independently from spec §3.8
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 5, cfg.hidden_size)))
    mlp = DogeMLP(dense_cfg, rngs=nnx.Rngs(0))
    nnx.update(mlp, _layer0(load_params(str(src))[1], ("gate_proj", "up_proj", "down_proj")))
    cdmoe = DogeCDMoE(cfg, rngs=nnx.Rngs(0))
    nnx.update(cdmoe, _layer0(p1, ("gate_proj", "up_proj", "down_proj", *NEW)))
    new = _layer0(p1, NEW)
    routed = _routed_reference(x, np.asarray(new["router_gate"]["kernel"]), np.asarray(new["down_embed"]["embedding"]),
                               np.asarray(new["up_embed"]["embedding"]), cfg.num_experts_per_tok)
    got = np.asarray(cdmoe(jnp.asarray(x))[0]) - np.asarray(mlp(jnp.asarray(x))[0])
    # float32 vs float64 on terms of size ~1e-3: observed ~1e-9 absolute
    np.testing.assert_allclose(got, routed, rtol=0, atol=1e-6 * max(1.0, np.abs(routed).max()))
    assert np.abs(routed).max() > 1e-4

    # freeze: after steps 1-2 only the new parameters moved (no update, no weight decay for the others) ...
    f2 = flat(load_params(str(out), step=2)[1])
    for k in f2:
        if is_new(k):
            assert not np.array_equal(f2[k], f1[k]), k
        else:
            assert np.array_equal(f2[k], want[k]), k
    # ... and from step 3 on everything trains
    f3 = flat(load_params(str(out), step=3)[1])
    for k in f3:
        assert not np.array_equal(f3[k], f2[k]), k
    # a changed freeze length is named on resume, as the schedule's fields are (it was not; the
    # last use of this run: the newest keep_checkpoints steps stay)
    assert run(corpus, cache, out, *args[:-1], "3", "--train.stop_after", "4") == 0
    assert "changed settings: moe_freeze_steps 2 -> 3" in capsys.readouterr().err


def test_freeze_needs_moe(corpus, cache, tmp_path, capsys):  # noqa: F811
    assert run(corpus, cache, tmp_path / "x", "--train.moe_freeze_steps", "2") == 2
    assert "train.moe_freeze_steps=2: needs a MoE model" in capsys.readouterr().err
    # as long as the run or longer: only the router and expert tables would ever train (it was accepted silently)
    assert run(corpus, cache, tmp_path / "y", "--model.is_moe", "true", "--model.num_experts", "16",
               "--model.num_experts_per_tok", "4", "--train.moe_freeze_steps", "6") == 2
    assert "error: train.moe_freeze_steps=6: must be < num_training_steps=6" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    # without --init-from it freezes a random model's dense parts: allowed, with a warning (a forgotten --init-from?)
    assert run(corpus, cache, tmp_path / "z", "--model.is_moe", "true", "--model.num_experts", "16",
               "--model.num_experts_per_tok", "4", "--train.moe_freeze_steps", "2", "--train.stop_after", "1") == 0
    assert "warning: train.moe_freeze_steps=2 without --init-from" in capsys.readouterr().err


def test_run_dir_must_match_its_start_and_not_be_a_saved_model(corpus, cache, dense, tmp_path, capsys,  # noqa: F811
                                                              monkeypatch):
    """Re-running into a run directory resumes it: with another (or a new) --init-from that would silently ignore
    the new starting point, so it is refused; so is training into an HF model directory (the run's checkpoints
    would shadow the saved weights for doge_jax's loaders, not for transformers')."""
    src = tmp_path / "scratch"
    shutil.copytree(dense[0], src)
    hf = tmp_path / "hf"
    DogeForCausalLM.from_pretrained(str(src)).save_pretrained(str(hf))
    shutil.copy(src / "tokenizer.json", hf / "tokenizer.json")
    assert run(corpus, cache, src, "--init-from", str(hf)) == 2
    assert "holds a run started from scratch, which this command would resume" in capsys.readouterr().err
    assert run(corpus, cache, hf, "--train.stop_after", "1") == 2
    assert "holds a saved model (model.safetensors)" in capsys.readouterr().err
    assert not (hf / "checkpoints").exists()
    cont = tmp_path / "cont"
    assert run(corpus, cache, cont, "--init-from", str(hf), "--train.stop_after", "1") == 0
    assert run(corpus, cache, cont, "--init-from", str(hf), "--train.stop_after", "2") == 0  # the same start resumes
    monkeypatch.chdir(tmp_path)  # ... also as a relative path from elsewhere, and without --init-from
    assert run(corpus, cache, cont, "--init-from", "hf", "--train.stop_after", "3") == 0
    assert run(corpus, cache, cont, "--train.stop_after", "4") == 0
    assert list_steps(str(cont))[-1] == 4
    assert run(corpus, cache, cont, "--init-from", str(src)) == 2  # another start
    assert "holds a run started from " in capsys.readouterr().err


def test_another_tokenizer_than_the_checkpoints_warns(corpus, cache, dense, tmp_path, capsys):  # noqa: F811
    """--train.tokenizer next to --init-from replaces the checkpoint's tokenizer: allowed, but said."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["some other text entirely"] * 20,
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<unk>", "<|end_of_text|>"]))
    tok.save(str(tmp_path / "other.json"))
    assert run(corpus, cache, tmp_path / "a", "--init-from", str(dense[0]), "--train.stop_after", "1",
               "--train.tokenizer", str(dense[0] / "tokenizer.json")) == 0
    assert "is not the tokenizer of" not in capsys.readouterr().err  # the same one: no warning
    assert run(corpus, cache, tmp_path / "b", "--init-from", str(dense[0]), "--train.stop_after", "1",
               "--train.tokenizer", str(tmp_path / "other.json")) == 0
    assert "is not the tokenizer of" in capsys.readouterr().err


def test_resume_without_init_from_takes_the_runs_model(corpus, cache, dense, tmp_path, capsys,  # noqa: F811
                                                       monkeypatch):
    """A run started with --init-from resumes by the command without it, even when that command's config file
    (here doge_jax's defaults plus no model field) describes another model: the run's config.json is the model
    (README). Model fields asked for explicitly are still checked against it."""
    base = [*TRAIN_ONLY, "--data", corpus, "--out_dir", str(tmp_path / "cont"), "--train.cache_dir", cache]
    assert T.main([*base, "--init-from", str(dense[0]), "--train.stop_after", "1"]) == 0
    capsys.readouterr()
    assert T.main([*base, "--train.stop_after", "2"]) == 0  # before: "holds a run with a different model config"
    err = capsys.readouterr().err
    assert "the model config is the run's" in err and "resumed from checkpoint step 1" in err
    assert list_steps(str(tmp_path / "cont"))[-1] == 2
    assert T.main([*base, "--model.hidden_size", "48"]) == 2
    assert "model.hidden_size=48: the run's" in capsys.readouterr().err
    # no checkpoint of the run restores: an error, nothing moved (it used to move them all aside and start over,
    # also when the reads failed for a reason that passes: an outage); with the checkpoints moved aside by hand it
    # starts again by the run's first command
    for root, _, files in os.walk(tmp_path / "cont" / "checkpoints"):
        for f in files:
            if "params" in root:
                (Path(root) / f).write_bytes(b"garbage")
    monkeypatch.setattr(TrainCheckpointer, "READ_RETRY_DELAYS", (0.0, 0.0))
    metrics = (tmp_path / "cont" / "metrics.jsonl").read_text()
    assert T.main([*base, "--train.stop_after", "1"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: no checkpoint in .* could be read \(step 2: .*; step 1: .*\)\. Nothing was moved", err)
    assert list_steps(str(tmp_path / "cont")) == [1, 2] and not (tmp_path / "cont" / "corrupt_checkpoints").exists()
    assert (tmp_path / "cont" / "metrics.jsonl").read_text() == metrics
    shutil.move(tmp_path / "cont" / "checkpoints", tmp_path / "aside")  # then the run's first command again
    assert T.main([*base, "--init-from", str(dense[0]), "--train.stop_after", "1"]) == 0
    assert f"initialised from {dense[0]}" in capsys.readouterr().err
    # ... or the command without --init-from: the run starts again from the recorded one (it was refused as "a
    # different model config": the run has no checkpoint yet, as after a first step that diverged)
    shutil.move(tmp_path / "cont" / "checkpoints", tmp_path / "aside2")
    assert T.main([*base, "--train.stop_after", "1"]) == 0
    err = capsys.readouterr().err
    assert "the model config is the run's" in err and f"initialised from {dense[0]}" in err, err[-2000:]
    # doge_torch.train and other load_configs callers never look at a doge_jax run (runs/<config name>)
    from doge_jax.train_config import load_configs

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tmp_path / "cont", tmp_path / "runs" / "tiny")
    cfg, tc = load_configs(None, [])  # (no --config: configs/tiny.yaml, run directory runs/tiny)
    assert cfg.hidden_size == 128 and tc.init_from is None  # configs/tiny.yaml's own model
    cfg, tc = load_configs(None, [], resume_runs=True)  # doge_jax.train's
    assert cfg.hidden_size == DogeConfig.from_json_file(dense[0] / "config.json").hidden_size
    assert tc.init_from == str(dense[0])


def test_a_checkpoint_that_does_not_fit_leaves_no_run(corpus, cache, dense, tmp_path, capsys):  # noqa: F811
    """--init-from a checkpoint whose weights do not fit its config (or the model config): one error and no run
    directory, so the corrected command starts cleanly (before: the directory was written first and then refused
    the corrected command as a different run)."""
    import json

    hf = tmp_path / "hf"
    DogeForCausalLM.from_pretrained(str(dense[0])).save_pretrained(str(hf))
    shutil.copy(dense[0] / "tokenizer.json", hf / "tokenizer.json")
    bad = tmp_path / "bad"
    shutil.copytree(hf, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "vocab_size": 400}))
    out = tmp_path / "run"
    base = [*TRAIN_ONLY, "--data", corpus, "--out_dir", str(out), "--train.cache_dir", cache]
    assert T.main([*base, "--init-from", str(bad)]) == 2
    assert "wrong shapes" in capsys.readouterr().err
    assert not out.exists()
    assert T.main([*base, "--init-from", str(hf), "--train.stop_after", "1"]) == 0
    assert list_steps(str(out)) == [1]


def test_init_from_in_a_config_file_expands_the_home_directory(tmp_path, monkeypatch):
    """train.init_from: ~/ckpt reads the checkpoint under $HOME, as data paths expand ~ (it was 'no such file')."""
    from doge_jax.train_config import load_configs

    monkeypatch.setenv("HOME", str(tmp_path))
    base = DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, keep_window_size=32)
    DogeForCausalLM(base).save_pretrained(str(tmp_path / "ckpt"))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  init_from: ~/ckpt\n  seq_len: 16\n")
    cfg, tc = load_configs(str(cfg_file), [])
    assert tc.init_from == str(tmp_path / "ckpt") and cfg.hidden_size == 32


def test_start_generation_config_keeps_settings_and_takes_changed_ids(tmp_path):
    """--init-from carries the start's generation_config.json (sampling settings, its own EOS list); when the run
    changes a token id (--model.eos_token_id, another tokenizer's), the ids are the run's: the start's EOS would
    end generation on the old token."""
    import json

    from doge_jax.init import start_generation_config

    cfg = DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                     pad_token_id=2)
    DogeForCausalLM(cfg, rngs=nnx.Rngs(0)).save_pretrained(str(tmp_path / "m"))
    json.dump({"bos_token_id": 0, "eos_token_id": [1, 5], "pad_token_id": 2, "do_sample": True, "temperature": 0.7},
              open(tmp_path / "m" / "generation_config.json", "w"))
    same = start_generation_config(str(tmp_path / "m"), cfg)
    assert (same.eos_token_id, same.temperature, same.do_sample) == ((1, 5), 0.7, True)
    moved = start_generation_config(str(tmp_path / "m"), cfg.replace(eos_token_id=7))
    assert (moved.bos_token_id, moved.eos_token_id, moved.pad_token_id, moved.temperature) == (0, 7, 2, 0.7)
    os.remove(tmp_path / "m" / "generation_config.json")
    assert start_generation_config(str(tmp_path / "m"), cfg) is None


def test_a_16_bit_start_is_said_to_train_as_float32(tmp_path, capsys):
    """--init-from a bfloat16 checkpoint: both trainers train (and save) float32 parameters, and say so; a float32
    checkpoint gets no note."""
    import torch
    from conftest import make_hf_model, save_hf

    import doge_torch.train as TT
    from doge_jax.init import checkpoint_config, init_params

    f32 = save_hf(make_hf_model(), tmp_path / "f32")
    bf16 = save_hf(make_hf_model().to(torch.bfloat16), tmp_path / "bf16")
    for path, noted in ((f32, False), (bf16, True)):
        cfg = checkpoint_config(path)
        params = init_params(path, cfg, 0)
        assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
        model = TT.init_from(path, cfg)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        err = capsys.readouterr().err
        note = (f"note: --init-from {path} holds bfloat16 weights: they are trained, and saved, as float32 (python -m "
                "convert --dtype bfloat16 casts a saved model back)")
        assert err.count(note) == (2 if noted else 0) and ("--init-from" in err) == noted, err
