"""Orbax checkpoints of doge_jax models: the on-disk layout shared by training, from_pretrained and convert.

Layouts (all carry the model's HF-style `config.json`):
- model-only checkpoint:   DIR/config.json, DIR/params/            (orbax PyTree of the parameter tree)
- training run directory:  RUN/config.json, RUN/checkpoints/<step>/params/ (+ optimizer/data state items)
- one step of a run:       RUN/checkpoints/<step>/params/ (config.json found in the run directory)
The parameter tree is the Flax path dict of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import DogeConfig
from .hf_io import is_program_error, model_output_dir, read_generation_config, write_generation_config
from .hf_names import CheckpointError, CheckpointWriteError

PARAMS = "params"
CHECKPOINTS = "checkpoints"


def is_orbax_checkpoint(path: str) -> bool:
    """True for a model-only checkpoint, a training run directory or one of its step directories (also one that
    lacks params/: resolve names it)."""
    return (os.path.isdir(os.path.join(path, PARAMS)) or os.path.isdir(os.path.join(path, CHECKPOINTS))
            or _step_dir(path))


def _step_dir(path: str) -> bool:
    """RUN/checkpoints/<digits>, finished or not."""
    path = os.path.abspath(path)
    return (os.path.isdir(path) and os.path.basename(path).isdigit()
            and os.path.basename(os.path.dirname(path)) == CHECKPOINTS)


def list_steps(run_dir: str) -> list[int]:
    """Finished steps of a run, ascending (orbax writes unfinished steps under temporary names)."""
    ck = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(ck):
        return []
    return sorted(int(n) for n in os.listdir(ck) if n.isdigit() and os.path.isdir(os.path.join(ck, n, PARAMS)))


def resolve(path: str, step: int | None = None) -> tuple[str, str]:
    """(params directory, config.json path) for any of the three layouts; `step` picks a run's step (default:
    the latest)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):
        steps = list_steps(path)
        if not steps:
            raise CheckpointError(f"{path}: training run has no finished checkpoint")
        if step is None:
            step = steps[-1]
            ck = os.path.join(path, CHECKPOINTS)
            newer = sorted(int(n) for n in os.listdir(ck) if n.isdigit() and int(n) > step)
            if newer:  # (orbax renames a finished save into place: a step folder without params/ is damage)
                warnings.warn(f"{path}: step {newer[-1]} has no {PARAMS}/ (damaged or unfinished): loading step "
                              f"{step}, the newest finished one", stacklevel=2)
        elif step not in steps:
            raise CheckpointError(f"{path}: no checkpoint for step {step} (have {steps})")
        return os.path.join(path, CHECKPOINTS, str(step), PARAMS), os.path.join(path, "config.json")
    if step is not None:
        raise CheckpointError(f"{path}: a step only applies to a doge_jax.train run directory (one holding "
                              f"{CHECKPOINTS}/)")
    if not os.path.isdir(os.path.join(path, PARAMS)):
        if _step_dir(path):
            run = os.path.dirname(os.path.dirname(path))
            raise CheckpointError(f"{path}: a training step without {PARAMS}/ (damaged or unfinished); the run's "
                                  f"finished steps: {list_steps(run) or 'none'}")
        raise CheckpointError(f"{path}: not an orbax checkpoint (no {PARAMS}/ or {CHECKPOINTS}/)")
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg) and os.path.basename(os.path.dirname(path)) == CHECKPOINTS:
        cfg = os.path.join(os.path.dirname(os.path.dirname(path)), "config.json")  # a step: the run's config
    return os.path.join(path, PARAMS), cfg


def abstract_params(cfg: DogeConfig, dtype=None) -> dict:
    """The parameter tree's shapes/dtypes (jax.ShapeDtypeStruct leaves) without allocating."""
    from .hf import abstract_model

    tree = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
    if dtype is None:
        return tree
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), tree)


