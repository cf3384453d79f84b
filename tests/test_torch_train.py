"""doge_torch training: WSD multiplier and decay groups equal doge_jax.optim's, the accumulated train step, a 20-step
float32 run equal to the same run in doge_jax (issue 6 item 5), and the command-line entry point."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import TINY, TINY_MOE, make_hf_model, random_ids, save_hf, unique_ids
from flax import nnx

import doge_jax
import doge_torch
from doge_jax.config import ConfigError
from doge_jax.hf import hf_state_dict
from doge_jax.optim import decay_mask, make_optimizer, wsd_schedule
from doge_jax.optim import hf_name_decayed as jax_hf_name_decayed
from doge_torch.optim import decayed_parameter_names, hf_name_decayed, param_groups, wsd_lambda, wsd_scheduler
from doge_torch.optim import make_optimizer as torch_make_optimizer
from doge_torch.train import cli, count_items, main, train_step


@pytest.fixture(autouse=True)
def _token_cache_in_tmp(tmp_path, monkeypatch):
    """doge_torch.train caches tokenized text under train.cache_dir (~/.cache/doge_jax): not in the tester's home."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _bpe(texts: list[str], specials: list[str], path) -> object:
    """A tiny byte-level BPE (vocabulary 300) trained on `texts`, saved as `path` (a tokenizer.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    tok.save(str(path))
    return tok


WSD_CASES = [
    dict(num_warmup_steps=3, num_decay_steps=5, num_training_steps=20, warmup_type="linear", decay_type="linear"),
    dict(num_warmup_steps=13, num_decay_steps=37, num_training_steps=80, warmup_type="cosine", decay_type="cosine",
         min_lr_ratio=0.1),
    dict(num_warmup_steps=10, num_decay_steps=40, num_training_steps=60, warmup_type="1-sqrt", decay_type="1-sqrt"),
    dict(num_warmup_steps=10, num_decay_steps=40, num_training_steps=60, num_cycles=1.5),
    dict(num_warmup_steps=0, num_decay_steps=0, num_training_steps=5),
    dict(num_warmup_steps=5, num_decay_steps=10, num_stable_steps=7, num_training_steps=1000, min_lr_ratio=0.1),
    dict(num_warmup_steps=1, num_decay_steps=1, num_training_steps=2, min_lr_ratio=0.1),
    dict(num_warmup_steps=800, num_decay_steps=800, num_training_steps=8000, decay_type="linear"),
]


@pytest.mark.parametrize("kwargs", WSD_CASES)
def test_wsd_lambda_equals_doge_jax_and_transformers(kwargs):
    """Every step (plus some past the end): bit-equal to transformers' float64 lambda; equal to doge_jax's float32
    wsd_schedule up to float32 rounding (exact zeros exact). Through LambdaLR the LRs are the same."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = wsd_lambda(**kwargs)
        hf = transformers.get_wsd_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                           **kwargs).lr_lambdas[0]
        jax_sched = wsd_schedule(1.0, **kwargs)
    stable = kwargs.get("num_stable_steps")
    if stable is None:
        stable = kwargs["num_training_steps"] - kwargs["num_warmup_steps"] - kwargs["num_decay_steps"]
    n = kwargs["num_warmup_steps"] + stable + kwargs["num_decay_steps"] + 5
    got = np.array([ours(s) for s in range(n)])
    assert np.array_equal(got, np.array([hf(s) for s in range(n)]))
    want = np.asarray(jax.jit(jax_sched)(jnp.arange(n)), np.float64)
    np.testing.assert_array_equal(got == 0, want == 0)
    rel = np.abs(got - want) / np.where(want == 0, 1.0, np.abs(want))
    assert rel.max() <= 1e-6, (int(rel.argmax()), got[rel.argmax()], want[rel.argmax()])

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = wsd_scheduler(opt, **kwargs)
    lrs = []
    for _ in range(min(n, 60)):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs, 3e-3 * got[:len(lrs)], rtol=1e-15, atol=0)


def test_wsd_lambda_errors():
    with pytest.raises(ValueError, match="num_training_steps or num_stable_steps"):
        wsd_lambda(1, 1)
    with pytest.raises(ValueError, match="decay_type"):
        wsd_lambda(1, 1, 10, decay_type="sqrt")
    with pytest.raises(ValueError, match="stable phase"):
        wsd_lambda(8, 8, num_training_steps=10)
    with pytest.warns(UserWarning, match="num_stable_steps"):
        wsd_lambda(1, 1, num_training_steps=10, num_stable_steps=3)


def test_decay_groups_equal_hf_rule():
    """Name rule identical to doge_jax.optim's and to the HF Trainer's; groups partition the parameters."""
    hf = make_hf_model(perturb=False, attention_bias=True, mlp_bias=True, **TINY_MOE)
    model = doge_torch.DogeForCausalLM(doge_jax.DogeConfig.from_hf_dict(hf.config.to_dict()))
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in hf.named_parameters()]
    trainer_rule = set(transformers.Trainer.get_decay_parameter_names(None, hf))
    assert decayed_parameter_names(model) == trainer_rule
    extra = ["model.norm.weight", "x.rmsnorm.w", "a.LayerNorm.b", "norm", "q_norm.weight", "normal.weight",
             "enorm.weight", "x.norms.y", "bias_free", "A", "layers.0.input_residual"]
    for name in names + extra:
        assert hf_name_decayed(name) == jax_hf_name_decayed(name), name
    decayed, plain = param_groups(model, 0.01)
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert [by_id[id(p)] for p in decayed["params"]] == [n for n in names if n in trainer_rule]
    assert [by_id[id(p)] for p in plain["params"]] == [n for n in names if n not in trainer_rule]
    assert {n.split(".", 3)[-1] for n in names if n not in trainer_rule and ".layers." in n} >= {
        "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
        "self_attn.k_norm.weight"}
    # A LayerNorm module's parameters are excluded whatever they are called (the Trainer's module rule).
    seq = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.LayerNorm(2))
    assert decayed_parameter_names(seq) == {"0.weight"}


# ---- the 20-step parity run ----------------------------------------------------------------------------------------
STEPS, WARMUP, DECAY = 20, 3, 5
WD = 0.01


def _step_batches(vocab: int, T: int, unique: bool, pool: int = 5) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """STEPS optimizer steps of 2 micro-batches [2, T]: the first ignores its first 3 labels, the second a random
    ~40% of its labels (so the two hold different numbers of valid tokens). Steps cycle through `pool` fixed
    step batches, so the model can learn (memorise) them and the loss goes down."""
    out = []
    rng = np.random.default_rng(7)
    for s in range(pool):
        mbs = []
        for j in range(2):
            make = unique_ids if unique else random_ids
            ids = make(2, T, vocab, seed=1000 + 2 * s + j)
            labels = ids.copy()
            if j == 0:
                labels[:, :3] = -100
            else:
                labels[rng.random(labels.shape) < 0.4] = -100
            mbs.append((ids, labels))
        out.append(mbs)
    return [out[s % pool] for s in range(STEPS)]


def _torch_run(path, steps, lr, max_norm, dtype=torch.float32):
    model = doge_torch.DogeForCausalLM.from_pretrained(path, dtype=dtype).train()
    opt = torch_make_optimizer(model, lr, weight_decay=WD)
    sched = wsd_scheduler(opt, WARMUP, DECAY, STEPS, warmup_type="linear", decay_type="linear")
    hist = [train_step(model, opt, sched, [(torch.as_tensor(i), torch.as_tensor(la)) for i, la in mbs], max_norm)
            for mbs in steps]
    params = {n: p.detach().double().numpy() for n, p in model.named_parameters()}
    return hist, params


def _jax_run(path, steps, lr, max_norm):
    model = doge_jax.DogeForCausalLM.from_pretrained(path)
    sched = wsd_schedule(lr, WARMUP, DECAY, STEPS, warmup_type="linear", decay_type="linear")
    opt = nnx.Optimizer(model, make_optimizer(sched, weight_decay=WD, max_grad_norm=max_norm, mask=decay_mask),
                        wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, mbs):
        n = sum(jnp.sum(labels[:, 1:] != -100) for _, labels in mbs)
        total, grads = 0.0, None
        def loss_fn(m, ids, labels):
            return m(ids, labels=labels, num_items_in_batch=n).loss

        for ids, labels in mbs:
            loss, g = nnx.value_and_grad(loss_fn)(model, ids, labels)
            total = total + loss
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        opt.update(model, grads)
        return total

    with jax.default_matmul_precision("highest"):
        losses = [float(step(model, opt, [(jnp.asarray(i), jnp.asarray(la)) for i, la in mbs])) for mbs in steps]
    return losses, {k: np.asarray(v, np.float64) for k, v in hf_state_dict(model).items()}


def _rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


