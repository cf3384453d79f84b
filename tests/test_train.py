"""Tests for `python -m doge_jax.train` (issue 3): artifacts, exact resume, corrupt checkpoints, NaN stop,
start-up errors, gradient accumulation normalisation, chunked cross-entropy, bf16, config overrides, MFU."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cpu_devices_env
from flax import nnx

from doge_jax import train as T
from doge_jax.checkpoint import TrainCheckpointer, list_steps, load_params
from doge_jax.config import ConfigError, DogeConfig
from doge_jax.hf_names import CheckpointError
from doge_jax.loss import DogeTrunk, causal_lm_loss_chunked
from doge_jax.metrics import flops_per_token, matmul_params_per_token, read_metrics
from doge_jax.model import causal_lm_loss
from doge_jax.optim import decay_mask, make_optimizer, wsd_schedule
from doge_jax.train_config import SIGTERM_REPEAT_S, TrainConfig, help_text, load_configs, parse_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny model + recipe: 1 layer, d 32, BPE vocab 320, 4 rows x 32 tokens per step.
TINY_ARGS = [
    "--model.vocab_size", "320", "--model.hidden_size", "32", "--model.intermediate_size", "64",
    "--model.num_hidden_layers", "1", "--model.max_position_embeddings", "64", "--model.keep_window_size", "64",
    "--train.seq_len", "32", "--train.global_batch_tokens", "128", "--train.num_training_steps", "6",
    "--train.num_warmup_steps", "2", "--train.num_decay_steps", "2", "--train.checkpoint_every", "2",
    "--train.eval_every", "3", "--train.eval_batches", "2", "--train.val_fraction", "0.2", "--train.progress", "false",
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(60)] + ["def", "return", "(", ")", ":", "\n"]
    for i in range(20):
        (d / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, size=300)))
    return str(d)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def run(corpus, cache, out, *extra) -> int:
    """doge_jax.train on `corpus`, or on the --data given in `extra` instead (repeated --data options add up)."""
    data = [] if "--data" in extra else ["--data", corpus]
    return T.main([*TINY_ARGS, *data, "--out_dir", str(out), "--train.cache_dir", cache, *extra])


def _params(path):
    return jax.tree.leaves(load_params(str(path))[1])


def test_ctrl_c_while_plotting_keeps_the_runs_outcome(corpus, cache, tmp_path, monkeypatch, capsys):
    """A Ctrl-C that lands after the last checkpoint, while loss.png is drawn, loses only the plot: the run's exit and
    message stand (it said "stopped at once, without a new checkpoint" after "checkpoint saved"); the plot is written
    aside and renamed, so an interrupted write leaves the old loss.png whole."""
    import matplotlib.figure

    from doge_jax.metrics import plot_loss

    def interrupted(run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "plot_loss", interrupted)
    out = tmp_path / "run"
    assert run(corpus, cache, out) == 0
    err = capsys.readouterr().err
    assert "loss.png not written (interrupted)" in err and "stopped at once" not in err, err[-2000:]
    assert list_steps(str(out)) == [2, 4, 6] and not (out / "loss.png").exists()
    plot_loss(str(out))
    before = (out / "loss.png").read_bytes()

    def half_then_interrupt(self, fname, **kw):
        open(fname, "wb").write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        plot_loss(str(out))
    assert (out / "loss.png").read_bytes() == before and not [n for n in os.listdir(out) if ".tmp-" in n]


def test_end_to_end_artifacts(corpus, cache, tmp_path):
    out = tmp_path / "run"
    assert run(corpus, cache, out) == 0
    names = set(os.listdir(out))
    assert {"checkpoints", "metrics.jsonl", "tb", "tokenizer.json", "tokenizer_config.json", "config.json",
            "train_config.yaml", "loss.png"} <= names
    assert list_steps(str(out)) == [2, 4, 6]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb"))
    assert set(os.listdir(out / "checkpoints" / "6")) >= {"params", "opt_state", "data", "meta"}
    rows = read_metrics(str(out))
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert {"step", "loss", "lr", "tokens_per_sec", "mfu", "grad_norm"} <= set(train_rows[0])
    assert train_rows[0]["lr"] == 0.0 and train_rows[1]["lr"] == pytest.approx(float(wsd_schedule(
        3e-3, 2, 2, 6, decay_type="linear")(1)))
    assert abs(train_rows[0]["loss"] - np.log(320)) < 0.1  # init loss ~ log(vocab)
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [3, 6] and val[-1]["val_ppl"] == pytest.approx(np.exp(val[-1]["val_loss"]))
    cfg, params = load_params(str(out))
    assert (cfg.hidden_size, cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id) == (32, 1, 0, 2)
    assert DogeConfig.from_json_file(out / "config.json") == cfg
    with open(out / "train_config.yaml") as f:
        assert "peak_lr" in f.read()
    # the resolved configuration is a config file again (before: its run record was an "unknown section")
    again, tc = load_configs(str(out / "train_config.yaml"), [])
    assert again == cfg and (tc.seq_len, tc.num_training_steps, tc.data) == (32, 6, [corpus])
    # re-running a finished run does nothing but succeed
    assert run(corpus, cache, out) == 0
    assert len(read_metrics(str(out))) == len(rows)


def test_resume_bit_identical(corpus, cache, tmp_path):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert run(corpus, cache, straight, "--train.checkpoint_every", "100") == 0
    assert run(corpus, cache, resumed, "--train.stop_after", "3", "--train.checkpoint_every", "100") == 0
    assert list_steps(str(resumed)) == [3]
    assert run(corpus, cache, resumed, "--train.checkpoint_every", "100") == 0
    for a, b in zip(_params(straight), _params(resumed)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    la = [r["loss"] for r in read_metrics(str(straight)) if "loss" in r]
    lb = [r["loss"] for r in read_metrics(str(resumed)) if "loss" in r]
    assert la == lb  # metrics.jsonl was cut back to the checkpoint, no duplicate steps
    # elapsed_s counts the run's training time across the resume (it restarted at zero in the second process):
    # the checkpoint records it, and the resumed steps count on from there
    with open(resumed / "checkpoints" / "3" / "meta" / "metadata") as f:
        at_3 = json.load(f)["elapsed_s"]
    el = {r["step"]: r["elapsed_s"] for r in read_metrics(str(resumed)) if "elapsed_s" in r}
    assert el[3] <= at_3 < el[4] < el[5] < el[6], (at_3, el)


def test_corrupt_latest_checkpoint_skipped(corpus, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(TrainCheckpointer, "READ_RETRY_DELAYS", (0.0, 0.0))
    out = tmp_path / "run"
    assert run(corpus, cache, out, "--train.stop_after", "4") == 0
    assert list_steps(str(out)) == [2, 4]
    for root, _, files in os.walk(out / "checkpoints" / "4" / "opt_state"):
        for f in files:
            with open(os.path.join(root, f), "w") as fh:
                fh.write("garbage")
    for f in (out / "checkpoints" / "4" / "params" / "ocdbt.process_0" / "d").iterdir():
        os.truncate(f, 100)  # cut array data: orbax's other reads fail later, into a closed event loop
    # in a process of its own: the leftover reads' tracebacks are printed by Python's hooks, past pytest's capture
    script = ("import sys; from doge_jax import train as T; from doge_jax.checkpoint import TrainCheckpointer as C; "
              "C.READ_RETRY_DELAYS = (0.0, 0.0); sys.exit(T.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", script, *TINY_ARGS, "--data", corpus, "--out_dir", str(out),
                           "--train.cache_dir", cache], cwd=REPO, capture_output=True, text=True, timeout=300)
    err = proc.stderr
    assert proc.returncode == 0, err[-3000:]
    said = [ln for ln in err.splitlines() if ln.startswith("warning: checkpoint step")]
    # (no source line, no tensorstore spec, no tracebacks: 1000+ lines of them for one cut checkpoint before)
    assert "restore_latest(" not in err and "bound method" not in err and "Traceback" not in err, err[:3000]
    assert sum("step 4: read failed" in m and "retrying" in m for m in said) == 2, said  # then given up
    assert any(re.search("step 4 .* partial or corrupt", m) for m in said), said
    assert list_steps(str(out)) == [2, 4, 6] and os.listdir(out / "corrupt_checkpoints")
    straight = tmp_path / "straight"
    assert run(corpus, cache, straight) == 0
    for a, b in zip(_params(straight), _params(out)):  # resumed from step 2: still the same parameters
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_transient_read_error_is_retried_not_quarantined(tmp_path, monkeypatch, capsys):
    """A step whose first read fails (a filesystem hiccup) is read again and restored, not moved aside."""
    monkeypatch.setattr(TrainCheckpointer, "READ_RETRY_DELAYS", (0.0, 0.0))
    params, opt = {"w": np.ones((2, 3), np.float32)}, {"count": np.zeros((), np.int32)}
    ck = TrainCheckpointer(str(tmp_path), keep=2, async_save=False)
    for step in (1, 2):
        ck.save(step, params, opt, {"next_index": step}, {"step": step})
    ck.wait()
    read, calls = TrainCheckpointer._read_step, []

    def flaky(self, step, *a):
        calls.append(step)
        if len(calls) == 1:
            raise OSError("simulated: stale file handle")
        return read(self, step, *a)

    monkeypatch.setattr(TrainCheckpointer, "_read_step", flaky)
    abstract = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, params))
    got = ck.restore_latest(abstract, jax.eval_shape(lambda: jax.tree.map(jnp.asarray, opt)))
    assert re.search("step 2: read failed .*stale file handle.*retrying", capsys.readouterr().err)
    ck.close()
    assert got[0] == 2 and got[3] == {"next_index": 2} and calls == [2, 2]
    assert list_steps(str(tmp_path)) == [1, 2] and not os.path.exists(tmp_path / "corrupt_checkpoints")


def test_unreadable_steps_move_only_when_an_older_one_restores_and_oom_passes(tmp_path, monkeypatch):
    """Every step unreadable: an error and nothing moved (all were moved aside and the run started over, losing its
    metrics; a lasting outage reads the same as damage). Out of memory while reading is not damage: it passes at
    once (it used to be retried, then the step moved aside as corrupt)."""
    monkeypatch.setattr(TrainCheckpointer, "READ_RETRY_DELAYS", (0.0, 0.0))
    params, opt = {"w": np.ones((2, 3), np.float32)}, {"count": np.zeros((), np.int32)}
    ck = TrainCheckpointer(str(tmp_path), keep=3, async_save=False)
    for step in (1, 2, 3):
        ck.save(step, params, opt, {"next_index": step}, {"step": step})
    ck.wait()
    read, calls, failing = TrainCheckpointer._read_step, [], {2, 3}

    def reader(self, step, *a):
        calls.append(step)
        if step in failing:
            raise OSError(f"simulated: step {step} unreadable")
        return read(self, step, *a)

    monkeypatch.setattr(TrainCheckpointer, "_read_step", reader)
    abstract = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, params))
    abstract_opt = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, opt))
    failing = {1, 2, 3}
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* could be read \(step 3: OSError: simulated: step 3 "
                                              r"unreadable; step 2: .*; step 1: .*\)\. Nothing was moved"):
        ck.restore_latest(abstract, abstract_opt)
    assert list_steps(str(tmp_path)) == [1, 2, 3] and not os.path.exists(tmp_path / "corrupt_checkpoints")

    def oom(self, step, *a):
        calls.append(step)
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4096 bytes.")

    calls.clear()
    monkeypatch.setattr(TrainCheckpointer, "_read_step", oom)
    with pytest.raises(RuntimeError, match="Out of memory"):
        ck.restore_latest(abstract, abstract_opt)
    assert calls == [3] and list_steps(str(tmp_path)) == [1, 2, 3]

    failing = {2, 3}  # an older step restores: the newer unreadable ones are moved aside then
    monkeypatch.setattr(TrainCheckpointer, "_read_step", reader)
    got = ck.restore_latest(abstract, abstract_opt)
    ck.close()
    assert got[0] == 1 and list_steps(str(tmp_path)) == [1]
    assert len(os.listdir(tmp_path / "corrupt_checkpoints")) == 2


def test_a_failed_checkpoint_write_names_its_own_step(tmp_path):
    """The step named is the one whose write failed: the new one, or (async) the one still in flight; the step
    before a failed one was named once a save finished (it is on disk)."""
    from doge_jax.hf_names import CheckpointWriteError

    params, opt = {"w": np.ones((2, 3), np.float32)}, {"count": np.zeros((), np.int32)}
    for async_save in (False, True):
        ck = TrainCheckpointer(str(tmp_path / str(async_save)), keep=3, async_save=async_save)
        ck.save(1, params, opt, {"next_index": 1}, {"step": 1})
        ck.mngr.wait_until_finished()  # (written; the trainer does not wait here)
        real = ck.mngr.save

        def full(*a, **k):
            raise ValueError("OUT_OF_RANGE: Failed writing: No space left on device")

        ck.mngr.save = full
        with pytest.raises(CheckpointWriteError, match=r"writing checkpoint step 2 into .* failed \(OUT_OF_RANGE"):
            ck.save(2, params, opt, {"next_index": 2}, {"step": 2})
        ck.mngr.save = real
        if async_save:  # a write that fails in the background: named when the next save or wait learns of it
            ck.save(3, params, opt, {"next_index": 3}, {"step": 3})
            real_wait, ck.mngr.wait_until_finished = ck.mngr.wait_until_finished, full
            with pytest.raises(CheckpointWriteError, match="writing checkpoint step 3 into"):
                ck.save(4, params, opt, {"next_index": 4}, {"step": 4})
            ck.mngr.wait_until_finished = real_wait
        ck.close()


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    params = {"w": np.ones((2, 3), np.float32)}
    ck = TrainCheckpointer(str(tmp_path), keep=1, async_save=False)
    ck.save(1, params, {"count": np.zeros((), np.int32)}, {"next_index": 1}, {"step": 1})
    ck.wait()
    with pytest.raises(TypeError, match="not JSON serializable"):
        ck.save(2, params, {"count": np.zeros((), np.int32)}, {"next_index": object()}, {"step": 2})
        ck.wait()
    ck.close()
    assert list_steps(str(tmp_path)) == [1]
    ck = TrainCheckpointer(str(tmp_path), keep=1, async_save=False)
    abstract = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, params))
    step, p, _, data, _ = ck.restore_latest(abstract, jax.eval_shape(lambda: {"count": jnp.zeros((), jnp.int32)}))
    ck.close()
    assert step == 1 and data == {"next_index": 1} and np.array_equal(p["w"], params["w"])


def test_config_without_model_section_warns(tmp_path, capsys):
    """A config file with only train: fields silently built transformers' default ~400M model."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  seq_len: 64\n")
    assert load_configs(str(path), [])[0].hidden_size == 1024
    assert "has no model: section" in capsys.readouterr().err
    load_configs(str(path), [("model", "hidden_size", 64)])  # a field on the command line: still the defaults' rest
    err = capsys.readouterr().err
    assert "has no model: section" in err and "with only model.hidden_size set" in err


