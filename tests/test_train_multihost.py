"""`python -m doge_jax.train` as a multi-host run: two local processes x 2 CPU devices joined by jax.distributed
(gloo), the way README's "Many devices and hosts" starts one per host. The run must see the same global batches as a
single process (losses equal up to the order of float32 sums), resume across host counts, and stop together when
only one host is signalled."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_train import MESH_ARGS, REPO, TINY_ARGS, cache, corpus, run  # noqa: F401 - fixtures

from doge_jax.checkpoint import list_steps
from doge_jax.metrics import read_metrics

# 6 steps of 2 micro-batches x 8 rows (4 per host), evaluated at 3 and 6; no checkpoint before the end
ARGS = [*MESH_ARGS, "--train.num_training_steps", "6", "--train.eval_every", "3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(data, cache_dir, out, tokenizer, *extra, processes: int = 2, devices: int = 2) -> list[subprocess.Popen]:
    """Start the trainer once per 'host' (same command, its own JAX_PROCESS_ID), each with `devices` CPU devices."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(processes))
    args = [sys.executable, "-m", "doge_jax.train", *TINY_ARGS, *ARGS, "--data", data, "--out_dir", str(out),
            "--train.cache_dir", cache_dir, "--train.tokenizer", str(tokenizer), *extra]
    return [subprocess.Popen(args, cwd=REPO, env={**env, "JAX_PROCESS_ID": str(i)}, stderr=subprocess.PIPE,
                             text=True) for i in range(processes)]


def finish(procs, want_rc: int = 0) -> list[str]:
    errs = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == want_rc, err[-3000:]
    return errs


def losses(out):
    rows = read_metrics(str(out))
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.fixture(scope="module")
def ref(corpus, cache, tmp_path_factory):  # noqa: F811 - fixtures
    """One process, one device: the losses every layout must reproduce, and the run's tokenizer."""
    out = tmp_path_factory.mktemp("mh") / "ref"
    assert run(corpus, cache, out, *ARGS) == 0
    return out, losses(out)


def test_two_hosts_train_like_one(corpus, cache, ref, tmp_path):  # noqa: F811 - fixtures
    ref_dir, (ref_loss, ref_val) = ref
    out = tmp_path / "two"
    errs = finish(launch(corpus, cache, out, ref_dir / "tokenizer.json"))
    assert all("mesh data=4 x fsdp=1" in e and "finished 6 steps" in e for e in errs)
    loss, val = losses(out)  # written by process 0 only: one record per step
    assert len(ref_loss) == 6 and len(set(ref_loss)) == 6 and len(ref_val) == 2
    # the same global batches (each host reads its half of every micro-batch): the same losses up to the order of
    # the float32 sums (the 1e-6 of tests/test_train.py's 8-device check)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=0)
    np.testing.assert_allclose(val, ref_val, rtol=1e-6, atol=0)
    assert list_steps(str(out)) == [6]


@pytest.mark.slow
def test_resume_across_host_counts_and_one_signalled_host(corpus, cache, ref, tmp_path):  # noqa: F811 - fixtures
    ref_dir, (ref_loss, ref_val) = ref
    tok = ref_dir / "tokenizer.json"
    # steps 1-3 on two hosts, 4-6 on one process with one device: the data position carries over
    out = tmp_path / "moved"
    finish(launch(corpus, cache, out, tok, "--train.stop_after", "3"))
    assert list_steps(str(out)) == [3]
    assert run(corpus, cache, out, *ARGS, "--train.tokenizer", str(tok)) == 0
    loss, val = losses(out)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=0)
    np.testing.assert_allclose(val, ref_val, rtol=1e-6, atol=0)

    # SIGTERM to host 1 only: both hosts stop after the same step, save one checkpoint and exit 130 (before, host 0
    # trained on and host 1 waited in the checkpoint's collective: both hung)
    out = tmp_path / "signal"
    procs = launch(corpus, cache, out, tok, "--train.num_training_steps", "100000", "--train.eval_every", "0",
                   "--train.checkpoint_every", "100000")
    for p in procs:
        for line in p.stderr:
            if "compiled the train step" in line:
                break
    procs[1].send_signal(signal.SIGTERM)
    errs = finish(procs, want_rc=130)
    stops = [[line for line in e.splitlines() if "interrupted at step" in line] for e in errs]
    assert len(stops[0]) == 1 and stops[0] == stops[1], errs
    steps = list_steps(str(out))
    assert len(steps) == 1 and f"interrupted at step {steps[0]};" in stops[0][0]


@pytest.mark.slow
def test_corrupt_checkpoint_skipped_by_every_host(corpus, cache, ref, tmp_path):  # noqa: F811 - fixtures
    """Both hosts skip a corrupt step and resume from the one before; one of them moves it aside (before, host 0
    crashed moving what host 1 had moved, and host 1 waited for it forever). A step one host cannot restore is
    skipped by all (`_every_process`)."""
    ref_dir, (ref_loss, ref_val) = ref
    tok = ref_dir / "tokenizer.json"
    out = tmp_path / "run"
    finish(launch(corpus, cache, out, tok, "--train.stop_after", "4", "--train.checkpoint_every", "2"))
    assert list_steps(str(out)) == [2, 4]
    for root, _, files in os.walk(out / "checkpoints" / "4" / "opt_state"):
        for f in files:
            with open(os.path.join(root, f), "w") as fh:
                fh.write("garbage")
    errs = finish(launch(corpus, cache, out, tok, "--train.checkpoint_every", "2"))
    assert all("step 4" in e and "partial or corrupt" in e and "resumed from checkpoint step 2" in e for e in errs)
    assert list_steps(str(out)) == [2, 4, 6] and len(os.listdir(out / "corrupt_checkpoints")) == 1
    loss, val = losses(out)  # steps 1-4, then 3-6 again after the resume from 2
    np.testing.assert_allclose(loss[-4:], ref_loss[-4:], rtol=1e-6, atol=0)
    np.testing.assert_allclose(val[-1], ref_val[-1], rtol=1e-6, atol=0)

    script = ("import jax, sys; from doge_jax import sharding as S; S.init_distributed(); "
              "from doge_jax.checkpoint import _every_process as every; i = jax.process_index(); "
              "print(every(True), every(i == 1), every(False))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**env, "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [o[0].splitlines()[-1] for o in outs] == ["True False False"] * 2, outs  # (gloo logs to stdout first)