def read_config(cfg_path: str) -> DogeConfig:
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{cfg_path}: missing (an orbax checkpoint needs the model's config.json)")
    return DogeConfig.from_json_file(cfg_path)


@contextlib.contextmanager
def _quiet_absl(level: int = logging.ERROR):
    """Orbax logs a warning for item directories written by CheckpointManager (their metadata file lives one
    level up); it is harmless here, so hide it from users."""
    log = logging.getLogger("absl")
    old = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(old)


@contextlib.contextmanager
def _orbax_write(directory: str):
    """A failed orbax write (disk full, file too large, permissions) arrives as tensorstore's ValueError, with each
    writer thread's traceback logged through absl: make it one OSError (callers and the CLIs treat OSError as a
    failed write, exit 1; atomic_output_dir names the output), and keep the tracebacks out of the user's terminal.
    The save raises at its first failed write while TensorStore's other writes into `directory` go on (recreating
    their folders): wait until the folder stops changing, so that the caller's clean-up removes all of it."""
    _quiet_failed_io_leftovers()  # (a failed write's other writes report into orbax's closed event loop at once)
    with _quiet_absl(logging.CRITICAL):
        try:
            yield
        except Exception as e:  # (not a second Ctrl-C's KeyboardInterrupt: that stops at once)
            if is_program_error(e):
                raise
            _settle(directory)
            # its other writes' errors, when their futures are collected later: "Task/Future exception was never
            # retrieved" with the failed write's message (which names this directory), from asyncio's logger
            _quiet_asyncio_about(directory)
            if isinstance(e, (OSError, CheckpointError)):
                raise
            raise OSError(_short(e)) from e


_QUIET_DIRS: set[str] = set()


def _quiet_asyncio_about(directory: str) -> None:
    """Drop asyncio's "exception was never retrieved" reports that name `directory` (a failed write's leftovers,
    reported once by the writer): one filter for the process, the directories in a set."""
    if not _QUIET_DIRS:
        logging.getLogger("asyncio").addFilter(
            lambda record: not any(d in record.getMessage() for d in _QUIET_DIRS))
    _QUIET_DIRS.add(directory)


def _settle(directory: str, quiet_s: float = 0.3, limit_s: float = 20.0) -> None:
    """Return once nothing under `directory` was created, grown or removed for `quiet_s` (at most `limit_s`)."""
    def snapshot():
        out = []
        for root, dirs, files in os.walk(directory):
            for f in files:
                try:
                    out.append((os.path.join(root, f), os.stat(os.path.join(root, f)).st_size))
                except OSError:
                    pass
            out.extend((os.path.join(root, d), -1) for d in dirs)
        return sorted(out)

    end = time.monotonic() + limit_s
    last = snapshot()
    while time.monotonic() < end:
        time.sleep(quiet_s)
        now = snapshot()
        if now == last:
            return
        last = now


def load_params(path: str, step: int | None = None, dtype=None) -> tuple[DogeConfig, dict]:
    """(config, parameter tree) of an orbax checkpoint in any of the three layouts."""
    import orbax.checkpoint as ocp

    params_dir, cfg_path = resolve(path, step)
    cfg = read_config(cfg_path)
    target = abstract_params(cfg)
    _quiet_failed_io_leftovers()
    try:
        with ocp.StandardCheckpointer() as ckptr:
            with _quiet_absl():
                meta = ckptr.metadata(params_dir)
            tree = getattr(meta, "item_metadata", meta)
            stored = {tuple(str(getattr(k, "key", k)) for k in p): v for p, v in
                      jax.tree_util.tree_flatten_with_path(tree)[0]}
            want = {tuple(str(getattr(k, "key", k)) for k in p): v for p, v in
                    jax.tree_util.tree_flatten_with_path(target)[0]}
            _check_tree(want, stored, params_dir)
            # onto this process's first device, whatever mesh saved it (without a sharding orbax restores the saved
            # one: a run trained on 8 devices failed to load on 1 with "Topology mismatch")
            one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, s.dtype, sharding=one), target,
                                  _unflatten_like(target, stored))
            params = ckptr.restore(params_dir, target)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{params_dir}: cannot restore parameters ({type(e).__name__}: {e})") from None
    if dtype is not None:
        params = jax.tree.map(lambda a: a.astype(dtype), params)
    return cfg, params