def test_nan_loss_stops_and_keeps_last_good(corpus, cache, tmp_path, capsys):
    out = tmp_path / "run"
    code = run(corpus, cache, out, "--train.peak_lr", "1e38", "--train.num_warmup_steps", "0",
               "--train.checkpoint_every", "1")
    assert code == 3
    err = capsys.readouterr().err
    assert "M parameters (1 layers, hidden 32, vocab 320)" in err  # the size is said up front
    assert "step 1: loss " in err  # without a progress bar: a line per logged step
    # step 1's update (lr 1e38) left finite weights that give step 2 a NaN loss: that checkpoint is set aside
    assert "non-finite loss/grad norm at step 2" in err and "checkpoint step 1 holds the weights" in err
    assert "last good checkpoint: none in" in err and list_steps(str(out)) == []
    rows = read_metrics(str(out))
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    # the same command with a sane lr starts over, and says so (it did silently, replacing those metrics)
    assert run(corpus, cache, out, "--train.stop_after", "1") == 0
    assert ("holds no checkpoint to resume from: an earlier start saved none (its diverged checkpoints are in "
            "diverged_checkpoints/); starting over from step 0") in capsys.readouterr().err


def test_metrics_read_one_step_behind(corpus, cache, tmp_path, monkeypatch):
    """The loop reads step s's metrics only after dispatching step s + 1 (the device never waits for the host),
    except where the step's result is needed now: eval, checkpoint, the last step."""
    events, real_make_steps, real_get = [], T.make_steps, jax.device_get

    def make_steps(*a, **k):
        train_step, micro, eval_step = real_make_steps(*a, **k)

        class Spy:
            def lower(self, *args):
                lowered = train_step.lower(*args)

                class Compiled:
                    def compile(self):
                        fn = lowered.compile()

                        def call(*args):
                            events.append(f"s{int(args[3])}")
                            return fn(*args)
                        return call
                return Compiled()
        return Spy(), micro, eval_step

    def device_get(x):
        if isinstance(x, tuple) and isinstance(x[0], dict) and "loss" in x[0]:  # (step metrics, stop vote)
            events.append("get")
        return real_get(x)

    monkeypatch.setattr(T, "make_steps", make_steps)
    monkeypatch.setattr(T.jax, "device_get", device_get)
    assert run(corpus, cache, tmp_path / "run", "--train.checkpoint_every", "4", "--train.eval_every", "0") == 0
    assert events == ["s0", "s1", "get", "s2", "get", "s3", "get", "get",  # step 4: read for its checkpoint
                      "s4", "s5", "get", "get"]  # step 6: the last one
    assert [r["step"] for r in read_metrics(str(tmp_path / "run")) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_an_update_that_overflows_is_never_checkpointed(corpus, cache, tmp_path, capsys):
    """lr 1e12 after a zero-lr first step: step 2's loss and grad norm are finite, but its weights give step 3 a
    NaN loss. Checkpoint 2 is moved to diverged_checkpoints/ and step 1 named the last good one (before: checkpoint
    2 was called good, and every resume from it diverged again at once); nothing non-finite reaches metrics.jsonl.
    With evaluation at every step, step 2's NaN val_loss stops the run before checkpoint 2 is written."""
    out = tmp_path / "run"
    assert run(corpus, cache, out, "--train.peak_lr", "1e12", "--train.num_warmup_steps", "1",
               "--train.checkpoint_every", "1", "--train.eval_every", "0") == 3
    err = capsys.readouterr().err
    assert "non-finite loss/grad norm at step 3" in err and "checkpoint step 2 holds the weights" in err, err
    assert "last good checkpoint: step 1 in" in err
    assert list_steps(str(out)) == [1] and os.listdir(out / "diverged_checkpoints")[0].startswith("2-")
    assert all(np.isfinite(a).all() for a in _params(out))
    for line in open(out / "metrics.jsonl"):
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    # evaluated before saving: a non-finite val_loss stops the run the same way
    assert run(corpus, cache, tmp_path / "ev", "--train.peak_lr", "1e12", "--train.num_warmup_steps", "1",
               "--train.checkpoint_every", "1", "--train.eval_every", "1") == 3
    err = capsys.readouterr().err
    assert "non-finite val_loss at step 2" in err and "last good checkpoint: step 1 in" in err, err
    assert list_steps(str(tmp_path / "ev")) == [1]


def test_a_damaged_run_record_is_one_error_line(corpus, cache, tmp_path, capsys):
    """A run directory whose train_config.yaml was cut: one error naming it (before: a yaml traceback)."""
    out = tmp_path / "run"
    assert run(corpus, cache, out, "--train.stop_after", "1") == 0
    (out / "train_config.yaml").write_text("train: [")
    capsys.readouterr()
    assert run(corpus, cache, out) == 2
    err = capsys.readouterr().err
    assert f"{out / 'train_config.yaml'}: unreadable run record" in err and "Traceback" not in err


def test_nan_found_between_checkpoints_names_its_step(corpus, cache, tmp_path, capsys):
    out = tmp_path / "run"
    code = run(corpus, cache, out, "--train.peak_lr", "1e38", "--train.num_warmup_steps", "0",
               "--train.checkpoint_every", "100", "--train.eval_every", "0")
    assert code == 3
    err = capsys.readouterr().err
    finite = [r for r in read_metrics(str(out)) if "loss" in r]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in finite)
    assert f"non-finite loss/grad norm at step {len(finite) + 1} " in err and "last good checkpoint: none in" in err
    assert list_steps(str(out)) == []