PARITY_CASES = {
    # Dense, GQA, T < keep_window. Grad norms run 1.8-2.9, so max_norm 2.0 clips about half of the steps.
    # LR 3e-3 is tiny.yaml's peak. At 1e-2 (half the init std per step) the run itself is float32-chaotic: rows of
    # embed_tokens / dt_proj with tiny gradients (the ill-conditioned dynamic-mask bias path) carry 2-20% float32
    # error, and Adam turns it into lr-sized steps; torch float32 then differs from torch float64 by 1.2e-4, so
    # no float32 implementation could be held to 1e-4 there.
    "dense": dict(overrides={}, T=24, unique=False, lr=3e-3, max_norm=2.0),
    # CDMoE with the keep-window top-k active (T > keep_window_size), unique ids so the top-k has no ties.
    "moe_keep_window": dict(overrides=dict(**TINY_MOE, keep_window_size=16), T=24, unique=True, lr=3e-3,
                            max_norm=2.0),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_training_parity_with_doge_jax(tmp_path, case):
    """20 float32 steps (WSD 3/12/5, AdamW + decay mask + clipping, 2 accumulated micro-batches) from the same
    init on the same batches: per-step losses and final parameters of doge_torch and doge_jax within 1e-4."""
    c = PARITY_CASES[case]
    path = save_hf(make_hf_model(**c["overrides"]), tmp_path / "init")
    steps = _step_batches(128, c["T"], c["unique"])
    hist, t_params = _torch_run(path, steps, c["lr"], c["max_norm"])
    j_losses, j_params = _jax_run(path, steps, c["lr"], c["max_norm"])

    t_losses = np.array([h["loss"] for h in hist])
    norms = np.array([h["grad_norm"] for h in hist])
    loss_rel = np.abs(np.array(j_losses) - t_losses) / np.abs(t_losses)
    assert set(j_params) == set(t_params)
    param_rel = {k: _rel(j_params[k], t_params[k]) for k in t_params}
    worst = max(param_rel, key=param_rel.get)
    print(f"\n[{case}] max loss rel {loss_rel.max():.2e}; max param rel {param_rel[worst]:.2e} ({worst}); "
          f"grad norms {np.round(norms, 2).tolist()}")
    assert (norms > c["max_norm"]).sum() >= 3 and (norms < c["max_norm"]).sum() >= 3, norms  # clipping sometimes
    assert t_losses[-1] < t_losses[0]
    assert loss_rel.max() <= 1e-4, loss_rel
    assert param_rel[worst] <= 1e-4, sorted(param_rel.items(), key=lambda kv: -kv[1])[:5]


# ---- the step and the entry point ---------------------------------------------------------------------------------
def test_train_step_accumulation_is_the_token_mean(tmp_path):
    """Two accumulated micro-batches give the gradient of the token mean over both (one big batch), not the mean
    of the two means; num_items counts shifted labels only."""
    path = save_hf(make_hf_model(), tmp_path / "init")
    ids = random_ids(4, 16, 128, seed=3)
    labels = ids.copy()
    labels[:2, :10] = -100
    labels[2:, 0] = -100  # the first label is dropped by the shift anyway
    halves = [(torch.as_tensor(ids[:2]), torch.as_tensor(labels[:2])),
              (torch.as_tensor(ids[2:]), torch.as_tensor(labels[2:]))]
    assert int(count_items(halves)) == 2 * 6 + 2 * 15

    grads = []
    for mbs in (halves, [(torch.as_tensor(ids), torch.as_tensor(labels))]):
        model = doge_torch.DogeForCausalLM.from_pretrained(path).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        out = train_step(model, opt, None, mbs, max_grad_norm=None)
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters()}, out))
    (g_acc, out_acc), (g_one, out_one) = grads
    assert out_acc["num_items"] == out_one["num_items"] == 42
    assert math.isclose(out_acc["loss"], out_one["loss"], rel_tol=1e-6)
    for n in g_one:
        torch.testing.assert_close(g_acc[n], g_one[n], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="-100"):
        train_step(model, opt, None, [(torch.as_tensor(ids), torch.full_like(torch.as_tensor(ids), -100))])


def test_train_step_without_sync_returns_device_tensors(tmp_path):
    """sync=False: the same step (same parameters after it, same loss and norm), loss and grad_norm left as 0-d
    tensors on the device for the caller to read later."""
    path = save_hf(make_hf_model(), tmp_path / "init")
    ids = torch.as_tensor(random_ids(2, 16, 128, seed=5))
    outs, params = [], []
    for sync in (True, False):
        model = doge_torch.DogeForCausalLM.from_pretrained(path).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        outs.append(train_step(model, opt, None, [(ids, ids)], max_grad_norm=0.5, sync=sync))
        params.append([p.detach().clone() for p in model.parameters()])
    synced, lazy = outs
    assert isinstance(synced["loss"], float) and isinstance(lazy["loss"], torch.Tensor)
    assert lazy["loss"].ndim == 0 and lazy["grad_norm"].ndim == 0 and lazy["num_items"] == synced["num_items"]
    assert float(lazy["loss"]) == synced["loss"] and float(lazy["grad_norm"]) == synced["grad_norm"]
    for a, b in zip(*params):
        assert torch.equal(a, b)



def test_train_step_checks_ids_on_the_host_and_the_model_skips_its_check(tmp_path):
    """train_step validates token ids where the batch lives (the CPU: no device sync) before touching the model,
    which then skips its own check (on a GPU a sync per micro-batch): bad ids name themselves, nothing changes."""
    path = save_hf(make_hf_model(), tmp_path / "init")
    model = doge_torch.DogeForCausalLM.from_pretrained(path).train()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.as_tensor(random_ids(2, 16, 128, seed=5))
    bad = ids.clone()
    bad[1, 3] = 128
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=128\): \[128\]"):
        train_step(model, opt, None, [(ids, ids), (bad, ids)])
    with pytest.raises(ValueError, match=r"labels outside \[0, vocab_size=128\) and not -100: \[128\]"):
        train_step(model, opt, None, [(ids, ids), (ids, bad)])  # before: an IndexError (a CUDA assert on a GPU)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="outside"):  # the model's own check, outside the step
        model(bad)
    with doge_torch.model.token_ids_checked(), pytest.raises(IndexError):  # skipped: torch's CPU gather complains
        model(bad)
    with pytest.raises(ValueError, match="outside"):  # the check is back after the block
        model(bad)


def test_cli_three_steps_npy(tmp_path):
    """`python -m doge_torch.train --config configs/tiny.yaml --data tokens.npy --max-steps 3` trains and saves."""
    tokens = np.random.default_rng(0).integers(0, 4096, size=20_000).astype(np.uint16)
    np.save(tmp_path / "tokens.npy", tokens)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(open("configs/tiny.yaml").read().replace("seq_len: 256", "seq_len: 64")
                   .replace("global_batch_tokens: 4096", "global_batch_tokens: 256")
                   .replace("grad_accum: 1", "grad_accum: 2"))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "doge_torch.train", "--config", str(cfg), "--data",
                           str(tmp_path / "tokens.npy"), "--max-steps", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [ln.split()[1] for ln in proc.stdout.splitlines()
            if ln.startswith("step ") and "val_loss" not in ln] == ["1", "2", "3"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 3] and set(lines[-1]) == {"step", "val_loss", "val_ppl"}
    assert "stopped after step 3 of 400" in proc.stdout and (out / "checkpoint-3" / "optimizer.pt").is_file()
    assert f"saved {out / 'final'} (the model at step 3)" in proc.stdout  # (written, unsaid)
    model = doge_torch.DogeForCausalLM.from_pretrained(str(out / "final"))
    assert model.config.vocab_size == 4096


