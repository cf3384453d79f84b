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
import threading
import time

import numpy as np
import pytest
from conftest import cpu_devices_env
from test_train import MESH_ARGS, REPO, TINY_ARGS, cache, corpus, run  # noqa: F401 - fixtures

from doge_jax.checkpoint import list_steps
from doge_jax.metrics import read_metrics

# 6 steps of 2 micro-batches x 8 rows (4 per host), evaluated at 3 and 6; no checkpoint before the end
ARGS = [*MESH_ARGS, "--train.num_training_steps", "6", "--train.eval_every", "3"]
# one pytest-xdist worker runs the whole module; its fixtures are costly runs, built once (session-scoped: a module
# fixture is torn down whenever the worker next runs another module's test, and xdist interleaves modules)
pytestmark = pytest.mark.xdist_group("multihost")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hosts:
    """The trainer started once per 'host' (same command, its own JAX_PROCESS_ID), each with `devices` CPU devices;
    stderr collected by a thread per process. Killed on exit from the `with` block, so a failing test leaves no
    trainer running."""

    def __init__(self, data, cache_dir, out, tokenizer, *extra, processes: int = 2, devices: int = 2,
                 script: str | None = None):
        env = cpu_devices_env(devices, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
                              JAX_NUM_PROCESSES=str(processes),
                              PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        entry = [script] if script else ["-m", "doge_jax.train"]
        args = [sys.executable, *entry, *TINY_ARGS, *ARGS, "--data", data, "--out_dir", str(out),
                "--train.cache_dir", cache_dir, "--train.tokenizer", str(tokenizer), *extra]
        self.procs = [subprocess.Popen(args, cwd=REPO, env={**env, "JAX_PROCESS_ID": str(i)},
                                       stderr=subprocess.PIPE, text=True) for i in range(processes)]
        self.lines: list[list[str]] = [[] for _ in self.procs]
        self.threads = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(processes)]
        for t in self.threads:
            t.start()

    def _read(self, i: int) -> None:
        for line in self.procs[i].stderr:
            self.lines[i].append(line)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        """Until every host has printed a line containing `text`."""
        deadline = time.monotonic() + timeout
        while not all(any(text in line for line in lines) for lines in self.lines):
            assert time.monotonic() < deadline, f"no {text!r} from every host:\n{self.errs()}"
            time.sleep(0.1)

    def errs(self) -> list[str]:
        return ["".join(lines) for lines in self.lines]

    def finish(self, want_rc: int | list[int] = 0, timeout: float = 300) -> list[str]:
        for p in self.procs:
            p.wait(timeout=timeout)
        for t in self.threads:
            t.join(timeout=10)
        errs = self.errs()
        want = want_rc if isinstance(want_rc, list) else [want_rc] * len(self.procs)
        for p, err, rc in zip(self.procs, errs, want):
            assert p.returncode == rc, err[-3000:]
        return errs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def finish(*args, **kw) -> list[str]:
    """Run the hosts to the end; their stderr."""
    with Hosts(*args, **kw) as hosts:
        return hosts.finish()


def losses(out):
    rows = read_metrics(str(out))
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.fixture(scope="session")
def ref(corpus, cache, tmp_path_factory):  # noqa: F811 - fixtures
    """One process, one device: the losses every layout must reproduce, and the run's tokenizer."""
    out = tmp_path_factory.mktemp("mh") / "ref"
    assert run(corpus, cache, out, *ARGS) == 0
    return out, losses(out)


def test_two_hosts_train_like_one(corpus, cache, ref, tmp_path):  # noqa: F811 - fixtures
    ref_dir, (ref_loss, ref_val) = ref
    out = tmp_path / "two"
    errs = finish(corpus, cache, out, ref_dir / "tokenizer.json")
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
    finish(corpus, cache, out, tok, "--train.stop_after", "3")
    assert list_steps(str(out)) == [3]
    assert run(corpus, cache, out, *ARGS, "--train.tokenizer", str(tok)) == 0
    loss, val = losses(out)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=0)
    np.testing.assert_allclose(val, ref_val, rtol=1e-6, atol=0)

    # SIGTERM to host 1 only: both hosts stop after the same step, save one checkpoint and exit 143 (host 1, as the
    # shell reports SIGTERM) / 130 (host 0, stopped by the other's signal) (before, host 0 trained on and host 1
    # waited in the checkpoint's collective: both hung)
    out = tmp_path / "signal"
    with Hosts(corpus, cache, out, tok, "--train.num_training_steps", "100000", "--train.eval_every", "0",
               "--train.checkpoint_every", "100000") as hosts:
        hosts.wait_for("compiled the train step")
        hosts.procs[1].send_signal(signal.SIGTERM)
        errs = hosts.finish(want_rc=[130, 143])
    stops = [[line.split("] ", 1)[1] for line in e.splitlines() if "interrupted at step" in line] for e in errs]
    assert len(stops[0]) == 1 and stops[0] == stops[1], errs
    assert all(f"[doge_jax.train host {i}/2] interrupted at step" in e for i, e in enumerate(errs))
    steps = list_steps(str(out))
    assert len(steps) == 1 and f"interrupted at step {steps[0]};" in stops[0][0]