@pytest.mark.parametrize("args, message", [
    (["--model.hiden_size", "8"], "unknown config key model.hiden_size (did you mean model.hidden_size"),
    (["--train.bogus", "1"], "unknown config key train.bogus"),
    (["optim.lr=1"], "unknown config section 'optim'"),
    (["--train.seq_len", "0"], "train.seq_len=0"),
    (["--model.hidden_size", "33"], "error: model.hidden_size=33"),  # (was "DogeConfig.hidden_size", not an option)
    (["--train.peak_lr", "fast"], "train.peak_lr='fast'"),
    (["--train.seq_len", "128"], "train.seq_len=128 > model.max_position_embeddings=64"),
    (["--config", "/nonexistent.yaml"], "config file '/nonexistent.yaml' does not exist"),
    (["--data", "/nonexistent/data.txt"], "data path '/nonexistent/data.txt' does not exist"),
    (["--train.tokenizer", "/nonexistent"], "tokenizer '/nonexistent'"),
    (["stray"], "unknown argument 'stray'"),
    # (with how to say "every device" on the command line: a run recorded on 8 devices, resumed on 1)
    (["--train.mesh", "{data: 3}"], "train.mesh: data=3 x fsdp=1 = 3 devices, but 1 device is available (the "
     "product must equal the device count; use -1 for one axis); --train.mesh '{data: -1}' runs data parallel on "
     "every device (1 here), '{fsdp: -1}' shards the parameters over them"),
    (["--train.mesh", "{tensor: 2}"], "train.mesh={'tensor': 2}: must be a mapping"),
    # optimizer fields (before: accepted; a negative clip norm ascends the gradient)
    (["--train.max_grad_norm", "-1"], "train.max_grad_norm=-1.0: must be > 0"),
    (["--train.adam_b1", "1.5"], "train.adam_b1=1.5: must be in [0, 1)"),
    (["--train.peak_lr", "inf"], "train.peak_lr=inf: must be > 0 and finite"),
    (["--train.peak_lr", "1e39"], "train.peak_lr=1e+39: must be at most float32's largest value"),
    (["--train.min_lr_ratio", "5"], "train.min_lr_ratio=5.0: must be in [0, 1]"),
    (["--train.weight_decay", "-10"], "train.weight_decay=-10.0: must be >= 0"),
    (["--train.adam_eps", "0"], "train.adam_eps=0.0: must be > 0"),
    (["--train.seq_len", "true"], "train.seq_len=True: must be int"),
    # before: NaN or negative MFU in every log line and a bare NaN in metrics.jsonl; 0 fell back to the table
    (["--train.peak_flops", "nan"], "train.peak_flops=nan: must be > 0 and finite"),
    (["--train.peak_flops", "0"], "train.peak_flops=0.0: must be > 0 and finite"),
    (["--train.seed", "4294967296"], "train.seed=4294967296: must be < 2**32"),  # (grain raised a traceback)
    (["--model.initializer_range", "nan"], "model.initializer_range=nan: must be finite and >= 0"),
    (["--model.remat", "foo"], "error: model.remat='foo'"),
    # an option where a value belongs (it was taken as the value, and the real value as an unknown argument)
    (["--train.peak_lr", "--train.seed", "3"], "--train.peak_lr: missing value (the next argument, --train.seed, "
                                                "is an option)"),
])
def test_startup_errors_name_the_problem(corpus, cache, tmp_path, capsys, args, message):
    code = run(corpus, cache, tmp_path / "run", *args)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not os.path.isdir(tmp_path / "run" / "checkpoints")


def test_config_file_errors_name_the_file(tmp_path):
    """A bad value the --config file set names that file (a long YAML under command-line overrides: which one said
    it?); one given on the command line does not."""
    from doge_jax.config import ConfigError

    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  hidden_size: 64\n  num_attention_heads: 3\ntrain:\n  peak_lr: -1\n  seed: x\n")
    cases = [([("train", "seed", 1)], f"train.peak_lr=-1.0: must be > 0 and finite (set in {path})"),
             ([], f"train.seed='x': expected int (set in {path})"),
             ([("train", "seed", 1), ("train", "peak_lr", 1e-3)],
              f"DogeConfig.hidden_size=64: must be a multiple of num_attention_heads=3 (set in {path})")]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as e:
            load_configs(str(path), overrides)
        assert str(e.value) == message
    with pytest.raises(ConfigError) as e:  # the command line's value: no file to name
        load_configs(str(path), [("train", "seed", 1), ("train", "peak_lr", -2.0)])
    assert str(e.value) == "train.peak_lr=-2.0: must be > 0 and finite"
    typo = tmp_path / "typo.yaml"  # an unknown key the file holds is named with the file too (it was not)
    typo.write_text("model:\n  hidden_size: 64\ntrain:\n  peak_lrr: 1e-3\n")
    with pytest.raises(ConfigError, match=re.escape("unknown config key train.peak_lrr (did you mean train.peak_lr")
                       + r".*" + re.escape(f"(set in {typo})")):
        load_configs(str(typo), [])


def test_token_ids_checked_against_vocab(corpus, cache, tmp_path, capsys):
    from doge_jax import data as D

    tok = D.train_bpe(D.resolve_paths([corpus]), 400)
    tok.save(str(tmp_path / "tokenizer.json"))
    code = run(corpus, cache, tmp_path / "run", "--train.tokenizer", str(tmp_path / "tokenizer.json"),
               "--model.vocab_size", "300")
    assert code == 2
    assert "training data: token id" in capsys.readouterr().err


def test_override_styles_and_help():
    ov = parse_overrides(["--model.hidden_size", "256", "--train.peak_lr=1e-3", "train.seed=7", "--data", "a",
                          "b*.txt", "--name", "x", "--train.tokenizer", "null"])
    m, t = load_configs(None, ov)
    assert m.hidden_size == 256 and t.peak_lr == 1e-3 and isinstance(t.peak_lr, float) and t.seed == 7
    assert t.data == ["a", "b*.txt"] and t.name == "x" and t.tokenizer is None
    # "none" is null for an optional field but a policy's name for model.remat (before: None, then "must be str")
    assert load_configs(None, parse_overrides(["--model.remat", "none"]))[0].remat == "none"
    _, t = load_configs(os.path.join(REPO, "configs", "doge-20m.yaml"), [])
    assert t.name == "doge-20m" and t.grad_accum == 256 and t.rows_per_micro == 1
    text = help_text()
    for field in TrainConfig.__dataclass_fields__:
        assert f"--train.{field}" in text
    for field in DogeConfig.__dataclass_fields__:
        assert f"--model.{field}" in text
    with pytest.raises(SystemExit):
        T.main(["--help"])