def test_cli_reads_each_loss_one_step_behind(tmp_path, capsys, monkeypatch):
    """Step s's loss is read back (a device sync) only after step s + 1 is queued, so the device never waits for
    the host; --log-every 2 prints steps 2 and 4 (and the first); history and metrics.jsonl hold every step."""
    import doge_torch.train as dtt

    events, real = [], dtt.train_step

    class Lazy(float):  # a loss on the "device": reading it is the sync
        def __float__(self):
            events.append("read")
            return float.__float__(self)

    def spy(*a, **k):
        assert k.get("sync") is False
        events.append("step")
        m = real(*a, **k)
        m["loss"] = Lazy(m["loss"])
        return m

    monkeypatch.setattr(dtt, "train_step", spy)
    tokens = np.random.default_rng(1).integers(0, 4096, size=20_000).astype(np.uint16)
    np.save(tmp_path / "tokens.npy", tokens)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(open("configs/tiny.yaml").read().replace("seq_len: 256", "seq_len: 32")
                   .replace("global_batch_tokens: 4096", "global_batch_tokens: 64"))
    hist = main(["--config", str(cfg), "--data", str(tmp_path / "tokens.npy"), "--max-steps", "4", "--log-every",
                 "2", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert events == ["step", "step", "read", "step", "read", "step", "read", "read"]
    printed = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith("step ") and "val_loss" not in line]
    assert [int(line.split()[1]) for line in printed] == [1, 2, 4]
    assert [h["step"] for h in hist] == [1, 2, 3, 4]  # steps done, as doge_jax counts them
    assert all(type(h["loss"]) is float and isinstance(h["grad_norm"], float) and math.isfinite(h["loss"])
               for h in hist)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lines = [x for x in lines if "loss" in x]  # (not the validation records)
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and lines[1]["loss"] == hist[1]["loss"]
    assert set(lines[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_sec"}  # doge_jax's metric names


def test_cli_stops_at_the_first_non_finite_loss(tmp_path, capsys):
    tokens = np.random.default_rng(1).integers(0, 4096, size=20_000).astype(np.uint16)
    np.save(tmp_path / "tokens.npy", tokens)
    cfg = tmp_path / "tiny.yaml"
    text = open("configs/tiny.yaml").read().replace("seq_len: 256", "seq_len: 32")
    text = text.replace("peak_lr: 3.0e-3", "peak_lr: 1.0e30").replace("num_warmup_steps: 40", "num_warmup_steps: 0")
    cfg.write_text(text.replace("global_batch_tokens: 4096", "global_batch_tokens: 64"))
    with pytest.raises(SystemExit, match="non-finite loss/grad norm at step") as exc:
        main(["--config", str(cfg), "--data", str(tmp_path / "tokens.npy"), "--max-steps", "8", "--device", "cpu",
              "--out", str(tmp_path / "run")])
    first_bad = int(str(exc.value).split("at step ")[1].split()[0])
    # metrics.jsonl stays valid JSON (before: a bare NaN), the steps before the bad one
    lines = [json.loads(x, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
             for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lines = [x for x in lines if "loss" in x]  # (not the validation records)
    assert lines[-1]["step"] == first_bad - 1 >= 1 and "last good checkpoint: none saved" in str(exc.value)
    # the command line: one error line, exit 3 as doge_jax.train (was exit 1, the bare message)
    proc = subprocess.run([sys.executable, "-m", "doge_torch.train", "--config", str(cfg), "--data",
                           str(tmp_path / "tokens.npy"), "--max-steps", "8", "--device", "cpu"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: non-finite loss/grad norm at step")
    # a re-run (a sane lr) starts over and says so (it did silently, replacing the metrics)
    cfg.write_text(cfg.read_text().replace("peak_lr: 1.0e30", "peak_lr: 3.0e-3"))
    main(["--config", str(cfg), "--data", str(tmp_path / "tokens.npy"), "--max-steps", "1", "--device", "cpu",
          "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "holds no checkpoint to resume from: an earlier start saved none" in err
    # (no checkpoint holds the first start's --init-from: the note says that one needs it again)
    assert "starting over from step 0, from scratch (a run started with --init-from needs it again)" in err, err


def test_cli_an_update_that_overflows_is_never_resumed_from(tmp_path):
    """lr 1e12 after a zero-lr first step (as doge_jax's test): step 2's loss is finite, its weights give step 3
    a NaN loss. checkpoint-2 goes to diverged_checkpoints/ and checkpoint-1 is named the last good one (before:
    checkpoint-2 stayed, and every resume from it diverged at once); evaluating each step stops at step 2's NaN
    val_loss before checkpoint-2 is written."""
    cfg = _small_run_config(tmp_path)
    text = open(cfg).read().replace("peak_lr: 3.0e-3", "peak_lr: 1.0e12").replace("num_warmup_steps: 2",
                                                                                  "num_warmup_steps: 1")
    open(cfg, "w").write(text.replace("checkpoint_every: 2", "checkpoint_every: 1") + "  eval_every: 0\n")
    args = ["--config", cfg, "--data", str(tmp_path / "tokens.npy"), "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(tmp_path / "run")])
    said = str(exc.value)
    assert "at step 3" in said and "checkpoint-2 holds the weights that gave it" in said, said
    assert said.endswith(f"last good checkpoint: {tmp_path / 'run' / 'checkpoint-1'}")
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1"]
    assert os.listdir(tmp_path / "run" / "diverged_checkpoints")[0].startswith("checkpoint-2-")
    open(cfg, "w").write(text.replace("checkpoint_every: 2", "checkpoint_every: 1") + "  eval_every: 1\n")
    with pytest.raises(SystemExit, match="non-finite val_loss at step 2") as exc:
        main([*args, "--out", str(tmp_path / "ev")])
    assert sorted(p.name for p in (tmp_path / "ev").glob("checkpoint-*")) == ["checkpoint-1"]


def test_cli_text_with_tokenizer(tmp_path, capsys):
    """Text data through a tokenizer.json (a tiny BPE trained here); in process, bf16 autocast on CPU. Without
    --out nothing is saved, and a note says so (it did not)."""
    text = "".join(open(p).read() for p in ("doge_torch/train.py", "doge_torch/optim.py"))
    (tmp_path / "a.txt").write_text(text)
    _bpe([text], ["<unk>", "<eos>"], tmp_path / "tokenizer.json")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(open("configs/tiny.yaml").read().replace("seq_len: 256", "seq_len: 32")
                   .replace("global_batch_tokens: 4096", "global_batch_tokens: 64")
                   .replace("eos_token_id: null", "eos_token_id: 1").replace("pad_token_id: null", "pad_token_id: 1"))
    hist = main(["--config", str(cfg), "--data", str(tmp_path / "a.txt"), "--tokenizer",
                 str(tmp_path / "tokenizer.json"), "--max-steps", "3", "--bf16", "--device", "cpu"])
    assert len(hist) == 3 and all(math.isfinite(h["loss"]) for h in hist)
    assert hist[0]["lr"] == 0.0 and hist[1]["lr"] == pytest.approx(3e-3 / 40)
    assert "note: no --out: nothing is saved" in capsys.readouterr().err
    assert set(os.listdir(tmp_path)) - {"home"} == {"a.txt", "tokenizer.json", "tiny.yaml"}  # (home: HOME)
    with pytest.raises(ValueError, match="tokenizer"):
        main(["--config", str(cfg), "--data", str(tmp_path / "a.txt"), "--max-steps", "1"])


def test_cli_resume_keeps_the_runs_tokenizer(tmp_path, capsys):
    """Checkpoints carry the run's tokenizer: a resume with another --tokenizer is refused (before: it trained on
    on the new ids and OUT/final got the new tokenizer with the old embeddings), one without --tokenizer uses the
    run's; --init-from a checkpoint tokenizes text with its tokenizer (before: "text data needs --tokenizer")."""
    text = "".join(open(p).read() for p in ("doge_torch/train.py", "doge_torch/optim.py"))
    (tmp_path / "a.txt").write_text(text)
    _bpe([text], ["<unk>", "<eos>"], tmp_path / "tokenizer.json")
    _bpe([text[::-1]], ["<unk>", "<eos>"], tmp_path / "other.json")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(open("configs/tiny.yaml").read().replace("seq_len: 256", "seq_len: 32")
                   .replace("global_batch_tokens: 4096", "global_batch_tokens: 64")
                   .replace("eos_token_id: null", "eos_token_id: 1").replace("pad_token_id: null", "pad_token_id: 1"))
    base = ["--config", str(cfg), "--data", str(tmp_path / "a.txt"), "--device", "cpu", "--out", str(tmp_path / "r")]
    assert cli([*base, "--tokenizer", str(tmp_path / "tokenizer.json"), "--max-steps", "2"]) == 0
    saved = tmp_path / "r" / "checkpoint-2" / "tokenizer.json"
    assert json.load(open(saved))["model"]["vocab"] == json.load(open(tmp_path / "tokenizer.json"))["model"]["vocab"]
    capsys.readouterr()
    assert cli([*base, "--tokenizer", str(tmp_path / "other.json"), "--max-steps", "3"]) == 2
    assert "differs from the tokenizer of the run in" in capsys.readouterr().err
    assert cli([*base, "--max-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "changed since" not in out, out
    start = ["--config", str(cfg), "--data", str(tmp_path / "a.txt"), "--device", "cpu", "--max-steps", "1"]
    assert cli([*start, "--init-from", str(tmp_path / "r" / "checkpoint-3")]) == 0
    # the run directory itself is not a model: the error names the ones in it (before: "not a checkpoint")
    from convert import main as convert

    hint = "doge_torch.train run directory: pass one of its model directories, final/ or checkpoint-3/ (the newest"
    capsys.readouterr()
    assert convert([str(tmp_path / "r"), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert hint in capsys.readouterr().err
    assert cli([*start, "--init-from", str(tmp_path / "r")]) == 2
    assert hint in capsys.readouterr().err


def test_cli_validates_like_doge_jax(tmp_path, capsys):
    """The train: section goes through doge_jax's TrainConfig (before: unknown keys ignored, other defaults, a
    batch floor-divided silently); bad input is one `error:` line, exit 2 (before: tracebacks)."""

    tokens = np.random.default_rng(0).integers(0, 4096, size=5_000).astype(np.uint16)
    np.save(tmp_path / "tokens.npy", tokens)
    base = open("configs/tiny.yaml").read().replace("seq_len: 256", "seq_len: 64")
    base = base.replace("global_batch_tokens: 4096", "global_batch_tokens: 256")
    cases = [
        (base.replace("peak_lr:", "peak_lrr:"), [], "unknown config key train.peak_lrr (did you mean train.peak_lr"),
        (base.replace("global_batch_tokens: 256", "global_batch_tokens: 700"), [],
         "train.global_batch_tokens=700: must be a multiple of grad_accum x seq_len = 64"),
        (base.replace("seq_len: 64", "seq_len: 4096").replace("global_batch_tokens: 256", "global_batch_tokens: 4096"),
         [], "train.seq_len=4096 > model.max_position_embeddings"),
        (base.replace("max_grad_norm: 1.0", "max_grad_norm: -1.0"), [], "train.max_grad_norm=-1.0"),
        (base, ["--data", str(tmp_path / "nope.npy")], "nope.npy' does not exist"),
        (base.replace("vocab_size: 4096", "vocab_size: 512"), [], "but model.vocab_size is 512"),
        (base, ["--data", __file__, "--tokenizer", str(tmp_path / "nope.json")], "nope.json' does not exist"),
        (base, ["--data", __file__, "--tokenizer", str(tmp_path / "tokens.npy")], "not a readable tokenizer.json"),
    ]
    for i, (text, extra, want) in enumerate(cases):
        cfg = tmp_path / f"c{i}.yaml"
        cfg.write_text(text)
        argv = ["--config", str(cfg), "--data", str(tmp_path / "tokens.npy"), "--max-steps", "1", "--device", "cpu"]
        assert cli(argv + extra) == 2, want
        err = capsys.readouterr().err
        assert err.startswith("error: ") and want in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as e:
        main(["--config", str(tmp_path / "c0.yaml"), "--data", "x.npy", "--log-every", "0"])
    assert e.value.code == 2 and "--log-every 0: must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # before: a RuntimeError traceback from torch.device
        main(["--config", str(tmp_path / "c0.yaml"), "--data", "x.npy", "--device", "gpu"])
    assert e.value.code == 2 and "--device gpu: not a torch device" in capsys.readouterr().err


def test_cli_init_from_applies_the_config_files_model_fields(tmp_path, capsys):
    """`--init-from DENSE --config moe.yaml`: the checkpoint's weights in the MoE model the config asks for (dense
    MLP -> shared expert, fresh router and expert tables), as doge_jax.train does; before, the config's model
    fields were dropped and a dense model trained."""
    tokens = np.random.default_rng(0).integers(0, 4096, size=5_000).astype(np.uint16)
    np.save(tmp_path / "tokens.npy", tokens)
    dense_cfg = doge_torch.DogeConfig.from_yaml("configs/tiny.yaml")
    torch.manual_seed(3)
    dense = doge_torch.DogeForCausalLM(dense_cfg)
    dense.save_pretrained(str(tmp_path / "dense"))
    cfg = tmp_path / "moe.yaml"
    cfg.write_text(open("configs/tiny.yaml").read().replace("seq_len: 256", "seq_len: 64")
                   .replace("global_batch_tokens: 4096", "global_batch_tokens: 128")
                   .replace("is_moe: false", "is_moe: true").replace("num_experts: 16384", "num_experts: 16")
                   .replace("num_experts_per_tok: 64", "num_experts_per_tok: 4")
                   .replace("peak_lr: 3.0e-3", "peak_lr: 1.0e-12"))
    main(["--config", str(cfg), "--data", str(tmp_path / "tokens.npy"), "--max-steps", "1", "--init-from",
          str(tmp_path / "dense"), "--out", str(tmp_path / "run"), "--device", "cpu"])
    out = capsys.readouterr().out  # said as doge_jax.train says it
    assert (f"initialised from {tmp_path / 'dense'} (fresh optimizer state); model config changes: is_moe False "
            "-> True") in out
    assert f"initialised from {tmp_path / 'dense'} (fresh optimizer state)" in out
    got = doge_torch.DogeForCausalLM.from_pretrained(str(tmp_path / "run" / "final"))
    assert got.config.is_moe and got.config.num_experts == 16
    want = dense.state_dict()
    for name, p in got.state_dict().items():
        if any(k in name for k in ("router_gate", "down_embed", "up_embed")):
            assert p.abs().max() > 0, name  # fresh tables, not zeros
        else:  # peak_lr 1e-12: one AdamW step moves a weight by ~1e-12
            torch.testing.assert_close(p, want[name], rtol=0, atol=1e-9, msg=name)
    # the same with train.init_from in the config file instead of --init-from
    in_file = tmp_path / "in_file.yaml"
    in_file.write_text(cfg.read_text().replace("train:\n", f"train:\n  init_from: {tmp_path / 'dense'}\n", 1))
    main(["--config", str(in_file), "--data", str(tmp_path / "tokens.npy"), "--max-steps", "1", "--out",
          str(tmp_path / "run2"), "--device", "cpu"])
    got2 = doge_torch.DogeForCausalLM.from_pretrained(str(tmp_path / "run2" / "final")).state_dict()
    torch.testing.assert_close(got2["model.embed_tokens.weight"], want["model.embed_tokens.weight"], rtol=0,
                               atol=1e-9)
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text().replace("hidden_size: 128", "hidden_size: 96"))
    with pytest.raises(ConfigError, match="hidden_size"):
        main(["--config", str(bad), "--data", str(tmp_path / "tokens.npy"), "--max-steps", "1", "--init-from",
              str(tmp_path / "dense")])


def test_cli_reads_data_as_doge_jax_does(tmp_path, capsys):
    """.jsonl rows are documents (not raw JSON text), a python -m doge_jax.data directory gives its token shards,
    a lone .bin shard is refused, moe_freeze_steps (doge_jax only) is refused, and OUT/final gets the tokenizer."""

    from doge_jax.corpora import pretokenize
    from doge_torch.train import load_tokens

    docs = [f"document {i}: " + open("doge_torch/optim.py").read()[i * 50:(i + 1) * 50] for i in range(60)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = _bpe(docs, ["<unk>", "<eos>"], tmp_path / "tokenizer.json")
    got = load_tokens([str(tmp_path / "d.jsonl")], str(tmp_path / "tokenizer.json"), 1)
    want = np.concatenate([tok.encode(d).ids + [1] for d in docs])
    np.testing.assert_array_equal(got, want)
    pretokenize([str(tmp_path / "d.jsonl")], str(tmp_path / "tokenizer.json"), str(tmp_path / "pre"))
    pre = load_tokens([str(tmp_path / "pre")])
    assert 0 < len(pre) <= len(want) and set(np.unique(pre)) <= set(np.unique(want))
    # the shards stay memory-mapped (a corpus larger than memory trains) and their largest id is the manifest's
    assert pre.parts and all(isinstance(p, np.memmap) for p in pre.parts) and None not in pre.max_ids
    with pytest.raises(ValueError, match="pre-tokenized shard; pass its directory"):
        load_tokens([next(str(p) for p in (tmp_path / "pre").iterdir() if p.suffix == ".bin")])
    with pytest.raises(ValueError, match="pre-tokenized with EOS id 1, the model's is 7"):
        load_tokens([str(tmp_path / "pre")], None, 7)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
    np.testing.assert_array_equal(load_tokens([str(tmp_path / "rows.jsonl")], str(tmp_path / "tokenizer.json"), 1,
                                              "content"), want)  # train.text_field
    (tmp_path / "npys").mkdir()
    np.save(tmp_path / "npys" / "a.npy", want[:50])
    np.save(tmp_path / "npys" / "b.npy", want[50:])
    np.testing.assert_array_equal(load_tokens([str(tmp_path / "npys")]), want)  # a directory of .npy files
    np.testing.assert_array_equal(load_tokens([str(tmp_path / "npys" / "*.npy")]), want)  # a glob of them
    # a file or directory given twice is read once, as doge_jax.train reads it (the .npy files were read twice)
    a = str(tmp_path / "npys" / "a.npy")
    capsys.readouterr()
    np.testing.assert_array_equal(load_tokens([a, str(tmp_path / "npys"), a]), want)
    np.testing.assert_array_equal(load_tokens([str(tmp_path / "pre"), str(tmp_path / "pre") + "/"]), pre)
    err = capsys.readouterr().err
    assert f"note: data path {a!r} given twice: read once" in err and err.count("given twice") == 3, err
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(open("configs/tiny.yaml").read().replace("seq_len: 256", "seq_len: 32")
                   .replace("global_batch_tokens: 4096", "global_batch_tokens: 64")
                   .replace("eos_token_id: null", "eos_token_id: 1"))
    main(["--config", str(cfg), "--data", str(tmp_path / "d.jsonl"), "--tokenizer", str(tmp_path / "tokenizer.json"),
          "--max-steps", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert (tmp_path / "run" / "final" / "tokenizer.json").read_text() == (tmp_path / "tokenizer.json").read_text()
    main(["--config", str(cfg), "--data", str(tmp_path / "pre"), "--max-steps", "1", "--device", "cpu", "--out",
          str(tmp_path / "run3")])  # a pre-tokenized directory carries its tokenizer
    assert (tmp_path / "run3" / "final" / "tokenizer.json").read_text() == (tmp_path / "pre" / "tokenizer.json"
                                                                           ).read_text()
    frozen = tmp_path / "frozen.yaml"
    frozen.write_text(cfg.read_text().replace("train:\n", "train:\n  moe_freeze_steps: 5\n", 1))
    with pytest.raises(ConfigError, match="moe_freeze_steps=5"):
        main(["--config", str(frozen), "--data", str(tmp_path / "d.jsonl"), "--max-steps", "1"])


def test_cli_takes_special_ids_from_the_tokenizer_as_doge_jax(tmp_path, capsys):
    """configs/tiny.yaml leaves bos/eos/pad unset ("they belong to the tokenizer"): a fresh run takes them from the
    tokenizer as doge_jax.train does, ends each document with EOS, and OUT/final gets a tokenizer_config.json that
    transformers reads. Before, the ids stayed null and the documents ran into each other."""
    from transformers import AutoTokenizer

    docs = [f"document {i}: " + open("doge_torch/optim.py").read()[i * 40:(i + 1) * 40] for i in range(30)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    tok = _bpe(docs, ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<unk>"], tmp_path / "tokenizer.json")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(open("configs/tiny.yaml").read().replace("seq_len: 256", "seq_len: 32")
                   .replace("global_batch_tokens: 4096", "global_batch_tokens: 64") + "  val_fraction: 0.0\n")
    assert "eos_token_id: null" in cfg.read_text()
    main(["--config", str(cfg), "--data", str(tmp_path / "d.jsonl"), "--tokenizer", str(tmp_path / "tokenizer.json"),
          "--max-steps", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    n_tokens = sum(len(tok.encode(d).ids) + 1 for d in docs)  # + EOS per document
    assert f"{n_tokens} tokens" in capsys.readouterr().out
    final = doge_torch.DogeForCausalLM.from_pretrained(str(tmp_path / "run" / "final")).config
    assert (final.bos_token_id, final.eos_token_id, final.pad_token_id) == (0, 1, 2)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "final"))
    assert (hf_tok.eos_token, hf_tok.pad_token) == ("<|end_of_text|>", "<|pad|>")
    # a run started before this (its checkpoint config has no ids) resumes, taking them now, and says so
    ck = tmp_path / "run" / "checkpoint-1" / "config.json"
    old = json.loads(ck.read_text())
    ck.write_text(json.dumps({**old, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}))
    (ck.parent / "generation_config.json").write_text("{}")  # as the earlier doge_torch.train wrote it
    main(["--config", str(cfg), "--data", str(tmp_path / "d.jsonl"), "--tokenizer", str(tmp_path / "tokenizer.json"),
          "--max-steps", "2", "--device", "cpu", "--out", str(tmp_path / "run")])
    said = capsys.readouterr().out
    assert "had no bos/eos/pad_token_id (None, None, None); from the tokenizer now: (0, 1, 2)" in said, said
    assert doge_torch.DogeForCausalLM.from_pretrained(str(tmp_path / "run" / "final")).config.eos_token_id == 1
    # a tokenizer with no EOS token, and no model.eos_token_id: refused, as in doge_jax.train
    _bpe(docs, ["<unk>"], tmp_path / "no_eos.json")
    argv = ["--config", str(cfg), "--data", str(tmp_path / "d.jsonl"), "--tokenizer", str(tmp_path / "no_eos.json"),
            "--max-steps", "1", "--device", "cpu"]
    assert cli(argv) == 2 and "model.eos_token_id" in capsys.readouterr().err


def test_cli_out_must_be_a_run_and_a_failed_start_writes_nothing(tmp_path, capsys):
    """--out holding a saved model (or a doge_jax run) is refused, as doge_jax.train refuses one; before, the run
    trained beside the model's own files. A run that fails its checks (too little data) leaves no directory."""
    cfg = _small_run_config(tmp_path)
    base = ["--config", cfg, "--data", str(tmp_path / "tokens.npy"), "--max-steps", "1", "--device", "cpu"]
    doge_torch.DogeForCausalLM(doge_torch.DogeConfig.from_yaml(cfg)).save_pretrained(str(tmp_path / "model"))
    before = sorted(os.listdir(tmp_path / "model"))
    assert cli(base + ["--out", str(tmp_path / "model")]) == 2
    assert "holds 'config.json' (a saved model or a doge_jax run)" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "model")) == before
    (tmp_path / "jax_run" / "checkpoints").mkdir(parents=True)
    assert cli(base + ["--out", str(tmp_path / "jax_run")]) == 2
    assert "holds 'checkpoints'" in capsys.readouterr().err
    assert cli(base + ["--out", cfg]) == 2 and "is a file, not a directory" in capsys.readouterr().err
    np.save(tmp_path / "short.npy", np.arange(40, dtype=np.uint16))
    short = ["--config", cfg, "--data", str(tmp_path / "short.npy"), "--max-steps", "1", "--device", "cpu"]
    assert cli(short + ["--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "a step needs" in err and "held out" not in err and not (tmp_path / "never").exists()
    np.save(tmp_path / "short.npy", np.arange(32 * 4, dtype=np.uint16))  # 4 rows: a step, if none were held out
    assert cli(short + ["--out", str(tmp_path / "never")]) == 2
    assert "; 32 more tokens are held out for validation (train.val_fraction)" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # an empty directory, or one with only a metrics file, is fine
    assert cli(base + ["--out", str(tmp_path / "empty")]) == 0 and os.path.isdir(tmp_path / "empty" / "final")
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "metrics.jsonl").write_text("")
    (tmp_path / "started" / "train_config.yaml").write_text("")  # (the user's own config file, kept there)
    assert cli(base + ["--out", str(tmp_path / "started")]) == 0
    # a doge_jax run written into this run's directory (beside its checkpoints) was resumed, metrics mixed
    (tmp_path / "started" / "checkpoints").mkdir()
    assert cli(base + ["--out", str(tmp_path / "started")]) == 2
    assert "holds this trainer's checkpoints and also 'checkpoints'" in capsys.readouterr().err


def test_cli_data_and_tokenizer_from_the_config(tmp_path, capsys):
    """train.data and train.tokenizer are used when --data / --tokenizer are not given (before: --data was required
    and the config's fields ignored); mixture weights, doge_jax.train's, are refused by name."""
    text = open("doge_torch/optim.py").read()
    (tmp_path / "a.txt").write_text(text)
    tok = _bpe([text], ["<unk>", "<|end_of_text|>"], tmp_path / "tokenizer.json")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(open("configs/tiny.yaml").read().replace("seq_len: 256", "seq_len: 32")
                   .replace("global_batch_tokens: 4096", "global_batch_tokens: 64")
                   + f"  data: [{tmp_path / 'a.txt'}]\n  tokenizer: {tmp_path / 'tokenizer.json'}\n"
                   + "  val_fraction: 0.0\n")
    hist = main(["--config", str(cfg), "--max-steps", "1", "--device", "cpu"])
    assert len(hist) == 1 and math.isfinite(hist[0]["loss"])
    n = len(tok.encode(text).ids) + 1  # one document + its EOS (id 1, from the tokenizer)
    assert f" {n} tokens" in capsys.readouterr().out
    weighted = tmp_path / "w.yaml"
    weighted.write_text(cfg.read_text().replace(f"data: [{tmp_path / 'a.txt'}]", f"data: ['{tmp_path / 'a.txt'}:0.5']"))
    assert cli(["--config", str(weighted), "--max-steps", "1", "--device", "cpu"]) == 2
    assert "train.data entry" in capsys.readouterr().err
    assert cli(["--config", str(cfg), "--data", f"{tmp_path / 'a.txt'}:0.5", "--device", "cpu"]) == 2
    assert "--data entry" in (err := capsys.readouterr()).err and "a mixture weight" in err.err
    # --data given twice adds up, as in doge_jax.train (it kept only the last: the weighted entry goes unseen)
    assert cli(["--config", str(cfg), "--data", f"{tmp_path / 'a.txt'}:0.5", "--data", str(tmp_path / "a.txt"),
                "--device", "cpu"]) == 2
    assert "a mixture weight" in capsys.readouterr().err
    assert cli(["--config", "configs/tiny.yaml", "--device", "cpu"]) == 2
    assert "no training data" in capsys.readouterr().err
    # with a tokenizer (--tokenizer, --init-from's), no data is the stdlib sources, as doge_jax.train trains on (the
    # README's Quickstart continues its tiny run this way; it failed with "no training data")
    import argparse

    from doge_jax.data import default_corpus
    from doge_jax.train_config import load_configs
    from doge_torch.train import data_args

    _, tc = load_configs("configs/tiny.yaml", [])
    for given in ({"tokenizer": str(tmp_path / "tokenizer.json")}, {"init_from": str(tmp_path)}):
        args = argparse.Namespace(**{"data": None, "tokenizer": None, "init_from": None, **given})
        assert data_args(args, tc) == (default_corpus(), given.get("tokenizer"))
        assert "no --data: training on this Python's standard-library sources" in capsys.readouterr().out
    # a resumed run's own tokenizer counts (its re-run without --tokenizer said "no training data"); a checkpoint
    # without one does not (it went on to "text data needs --tokenizer" after the note)
    bare = argparse.Namespace(data=None, tokenizer=None, init_from=None)
    assert data_args(bare, tc, str(tmp_path / "tokenizer.json")) == (default_corpus(), None)
    (tmp_path / "no_tok").mkdir()
    for args, run_tok in ((bare, str(tmp_path / "no_tok" / "tokenizer.json")),
                          (argparse.Namespace(data=None, tokenizer=None, init_from=str(tmp_path / "no_tok")), None)):
        with pytest.raises(ConfigError, match="no training data"):
            data_args(args, tc, run_tok)


def test_bad_token_files_are_named(tmp_path):
    """An unreadable .npy and an out-of-range id name their file (before: numpy's allow_pickle message, and a span
    of ids with no file)."""
    from doge_torch.train import check_id_range, load_tokens

    np.save(tmp_path / "a.npy", np.arange(100, dtype=np.uint16))
    np.save(tmp_path / "b.npy", np.array([1, 5000, 2], dtype=np.int64))
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"obj.npy: not a readable .npy token array"):
        load_tokens([str(tmp_path / "obj.npy")])
    stream = load_tokens([str(tmp_path / "a.npy"), str(tmp_path / "b.npy")])
    with pytest.raises(ValueError, match=r"span \[0, 5000\] but model.vocab_size is 4096 \(first in .*b.npy\)"):
        check_id_range(stream, 4096)
    head, tail = stream.split_tail(2)  # the names follow the parts through the validation split
    assert head.names == [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")] and tail.names == [str(tmp_path / "b.npy")]
    check_id_range(stream, 5001)
    home = tmp_path / "home"  # (HOME, set by the autouse fixture): ~ is expanded as doge_jax.train expands it
    home.mkdir()
    np.save(home / "c.npy", np.arange(10, dtype=np.uint16))
    assert len(load_tokens(["~/c.npy"])) == 10


def _small_run_config(tmp_path, extra: str = "") -> str:
    tokens = np.random.default_rng(4).integers(0, 4096, size=6_000).astype(np.uint16)
    np.save(tmp_path / "tokens.npy", tokens)
    cfg = tmp_path / "small.yaml"
    cfg.write_text(open("configs/tiny.yaml").read().replace("seq_len: 256", "seq_len: 32")
                   .replace("global_batch_tokens: 4096", "global_batch_tokens: 128")
                   .replace("grad_accum: 1", "grad_accum: 2")
                   .replace("num_warmup_steps: 40", "num_warmup_steps: 2")
                   .replace("num_decay_steps: 80", "num_decay_steps: 3")
                   .replace("num_training_steps: 400", "num_training_steps: 8")
                   + "  checkpoint_every: 2\n  keep_checkpoints: 2\n" + extra)
    return str(cfg)


def test_cli_resume_continues_the_same_run(tmp_path, capsys):
    """Stopping after step 3 and re-running the same command gives the run that never stopped, bit for bit: weights,
    optimizer, schedule and the batch order come back from OUT/checkpoint-3 (transformers Trainer layout). The run
    keeps the newest train.keep_checkpoints checkpoints, each an HF model directory any tool loads."""
    cfg = _small_run_config(tmp_path, "  loss_chunk: 512\n")
    data = str(tmp_path / "tokens.npy")
    base = ["--config", cfg, "--data", data, "--device", "cpu"]
    straight = main(base + ["--max-steps", "6", "--out", str(tmp_path / "a")])
    assert "does not use train.loss_chunk=512" in capsys.readouterr().out
    first = main(base + ["--max-steps", "3", "--out", str(tmp_path / "b")])
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    again = main(base + ["--max-steps", "6", "--out", str(tmp_path / "b")])
    said = capsys.readouterr().out
    assert "resuming" in said and "(step 3)" in said and "warning" not in said
    assert [h["step"] for h in first + again] == list(range(1, 7))
    assert [h["loss"] for h in first + again] == [h["loss"] for h in straight]
    assert [h["lr"] for h in first + again] == [h["lr"] for h in straight]
    a = doge_torch.DogeForCausalLM.from_pretrained(str(tmp_path / "a" / "final")).state_dict()
    b = doge_torch.DogeForCausalLM.from_pretrained(str(tmp_path / "b" / "final")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if "val_loss" not in x]
    assert lines == list(range(1, 7))
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    ck = doge_jax.DogeForCausalLM.from_pretrained(str(tmp_path / "b" / "checkpoint-6"))  # an HF directory
    assert ck.config.hidden_size == 128
    # a finished run re-run: nothing to train, the final model is written again
    assert main(base + ["--max-steps", "6", "--out", str(tmp_path / "b")]) == []
    assert main(base + ["--max-steps", "5", "--out", str(tmp_path / "b")]) == []
    assert "is at step 6 of 8 (past the 5 asked for)" in capsys.readouterr().out


def test_cli_unreadable_checkpoint_is_one_error_naming_it(tmp_path, capsys):
    """A damaged newest checkpoint (its optimizer state or its record) ends in one `error:` line that names it and
    says how to go on, not a traceback from torch.load or json; moved away, the run resumes from the one before."""
    cfg = _small_run_config(tmp_path)
    data = str(tmp_path / "tokens.npy")
    out = tmp_path / "run"
    argv = ["--config", cfg, "--data", data, "--device", "cpu", "--out", str(out)]
    main(argv + ["--max-steps", "3"])
    capsys.readouterr()
    for name in ("optimizer.pt", "model.safetensors", "trainer_state.json", "config.json"):  # one at a time
        good = (out / "checkpoint-3" / name).read_bytes()
        (out / "checkpoint-3" / name).write_bytes(good[:len(good) // 2] if name.endswith((".safetensors", ".json"))
                                                  else b"garbage")
        assert cli(argv + ["--max-steps", "4"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: the run's newest checkpoint") and "checkpoint-3" in err[0] \
            and "resume from the one before" in err[0] and "weights_only" not in err[0], err
        (out / "checkpoint-3" / name).write_bytes(good)
    # a record that parses but is not an object: damage too (it was an AttributeError traceback)
    good = (out / "checkpoint-3" / "trainer_state.json").read_bytes()
    (out / "checkpoint-3" / "trainer_state.json").write_text("[]")
    assert cli(argv + ["--max-steps", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the run's newest checkpoint") and "not an object" in err[0], err
    (out / "checkpoint-3" / "trainer_state.json").write_bytes(good)
    # not damage: out of memory while moving the state to the device, or a programming error, passes through
    from doge_torch import checkpoint as ck

    for error in (torch.OutOfMemoryError("simulated"), AttributeError("simulated")):
        def load(*a, error=error):
            raise error

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ck, "load", load)
            (out / "checkpoint-3" / "trainer_state.json").write_text((out / "checkpoint-2" / "trainer_state.json")
                                                                      .read_text().replace('"global_step": 2',
                                                                                           '"global_step": 3'))
            with pytest.raises(type(error), match="simulated"):
                main(argv + ["--max-steps", "4"])
    shutil.move(str(out / "checkpoint-3"), str(tmp_path / "damaged"))
    assert [h["step"] for h in main(argv + ["--max-steps", "4"])] == [3, 4]
    assert "(step 2)" in capsys.readouterr().out


def test_cli_resume_refuses_another_start_or_model(tmp_path):
    """A run directory resumes only the run it holds: another --init-from or another model config is refused
    (naming the field), not silently trained over."""
    cfg = _small_run_config(tmp_path)
    data = str(tmp_path / "tokens.npy")
    out = str(tmp_path / "run")
    main(["--config", cfg, "--data", data, "--device", "cpu", "--max-steps", "2", "--out", out])
    doge_torch.DogeForCausalLM(doge_torch.DogeConfig.from_yaml(cfg)).save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="holds a run started from a fresh init"):
        main(["--config", cfg, "--data", data, "--device", "cpu", "--out", out, "--init-from",
              str(tmp_path / "other")])
    wide = tmp_path / "wide.yaml"
    wide.write_text(open(cfg).read().replace("intermediate_size: 256", "intermediate_size: 384"))
    with pytest.raises(ConfigError, match=r"intermediate_size=384: the run's newest \(.*checkpoint-2\) checkpoint "
                       "has intermediate_size=256"):
        main(["--config", str(wide), "--data", data, "--device", "cpu", "--out", out])
    broken = tmp_path / "broken.yaml"  # checked as on a fresh start (one error line, no traceback)
    broken.write_text(open(cfg).read() + "  oops: [\n")
    with pytest.raises(ConfigError, match="unreadable YAML"):
        main(["--config", str(broken), "--data", data, "--device", "cpu", "--out", out])
    theta = tmp_path / "theta.yaml"  # a field that keeps the shapes
    theta.write_text(open(cfg).read().replace("rope_theta: 10000.0", "rope_theta: 20000.0"))
    with pytest.raises(ConfigError, match=r"another model config \(fields: rope_theta"):
        main(["--config", str(theta), "--data", data, "--device", "cpu", "--out", out])


def _long_run_command(tmp_path, out, log_every: str) -> list[str]:
    """The command of a doge_torch.train run that goes on until stopped (no checkpoint before the stop's)."""
    cfg = _small_run_config(tmp_path)
    text = open(cfg).read().replace("num_training_steps: 8", "num_training_steps: 100000")
    open(cfg, "w").write(text.replace("checkpoint_every: 2", "checkpoint_every: 100000"))
    return [sys.executable, "-m", "doge_torch.train", "--config", cfg, "--data", str(tmp_path / "tokens.npy"),
            "--device", "cpu", "--out", str(out), "--log-every", log_every]


def test_cli_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path):
    """SIGTERM (a scheduler's preemption) stops the run after its current step with a checkpoint, exit 143; the
    same command then continues from there."""
    import signal

    out = tmp_path / "run"
    cmd = _long_run_command(tmp_path, out, "100000")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step "):  # step 1 is always printed
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    (stopped,) = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")]
    assert f"stopped by SIGTERM after step {stopped}; the same command resumes" in err
    res = subprocess.run(cmd + ["--max-steps", str(stopped + 2)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"(step {stopped})" in res.stdout
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" not in x]
    assert steps == list(range(1, stopped + 3))


def test_cli_closed_output_pipe_stops_with_a_checkpoint(tmp_path):
    """Its output's reader gone (`... | head`, a dead tee): a stop as SIGTERM's, with a checkpoint, exit 141 (128 +
    SIGPIPE). Before: a BrokenPipeError ended the run, no checkpoint."""
    out = tmp_path / "run"
    cmd = _long_run_command(tmp_path, out, "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                break
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 141
    finally:
        proc.kill()
    (ckpt,) = out.glob("checkpoint-*")
    # stderr, still open, says so (only the closed stream is discarded)
    assert f"stopped by a closed output pipe after step {ckpt.name.split('-')[1]}" in err, err


def test_cli_resume_applies_new_settings_and_survives_leftovers(tmp_path, capsys):
    """On resume the moments come from the checkpoint but the train: hyperparameters are the config's (a doubled
    peak_lr takes effect, as in a run started with it); a metrics line cut short by a kill, and a killed checkpoint
    write's temporary directory, do not stop the run (the leftover is removed); train.stop_after stops with a
    checkpoint; train.compute_dtype bfloat16 trains under bf16 autocast."""
    from doge_jax import hf_io

    cfg = _small_run_config(tmp_path)
    data = str(tmp_path / "tokens.npy")
    fast = tmp_path / "fast.yaml"
    fast.write_text(open(cfg).read().replace("peak_lr: 3.0e-3", "peak_lr: 6.0e-3")
                    .replace("weight_decay: 0.01", "weight_decay: 0.5"))
    straight = main(["--config", str(fast), "--data", data, "--device", "cpu", "--max-steps", "5",
                     "--out", str(tmp_path / "a")])
    out = tmp_path / "b"
    main(["--config", cfg, "--data", data, "--device", "cpu", "--max-steps", "3", "--out", str(out)])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a kill in the middle of a line
    stale = out / f".checkpoint-7.tmp-{hf_io._owner().rsplit('.', 1)[0]}.999999999-x"  # a step not saved again
    stale.mkdir()
    (stale / "optimizer.pt").write_bytes(b"half")
    capsys.readouterr()
    again = main(["--config", str(fast), "--data", data, "--device", "cpu", "--max-steps", "5", "--out", str(out)])
    assert "peak_lr 0.003 -> 0.006" in capsys.readouterr().out
    assert [h["lr"] for h in again] == [h["lr"] for h in straight[3:]]
    groups = torch.load(out / "checkpoint-5" / "optimizer.pt", weights_only=True)["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.5]
    assert not stale.exists()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" not in x]
    assert steps == [1, 2, 3, 4, 5]
    halt = tmp_path / "halt.yaml"
    halt.write_text(open(cfg).read() + "  stop_after: 2\n  compute_dtype: bfloat16\n")
    hist = main(["--config", str(halt), "--data", data, "--device", "cpu", "--out", str(tmp_path / "c")])
    said = capsys.readouterr().out
    assert [h["step"] for h in hist] == [1, 2] and "on cpu bf16" in said and "stopped after step 2 of 8" in said
    assert (tmp_path / "c" / "checkpoint-2" / "optimizer.pt").is_file()
    # resumed without bf16: said (before: float32 from then on, silently)
    main(["--config", cfg, "--data", data, "--device", "cpu", "--max-steps", "3", "--out", str(tmp_path / "c")])
    assert "compute 'bf16 autocast' -> 'float32'" in capsys.readouterr().out


def test_cli_non_finite_gradient_norm_saves_no_checkpoint(tmp_path, monkeypatch):
    """A step whose loss is finite but whose gradient norm is not (clipping then makes the weights NaN) stops the
    run before its checkpoint is written: the newest checkpoint stays a good one."""
    import doge_torch.train as dtt

    calls, real = [], dtt.clip_grad_norm

    def poisoned(params, max_norm):
        calls.append(1)
        if len(calls) == 4:
            params[0].grad.view(-1)[0] = float("inf")
        return real(params, max_norm)

    monkeypatch.setattr(dtt, "clip_grad_norm", poisoned)
    cfg = _small_run_config(tmp_path)
    with pytest.raises(SystemExit, match="non-finite loss/grad norm at step 4"):
        main(["--config", cfg, "--data", str(tmp_path / "tokens.npy"), "--device", "cpu", "--out",
              str(tmp_path / "run")])
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]


def test_cli_resume_needs_no_start_directory(tmp_path, capsys):
    """A run started with --init-from resumes from its own checkpoint even after the start directory is gone, with
    or without --init-from on the command line, and keeps recording where it started."""
    import shutil

    cfg = _small_run_config(tmp_path)
    data = str(tmp_path / "tokens.npy")
    start = tmp_path / "start"
    doge_torch.DogeForCausalLM(doge_torch.DogeConfig.from_yaml(cfg)).save_pretrained(str(start))
    gen = json.loads((start / "generation_config.json").read_text())  # the start's generate settings are kept
    gen.update(do_sample=True, temperature=0.7, top_k=20, max_new_tokens=33)  # (every checkpoint had ids only)
    (start / "generation_config.json").write_text(json.dumps(gen))
    partial = tmp_path / "partial.yaml"  # a config with only a train: section (the model comes from the start)
    partial.write_text("train:\n" + open(cfg).read().split("train:\n", 1)[1])
    out = tmp_path / "run"
    base = ["--config", str(partial), "--data", data, "--device", "cpu", "--out", str(out)]
    main(base + ["--init-from", str(start), "--max-steps", "2"])
    shutil.rmtree(start)
    main(base + ["--max-steps", "3"])
    main(base + ["--init-from", str(start), "--max-steps", "4"])
    assert "(step 3)" in capsys.readouterr().out
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["init_from"] == str(start) and state["global_step"] == 4
    assert json.loads((out / "checkpoint-4" / "generation_config.json").read_text()) == gen  # (after 2 resumes)


def test_token_stream_rows_equal_the_joined_stream():
    """doge_torch.train reads its data as a stream of parts (memory-mapped shards, never joined or widened to int64
    in memory); every row, also one spanning several parts, equals the same row of the joined tokens."""
    from doge_torch.train import TokenStream, batches

    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 500, n).astype(np.uint16) for n in (5, 0, 37, 3, 1, 64, 20)]
    joined = np.concatenate(parts).astype(np.int64)
    stream = TokenStream(parts)
    assert len(stream) == len(joined) and (stream.min(), stream.max()) == (0, joined.max())  # unsigned: min 0
    signed = TokenStream([p.astype(np.int32) - 1 for p in parts])
    assert (signed.min(), signed.max()) == (joined.min() - 1, joined.max() - 1)
    # a part's known largest id (a manifest's) is taken without reading the part; an empty part's is dropped
    known = TokenStream(parts, [None, 10**7, 10**6, None, None, None, None])
    assert known.max() == 10**6
    assert (TokenStream([]).min(), TokenStream([]).max(), len(TokenStream([]))) == (0, 0, 0)
    np.testing.assert_array_equal(np.asarray(stream), joined)
    for seq in (1, 4, 7, 16):
        n = len(joined) // seq
        idx = rng.permutation(n)
        np.testing.assert_array_equal(stream.rows(idx, seq), joined[:n * seq].reshape(n, seq)[idx])
    a, b = batches(stream, 8, 2, 2, 0, pad_token_id=3), batches(joined, 8, 2, 2, 0, pad_token_id=3)
    for _ in range(20):  # (several epochs)
        for x, y in zip(next(a), next(b)):
            assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


def test_cli_validation_loss(tmp_path, capsys):
    """Every train.eval_every steps and at the end the run reports the mean loss of eval_batches held-out
    micro-batches: the last val_fraction of a .npy stream (not trained on), or a pre-tokenized directory's own
    validation shards. The reported value equals the saved model's loss on those rows."""
    from doge_torch.train import TokenStream, evaluate, val_rows

    cfg = _small_run_config(tmp_path, "  eval_every: 3\n  val_fraction: 0.05\n  eval_batches: 2\n")
    out = tmp_path / "run"
    main(["--config", cfg, "--data", str(tmp_path / "tokens.npy"), "--device", "cpu", "--max-steps", "7",
          "--out", str(out)])
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in val] == [3, 6, 7]
    assert val[0]["val_loss"] > val[-1]["val_loss"] and math.isclose(val[-1]["val_ppl"], math.exp(val[-1]["val_loss"]))
    tokens = np.load(tmp_path / "tokens.npy").astype(np.int64)
    n_rows = len(tokens) // 32
    held = tokens[len(tokens) - int(n_rows * 0.05) * 32:]  # the stream's last tokens, a whole number of rows
    rows = held[:len(held) // 32 * 32].reshape(-1, 32)[:2 * 2]  # eval_batches x rows per micro-batch
    model = doge_torch.DogeForCausalLM.from_pretrained(str(out / "final"))
    want, _ = evaluate(model, rows, 2, None, None)
    assert abs(val[-1]["val_loss"] - want) <= 1e-6 * want
    ids = torch.as_tensor(rows)
    with torch.no_grad():  # the token mean over the rows, computed directly
        direct = model(ids, labels=ids).loss.item()
    assert abs(direct - want) <= 1e-5 * want
    parts = [tokens[:100], tokens[100:100], tokens[100:3000], tokens[3000:]]  # also a cut on a part boundary
    for n in (0, 1, len(tokens) - 3000, len(tokens) - 100, len(held), len(tokens)):
        head, tail = TokenStream(parts).split_tail(n)
        np.testing.assert_array_equal(np.asarray(head), tokens[:len(tokens) - n])
        np.testing.assert_array_equal(np.asarray(tail), tokens[len(tokens) - n:])
    assert f" {len(tokens) - len(held)} tokens, 7 steps" in capsys.readouterr().out  # trained without them
    stream = TokenStream([np.arange(40)])  # one row of 32: nothing to hold out, the stream stays whole
    assert val_rows(stream, [], 32, 0.5, 4)[1] is None and len(val_rows(stream, [], 32, 0.5, 4)[0]) == 40


def test_text_validation_rows_equal_doge_jax(tmp_path):
    """Text data: doge_torch.train holds out the same documents as doge_jax.train (train.val_fraction, train.seed)
    and validates on the same rows, so the two frameworks' val_loss compare; the tokens come from doge_jax's cache.
    Before, doge_torch held out the tail of the stream."""
    from doge_jax import corpora as C
    from doge_jax import data as D
    from doge_torch.train import load_tokens, val_rows

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(1)
    for i in range(30):
        (corpus / f"d{i:02d}.txt").write_text(" ".join(rng.choice(["a", "bb", "c", "dd", "e"], size=60)))
    (corpus / "more.jsonl").write_text("".join(json.dumps({"text": f"row {i} " * 9}) + "\n" for i in range(10)))
    tok_file = str(tmp_path / "tokenizer.json")
    D.train_bpe(D.resolve_paths([str(corpus)]), 300).save(tok_file)
    tok = D.load_tokenizer(tok_file)
    cache = str(tmp_path / "cache")
    want = C.training_data(C.parse_sources([str(corpus)]), tok, 1, 300, 16, cache, "text", 0.2, 7, False)
    held: list = []
    # the files given another way (a glob and a file, overlapping): the same documents, in doge_jax's order
    stream = load_tokens([str(corpus / "more.jsonl"), str(corpus / "*.txt"), str(corpus / "d03.txt")], tok_file, 1,
                         val=held, val_fraction=0.2, seed=7, cache_dir=cache)
    assert len(os.listdir(cache)) == 1  # doge_jax's cache entry was used, not a second tokenization
    train, rows = val_rows(stream, held, 16, 0.2, 10**6)
    np.testing.assert_array_equal(rows, np.asarray(want.val_rows))
    assert len(train) == want.train_tokens and sum(map(len, held)) == want.val_tokens > 0
    packed = np.asarray(want.rows).ravel()  # doge_jax's training rows: the same stream, cut into rows
    np.testing.assert_array_equal(np.asarray(train)[:packed.size], packed)


def test_evaluate_is_cross_entropy_only():
    """val_loss is the token-mean cross-entropy, as doge_jax's eval: an MoE config's router aux term (added to the
    training loss when output_router_logits is set) is not in it."""
    from doge_torch.train import evaluate

    cfg = doge_torch.DogeConfig.from_yaml("configs/tiny.yaml").replace(
        **TINY_MOE, output_router_logits=True, router_aux_loss_coef=1.0)
    torch.manual_seed(0)
    model = doge_torch.DogeForCausalLM(cfg)
    rows = random_ids(4, 16, cfg.vocab_size, seed=3)
    ids = torch.as_tensor(rows)
    with torch.no_grad():
        out = model(ids, labels=ids)
        ce = model(ids, labels=ids, output_router_logits=False).loss.item()
    assert out.aux_loss is not None and out.loss.item() > ce + 0.5  # the aux term is in the training loss
    got, _ = evaluate(model, rows, 4, None, None)  # one micro-batch (MoE routing couples a batch's rows, §9.19)
    assert abs(got - ce) <= 1e-5 * ce and model.training


_TORCH_FILE_SIZE_LIMIT = """import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from doge_torch.train import cli
sys.exit(cli(sys.argv[1:]))
"""


def _tiny_npy_run(tmp_path):
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 4096, size=20_000).astype(np.uint16))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(open("configs/tiny.yaml").read().replace("seq_len: 256", "seq_len: 64")
                   .replace("global_batch_tokens: 4096", "global_batch_tokens: 256")
                   .replace("grad_accum: 1", "grad_accum: 2"))
    return ["--config", str(cfg), "--data", str(tmp_path / "tokens.npy"), "--max-steps", "3"]


def test_cli_failed_checkpoint_write_is_one_line_exit_1(tmp_path):
    """A checkpoint that cannot be written (files may not pass 200 kB; a full disk alike): one line naming it, exit
    1, no temporary left (safetensors' and torch.save's own exceptions came through as tracebacks)."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _TORCH_FILE_SIZE_LIMIT, *_tiny_npy_run(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: writing checkpoint step 3 into {out}")
    assert sorted(os.listdir(out)) == ["metrics.jsonl"]


def test_cli_failed_final_write_is_exit_1_and_a_rerun_writes_it(tmp_path, capsys, monkeypatch):
    """OUT/final that cannot be written (a full disk) is a failed write, exit 1 (it was exit 2, bad input), and the
    same command run again writes it."""
    import errno

    import doge_torch.model as TM
    from doge_torch.train import cli

    out, save = tmp_path / "run", TM.DogeForCausalLM.save_pretrained

    def full(self, path, *a, **k):
        if os.path.basename(path) == "final":
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, path, *a, **k)

    monkeypatch.setattr(TM.DogeForCausalLM, "save_pretrained", full)
    assert cli([*_tiny_npy_run(tmp_path), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: writing the final model into {out / 'final'} failed (") and "No space" in err, err
    monkeypatch.setattr(TM.DogeForCausalLM, "save_pretrained", save)
    assert cli([*_tiny_npy_run(tmp_path), "--out", str(out)]) == 0
    assert "saved" in capsys.readouterr().out and (out / "final" / "model.safetensors").is_file()


def test_cli_a_second_trainer_on_a_run_is_refused(tmp_path, capsys):
    """Two trainers on one --out overwrote each other's checkpoints and garbled metrics.jsonl: --out is locked."""
    from doge_jax.hf_io import run_lock
    from doge_torch.train import cli

    out = tmp_path / "run"
    out.mkdir()
    with run_lock(str(out)):
        assert cli([*_tiny_npy_run(tmp_path), "--out", str(out)]) == 2
    assert "is in use: another trainer holds its lock" in capsys.readouterr().err
    assert os.listdir(out) == []
    # ... also when the other trainer made --out while this one started up (it checked before: no directory, no
    # lock taken, and both trained into it)
    import contextlib

    import doge_torch.train as TT

    late, other = tmp_path / "late", contextlib.ExitStack()
    data_args = TT.data_args

    def made_meanwhile(*args):  # (while this one reads its data)
        os.makedirs(late)
        other.enter_context(run_lock(str(late)))
        return data_args(*args)

    with other, pytest.MonkeyPatch.context() as mp:
        mp.setattr(TT, "data_args", made_meanwhile)
        assert cli([*_tiny_npy_run(tmp_path), "--out", str(late)]) == 2
    assert "is in use: another trainer holds its lock" in capsys.readouterr().err
    assert os.listdir(late) == []


def test_mixed_text_and_pretokenized_validation_rows_equal_doge_jax(tmp_path):
    """Text plus a pre-tokenized directory (either order on the command line): doge_torch validates on doge_jax's
    rows, the text's held-out documents first (before, the directory's validation shards came first)."""
    from doge_jax import corpora as C
    from doge_jax import data as D
    from doge_torch.train import load_tokens, val_rows

    rng = np.random.default_rng(2)
    words = ["a", "bb", "c", "dd", "e", "ff"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n"
                                              for _ in range(40)))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(words[::-1], 50))}) + "\n"
                                              for _ in range(40)))
    tok_file = str(tmp_path / "tokenizer.json")
    D.train_bpe([str(tmp_path / "t.jsonl")], 300).save(tok_file)
    tok = D.load_tokenizer(tok_file)
    C.pretokenize([str(tmp_path / "p.jsonl")], tok_file, str(tmp_path / "pre"), val_fraction=0.2, seed=7,
                  workers=1, progress=False)
    specs = [str(tmp_path / "pre"), str(tmp_path / "t.jsonl")]
    cache = str(tmp_path / "cache")
    want = C.training_data(C.parse_sources(specs), tok, 1, 300, 16, cache, "text", 0.2, 7, False)
    held: list = []
    stream = load_tokens(specs, tok_file, 1, val=held, val_fraction=0.2, seed=7, cache_dir=cache)
    _, rows = val_rows(stream, held, 16, 0.2, 10**6)
    assert len(rows) == len(want.val_rows) > 0
    np.testing.assert_array_equal(rows, np.asarray(want.val_rows))
    # train.val_fraction 0: the directory's held-out documents are trained on in both trainers (they were
    # validated on anyway), with a note
    want = C.training_data(C.parse_sources(specs[:1]), tok, 1, 300, 16, cache, "text", 0.0, 7, False)
    held = []
    stream = load_tokens(specs[:1], tok_file, 1, val=held, val_fraction=0.0, seed=7, cache_dir=cache)
    manifest = C.read_manifest(specs[0])
    assert held == [] and len(stream) == want.train_tokens == manifest["train_tokens"] + manifest["val_tokens"]
    assert len(want.rows.arrays) == 2  # its one shard's train and val tokens, in that order in both
    np.testing.assert_array_equal(np.asarray(stream), np.concatenate(want.rows.arrays))


def test_binary_and_mixed_data_paths_are_refused_by_name(tmp_path):
    """A directory or glob holding both .npy token arrays and text: one error (before, the .npy files alone were
    read, or the .npy bytes tokenized as text); a binary file given as text is refused (also by doge_jax.train)."""
    from doge_jax import data as D
    from doge_torch.train import load_tokens

    mix = tmp_path / "mix"
    mix.mkdir()
    np.save(mix / "tok.npy", np.arange(100, dtype=np.uint16))
    (mix / "a.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n")
    for spec in (str(mix), str(mix / "*")):
        with pytest.raises(D.DataError, match=r"holds both .npy token arrays \(tok.npy\) and other files \(a.jsonl\)"):
            load_tokens([spec], None, 1)
    assert len(load_tokens([str(mix / "*.npy")], None, 1)) == 100
    np.save(tmp_path / "alone.npy", np.arange(5, dtype=np.uint16))
    (tmp_path / "shard.dat").write_bytes(b"\x01\x00\x02\x00")
    (tmp_path / "blob.bin").write_bytes(b"\x01\x00\x02\x00")
    (tmp_path / "00000.train.bin").write_bytes(b"\x01\x00\x02\x00")
    for path, hint in ((mix / "tok.npy", "; .npy token arrays are read by python -m doge_torch.train"),
                       (tmp_path / "shard.dat", "$"), (tmp_path / "blob.bin", "$"),  # (any .bin was called a shard)
                       (tmp_path / "00000.train.bin", "; a python -m doge_jax.data shard: pass its directory")):
        with pytest.raises(D.DataError, match=f"{path.name}': a binary file \\(NUL bytes\\), not text{hint}"):
            D.resolve_paths([str(path)])
    with pytest.raises(D.DataError, match="'.*': a binary file"):
        D.resolve_paths([str(tmp_path / "*")])
    (tmp_path / "notes").write_text("plain text, no extension")
    assert D.resolve_paths([str(tmp_path / "notes")]) == [str(tmp_path / "notes")]


def test_cli_takes_field_overrides_as_doge_jax(tmp_path, capsys):
    """--train.FIELD / --model.FIELD (and FIELD=VALUE) override the config, as in doge_jax.train, and --config
    defaults to configs/tiny.yaml (both were refused: every schedule change needed a new YAML file)."""
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 4096, size=4_000).astype(np.uint16))
    small = ["--data", str(tmp_path / "tokens.npy"), "--device", "cpu", "--out", str(tmp_path / "run"),
             "--train.seq_len", "32", "train.global_batch_tokens=64", "--model.num_hidden_layers=1",
             "--train.num_training_steps", "4", "--train.num_warmup_steps", "1", "--train.num_decay_steps", "1"]
    metrics = main([*small, "--max-steps", "2"])
    assert len(metrics) == 2
    cfg = json.load(open(tmp_path / "run" / "checkpoint-2" / "config.json"))
    assert cfg["num_hidden_layers"] == 1 and cfg["hidden_size"] == 128  # configs/tiny.yaml's, one layer
    state = json.load(open(tmp_path / "run" / "checkpoint-2" / "trainer_state.json"))
    assert state["num_training_steps"] == 4 and state["seq_len"] == 32
    main([*small, "--train.peak_lr", "1e-4", "--data", str(tmp_path / "tokens.npy"), "train.peak_lr=1e-3"])
    # (a resume with another setting: used, with a warning; a bare override ends --data's list and, the later one,
    # wins, as in doge_jax)
    assert "peak_lr 0.003 -> 0.001" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="model.hidden_size=64: the run's newest .*a resumed run keeps its model"):
        main([*small, "--model.hidden_size", "64"])
    # an = override with a space in its value after --data is an override (argparse took it for a data path)
    with pytest.raises(ConfigError, match="model.hidden_size=64: the run's newest"):
        main([*small[:2], "--model.hidden_size= 64", *small[2:]])
    main([*small[:2], "--train.mesh={fsdp: 2}", *small[2:], "--max-steps", "3"])
    assert "does not use train.mesh={'fsdp': 2}" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a shorthand too (was "data path '--out_dir=my runs' does not exist")
        main([*small[:2], "--out_dir=my runs", *small[2:]])
    assert "train.out_dir (or --out_dir / --name): doge_jax.train's run directory" in capsys.readouterr().err
    for bad, why in ((["--train.num_trainig_steps", "3"], "did you mean train.num_training_steps"),
                     (["--foo", "3"], "unknown argument '--foo': overrides are --model.FIELD VALUE"),
                     (["--train.seq_len"], "--train.seq_len: missing value"),
                     (["--out_dir", "x"], "train.out_dir (or --out_dir / --name): doge_jax.train's run directory"),
                     (["--train.name", "x"], "writes its run to --out DIR")):
        with pytest.raises((SystemExit, ConfigError)) as e:
            main(["--data", str(tmp_path / "tokens.npy"), "--device", "cpu", *bad])
        assert why in (str(e.value) if isinstance(e.value, ConfigError) else capsys.readouterr().err)


def test_resume_fills_the_ids_a_checkpoints_generation_config_lacks(tmp_path):
    """A checkpoint of a run whose config had no token ids (filled from the tokenizer on resume) holds a
    generation_config.json without them: load() takes the file's settings and the model config's ids (it took the
    file as is, and every later checkpoint lost its EOS)."""
    from doge_torch import checkpoint
    from doge_torch.optim import make_optimizer, wsd_scheduler

    cfg = doge_torch.DogeConfig(**{**TINY, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2})
    model = doge_torch.DogeForCausalLM(cfg)
    opt = make_optimizer(model, 1e-3)
    sched = wsd_scheduler(opt, 1, 1, 4)
    path = checkpoint.save(str(tmp_path), 1, model, opt, sched, {}, keep=2)
    (tmp_path / "checkpoint-1" / "generation_config.json").write_text('{"do_sample": true, "top_k": 7}')
    fresh = doge_torch.DogeForCausalLM(cfg)
    fresh_opt = make_optimizer(fresh, 1e-3)
    checkpoint.load(path, fresh, fresh_opt, wsd_scheduler(fresh_opt, 1, 1, 4))
    gen = fresh.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id, gen.do_sample, gen.top_k) == (0, 1, 2, True, 7)


def test_cli_init_from_keeps_the_tokenizer_settings_and_warns_on_another(tmp_path, capsys):
    """--init-from a chat model: the run's checkpoints and OUT/final keep its tokenizer_config.json settings
    (chat_template, padding_side) and its chat_template.jinja (as the chat_template field); they kept only the
    special tokens, so the template was lost. Another --tokenizer than the checkpoint's is said, as doge_jax.train
    says it (it was silent)."""
    import transformers

    text = open("doge_torch/optim.py").read()
    (tmp_path / "a.txt").write_text(text)
    start = tmp_path / "start"
    start.mkdir()
    _bpe([text], ["<unk>", "<|end_of_text|>"], start / "tokenizer.json")
    cfg = dataclasses.replace(doge_torch.DogeConfig.from_yaml("configs/tiny.yaml"), vocab_size=300,
                              num_hidden_layers=1, eos_token_id=1)
    doge_torch.DogeForCausalLM(cfg).save_pretrained(str(start))
    (start / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end_of_text|>", "padding_side": "left"}))
    (start / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    small = tmp_path / "small.yaml"
    small.write_text(open("configs/tiny.yaml").read().replace("seq_len: 256", "seq_len: 32")
                     .replace("global_batch_tokens: 4096", "global_batch_tokens: 64") + "  val_fraction: 0.0\n")
    args = ["--config", str(small), "--data", str(tmp_path / "a.txt"), "--max-steps", "1", "--device", "cpu",
            "--init-from", str(start), "--model.vocab_size", "300", "--model.num_hidden_layers", "1"]
    main([*args, "--out", str(tmp_path / "run")])
    for d in (tmp_path / "run" / "final", tmp_path / "run" / "checkpoint-1"):
        t = transformers.AutoTokenizer.from_pretrained(str(d))
        assert t.padding_side == "left" and "<{{ m['content'] }}>" in t.chat_template, d
        assert t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<hi>"
    assert "is not the tokenizer of" not in capsys.readouterr().err
    _bpe([text[::-1]], ["<unk>", "<|end_of_text|>"], tmp_path / "other.json")
    main([*args, "--tokenizer", str(tmp_path / "other.json"), "--out", str(tmp_path / "run2")])
    assert (f"warning: --tokenizer {tmp_path / 'other.json'} is not the tokenizer of {start} ({start}/tokenizer.json)"
            ": the checkpoint's embeddings belong to that one") in capsys.readouterr().err