def _unflatten_like(target: dict, flat: dict) -> dict:
    leaves = [flat[tuple(str(getattr(k, "key", k)) for k in p)] for p, _ in
              jax.tree_util.tree_flatten_with_path(target)[0]]
    return jax.tree.unflatten(jax.tree.structure(target), leaves)


def _check_tree(want: dict, stored: dict, where: str) -> None:
    missing = sorted(".".join(k) for k in want if k not in stored)
    unexpected = sorted(".".join(k) for k in stored if k not in want)
    wrong = sorted(f"{'.'.join(k)}: expected {tuple(want[k].shape)}, got {tuple(stored[k].shape)}"
                   for k in want if k in stored and tuple(stored[k].shape) != tuple(want[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{where} does not match the model config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items[:50]))
        raise CheckpointError("\n".join(parts))


def model_from_params(cfg: DogeConfig, params: dict):
    """A DogeForCausalLM holding the given parameter tree (no random init)."""
    from .hf import abstract_model

    model = abstract_model(cfg)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def load_model(path: str, step: int | None = None, dtype=None):
    """DogeForCausalLM from an orbax checkpoint (model-only, run directory or step directory)."""
    cfg, params = load_params(path, step, dtype)
    model = model_from_params(cfg, params)
    model.generation_config = read_generation_config(os.path.dirname(resolve(path, step)[1]), cfg)
    return model


def save_model(model, path: str, overwrite: bool = True) -> None:
    """Write a model-only orbax checkpoint (config.json + params/) atomically; other files of an existing directory
    (a tokenizer) stay, HF weight files go."""
    import orbax.checkpoint as ocp

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = jax.tree.map(jnp.asarray, params)
    dtype = str(jax.tree.leaves(params)[0].dtype)
    with model_output_dir(path, overwrite=overwrite) as tmp:
        model.config.save_json(os.path.join(tmp, "config.json"), dtype=dtype)
        write_generation_config(tmp, model.generation_config)
        with sigint_deferred(), _orbax_write(tmp), ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS), params)
            ckptr.wait_until_finished()


# ---- streaming access for the converters (convert/) ------------------------------------------------------------

def param_metadata(path: str, step: int | None = None) -> tuple[str, str, dict[tuple[str, ...], tuple]]:
    """(params directory, config.json path, {Flax path: (shape, dtype)}) without reading any array."""
    import orbax.checkpoint as ocp

    params_dir, cfg_path = resolve(path, step)
    _quiet_failed_io_leftovers()  # (a damaged checkpoint's reads report into orbax's closed event loop afterwards)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            with _quiet_absl():
                meta = ckptr.metadata(params_dir)
    except Exception as e:
        raise CheckpointError(f"{params_dir}: unreadable orbax metadata ({type(e).__name__}: {e})") from None
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    out = {}
    for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(v, "shape"):
            out[tuple(str(getattr(k, "key", k)) for k in p)] = (tuple(v.shape), v.dtype)
    if not out:  # (read as a variant clash before: no q_norm -> "small_doge")
        older = ""
        if os.path.basename(os.path.dirname(os.path.dirname(params_dir))) == CHECKPOINTS:
            older = "; an older step of the run may be intact (--step, or convert RUN/checkpoints/STEP)"
        raise CheckpointError(f"{params_dir}: no parameters in its orbax metadata (an incomplete or damaged "
                              f"checkpoint){older}")
    return params_dir, cfg_path, out


def _nest(path: tuple[str, ...], leaf) -> dict:
    tree = leaf
    for k in reversed(path):
        tree = {k: tree}
    return tree