def _tiny_setup(compute_dtype="float32", grad_accum=1, rows=4, loss_chunk=1024, **model):
    cfg = DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                     keep_window_size=32, tie_word_embeddings=False, pad_token_id=2, eos_token_id=1, **model)
    tcfg = TrainConfig(seq_len=16, grad_accum=grad_accum, global_batch_tokens=16 * rows, compute_dtype=compute_dtype,
                       loss_chunk=loss_chunk, num_training_steps=10, num_warmup_steps=0, num_decay_steps=0)
    graphdef, state = nnx.split(DogeTrunk(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(state)
    tx = make_optimizer(1e-3, mask=decay_mask)
    return cfg, tcfg, graphdef, params, tx


def test_step_reports_its_target_count():
    """A step whose labels are all padding has a NaN loss; its metrics say it had no target, so the run can name
    the cause instead of calling it a divergence."""
    cfg, tcfg, graphdef, params, tx = _tiny_setup()
    step = T.make_steps(graphdef, tx, cfg, tcfg)[0]
    opt_state = tx.init(params)
    ids = np.random.default_rng(0).integers(3, 64, (1, 4, 16)).astype(np.int32)
    params, opt_state, m = step(params, opt_state, ids, 0)  # (the step donates its inputs)
    assert int(m["targets"]) == 4 * 15 and np.isfinite(m["loss"])
    _, _, m = step(params, opt_state, np.full((1, 4, 16), cfg.pad_token_id, np.int32), 1)
    assert int(m["targets"]) == 0 and np.isnan(m["loss"])


def test_grad_accumulation_equals_big_batch():
    """GA micro-batches with uneven padding give the gradient of the token mean over the whole step."""
    cfg, tcfg, graphdef, params, tx = _tiny_setup()
    # A = 0 at init makes dL/dA a near-total cancellation (constant bias per row); use A ~ N(0, 1) (as conftest's
    # perturb_) so every gradient is well conditioned
    attn = params["model"]["layers"]["self_attn"]
    attn["A"] = jax.random.normal(jax.random.key(5), attn["A"].shape)
    ids = np.random.default_rng(0).integers(3, 64, (4, 16)).astype(np.int32)
    ids[0, 5:] = 2  # pad: ignored labels, all in the first micro-batch
    ids[1, 9:] = 2
    _, grads_big, _ = T.make_steps(graphdef, tx, cfg, tcfg)
    loss_big, g_big = grads_big(params, ids[None], 0)
    _, tcfg2, *_ = _tiny_setup(grad_accum=2, rows=2)
    _, grads_acc, _ = T.make_steps(graphdef, tx, cfg, tcfg2)
    loss_acc, g_acc = grads_acc(params, ids.reshape(2, 2, 16), 0)
    # reference: plain mean CE over all valid targets of the 4 rows, real logits
    model = nnx.merge(graphdef, params)
    labels = np.where(ids == 2, -100, ids)
    ref = causal_lm_loss(model.head_logits(model(ids).logits), jnp.asarray(labels))
    np.testing.assert_allclose(loss_big, ref, rtol=1e-6)
    np.testing.assert_allclose(loss_acc, ref, rtol=1e-6)
    # The two differ only by float32 summation order over rows. Compare by norms: elementwise rtol is meaningless
    # for entries that are sums of cancelling terms, and dL/dA is one (softmax-bias gradients sum to zero per
    # query), measured at ~7e-6 relative. A wrong normalisation (per-micro-batch means) is far off (see below).
    flat_big = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g_big)])
    flat_acc = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g_acc)])
    assert np.linalg.norm(flat_big - flat_acc) <= 1e-6 * np.linalg.norm(flat_big)
    for a, b in zip(jax.tree.leaves(g_big), jax.tree.leaves(g_acc)):
        assert np.linalg.norm(np.asarray(a) - np.asarray(b)) <= 1e-4 * np.linalg.norm(np.asarray(b))
    # the normalisation matters here: per-micro-batch means would give another loss
    per_micro = [causal_lm_loss(model.head_logits(model(ids[i:i + 2]).logits), jnp.asarray(labels[i:i + 2]))
                 for i in (0, 2)]
    assert abs(float(np.mean(per_micro)) - float(ref)) > 1e-3  # vs the 1e-6 agreement above


def test_moe_aux_loss_is_added_in_every_micro_batch():
    """With grad_accum, the router aux loss of each micro-batch is added unscaled (transformers' Trainer, spec §6.2;
    README says so): the step's loss is the token-mean CE of all rows plus coef x the sum of the micro-batches'
    aux losses, not coef x one aux of the whole step."""
    moe = dict(is_moe=True, num_experts=16, num_experts_per_tok=2, output_router_logits=True,
               router_aux_loss_coef=0.5)
    cfg, tcfg, graphdef, params, tx = _tiny_setup(**moe)
    ids = np.random.default_rng(1).integers(3, 64, (4, 16)).astype(np.int32)
    loss_big, _ = T.make_steps(graphdef, tx, cfg, tcfg)[1](params, ids[None], 0)
    _, tcfg2, *_ = _tiny_setup(grad_accum=2, rows=2, **moe)
    loss_acc, _ = T.make_steps(graphdef, tx, cfg, tcfg2)[1](params, ids.reshape(2, 2, 16), 0)
    model = nnx.merge(graphdef, params)
    # (CDMoE routing mixes the rows of a batch, spec §3.8: each micro-batch's own forward; equal halves of the
    # step's targets, so the token mean is the mean of the two)
    ce, aux = zip(*[(float(causal_lm_loss(model.head_logits(o.logits), jnp.asarray(x))), float(o.aux_loss))
                    for x in (ids, ids[:2], ids[2:]) for o in [model(x)]])
    np.testing.assert_allclose(float(loss_big), ce[0] + 0.5 * aux[0], rtol=1e-6)
    np.testing.assert_allclose(float(loss_acc), (ce[1] + ce[2]) / 2 + 0.5 * (aux[1] + aux[2]), rtol=1e-6)
    assert abs(float(loss_acc) - float(loss_big)) > 0.1  # (the two readings are far apart here)


@pytest.mark.parametrize("vocab_major", [False, True])
def test_chunked_ce_equals_model_loss(vocab_major):
    k = jax.random.split(jax.random.key(1), 3)
    B, S, d, V = 3, 21, 16, 40
    h = jax.random.normal(k[0], (B, S, d))
    w = jax.random.normal(k[1], (V, d) if vocab_major else (d, V)) * 0.5
    labels = jax.random.randint(k[2], (B, S), 0, V).at[1, 3:9].set(-100)

    def ours(h, w, n):
        return causal_lm_loss_chunked(h, w, labels, n, vocab_major, chunk=8)  # 63 tokens: a ragged last chunk

    def ref(h, w, n):
        return causal_lm_loss(h @ (w.T if vocab_major else w), labels, n)

    for n in (None, 100):
        v1, g1 = jax.value_and_grad(ours, (0, 1))(h, w, n)
        v2, g2 = jax.value_and_grad(ref, (0, 1))(h, w, n)
        np.testing.assert_allclose(v1, v2, rtol=1e-6)
        for a, b in zip(g1, g2):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_ce_with_no_target_gives_nan_loss_and_zero_gradients():
    """As the plain loss and doge_torch's: every label -100 is a NaN loss, but the gradients stay finite (zero)."""
    k = jax.random.split(jax.random.key(2), 2)
    h, w = jax.random.normal(k[0], (2, 9, 16)), jax.random.normal(k[1], (16, 40))
    labels = jnp.full((2, 9), -100)
    loss, (gh, gw) = jax.value_and_grad(lambda h, w: causal_lm_loss_chunked(h, w, labels, chunk=8), (0, 1))(h, w)
    assert np.isnan(loss) and not np.asarray(gh).any() and not np.asarray(gw).any()


def test_chunked_ce_pads_little():
    """Chunks are evened out: 64 tokens with chunk 1024 are one chunk of 64, 2100 three of 700 (no padding)."""
    from doge_jax.loss import _chunks

    for n, chunk, want in ((64, 1024, (1, 64)), (2100, 1024, (3, 700)), (63, 8, (8, 8)), (4096, 1024, (4, 1024))):
        hc, tc, _ = _chunks(jnp.zeros((n, 4)), jnp.zeros((n,), jnp.int32), chunk)
        assert hc.shape == (*want, 4) and tc.shape == want