@pytest.mark.slow
def test_corrupt_checkpoint_skipped_by_every_host(corpus, cache, ref, tmp_path):  # noqa: F811 - fixtures
    """Both hosts skip a corrupt step and resume from the one before; one of them moves it aside (before, host 0
    crashed moving what host 1 had moved, and host 1 waited for it forever). A step one host cannot read is skipped
    by all (before, orbax's restore barrier on one host met the vote's all-gather on the other: both died)."""
    ref_dir, (ref_loss, ref_val) = ref
    tok = ref_dir / "tokenizer.json"
    out = tmp_path / "run"
    finish(corpus, cache, out, tok, "--train.stop_after", "4", "--train.checkpoint_every", "2")
    assert list_steps(str(out)) == [2, 4]
    for root, _, files in os.walk(out / "checkpoints" / "4" / "opt_state"):
        for f in files:
            with open(os.path.join(root, f), "w") as fh:
                fh.write("garbage")
    errs = finish(corpus, cache, out, tok, "--train.checkpoint_every", "2")
    assert all("step 4" in e and "partial or corrupt" in e and "resumed from checkpoint step 2" in e for e in errs)
    assert list_steps(str(out)) == [2, 4, 6] and len(os.listdir(out / "corrupt_checkpoints")) == 1
    loss, val = losses(out)  # steps 1-4, then 3-6 again after the resume from 2
    np.testing.assert_allclose(loss[-4:], ref_loss[-4:], rtol=1e-6, atol=0)
    np.testing.assert_allclose(val[-1], ref_val[-1], rtol=1e-6, atol=0)

    # a read error on one host only (its own shards): both skip the step (one vote, no barrier inside the read)
    wrapper = tmp_path / "one_host_fails.py"
    wrapper.write_text(ONE_HOST_FAILS)
    errs = finish(corpus, cache, out, tok, "--train.checkpoint_every", "2", script=str(wrapper))
    assert "simulated: host 1 cannot read step 6" in errs[1] and "another host could not read it" in errs[0]
    assert all("step 6" in e and "resumed from checkpoint step 4" in e and "finished 6 steps" in e for e in errs)
    assert list_steps(str(out)) == [2, 4, 6] and len(os.listdir(out / "corrupt_checkpoints")) == 2


ONE_HOST_FAILS = """import runpy, sys
import jax
from doge_jax import checkpoint as C
read = C.TrainCheckpointer._read_step
def read_step(self, step, *a):
    if jax.process_index() == 1 and step == 6:
        raise OSError("simulated: host 1 cannot read step 6")
    return read(self, step, *a)
C.TrainCheckpointer._read_step = read_step
sys.argv[0] = "doge_jax.train"
runpy.run_module("doge_jax.train", run_name="__main__", alter_sys=True)
"""


def test_setup_error_on_one_host_stops_every_host(corpus, cache, ref, tmp_path):  # noqa: F811 - fixtures
    """A data error on host 1 only: both hosts exit 2 at once, host 1 with its error and host 0 saying another host
    failed (before, host 0 went on into the first collective and died 30 s later in a gloo timeout traceback)."""
    wrapper = tmp_path / "one_host_no_data.py"
    wrapper.write_text(ONE_HOST_NO_DATA)
    with Hosts(corpus, cache, tmp_path / "run", ref[0] / "tokenizer.json", script=str(wrapper)) as hosts:
        errs = hosts.finish(want_rc=2, timeout=25)  # well inside jax.distributed's 30 s key-value timeout
    assert "error: simulated: host 1 cannot read the data" in errs[1]
    assert "error: another host failed while setting up the run" in errs[0] and "Traceback" not in errs[0]
    # the same for a config file only host 0 has (read before train() starts)
    wrapper.write_text(ONE_HOST_NO_CONFIG)
    with Hosts(corpus, cache, tmp_path / "run2", ref[0] / "tokenizer.json", script=str(wrapper)) as hosts:
        errs = hosts.finish(want_rc=2, timeout=25)
    assert "error: config file '/only/on/host0.yaml' does not exist" in errs[1]
    assert "error: another host failed while reading the configuration" in errs[0]


ONE_HOST_NO_DATA = """import runpy, sys
import jax
from doge_jax import corpora as C, data as D
real = C.training_data
def training_data(*a, **kw):
    if jax.process_index() == 1:
        raise D.DataError("simulated: host 1 cannot read the data")
    return real(*a, **kw)
C.training_data = training_data
sys.argv[0] = "doge_jax.train"
runpy.run_module("doge_jax.train", run_name="__main__", alter_sys=True)
"""


ONE_HOST_NO_CONFIG = """import runpy, sys
if __import__("os").environ["JAX_PROCESS_ID"] == "1":
    sys.argv[1:1] = ["--config", "/only/on/host0.yaml"]
sys.argv[0] = "doge_jax.train"
runpy.run_module("doge_jax.train", run_name="__main__", alter_sys=True)
"""



@pytest.mark.slow
def test_two_hosts_init_from_an_orbax_run(corpus, cache, ref, tmp_path):  # noqa: F811 - fixtures
    """--init-from a doge_jax run on two hosts with FSDP across them (before: every host died in device_put: the
    restored arrays were committed to a local device); a batch that does not split names the right multiple."""
    ref_dir = ref[0]
    tok = ref_dir / "tokenizer.json"
    mesh = ("--train.mesh", "{data: 2, fsdp: 2}")
    errs = finish(corpus, cache, tmp_path / "cont", tok, *mesh, "--init-from", str(ref_dir), "--train.stop_after",
                  "1")
    assert all(f"initialised from {ref_dir}" in e and "Traceback" not in e for e in errs)
    with Hosts(corpus, cache, tmp_path / "bad", tok, *mesh, "--train.global_batch_tokens", "384") as hosts:
        errs = hosts.finish(want_rc=2, timeout=60)
    assert all("6 rows per micro-batch do not split over the 4 devices" in e and "use a multiple of 4 rows" in e
               for e in errs)