def read_param(params_dir: str, path: tuple[str, ...]):
    """One parameter array (numpy) of an orbax parameter tree, restoring only that leaf."""
    import numpy as np
    import orbax.checkpoint as ocp

    _quiet_failed_io_leftovers()
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
                item=_nest(path, 0), restore_args=_nest(path, ocp.RestoreArgs(restore_type=np.ndarray)),
                partial_restore=True))
    except Exception as e:
        raise CheckpointError(f"{params_dir}: cannot restore {'.'.join(path)} ({type(e).__name__}: {e})") from None
    for k in path:
        out = out[k]
    return out


@contextlib.contextmanager
def sigint_deferred():
    """A first Ctrl-C waits for the end of the block, then acts as it would have (KeyboardInterrupt, or the handler
    that was installed); a second one raises KeyboardInterrupt at once. orbax writes from background threads that
    an interrupt does not stop: interrupted, they went on writing into the temporary output directory after its
    removal (hundreds of MB left behind by `convert --to jax`). An ignored SIGINT stays ignored."""
    old = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or old in (signal.SIG_IGN, None):
        yield
        return
    got: list = []

    def second(signum, frame):
        raise KeyboardInterrupt  # at once, whatever the outer handler would do with a first one

    def first(signum, frame):
        got.append(frame)
        signal.signal(signal.SIGINT, second)
        print("interrupted: finishing the checkpoint write first (Ctrl-C again to stop at once)", file=sys.stderr)

    signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if got:
        if callable(old):
            old(signal.SIGINT, got[0])  # default_int_handler raises KeyboardInterrupt
        else:  # SIG_DFL: terminate as the signal would have
            os.kill(os.getpid(), signal.SIGINT)