def test_plain_and_chunked_train_loss_agree():
    cfg, tcfg, graphdef, params, tx = _tiny_setup(loss_chunk=24)  # 64 tokens: 3 chunks (1024 would be one)
    ids = np.random.default_rng(1).integers(3, 64, (1, 4, 16)).astype(np.int32)
    l1, g1 = T.make_steps(graphdef, tx, cfg, tcfg)[1](params, ids, 0)
    _, tcfg0, *_ = _tiny_setup(loss_chunk=0)
    l0, g0 = T.make_steps(graphdef, tx, cfg, tcfg0)[1](params, ids, 0)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bf16_compute_path():
    cfg, tcfg, graphdef, params, tx = _tiny_setup(compute_dtype="bfloat16")
    ids = np.random.default_rng(1).integers(3, 64, (1, 4, 16)).astype(np.int32)
    step, grads_fn, _ = T.make_steps(graphdef, tx, cfg, tcfg)
    loss16, g16 = grads_fn(params, ids, 0)
    _, tcfg32, *_ = _tiny_setup()
    loss32, _ = T.make_steps(graphdef, tx, cfg, tcfg32)[1](params, ids, 0)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))  # params and grads stay float32
    assert abs(float(loss16) - float(loss32)) < 0.02
    # validation runs in the compute dtype too, as the training loss and doge_torch.train (it ran in float32)
    total16, n = T.make_steps(graphdef, tx, cfg, tcfg)[2](params, ids[0])
    total32, _ = T.make_steps(graphdef, tx, cfg, tcfg32)[2](params, ids[0])
    np.testing.assert_allclose(float(total16) / int(n), float(loss16), rtol=1e-6)
    assert float(total16) != float(total32)
    new, _, out = step(params, tx.init(params), ids, 0)
    assert np.isfinite(float(out["loss"])) and all(p.dtype == jnp.float32 for p in jax.tree.leaves(new))


def test_bf16_remat_and_unrolled_layers_run_end_to_end(corpus, cache, tmp_path):
    """Runtime model fields (remat, scan_layers) may change on resume: they are not part of the model."""
    out = tmp_path / "run"
    common = ("--train.compute_dtype", "bfloat16", "--train.num_training_steps", "4", "--train.eval_every", "0")
    assert run(corpus, cache, out, *common, "--model.remat", "full", "--model.scan_layers", "false",
               "--train.stop_after", "2") == 0
    assert run(corpus, cache, out, *common, "--model.remat", "full") == 0
    rows = read_metrics(str(out))
    assert all(np.isfinite(r.get("loss", 0)) for r in rows) and rows[-1]["step"] == 4


def test_resume_refuses_other_model(corpus, cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(corpus, cache, out, "--train.stop_after", "2") == 0
    assert run(corpus, cache, out, "--model.intermediate_size", "96", "--train.num_training_steps", "8") == 2
    err = capsys.readouterr().err
    assert "different model config (fields: intermediate_size)" in err
    assert "changed settings" not in err  # (it first warned about resuming with a longer schedule)


def _sigterm_once_compiled(program: list[str], corpus, cache, out) -> subprocess.Popen:
    """A long run of `python *program` (its stderr piped), sent SIGTERM once its train step is compiled."""
    args = [sys.executable, *program, *TINY_ARGS, "--data", corpus, "--out_dir", str(out), "--train.cache_dir", cache,
            "--train.num_training_steps", "100000", "--train.num_decay_steps", "2", "--train.checkpoint_every",
            "100000", "--train.eval_every", "0"]
    proc = subprocess.Popen(args, cwd=REPO, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "compiled the train step" in line:
            break
    proc.send_signal(signal.SIGTERM)
    return proc


def test_sigterm_saves_a_checkpoint(corpus, cache, tmp_path):
    out = tmp_path / "run"
    proc = _sigterm_once_compiled(["-m", "doge_jax.train"], corpus, cache, out)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, rest  # 128 + SIGTERM, as the shell reports it
    assert "interrupted at step" in rest
    steps = list_steps(str(out))
    assert len(steps) == 1 and steps[0] >= 1


def test_closed_log_pipe_stops_with_a_checkpoint(corpus, cache, tmp_path):
    """The log's reader gone (`train ... 2>&1 | head`, a dead tee) is a stop as SIGTERM's: a checkpoint, exit 141
    (128 + SIGPIPE); the same command resumes. Before: exit 1, no checkpoint, nothing said."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "doge_jax.train", *TINY_ARGS, "--data", corpus, "--out_dir", str(out),
            "--train.cache_dir", cache, "--train.num_training_steps", "100000", "--train.num_decay_steps", "2",
            "--train.checkpoint_every", "100000", "--train.eval_every", "0", "--train.log_every", "1"]
    proc = subprocess.Popen(args, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:
            if "compiled the train step" in line:
                break
        proc.stderr.close()
        assert proc.wait(timeout=120) == 141
    finally:
        proc.kill()
    (stopped,) = list_steps(str(out))
    assert stopped >= 1
    assert run(corpus, cache, out, "--train.num_training_steps", "100000", "--train.num_decay_steps", "2",
               "--train.stop_after", str(stopped + 1), "--train.checkpoint_every", "100000",
               "--train.eval_every", "0") == 0
    assert list_steps(str(out))[-1] == stopped + 1


def test_closed_pipe_is_seen_without_a_write(monkeypatch):
    """A pipe whose reader went away is seen by output_closed() before anything is written to it (doge_torch.train
    printed nothing between steps 1 and 2, so a reader gone during start-up stopped it after step 2, not 1); the
    stream goes to /dev/null from then on."""
    from doge_jax import closed_pipe

    r, w = os.pipe()
    stream = os.fdopen(w, "w")
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        with closed_pipe.guarded_output():
            assert not closed_pipe.output_closed()
            print("read", flush=True)
            assert os.read(r, 100) == b"read\n" and not closed_pipe.output_closed()
            os.close(r)
            assert closed_pipe.output_closed() and closed_pipe._CLOSED == ["stdout"]
            print("to /dev/null now", flush=True)
    finally:
        closed_pipe._CLOSED.clear()  # (module state: the other trainer tests in this process must not stop)
        stream.close()


def test_output_guard_with_a_stream_closed_at_start():
    """A trainer started with stdout closed (`>&-`: Python's sys.stdout is None) prints as before (print() skips a
    None stream); the guard wrapped None and every print raised AttributeError."""
    code = ("import sys\nfrom doge_jax.closed_pipe import guarded_output, output_closed\n"
            "with guarded_output():\n    print('to nowhere')\n    print('said', output_closed(), file=sys.stderr)\n")
    proc = subprocess.run(["sh", "-c", 'exec "$0" -c "$1" >&-', sys.executable, code], cwd=REPO,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.strip() == "said False", proc.stderr


_SLOW_STOP_SAVE = """import sys, time
from doge_jax import train as T
from doge_jax.checkpoint import TrainCheckpointer
TrainCheckpointer.wait = lambda self: (print("waiting for the write", file=sys.stderr, flush=True), time.sleep(120))
sys.exit(T.main(sys.argv[1:]))
"""


def test_a_second_sigterm_ends_the_run_at_once(corpus, cache, tmp_path):
    """As README says: the first SIGTERM stops after the step with a checkpoint; a second one while that is written
    ends the process at once (it only put the old handler back: the run went on and exited 143 later)."""
    import time

    proc = _sigterm_once_compiled(["-c", _SLOW_STOP_SAVE], corpus, cache, tmp_path / "run")
    for line in proc.stderr:
        if "waiting for the write" in line:
            break
    time.sleep(SIGTERM_REPEAT_S + 0.2)  # (one sooner is a scheduler's repeat of the first: the same stop)
    proc.send_signal(signal.SIGTERM)
    try:
        rest = proc.communicate(timeout=60)[1]  # (its stderr drained meanwhile)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest = "still running 60 s after the second SIGTERM\n" + proc.communicate()[1]
    assert proc.returncode == -signal.SIGTERM, rest[-3000:]  # ended by the signal, not 120 s later with 143


def _ctrl_c_in_first_step(monkeypatch, times: int) -> None:
    """`times` SIGINTs (0.2 s apart: signals of one kind do not queue) while the first train step runs."""
    import time

    real, sent = T.make_steps, []

    def make_steps(*a, **k):
        train_step, grads_fn, eval_step = real(*a, **k)

        class Lowered:
            def __init__(self, low):
                self.low = low

            def compile(self):
                compiled = self.low.compile()

                def run(*args):
                    if not sent:
                        for _ in range(times):
                            sent.append(os.kill(os.getpid(), signal.SIGINT))
                            time.sleep(0.2)
                    return compiled(*args)
                return run

        class Step:
            def lower(self, *args):
                return Lowered(train_step.lower(*args))

        return Step(), grads_fn, eval_step

    monkeypatch.setattr(T, "make_steps", make_steps)


def test_second_ctrl_c_stops_at_once(corpus, cache, tmp_path, monkeypatch, capsys):
    """The first Ctrl-C asks for the checkpointing stop; a second one, while the step still runs, stops at once in
    one line (exit 130, no new checkpoint). Before, the second only put the old handler back: it took a third."""
    _ctrl_c_in_first_step(monkeypatch, 2)
    assert run(corpus, cache, tmp_path / "run") == 130
    err = capsys.readouterr().err
    assert "stopped at once" in err and "checkpoint saved" not in err and list_steps(str(tmp_path / "run")) == []


def test_ctrl_c_during_the_stop_checkpoint_waits_for_it(corpus, cache, tmp_path, monkeypatch, capsys):
    """Ctrl-Cs while the stop's checkpoint is written wait for the write (said each time), and "checkpoint saved"
    is said once it is on disk. Before, "saved" came first, the second Ctrl-C killed the async write (orbax
    tracebacks) and only a temporary directory was left: the re-run started from step 0. A Ctrl-C during a
    train.stop_after stop's write makes it an interrupted stop (exit 130), not a silent one."""
    import time

    real_save = TrainCheckpointer.save

    def save(self, *a, **k):
        real_save(self, *a, **k)  # (async: the write is still in flight)
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)

    monkeypatch.setattr(TrainCheckpointer, "save", save)
    _ctrl_c_in_first_step(monkeypatch, 1)
    out = tmp_path / "run"
    assert run(corpus, cache, out, "--train.checkpoint_every", "1000") == 130
    err = capsys.readouterr().err
    assert err.count("finishing the checkpoint write first") == 2 and "stopped at once" not in err, err
    assert "interrupted at step 1; checkpoint saved" in err, err
    assert list_steps(str(out)) == [1] and not [f for f in os.listdir(out / "checkpoints") if "tmp" in f]
    monkeypatch.undo()
    monkeypatch.setattr(TrainCheckpointer, "save", save)
    assert run(corpus, cache, tmp_path / "b", "--train.checkpoint_every", "1000", "--train.stop_after", "2") == 130
    err = capsys.readouterr().err
    assert "interrupted at step 2; checkpoint saved" in err and list_steps(str(tmp_path / "b")) == [2], err


def test_mfu_formula():
    cfg = DogeConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, keep_window_size=8)
    D = 4
    per_layer = 8 * 2 * D + 2 * 8 * D + D * 1 + 2 * D * 8 + 3 * 8 * 16
    assert matmul_params_per_token(cfg) == 2 * per_layer + 8 * 100
    assert flops_per_token(cfg, 10) == 6 * (2 * per_layer + 800) + 6 * 2 * 2 * D * 10
    with pytest.raises(ConfigError):
        TrainConfig(global_batch_tokens=100, seq_len=32)


# ---- many devices (issue 6 item 2): data parallel + FSDP over 8 simulated CPU devices -----------------------------
MESH_ARGS = ["--train.global_batch_tokens", "512", "--train.grad_accum", "2", "--train.num_training_steps", "4",
             "--train.eval_every", "0", "--train.checkpoint_every", "100"]  # 2 micro-batches of 8 rows per step


def _run_8_devices(corpus, cache, out, *extra):
    env = cpu_devices_env(8)
    args = [sys.executable, "-m", "doge_jax.train", *TINY_ARGS, *MESH_ARGS, "--data", corpus, "--out_dir", str(out),
            "--train.cache_dir", cache, "--train.mesh", "{data: 2, fsdp: 4}", *extra]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.slow
def test_mesh_8_devices_matches_1_and_checkpoints_move(corpus, cache, tmp_path):
    """Losses on a data 2 x fsdp 4 mesh equal the 1-device run within float32 noise (1e-6 relative: only the order
    of the sums differs, cf. tests/test_sharding.py), and a run checkpointed on 8 devices resumes on 1 and the reverse
    (same data iterator position, same parameters up to that noise)."""
    def losses(out):
        rows = read_metrics(str(out))
        return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]

    ref = tmp_path / "ref"
    assert run(corpus, cache, ref, *MESH_ARGS) == 0
    ref_loss, ref_val = losses(ref)
    assert len(ref_loss) == 4 and len(set(ref_loss)) == 4
    a, b = tmp_path / "8to1", tmp_path / "1to8"
    err = _run_8_devices(corpus, cache, a, "--train.stop_after", "2")  # steps 1-2 on 8 devices ...
    assert "mesh data=2 x fsdp=4" in err
    assert run(corpus, cache, a, *MESH_ARGS) == 0  # ... 3-4 on 1
    assert run(corpus, cache, b, *MESH_ARGS, "--train.stop_after", "2") == 0  # steps 1-2 on 1 device ...
    err = _run_8_devices(corpus, cache, b)  # ... 3-4 on 8
    assert "resumed from checkpoint step 2" in err
    la, va = losses(a)
    lb, vb = losses(b)
    np.testing.assert_allclose(la, ref_loss, rtol=1e-6, atol=0)
    np.testing.assert_allclose(lb, ref_loss, rtol=1e-6, atol=0)
    np.testing.assert_allclose(vb, ref_val, rtol=1e-6, atol=0)
    np.testing.assert_allclose(va, ref_val, rtol=1e-6, atol=0)
    # b's newest checkpoint was saved on 8 devices: it loads on 1 (before: "Topology mismatch"), and on 8 the
    # generate CLI streams it (before: an "ordered effects" traceback); on_token with a model sharded over 8 is
    # refused by name
    from doge_jax import DogeForCausalLM

    assert np.isfinite(np.asarray(DogeForCausalLM.from_pretrained(str(b))(np.array([[5, 6, 7]])).logits)).all()
    code = f"""
import jax, numpy as np
from flax import nnx
from doge_jax import DogeForCausalLM
from doge_jax.generate import main
assert main(["--model", {str(b)!r}, "--prompt-ids", "5", "6", "7", "--max-new-tokens", "3"]) == 0
m = DogeForCausalLM.from_pretrained({str(b)!r})
everywhere = jax.sharding.NamedSharding(jax.make_mesh((8,), ("d",)), jax.sharding.PartitionSpec())
nnx.update(m, jax.device_put(nnx.state(m), everywhere))
try:
    m.generate(np.array([[5, 6, 7]]), max_new_tokens=2, on_token=lambda s, t: None)
except ValueError as e:
    print("refused:", e)
"""
    env = cpu_devices_env(8)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: on_token streams tokens from one device, but the model's parameters are on 8" in proc.stdout