def save_param_tree(params_dir: str, tree: dict, concurrent_gb: float = 0.25) -> None:
    """Write a parameter tree (nested dicts of numpy or JAX arrays) as the `params/` item of a model-only
    checkpoint; `params_dir` must not exist (callers wrap the whole checkpoint in hf_io.atomic_output_dir).

    Same layout as save_model (orbax PyTree, OCDBT; load_params reads both), but numpy leaves are written from
    the caller's arrays (orbax's default numpy handler deep-copies every array first) and uncompressed (zstd
    buffers of whole arrays cost ~1x more memory and save ~8% on float weights), so saving adds little to the
    tree's own memory (issue 4: Doge-320M HF -> jax peaks at ~1.2x the checkpoint).
    """
    import numpy as np
    import orbax.checkpoint as ocp

    th = ocp.type_handlers
    registry = th.create_type_handler_registry((np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
                                               (jax.Array, th.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=concurrent_gb, type_handler_registry=registry,
                                          use_compression=False)
    out_dir = os.path.dirname(os.path.abspath(params_dir))
    with sigint_deferred(), _orbax_write(out_dir), ocp.Checkpointer(handler) as ckptr:
        ckptr.save(os.path.abspath(params_dir), args=ocp.args.PyTreeSave(tree))


# ---- training checkpoints ---------------------------------------------------------------------------------------
ITEMS = ("params", "opt_state", "data", "meta")


def _short(error: BaseException) -> str:
    """An error's first line, without tensorstore's "See full TensorStore details: <bound method ...>" tail."""
    first = re.sub(r"[;.]?\s*See full TensorStore details.*$", "", (str(error).splitlines() or [""])[0])
    # (the cause ends the line, after TensorStore's paths: "...: File too large [os_error_code='27']")
    return first if len(first) <= 200 else f"{first[:110]} ... {first[-85:]}"


def _warn(msg: str) -> None:
    """A warning line on stderr (not warnings.warn: its report repeats a source line of the caller)."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


QUARANTINE = "corrupt_checkpoints"
DIVERGED = "diverged_checkpoints"  # steps whose weights gave a non-finite loss: moved aside, not resumed from


def _every_process(ok: bool) -> bool:
    """Whether `ok` holds on every process of the run (on a multi-host run: the hosts' vote, waited for)."""
    if jax.process_count() == 1:
        return ok
    from .sharding import any_process

    return not bool(jax.device_get(any_process(not ok)))


def _process0_list(steps: list[int]) -> list[int]:
    """Process 0's list of steps on every host (hosts may list a shared directory differently for a moment)."""
    if jax.process_count() == 1:
        return steps
    from jax.experimental import multihost_utils

    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
    mine = np.array((steps + [-1] * n)[:n], np.int32)  # any host's values of this shape; process 0's are kept
    return [int(x) for x in multihost_utils.broadcast_one_to_all(mine)] if n else []


def _quiet_failed_io_leftovers() -> None:
    """For failed orbax reads (and writes): their other array reads (writes) still finish in the background and
    report into an asyncio loop orbax has closed ("Event loop is closed" tracebacks from TensorStore's threads;
    "Exception ignored in <coroutine _read_array_index_and_device_put>" and asyncio's "Task exception was never
    retrieved" for it, each with the whole TensorStore spec): ~30 tracebacks, 1000+ lines, for one damaged checkpoint
    that the warnings already name. Those kinds (only) are dropped from here on, for the rest of the process (they
    can arrive at any later time); anything else is reported as before."""
    if getattr(sys.excepthook, "_doge_quiet", False):
        return
    old_except, old_unraisable = sys.excepthook, sys.unraisablehook

    def closed_loop(exc) -> bool:
        return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

    def excepthook(tp, value, tb):  # (TensorStore's threads report through it; the main thread's are real errors)
        if not (closed_loop(value) and threading.current_thread() is not threading.main_thread()):
            old_except(tp, value, tb)

    def unraisablehook(u):
        leftover = getattr(getattr(u.object, "cr_code", None), "co_name", "") == "_read_array_index_and_device_put"
        if not (leftover or (closed_loop(u.exc_value) and threading.current_thread() is not threading.main_thread())):
            old_unraisable(u)

    def orphan_task(record: logging.LogRecord) -> bool:  # asyncio's "Task/_GatheringFuture exception was never
        msg = record.getMessage()  # retrieved" for those reads
        return not ("_read_array_index_and_device_put" in msg or (
            "exception was never retrieved" in msg and "Encountered error while reading array index" in msg))

    excepthook._doge_quiet = True
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    logging.getLogger("asyncio").addFilter(orphan_task)
    warnings.filterwarnings("ignore", message="coroutine '_read_array_index_and_device_put' was never awaited",
                            category=RuntimeWarning)


def _out_of_memory(error: BaseException) -> bool:
    """Host or device memory ran out (XLA: "RESOURCE_EXHAUSTED: Out of memory while trying to allocate ...")."""
    return isinstance(error, MemoryError) or (
        "RESOURCE_EXHAUSTED" in str(error) and re.search(r"out of memory|allocat", str(error), re.I) is not None)


_ASYNC_WRITE_FAILED = ("_SignalingThread.run() raised an exception", "in background save thread",
                       "Save Finalize thread (save_finalize) failed")


def _no_async_write_tracebacks(record: logging.LogRecord) -> bool:
    """absl logging filter: orbax's reports of a failed background write (with tracebacks; the trainer says it
    in one line, CheckpointWriteError)."""
    msg = record.getMessage()
    if any(p in msg for p in _ASYNC_WRITE_FAILED):
        _quiet_unawaited_coroutines()
        return False
    return True


def _quiet_unawaited_coroutines() -> None:
    """After a failed checkpoint write: the aborted write's other coroutines, handed to an event loop that orbax has
    closed, are collected unrun, some only at exit, after the one-line error ("RuntimeWarning: coroutine '...' was
    never awaited" + a tracemalloc hint; seen in CI). Dropped for the rest of the process (this code runs no
    coroutines of its own; before any failed write the warning is shown as usual)."""
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)


class TrainCheckpointer:
    """Orbax CheckpointManager over RUN/checkpoints/<step>/{params,opt_state,data,meta}/.

    Saves are async (optional) and atomic: orbax writes a temporary directory and renames it when complete, and
    deletes old steps (keep N) only after a newer one is finished, so a failed or interrupted save never damages
    an earlier checkpoint. `params/` is what `load_params`/`from_pretrained` read."""

    def __init__(self, run_dir: str, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.run_dir = run_dir
        self.directory = os.path.abspath(os.path.join(run_dir, CHECKPOINTS))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self.async_save = async_save
        self.in_flight: int | None = None  # the step an async save is still writing
        # a failed async write is reported by the next save or wait, as one line (CheckpointWriteError); orbax
        # also logs it from its writer threads at once, with tracebacks (hundreds of lines): dropped, as are the
        # other writes' reports into orbax's closed event loop
        _quiet_failed_io_leftovers()
        if _no_async_write_tracebacks not in logging.getLogger("absl").filters:
            logging.getLogger("absl").addFilter(_no_async_write_tracebacks)
        # ... and asyncio's "Task/Future exception was never retrieved" for those writes, when collected later
        _quiet_asyncio_about(self.directory)

    def save(self, step: int, params, opt_state, data_state: dict, meta: dict) -> None:
        """Start writing checkpoint `step` (finished in the background when saves are async). A failed write,
        this one's or (async) the previous one's, raises CheckpointWriteError naming the step."""
        import orbax.checkpoint as ocp

        args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                                  data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta))
        self.wait()  # the previous async write's failure, named as its own
        with self._write_errors(step):
            self.mngr.save(step, args=args, force=True)
        self.in_flight = step if self.async_save else None

    @contextlib.contextmanager
    def _write_errors(self, step: int | None):
        """A failed write of checkpoint `step` (async: reported by orbax at the next save or wait) as
        CheckpointWriteError: one line, not orbax's traceback (a TypeError of a value that is not JSON stays what
        it is: a program error)."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - TensorStore's ValueError, XLA's RuntimeError, OSError, ...
            if isinstance(e, CheckpointError | CheckpointWriteError) or is_program_error(e):
                raise
            failed, self.in_flight = step, None
            _quiet_unawaited_coroutines()
            which = f"checkpoint step {failed}" if failed is not None else "a checkpoint"
            raise CheckpointWriteError.of(which, self.directory, _short(e)) from e

    def restore_latest(self, abstract_params, abstract_opt_state):
        """(step, params, opt_state, data_state, meta) of the newest checkpoint that restores, or None when the run
        has none.

        A step whose read fails is read again after READ_RETRY_DELAYS (a transient filesystem error); one that
        still fails is partial or corrupt: it is skipped with a warning, and once an older step restores, the
        skipped ones are moved to RUN/corrupt_checkpoints/ (so that the resumed run can save those steps again).
        When no step restores, nothing is moved and CheckpointError says so: a run is never silently started over
        (a lasting filesystem outage reads like damage). Out of memory passes through at once (a good checkpoint on
        a busier device). Multi-host: the hosts try process 0's steps in order, each reading its own shards with no
        cross-host barrier; a step counts only if every host read it."""
        self.mngr.wait_until_finished()  # a save still in flight is listed before it is on disk
        # before any read: a failed read's leftovers can report in the moment between its exception and a handler
        # (seen under load: a test's ~30 tracebacks were back)
        _quiet_failed_io_leftovers()
        skipped: list[tuple[int, str]] = []
        for step in _process0_list(sorted(self.mngr.all_steps(), reverse=True)):
            r, error = self._read_step_retrying(step, abstract_params, abstract_opt_state)
            oom = error is not None and _out_of_memory(error)
            if not _every_process(not oom):  # out of memory is not damage: every host stops, nothing is moved
                if oom:
                    raise error
                raise CheckpointError(f"another host ran out of memory reading checkpoint step {step} in "
                                      f"{self.directory}; nothing was moved")
            if _every_process(error is None):  # every host takes the same branch
                for bad, _ in skipped:
                    self._quarantine(bad)
                return (step, *r)
            why = f"{type(error).__name__}: {_short(error)}" if error else "another host could not read it"
            _warn(f"checkpoint step {step} in {self.directory} is partial or corrupt ({why}); skipping it")
            skipped.append((step, why))
        if skipped:
            listed = "; ".join(f"step {step}: {why}" for step, why in skipped)
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be read ({listed}). Nothing was moved or overwritten. If "
                f"they are damaged, move {self.directory} aside to start the run anew, or use another --out_dir")
        return None

    # seconds before each further read of a step that failed: a transient error (a network filesystem's hiccup)
    # must not send a good step to corrupt_checkpoints/ and the run back to an older one
    READ_RETRY_DELAYS = (1.0, 4.0)

    def _read_step_retrying(self, step: int, abstract_params, abstract_opt_state) -> tuple:
        """(the step's items, None), or (None, the last error) after every retry failed."""
        import time

        for delay in (*self.READ_RETRY_DELAYS, None):
            try:
                return self._read_step(step, abstract_params, abstract_opt_state), None
            except Exception as e:  # noqa: BLE001 - any failure but out of memory: retried, then the step is unusable
                if _out_of_memory(e):
                    return None, e  # (not retried; restore_latest has every host raise it)
                error = e
            if delay is not None:
                _warn(f"checkpoint step {step}: read failed ({type(error).__name__}: {_short(error)}); retrying in "
                      f"{delay:g}s")
                time.sleep(delay)
        return None, error

    def _read_step(self, step: int, abstract_params, abstract_opt_state) -> tuple:
        """(params, opt_state, data_state, meta) of one step, read by this host's item handlers. Not through the
        CheckpointManager: orbax's restore ends in a cross-host barrier that a host whose read raised never
        reaches, so one host's bad shard would pair that barrier with the other hosts' vote."""
        import orbax.checkpoint as ocp
        from etils import epath

        d = epath.Path(self.directory) / str(step)
        tree, js = ocp.StandardCheckpointHandler(), ocp.JsonCheckpointHandler()
        try:
            return (tree.restore(d / "params", args=ocp.args.StandardRestore(abstract_params)),
                    tree.restore(d / "opt_state", args=ocp.args.StandardRestore(abstract_opt_state)),
                    js.restore(d / "data", args=ocp.args.JsonRestore()),
                    js.restore(d / "meta", args=ocp.args.JsonRestore()))
        finally:
            tree.close()
            js.close()

    def set_aside_diverged(self, step: int) -> str:
        """Move step `step` (finished first) to RUN/diverged_checkpoints/: its weights gave a non-finite loss, so a
        re-run must not resume from it. Returns that folder."""
        self.wait()
        self._quarantine(step, DIVERGED)
        return os.path.join(self.run_dir, DIVERGED)

    def _quarantine(self, step: int, folder: str = QUARANTINE) -> None:
        import shutil
        import time

        error = None
        if jax.process_index() == 0:  # one host moves it; the others learn the outcome from the vote
            try:
                dest = os.path.join(self.run_dir, folder)
                os.makedirs(dest, exist_ok=True)
                shutil.move(os.path.join(self.directory, str(step)), os.path.join(dest, f"{step}-{int(time.time())}"))
            except OSError as e:
                error = e
        if not _every_process(error is None):
            raise CheckpointError(f"could not move checkpoint step {step} out of {self.directory} to {folder}/: "
                                  f"{error or 'it failed on process 0'}")
        self.mngr.reload()

    def wait(self) -> None:
        with self._write_errors(self.in_flight):
            self.mngr.wait_until_finished()
        self.in_flight = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.mngr.close()