@pytest.mark.slow
def test_8_device_run_twice_with_a_warm_compilation_cache(corpus, tmp_path):
    """The second identical run on a simulated 8-device CPU aborted in its first step when its executable came
    from the persistent compilation cache (XLA:CPU collectives: "only 4 of 8 threads arrived"); the cache is not
    used there now. Shapes from the user report that triggered it."""
    env = cpu_devices_env(8)
    args = [sys.executable, "-m", "doge_jax.train", "--data", corpus, "--train.cache_dir", str(tmp_path / "cache"),
            "--train.num_training_steps", "3", "--train.num_warmup_steps", "1", "--train.num_decay_steps", "1",
            "--train.progress", "false", "--train.seq_len", "32", "--train.global_batch_tokens", "512",
            "--model.hidden_size", "64", "--model.intermediate_size", "128", "--model.keep_window_size", "16",
            "--model.max_position_embeddings", "64"]
    for name in ("g1", "g2"):
        proc = subprocess.run([*args, "--out_dir", str(tmp_path / name)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]


def test_names_and_paths_stay_strings(corpus, tmp_path, capsys):
    """YAML turns `7` and `2024-05-01` into an int and a date; string fields keep them as text (before: a
    TypeError); a --data path holding `=` (Hive style) is a path, not an override. --name beside --out_dir does
    nothing: a note says so (it was ignored without a word)."""
    _, t = load_configs(None, parse_overrides(["--name", "7", "--out_dir", "123", "--train.tokenizer", "2024-05-01"]))
    assert (t.name, t.out_dir, t.tokenizer) == ("7", "123", "2024-05-01")
    assert "note: --out_dir given: --name 7 has no effect" in capsys.readouterr().err
    hive = tmp_path / "lang=en"
    hive.mkdir()
    ov = parse_overrides(["--data", str(hive), "b.txt", "train.seed=3", "--name", "x"])
    _, t = load_configs(None, ov)
    assert t.data == [str(hive), "b.txt"] and t.seed == 3
    _, t = load_configs(None, parse_overrides(["--data", "a.txt", "name=foo"]))  # a bare shorthand ends the list
    assert t.data == ["a.txt"] and t.name == "foo"
    assert TrainConfig(data=("a.txt",)).data == ["a.txt"]  # a tuple is a list
    # one {path, weight} mapping where a list belongs is one entry (it became the path "{'path': ...}")
    (tmp_path / "one.yaml").write_text("train:\n  data: {path: a.parquet, weight: 2}\n")
    _, t = load_configs(str(tmp_path / "one.yaml"), [])
    assert t.data == [{"path": "a.parquet", "weight": 2}]


def test_unwritable_run_directory_is_one_error_line(corpus, cache, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert run(corpus, cache, tmp_path / "afile" / "run") == 2
    err = capsys.readouterr().err
    assert "error: [Errno 20] Not a directory" in err and "Traceback" not in err


def test_failed_run_leaves_no_tokenizer_that_wins_later(corpus, cache, tmp_path, capsys):
    """A run that fails its checks writes nothing (before: its tokenizer files, which then beat an explicit
    --train.tokenizer on the next run in that directory); an established run refuses a different tokenizer."""
    from doge_jax import data as D

    out = tmp_path / "run"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert run(corpus, cache, out, "--data", str(empty)) == 2
    assert "0 packed rows" in capsys.readouterr().err and not out.exists()
    # a directory that only holds a stray tokenizer (e.g. from an older version) is not an established run
    out.mkdir()
    stray = D.train_bpe(D.resolve_paths([str(empty)]), 300)
    stray.save(str(out / "tokenizer.json"))
    good = D.train_bpe(D.resolve_paths([corpus]), 320)
    good.save(str(tmp_path / "tokenizer.json"))
    assert run(corpus, cache, out, "--train.tokenizer", str(tmp_path / "tokenizer.json"),
               "--train.num_training_steps", "4", "--train.stop_after", "2") == 0
    assert D.load_tokenizer(str(out / "tokenizer.json")).get_vocab() == good.get_vocab()
    assert run(corpus, cache, out, "--train.tokenizer", str(out / "tokenizer.json"),
               "--train.num_training_steps", "4") == 0  # the same tokenizer again: fine
    stray.save(str(tmp_path / "other.json"))
    assert run(corpus, cache, out, "--train.tokenizer", str(tmp_path / "other.json")) == 2
    assert "differs from the tokenizer of the run" in capsys.readouterr().err


def test_rerun_with_stop_after_does_not_creep(corpus, cache, tmp_path, capsys):
    out = tmp_path / "run"
    for _ in range(2):
        assert run(corpus, cache, out, "--train.stop_after", "2", "--train.checkpoint_every", "100") == 0
    err = capsys.readouterr().err
    assert "stopped at step 2; checkpoint saved. Re-run without train.stop_after" in err
    assert "stopped at step 2: train.stop_after=2 is reached already" in err
    assert list_steps(str(out)) == [2]



def test_run_inside_its_data_directory_resumes(corpus, cache, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    out = data / "runs" / "tiny"  # `--data .` with the default runs/ below it
    assert run(str(data), cache, out, "--train.stop_after", "2") == 0
    assert run(str(data), cache, out, "--train.stop_after", "4") == 0  # its metrics.jsonl is not a document
    assert list_steps(str(out)) == [2, 4]
    rows = [r for r in read_metrics(str(out)) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_ctrl_c_outside_the_training_loop_is_one_line_and_exit_130(monkeypatch, capsys):
    """Ctrl-C while an entry point starts (compiling, importing, tokenizing) or a second Ctrl-C: exit 130 with one
    line, not a KeyboardInterrupt traceback."""
    import doge_jax.generate as G
    import doge_torch.train as TT
    from doge_jax import corpora as C

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train", interrupted)
    monkeypatch.setattr(G, "_main", interrupted)
    monkeypatch.setattr(C, "pretokenize", interrupted)
    monkeypatch.setattr(TT, "main", interrupted)
    calls = [lambda: T.main(["--train.progress", "false"]), lambda: G.main([]),
             lambda: C.main(["--data", "x", "--out", "y"]), lambda: TT.cli([])]
    for call in calls:
        assert call() == 130
        err = capsys.readouterr().err
        assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_metrics_survive_a_cut_line_and_peaks_match_whole_words(tmp_path):
    from types import SimpleNamespace

    from doge_jax.metrics import MetricsLogger, peak_flops

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    MetricsLogger(str(tmp_path), resume_step=1).close()  # a resume after the kill: rewritten without the cut line
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
    dev = lambda kind: SimpleNamespace(device_kind=kind, platform="gpu")  # noqa: E731
    assert peak_flops(dev("NVIDIA L40S"), "bfloat16") == 362e12
    assert peak_flops(dev("NVIDIA L4"), "bfloat16") == 121e12
    assert peak_flops(dev("NVIDIA H100 80GB HBM3"), "bfloat16") == 989e12


def test_too_little_validation_data_is_said(corpus, cache, tmp_path, capsys):
    assert run(corpus, cache, tmp_path / "run", "--train.val_fraction", "0.01", "--train.global_batch_tokens",
               "4096", "--train.stop_after", "1") == 0
    err = capsys.readouterr().err
    assert "0 val batches" in err and "warning: no validation: the held-out documents fill" in err
    assert "fewer than one micro-batch of 128 rows" in err


def test_resume_with_changed_settings_warns(corpus, cache, tmp_path, capsys):
    """Resuming with another schedule or data is allowed (a longer run, more data) but said."""
    out = tmp_path / "run"
    assert run(corpus, cache, out, "--train.stop_after", "2") == 0
    capsys.readouterr()
    assert run(corpus, cache, out, "--train.stop_after", "3") == 0
    assert "changed settings" not in capsys.readouterr().err
    assert run(corpus, cache, out, "--train.num_training_steps", "8", "--train.stop_after", "4") == 0
    assert "with changed settings: num_training_steps 6 -> 8" in capsys.readouterr().err
    # the optimizer and the compute dtype too (they were applied without a word)
    assert run(corpus, cache, out, "--train.num_training_steps", "8", "--train.stop_after", "5",
               "--train.weight_decay", "0.5", "--train.adam_b2", "0.99", "--train.max_grad_norm", "0.5") == 0
    assert ("with changed settings: weight_decay 0.01 -> 0.5; adam_b2 0.95 -> 0.99; max_grad_norm 1.0 -> 0.5"
            in capsys.readouterr().err)
    # a refused --init-from says only why (not first a "resuming with changed settings" warning)
    assert run(corpus, cache, out, "--init-from", str(out), "--train.peak_lr", "1e-3") == 2
    err = capsys.readouterr().err
    assert "holds a run started from scratch" in err and "changed settings" not in err


def test_init_from_keeps_the_tokenizer_settings(corpus, cache, tmp_path):
    """--init-from a model whose tokenizer_config.json has a chat template and padding side (or a
    chat_template.jinja): the run keeps them (it kept only the special tokens), and so does a resume."""
    import transformers

    start = tmp_path / "start"
    assert run(corpus, cache, start, "--train.stop_after", "1") == 0
    extra = {"padding_side": "left", "chat_template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"}
    tc = json.load(open(start / "tokenizer_config.json"))
    json.dump({**tc, **extra}, open(start / "tokenizer_config.json", "w"))
    out = tmp_path / "run"
    assert run(corpus, cache, out, "--init-from", str(start), "--train.stop_after", "1") == 0
    assert run(corpus, cache, out, "--init-from", str(start), "--train.stop_after", "2") == 0  # (a resume)
    t = transformers.AutoTokenizer.from_pretrained(str(out))
    assert t.padding_side == "left" and t.apply_chat_template([{"role": "user", "content": "x"}],
                                                              tokenize=False) == "[x]"
    # a chat_template.jinja beside the tokenizer: its text becomes the chat_template field
    json.dump({**tc, "padding_side": "left"}, open(start / "tokenizer_config.json", "w"))
    (start / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    assert run(corpus, cache, tmp_path / "run2", "--init-from", str(start), "--train.stop_after", "1") == 0
    got = json.load(open(tmp_path / "run2" / "tokenizer_config.json"))
    assert got["chat_template"].startswith("{% for m in messages %}<") and got["padding_side"] == "left"


def test_resume_on_a_grown_corpus_says_so(corpus, cache, tmp_path, capsys):
    """Files added to the --data directory between starts: the same command resumes, with a warning that gives
    the old and new counts (it resumed without a word)."""
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    out = tmp_path / "run"
    assert run(str(data), cache, out, "--train.stop_after", "2") == 0
    assert run(str(data), cache, out, "--train.stop_after", "3") == 0
    assert "the data differs" not in capsys.readouterr().err
    (data / "aaa.txt").write_text(" ".join(["w1 w2 def"] * 50))
    assert run(str(data), cache, out, "--train.stop_after", "4") == 0
    err = capsys.readouterr().err
    assert "warning: the data differs from the run's last start: 21 files" in err and "(was 20 files" in err
    assert "changed settings" not in err


def test_a_runs_record_resumes_it_from_another_directory(corpus, cache, tmp_path, monkeypatch, capsys):
    """`--config RUN/train_config.yaml` from another working directory started a new run there (the record's
    runs_dir and data are relative to where the run started): it resumes RUN, reading the data from there."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    shutil.copytree(corpus, start / "corpus")
    (elsewhere / "corpus").mkdir(parents=True)  # a same-named folder here (empty): not what the run trained on
    monkeypatch.chdir(start)
    assert T.main([*TINY_ARGS, "--data", "corpus/", "--name", "r", "--train.cache_dir", cache,
                   "--train.stop_after", "1"]) == 0
    record = start / "runs" / "r" / "train_config.yaml"
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert T.main(["--config", str(record), "--train.stop_after", "2"]) == 0
    err = capsys.readouterr().err
    assert f"relative paths taken from {start}, where the run started (train.data)" in err, err
    assert "changed settings" not in err and not (elsewhere / "runs").exists()
    assert list_steps(str(start / "runs" / "r")) == [1, 2]
    # with --name it is a new run (under this directory's runs/), on the same data
    assert T.main(["--config", str(record), "--name", "copy", "--train.stop_after", "1"]) == 0
    assert list_steps(str(elsewhere / "runs" / "copy")) == [1]


def test_config_sections_must_be_mappings_and_name_picks_a_new_run(corpus, cache, tmp_path, capsys):
    """A model:/train: section that is not a mapping is one error line (was a TypeError traceback); `--config
    RUN/train_config.yaml --name NEW` starts runs_dir/NEW (the record's out_dir resumed the old run instead)."""
    for text in ("train: 5\n", "model: tiny\n", "train:\n- seq_len: 64\n"):
        (tmp_path / "y.yaml").write_text(text)
        assert T.main(["--config", str(tmp_path / "y.yaml")]) == 2
        err = capsys.readouterr().err
        assert "y.yaml: " in err and ": must be a mapping of settings" in err and "Traceback" not in err, err
    old = tmp_path / "old"
    assert run(corpus, cache, old, "--train.stop_after", "2") == 0
    capsys.readouterr()
    assert T.main(["--config", str(old / "train_config.yaml"), "--name", "new", "--train.runs_dir",
                   str(tmp_path / "runs"), "--train.stop_after", "2"]) == 0
    err = capsys.readouterr().err
    assert "note: --name given: the run directory is runs_dir/name" in err and "resumed from" not in err, err
    assert list_steps(str(tmp_path / "runs" / "new")) == [2]
    assert list_steps(str(old)) == [2] and "name: new" not in (old / "train_config.yaml").read_text()


def test_run_directory_is_not_a_file_nor_in_a_runs_checkpoints(corpus, cache, tmp_path, capsys):
    """An --out_dir that is a file was a raw "[Errno 17] File exists"; one inside a run's checkpoints/ trained a
    whole run there (convert refuses that destination); a doge_torch.train run directory took a doge_jax run beside
    its checkpoints. `--train.data '[]'` is the empty list (the stdlib corpus),
    not a path named '[]'."""
    (tmp_path / "afile").write_text("x")
    assert run(corpus, cache, tmp_path / "afile") == 2
    assert "afile: is a file, not a directory" in capsys.readouterr().err
    assert run(corpus, cache, tmp_path / "run", "--train.stop_after", "1") == 0
    capsys.readouterr()
    for inside in (tmp_path / "run" / "checkpoints" / "x", tmp_path / "run" / "checkpoints"):
        assert run(corpus, cache, inside) == 2
        assert "checkpoints/; use a directory outside it" in capsys.readouterr().err
    assert list_steps(str(tmp_path / "run")) == [1]
    capsys.readouterr()
    (tmp_path / "run" / "final").mkdir()  # (a model converted into the run) leaves it a doge_jax run
    assert run(corpus, cache, tmp_path / "run", "--train.stop_after", "2") == 0
    (tmp_path / "trun" / "checkpoint-4").mkdir(parents=True)  # a doge_torch.train run: its files and ours would mix
    assert run(corpus, cache, tmp_path / "trun") == 2
    assert "it is a doge_torch.train run directory" in capsys.readouterr().err
    assert os.listdir(tmp_path / "trun") == ["checkpoint-4"]
    ov = parse_overrides(["--train.data", "[]"])
    assert ov == [("train", "data", [])] and load_configs(None, ov)[1].data == []
    assert parse_overrides(["--data", "[a.txt, b/]"]) == [("train", "data", ["a.txt", "b/"])]
    assert parse_overrides(["--data", "[ab]*.txt"]) == [("train", "data", ["[ab]*.txt"])]  # a glob stays one
    assert parse_overrides(["--data", "[ab]"]) == [("train", "data", ["[ab]"])]


def test_repeated_data_option_adds_up():
    """`--data a --data b` trains on both (it kept only b); --train.data replaces what came before."""
    assert load_configs(None, parse_overrides(["--data", "a.txt", "b/",
                        "--train.seed", "1", "--data", "[c.txt, d/]", "--data", "e:2"]))[1].data == \
        ["a.txt", "b/", "c.txt", "d/", "e:2"]
    for forms in (["--data=a", "--data", "b"], ["--data", "a", "--data=b"], ["--data", "a", "data=b"],
                  ["data=a", "data=b"]):  # the = forms of the shorthand add up too (they replaced)
        assert load_configs(None, parse_overrides(forms))[1].data == ["a", "b"], forms
    for replace in (["--train.data", "x.txt"], ["--train.data=x.txt"], ["train.data=x.txt"]):
        ov = parse_overrides(["--data", "a.txt", *replace, "--data", "b.txt"])
        assert load_configs(None, ov)[1].data == ["b.txt"], replace
        assert load_configs(None, parse_overrides(["--data", "a.txt", *replace]))[1].data in (["x.txt"], "x.txt")


# ---- failed writes during a run ---------------------------------------------------------------------------------

_FILE_SIZE_LIMIT = """import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
from doge_jax import train as T
sys.exit(T.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("async_save", ["true", "false"])
def test_failed_checkpoint_write_is_one_line_exit_1(corpus, cache, tmp_path, async_save):
    """A checkpoint that cannot be written (here: files may not pass 40 kB; a full disk alike) ends the run with one
    line naming the step, exit 1 (a failed write, not bad input). It was exit 1 with ~570 lines of orbax and
    asyncio tracebacks (async: the failure logged at once, raised at the next save)."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMIT, *TINY_ARGS, "--data", corpus, "--out_dir", str(out),
                           "--train.cache_dir", cache, "--train.async_checkpoint", async_save],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "ERROR:" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.match(rf"error: writing checkpoint step \d into {re.escape(str(out / 'checkpoints'))} failed \(", last)
    assert "the checkpoints before it are intact" in last


_UNAWAITED = """import gc, sys
from doge_jax.checkpoint import TrainCheckpointer
from doge_jax.hf_names import CheckpointWriteError
ckpt = TrainCheckpointer(sys.argv[1], async_save=False)
async def leftover():
    pass
leftover()  # collected unrun: warned (nothing failed yet)
gc.collect()
if sys.argv[2] == "fail":
    try:
        with ckpt._write_errors(2):
            raise OSError("No space left on device")
    except CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr)
    held = leftover()  # an aborted write's coroutine, collected at exit
"""


def test_failed_write_leftover_coroutines_stay_quiet(tmp_path):
    """After a failed checkpoint write, the aborted write's coroutines that orbax's closed loop never ran are not
    reported at exit after the one-line error (CI: the run's last line was "RuntimeWarning: Enable tracemalloc ...");
    before any failure such a warning is still shown."""
    for mode in ("ok", "fail"):
        proc = subprocess.run([sys.executable, "-c", _UNAWAITED, str(tmp_path / mode), mode], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert sum("coroutine 'leftover' was never awaited" in line for line in lines) == 1, proc.stderr
        if mode == "fail":
            assert lines[-1].startswith("error: writing checkpoint step 2 into "), proc.stderr


def test_metrics_and_tensorboard_failures_do_not_stop_a_run(tmp_path):
    """A failed metrics.jsonl write turns it off with one warning (it ended the run, exit 2, losing the steps since
    the last checkpoint); a dead TensorBoard writer thread (tensorboardX ends it at a failed write) turns
    TensorBoard off (every later event waited in its full queue for good: the run hung)."""
    import errno
    import threading

    from doge_jax.metrics import MetricsLogger

    said = []
    m = MetricsLogger(str(tmp_path), warn=said.append)
    m.log({"step": 1, "loss": 2.0})
    for fw in m.tb.all_writers.values():  # the writer thread stops, as after a failed write
        fw.event_writer._worker.stop()

    def many():
        for step in range(2, 400):  # ~2400 events: more than any queue holds
            m.log({"step": step, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "tokens_per_sec": 5.0, "mfu": 0.1})

    t = threading.Thread(target=many, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "MetricsLogger.log blocked on a dead TensorBoard writer"
    assert len(said) == 1 and "TensorBoard logging" in said[0] and "off" in said[0], said
    assert len(read_metrics(str(tmp_path))) == 399

    class Full:
        name = "metrics.jsonl"

        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    m.file = Full()
    m.log({"step": 400, "loss": 1.0})
    m.log({"step": 401, "loss": 1.0})
    assert len(said) == 2 and "metrics.jsonl is off" in said[1] and "No space left" in said[1], said
    m.close()
    # one that cannot be opened at start-up (here a directory in its place) is the same warning, not an error
    blocked = tmp_path / "blocked"
    (blocked / "metrics.jsonl").mkdir(parents=True)
    said.clear()
    m = MetricsLogger(str(blocked), resume_step=0, warn=said.append)
    m.log({"step": 1, "loss": 1.0})
    assert len(said) == 1 and "opening" in said[0] and "metrics.jsonl is off" in said[0], said
    m.close()


def test_a_second_trainer_on_a_run_is_refused(corpus, cache, tmp_path, capsys):
    """Two trainers on one run directory deleted each other's checkpoint writes and interleaved metrics.jsonl:
    the run directory is locked while a trainer uses it."""
    from doge_jax.hf_io import run_lock

    out = tmp_path / "run"
    out.mkdir()
    with run_lock(str(out)):  # (flock: another open of the directory, as another process's, conflicts)
        assert run(corpus, cache, out, "--train.stop_after", "1") == 2
    assert "is in use: another trainer holds its lock" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()
    assert run(corpus, cache, out, "--train.stop_after", "1") == 0  # free again
