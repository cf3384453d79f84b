"""`python -m doge_jax.train`: pretrain (or continue) a Doge model (design.md §4, spec §6).

Wires the pieces: train_config (YAML + overrides), data (tokenizer, packing, grain), loss (chunked CE), optim
(WSD + clipped AdamW with the HF decay mask), checkpoint (orbax, exact resume) and metrics (jsonl, TensorBoard,
MFU, loss.png). `python -m doge_jax.train --help` lists every option.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import optax
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from . import corpora as C
from . import data as D
from . import init as I
from . import sharding as S
from .checkpoint import TrainCheckpointer, list_steps
from .closed_pipe import guarded_output, output_closed
from .config import RUNTIME_FIELDS, ConfigError, DogeConfig, as_model_option
from .hf_io import (
    SAFE_INDEX,
    SAFE_SINGLE,
    TORCH_BIN,
    TORCH_INDEX,
    atomic_file,
    run_lock,
    torch_run_hint,
    write_generation_config,
)
from .hf_names import CheckpointError, CheckpointWriteError
from .loss import IGNORE, DogeTrunk, causal_lm_loss_chunked, shift_targets
from .metrics import MetricsLogger, flops_per_token, peak_flops, plot_loss
from .model import causal_lm_loss
from .optim import decay_mask, make_optimizer, wsd_schedule
from .train_config import SIGTERM_REPEAT_S, TrainConfig, absolute_data, parse_argv, read_run_record


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf."""


@dataclasses.dataclass
class TrainResult:
    status: str  # finished | interrupted | stopped
    step: int
    run_dir: str
    val_loss: float | None = None
    signal: int | None = None  # the signal that interrupted this host (None: stopped by another host's)


def tag() -> str:
    """The prefix of every line the trainer prints: which program, and on a multi-host run which host."""
    n = jax.process_count()
    return f"[doge_jax.train host {jax.process_index()}/{n}]" if n > 1 else "[doge_jax.train]"


def log(msg: str) -> None:
    """A progress line on stderr; on a multi-host run every host logs, each line saying which host it is."""
    print(f"{tag()} {msg}", file=sys.stderr, flush=True)


# ---- setup ----------------------------------------------------------------------------------------------------------
def setup_compilation_cache(cache_dir: str) -> None:
    """XLA's persistent compilation cache under cache_dir/xla; not on a multi-device CPU (a simulated mesh): its
    executables read back from the cache deadlocked in their collectives (jax 0.10.2: "Expected 8 threads to join
    the rendezvous, but only 4 arrived", then abort) on the second run of the same program."""
    if jax.default_backend() == "cpu" and jax.device_count() > 1:
        return
    path = os.path.join(os.path.expanduser(cache_dir), "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def prepare_tokenizer(mcfg: DogeConfig, tcfg: TrainConfig, paths: list[str], run_dir: str):
    """(tokenizer, model config with bos/eos/pad filled in, D.tokenizer_extras of its source); nothing is written
    (D.save_tokenizer does, once the run has passed its checks). An existing run's tokenizer.json wins on resume; a
    different --train.tokenizer is refused."""
    saved = os.path.join(run_dir, "tokenizer.json")
    if os.path.isfile(saved) and os.path.isfile(os.path.join(run_dir, "config.json")):  # an established run
        tok, src = D.load_tokenizer(saved), run_dir
        if tcfg.tokenizer and D.load_tokenizer(tcfg.tokenizer).get_vocab() != tok.get_vocab():
            raise ConfigError(f"train.tokenizer={tcfg.tokenizer!r}: differs from the tokenizer of the run in "
                              f"{run_dir}; resume with the run's own (omit it) or use another --out_dir")
    elif tcfg.tokenizer:
        tok, src = D.load_tokenizer(tcfg.tokenizer), tcfg.tokenizer
    else:
        cache = os.path.join(os.path.expanduser(tcfg.cache_dir), "tokenizers")
        file = os.path.join(cache, D.corpus_fingerprint(paths, str(mcfg.vocab_size), tcfg.text_field) + ".json")
        if os.path.isfile(file):
            tok = D.load_tokenizer(file)
        else:
            if mcfg.vocab_size < D.MIN_BPE_VOCAB:
                raise ConfigError(f"model.vocab_size={mcfg.vocab_size}: too small for the byte-level BPE trained "
                                  f"without train.tokenizer (at least {D.MIN_BPE_VOCAB}: 256 bytes + "
                                  f"{len(D.SPECIAL_TOKENS)} special tokens)")
            log(f"training a byte-level BPE (vocab {mcfg.vocab_size}) on {len(paths)} files")
            tok = D.train_bpe(paths, mcfg.vocab_size, tcfg.text_field)
            os.makedirs(cache, exist_ok=True)
            with atomic_file(file) as tmp:
                tok.save(tmp)
        src = None
    mcfg, warnings = D.with_special_ids(mcfg, tok, src)
    for w in warnings:
        log(f"warning: {w}")
    if not mcfg.eos_token_ids:
        raise ConfigError("model.eos_token_id: the tokenizer has no known EOS token; set --model.eos_token_id")
    if tok.get_vocab_size() > mcfg.vocab_size:
        log(f"warning: tokenizer vocabulary {tok.get_vocab_size()} > model vocab_size {mcfg.vocab_size}")
    return tok, mcfg, D.tokenizer_extras(src)


def check_same_model(run_dir: str, mcfg: DogeConfig) -> None:
    """A resumed run must use the model config it was started with (runtime fields may change)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return
    old = DogeConfig.from_json_file(path)
    diff = [f.name for f in dataclasses.fields(DogeConfig) if f.name not in RUNTIME_FIELDS
            and getattr(old, f.name) != getattr(mcfg, f.name)]
    if diff:
        started = (read_run_record(run_dir) or {}).get("init_from")
        hint = (f"; the run started with --init-from {started}: its model is the run's config.json, so leave out "
                "the model fields (--model.*, a config file's model: section) that differ" if started else "")
        raise ConfigError(f"{run_dir} holds a run with a different model config (fields: {', '.join(diff)}); "
                          f"use another --name/--out_dir or the original config{hint}")


# ---- compiled steps -------------------------------------------------------------------------------------------------
def make_steps(graphdef, tx, mcfg: DogeConfig, tcfg: TrainConfig, mesh=None, param_sh=None, opt_sh=None):
    """(train_step, grads_fn, eval_step). train_step(params, opt_state, batch [GA, R, S], step) -> (params,
    opt_state, {loss, grad_norm}); the loss of each micro-batch is CE_sum / (valid targets of the whole step).

    With a mesh (and the parameter / optimizer-state shardings of doge_jax.sharding) the steps are jitted with
    those in/out shardings, batches split over every device along the rows axis; without, a plain jit."""
    cdtype = jnp.bfloat16 if tcfg.compute_dtype == "bfloat16" else jnp.float32
    pad = mcfg.pad_token_id
    dropout = mcfg.hidden_dropout > 0 or mcfg.attention_dropout > 0
    freeze = tcfg.moe_freeze_steps

    def labels_of(ids):
        return ids if pad is None else jnp.where(ids == pad, IGNORE, ids)  # spec §6.4: pad labels ignored

    def cast(params):  # compute_dtype copies of the float32 parameters (the update stays float32)
        return jax.tree.map(lambda x: x.astype(cdtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)

    def ce(params, ids, num_items, rng):
        model = nnx.merge(graphdef, cast(params))
        out = model(ids, dropout_rng=rng if dropout else None)
        labels = labels_of(ids)
        if tcfg.loss_chunk:
            w, vocab_major = model.head_weight()
            loss = causal_lm_loss_chunked(out.logits, w, labels, num_items, vocab_major, tcfg.loss_chunk)
        else:
            loss = causal_lm_loss(model.head_logits(out.logits), labels, num_items)
        if out.aux_loss is not None:
            loss = loss + mcfg.router_aux_loss_coef * out.aux_loss
        return loss

    def constrain(grads):
        return grads if param_sh is None else jax.lax.with_sharding_constraint(grads, param_sh)

    def grads_fn(params, batch, step):
        num_items = jnp.sum(shift_targets(labels_of(batch)) != IGNORE)
        rngs = jax.random.split(jax.random.fold_in(jax.random.key(tcfg.seed), step), batch.shape[0])

        def micro(carry, xs):
            ids, rng = xs
            loss, g = jax.value_and_grad(ce)(params, ids, num_items, rng)
            return jax.tree.map(jnp.add, carry, (loss, constrain(g))), None

        zero = (jnp.zeros((), jnp.float32), constrain(jax.tree.map(jnp.zeros_like, params)))
        (loss, grads), _ = jax.lax.scan(micro, zero, (batch, rngs))
        return loss, grads

    def train_step(params, opt_state, batch, step):
        loss, grads = grads_fn(params, batch, step)
        if freeze:  # MoE warm-up: frozen parameters have no gradient (nor a share of the clipping norm)
            grads = I.mask_frozen_grads(grads, step, freeze)
        updates, opt_state = tx.update(grads, opt_state, params)
        targets = jnp.sum(shift_targets(labels_of(batch)) != IGNORE)  # 0: a NaN loss with a plain cause
        return (optax.apply_updates(params, updates), opt_state,
                {"loss": loss, "grad_norm": optax.tree.norm(grads), "targets": targets})

    def eval_step(params, ids):  # in compute_dtype as the training loss (and doge_torch.train's autocast)
        model = nnx.merge(graphdef, cast(params))
        labels = labels_of(ids)
        w, vocab_major = model.head_weight()
        total = causal_lm_loss_chunked(model(ids).logits, w, labels, 1, vocab_major, tcfg.loss_chunk or 1024)
        return total, jnp.sum(shift_targets(labels) != IGNORE)

    if mesh is None:
        return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(grads_fn), jax.jit(eval_step)
    train_step, grads_fn, eval_step = (_with_activation_mesh(f, mesh) for f in (train_step, grads_fn, eval_step))
    rep = NamedSharding(mesh, PartitionSpec())
    b3, b2 = S.batch_sharding(mesh, 1, 3), S.batch_sharding(mesh, 0, 2)
    return (jax.jit(train_step, donate_argnums=(0, 1), in_shardings=(param_sh, opt_sh, b3, rep),
                    out_shardings=(param_sh, opt_sh, rep)),
            jax.jit(grads_fn, in_shardings=(param_sh, b3, rep), out_shardings=(rep, param_sh)),
            jax.jit(eval_step, in_shardings=(param_sh, b2), out_shardings=(rep, rep)))


def _corpus_change(record: dict, data) -> str | None:
    """The warning for a resumed run whose data files or token counts differ from its last start's (files added to
    a --data directory): its rows and their order change from here on. Every document keeps its side of the
    validation split (a hash of its text)."""
    was = [record.get(k) for k in ("data_files", "train_tokens", "val_tokens")]
    now = [data.files, data.train_tokens, data.val_tokens]
    if None in was or was == now:
        return None
    return (f"warning: the data differs from the run's last start: {now[0]} files, {now[1]:,} train / {now[2]:,} val "
            f"tokens (was {was[0]} files, {was[1]:,} / {was[2]:,}); the rest of the run reads the new rows, shuffled "
            "anew (every document keeps its side of the validation split)")


def _with_activation_mesh(f, mesh):
    """`f` traced under sharding.activation_mesh(mesh) (the model pins its activations' rows to the devices)."""
    @functools.wraps(f)
    def traced(*args):
        with S.activation_mesh(mesh):
            return f(*args)

    return traced


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every element of every array of `tree` is finite (one pass, on the device)."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def evaluate(eval_step, params, batches) -> tuple[float, float] | None:
    if not batches:
        return None
    total, count = 0.0, 0
    for b in batches:
        t, c = jax.device_get(eval_step(params, b))
        total, count = total + float(t), count + int(c)
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 80.0))


# ---- mesh and run checks --------------------------------------------------------------------------------------------
def make_mesh(tcfg: TrainConfig):
    """The device mesh of train.mesh; the global batch must split over its devices and the hosts."""
    try:
        mesh = S.make_mesh(tcfg.mesh)
    except ValueError as e:
        hint = ""
        if " available (" in str(e):  # e.g. a run recorded on 8 devices resumed on 1: say how on the command line
            hint = (f"; --train.mesh '{{data: -1}}' runs data parallel on every device ({jax.device_count()} here), "
                    "'{fsdp: -1}' shards the parameters over them")
        raise ConfigError(f"train.{e}{hint}") from None
    R = tcfg.rows_per_micro
    if R % mesh.size or R % jax.process_count():
        hosts = jax.process_count()
        raise ConfigError(f"train.global_batch_tokens={tcfg.global_batch_tokens}: {R} rows per micro-batch do not "
                          f"split over the {mesh.size} devices of mesh {S.describe(mesh)} and {hosts} host(s); use a "
                          f"multiple of {math.lcm(mesh.size, hosts)} rows")
    return mesh


# train fields whose change on resume is worth a warning (the schedule, the data and its order, the batch)
RESUME_NOTED = ("data", "seq_len", "global_batch_tokens", "grad_accum", "peak_lr", "num_training_steps",
                "num_warmup_steps", "num_decay_steps", "warmup_type", "decay_type", "min_lr_ratio", "weight_decay",
                "adam_b1", "adam_b2", "adam_eps", "max_grad_norm", "seed", "val_fraction", "text_field",
                "compute_dtype", "loss_chunk", "moe_freeze_steps")


def check_run_config(run_dir: str, tcfg: TrainConfig) -> str | None:
    """The run directory is not a saved model, and settings that decide what is resumed (the starting checkpoint,
    the optimizer-state layout) do not change on resume. Returns the warning about the settings a resume changes
    (said once the resume is known to go ahead), if any."""
    saved = [f for f in (SAFE_SINGLE, SAFE_INDEX, TORCH_BIN, TORCH_INDEX) if os.path.isfile(os.path.join(run_dir, f))]
    if saved:
        raise ConfigError(f"{run_dir} holds a saved model ({saved[0]}); a run there would shadow it (doge_jax loads "
                          "a run directory's checkpoints first): use another --out_dir, or --init-from it")
    old = read_run_record(run_dir)
    if old is None:
        return None
    before, now = old.get("init_from"), tcfg.init_from
    # without --init-from a re-run just resumes; a run records its start as an absolute path (older runs: as typed)
    same = now is None or before == now or (before and os.path.abspath(before) == os.path.abspath(now))
    resuming = bool(list_steps(run_dir))
    if not same and resuming:  # re-running resumes from the run's checkpoints, not from init_from
        raise ConfigError(f"train.init_from={now!r}: {run_dir} holds a run started "
                          f"{'from ' + repr(before) if before else 'from scratch'}, which this command would resume "
                          "(ignoring the new starting point); use --name or --out_dir for a new run")
    if bool(old.get("moe_freeze_steps", 0)) != bool(tcfg.moe_freeze_steps):
        raise ConfigError(f"train.moe_freeze_steps={tcfg.moe_freeze_steps}: {run_dir} was started with "
                          f"moe_freeze_steps={old.get('moe_freeze_steps', 0)} (the optimizer state differs); use the "
                          "original value or another --out_dir")
    if resuming:  # allowed (a longer schedule, more data), but said: the run's record is rewritten
        new = tcfg.to_dict()
        # data paths as the two commands meant them: each relative to the directory it was run from
        started_in = (read_run_record(run_dir, "run") or {}).get("cwd") or os.getcwd()
        same_data = absolute_data(old.get("data"), started_in) == absolute_data(new["data"], os.getcwd())
        changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in RESUME_NOTED if k in old and old[k] != new.get(k)
                   and not (k == "data" and same_data)]
        if changed:
            return f"warning: resuming {run_dir} with changed settings: {'; '.join(changed)}"
    return None


@contextlib.contextmanager
def _ctrl_c_waits():
    """While the stop's checkpoint is written: each Ctrl-C says that the write finishes first and is recorded (the
    yielded list). Raising would not stop orbax's background write, only leave it unreported (and a temporary
    directory behind); a second SIGTERM, or SIGKILL, still ends the process at once."""
    pressed: list[int] = []
    old = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or old in (signal.SIG_IGN, None):
        yield pressed
        return

    def on_int(signum, frame):
        pressed.append(signum)
        print("interrupted: finishing the checkpoint write first", file=sys.stderr)

    signal.signal(signal.SIGINT, on_int)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, old)


def check_run_dir(run_dir: str) -> None:
    """The run directory is not a file, not a doge_torch.train run (its files and ours would mix, and each trainer
    would resume the other's directory), and not inside another run's checkpoints/ (that run's checkpoint manager
    would take it for a damaged step)."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"run directory {run_dir}: is a file, not a directory (--out_dir / --name)")
    ours = any(os.path.exists(os.path.join(run_dir, f)) for f in ("train_config.yaml", "config.json", "checkpoints"))
    hint = "" if ours else torch_run_hint(run_dir)  # (a doge_jax run may hold a converted final/)
    if hint:
        raise ConfigError(f"run directory {run_dir}{hint}, to --init-from to start from its model; for a new run use "
                          "another --name/--out_dir")
    d = os.path.abspath(run_dir)
    while os.path.dirname(d) != d:  # the directory itself and its parents
        if os.path.basename(d) == "checkpoints" and os.path.isfile(os.path.join(os.path.dirname(d),
                                                                              "train_config.yaml")):
            raise ConfigError(f"run directory {run_dir}: inside the training run {os.path.dirname(d)}'s "
                              "checkpoints/; use a directory outside it")
        d = os.path.dirname(d)


# ---- the run --------------------------------------------------------------------------------------------------------
def train(mcfg: DogeConfig, tcfg: TrainConfig, config_path: str | None = None) -> TrainResult:
    """Train (or resume) the run `tcfg.run_dir` describes; see the module docstring."""
    with contextlib.ExitStack() as held:  # the run directory's lock, from when it exists to the end
        return _train(mcfg, tcfg, config_path, held)


def _train(mcfg: DogeConfig, tcfg: TrainConfig, config_path: str | None, held: contextlib.ExitStack) -> TrainResult:
    run_dir = tcfg.run_dir
    if tcfg.init_from:  # recorded absolute: a resume from another working directory compares equal
        tcfg = dataclasses.replace(tcfg, init_from=os.path.abspath(os.path.expanduser(tcfg.init_from)))
    # a data, tokenizer or write error can hit one host only: every host stops with it (not in a collective later)
    with S.all_or_none("setting up the run (config, tokenizer, data)"):
        check_run_dir(run_dir)
        locked = jax.process_index() == 0 and os.path.isdir(run_dir)
        if locked:  # one trainer per run (process 0 of a multi-host run holds it for all), before its files are read
            held.enter_context(run_lock(run_dir))
        # paths are checked here
        sources = (C.parse_sources(tcfg.data, exclude=[run_dir]) if tcfg.data
                   else [C.Source("stdlib", D.default_corpus())])
        paths = [p for s in sources for p in s.paths]
        if tcfg.seq_len > mcfg.max_position_embeddings:
            raise ConfigError(f"train.seq_len={tcfg.seq_len} > model.max_position_embeddings="
                              f"{mcfg.max_position_embeddings}")
        if tcfg.moe_freeze_steps and not mcfg.is_moe:
            raise ConfigError(f"train.moe_freeze_steps={tcfg.moe_freeze_steps}: needs a MoE model "
                              "(model.is_moe true)")
        mesh = make_mesh(tcfg)
        resuming = bool(list_steps(run_dir))  # (its weights come from its checkpoint: init_from is not read)
        if tcfg.moe_freeze_steps and not tcfg.init_from and not resuming:
            log(f"warning: train.moe_freeze_steps={tcfg.moe_freeze_steps} without --init-from: the first "
                f"{tcfg.moe_freeze_steps} steps train only the routers and experts of a randomly initialised model "
                "(the dense -> MoE recipe starts from a dense checkpoint: --init-from DIR)")
        if tcfg.init_from and not resuming:
            base = I.checkpoint_config(tcfg.init_from)
            changes = I.config_changes(base, mcfg)
            log(f"init from {tcfg.init_from}" + (f"; model config changes: {'; '.join(changes)}" if changes else ""))
            tok_dir = I.find_tokenizer(tcfg.init_from)
            if tcfg.tokenizer is None:  # the checkpoint's own tokenizer, never a freshly trained one
                if tok_dir is None:
                    raise ConfigError(f"train.init_from={tcfg.init_from!r}: no tokenizer.json there; "
                                      "set --train.tokenizer")
                tcfg = dataclasses.replace(tcfg, tokenizer=tok_dir)
            elif tok_dir is not None and (D.load_tokenizer(tcfg.tokenizer).get_vocab()
                                          != D.load_tokenizer(tok_dir).get_vocab()):
                log(f"warning: train.tokenizer={tcfg.tokenizer!r} is not the tokenizer of {tcfg.init_from} "
                    f"({tok_dir}/tokenizer.json): the checkpoint's embeddings belong to that one")
        pretok = [s.pretokenized for s in sources if s.pretokenized]
        shas = {p: C.read_manifest(p)["tokenizer_sha"] for p in pretok}
        other = next((p for p in pretok if shas[p] != shas[pretok[0]]), None)
        if other:  # no --train.tokenizer fixes a mixture of two vocabularies
            raise D.DataError(f"pre-tokenized {pretok[0]} and {other} were tokenized with different tokenizers; a run "
                              f"has one (re-tokenize one: python -m doge_jax.data --tokenizer {pretok[0]} ...)")
        if tcfg.tokenizer is None and pretok:  # pre-tokenized data carries its tokenizer
            tcfg = dataclasses.replace(tcfg, tokenizer=pretok[0])
        changed = check_run_config(run_dir, tcfg)
        setup_compilation_cache(tcfg.cache_dir)
        primary = jax.process_index() == 0  # the host that writes the run directory's files (orbax: every host)
        tok, mcfg, tok_extras = prepare_tokenizer(mcfg, tcfg, paths, run_dir)
        check_same_model(run_dir, mcfg)
        if changed:  # (after the model check: a refused resume does not first warn about its settings)
            log(changed)
        # a new run's starting weights, loaded before any file is written or data tokenized: a checkpoint that
        # does not fit the model config fails here and leaves nothing behind
        init = I.init_params(tcfg.init_from, mcfg, tcfg.seed) if tcfg.init_from and not resuming else None
        start_gen = None  # the start checkpoint's generate settings carry over to the run (convert, generate)
        if tcfg.init_from and not resuming:
            try:
                start_gen = I.start_generation_config(tcfg.init_from, mcfg)
            except ConfigError as e:
                log(f"warning: {e}; the run's generation_config.json is made from its token ids")
        data = C.training_data(sources, tok, mcfg.eos_token_ids[0], mcfg.vocab_size, tcfg.seq_len,
                               os.path.join(tcfg.cache_dir, "tokens"), tcfg.text_field, tcfg.val_fraction, tcfg.seed,
                               tcfg.progress)
        rows, val_rows = data.rows, data.val_rows
        R, GA, hosts = tcfg.rows_per_micro, tcfg.grad_accum, jax.process_count()
        # the same global batches on any number of hosts: host i reads and feeds its R / hosts rows of each
        # micro-batch
        dataset = D.train_dataset(rows, GA, R, tcfg.seed, jax.process_index(), hosts)
        val_batches = D.val_batches(val_rows, R, tcfg.eval_batches)
        if resuming:
            corpus_changed = _corpus_change(read_run_record(run_dir, "run") or {}, data)
            if corpus_changed:
                log(corpus_changed)
        os.makedirs(run_dir, exist_ok=True)  # only now: a run that fails its checks leaves nothing behind
        if primary and not locked:  # (a new run directory)
            held.enter_context(run_lock(run_dir))
        if primary:  # config.json last: it marks an established run (whose tokenizer then wins on resume)
            D.save_tokenizer(tok, mcfg, run_dir, tok_extras)
            if start_gen is not None:
                write_generation_config(run_dir, start_gen)
            with atomic_file(os.path.join(run_dir, "train_config.yaml")) as tmp, open(tmp, "w") as f:
                # run: is a record (ignored when the file is read back as --config, to repeat the run)
                yaml.safe_dump({"model": mcfg.to_dict(), "train": tcfg.to_dict(),
                                "run": {"config_file": config_path, "cwd": os.getcwd(), "data_files": data.files,
                                        "train_tokens": data.train_tokens, "val_tokens": data.val_tokens}},
                               f, sort_keys=False)
            mcfg.save_json(os.path.join(run_dir, "config.json"))
    log(f"run {run_dir}: {data.files} files in {len(sources)} source(s), {data.train_tokens:,} train / "
        f"{data.val_tokens:,} val tokens, "
        f"{len(rows):,} rows of {tcfg.seq_len}; {len(val_batches)} val batches; mesh {S.describe(mesh)}")
    if not val_batches and tcfg.val_fraction > 0:
        log(f"warning: no validation: the held-out documents fill {len(val_rows)} row(s) of {tcfg.seq_len} tokens, "
            f"fewer than one micro-batch of {R} rows (raise train.val_fraction or add documents)")

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DogeTrunk(mcfg, rngs=nnx.Rngs(tcfg.seed))), nnx.Param)
    abstract = nnx.to_pure_dict(abstract)
    schedule = wsd_schedule(tcfg.peak_lr, tcfg.num_warmup_steps, tcfg.num_decay_steps, tcfg.num_training_steps,
                            warmup_type=tcfg.warmup_type, decay_type=tcfg.decay_type, min_lr_ratio=tcfg.min_lr_ratio)
    opt_args = (tcfg.weight_decay, tcfg.adam_b1, tcfg.adam_b2, tcfg.adam_eps, tcfg.max_grad_norm)
    if tcfg.moe_freeze_steps:
        tx = I.freeze_optimizer(schedule, tcfg.moe_freeze_steps, *opt_args, decay_mask=decay_mask)
    else:
        tx = make_optimizer(schedule, *opt_args, mask=decay_mask)
    psh = S.param_shardings(abstract, mesh)
    osh = S.opt_state_shardings(jax.eval_shape(tx.init, abstract), psh, mesh)
    ckpt = TrainCheckpointer(run_dir, tcfg.keep_checkpoints, tcfg.async_checkpoint)
    it = iter(dataset)
    step = 0
    restored = ckpt.restore_latest(S.abstract_sharded(abstract, psh),
                                   S.abstract_sharded(jax.eval_shape(tx.init, abstract), osh))
    elapsed0 = 0.0  # training time of the run before this process (metrics' elapsed_s continues across resumes)
    if restored is not None:
        step, params, opt_state, data_state, old_meta = restored
        elapsed0 = float((old_meta or {}).get("elapsed_s", 0.0))
        it.set_state(data_state)
        log(f"resumed from checkpoint step {step}")
    else:
        earlier = os.path.join(run_dir, "metrics.jsonl")
        if primary and os.path.isfile(earlier) and os.path.getsize(earlier):  # (a start that saved no checkpoint)
            aside = " (its diverged checkpoints are in diverged_checkpoints/)" if os.path.isdir(
                os.path.join(run_dir, "diverged_checkpoints")) else ""
            log(f"note: {run_dir} holds no checkpoint to resume from: an earlier start saved none{aside}; starting "
                "over from step 0 (its metrics.jsonl records are replaced)")
        if tcfg.init_from:
            params, init = (init if init is not None else I.init_params(tcfg.init_from, mcfg, tcfg.seed)), None
            log(f"initialised from {tcfg.init_from} (fresh optimizer state)")
        else:
            params = nnx.to_pure_dict(nnx.split(DogeTrunk(mcfg, rngs=nnx.Rngs(tcfg.seed)), nnx.Param)[1])
        params, _ = S.shard_params(params, mesh)
        opt_state, _ = S.init_opt_state(tx, params, psh, mesh)
    train_step, _, eval_step = make_steps(graphdef, tx, mcfg, tcfg, mesh, psh, osh)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    log(f"model: {n_params / 1e6:.2f}M parameters ({mcfg.num_hidden_layers} layers, hidden {mcfg.hidden_size}, "
        f"vocab {mcfg.vocab_size}{', MoE' if mcfg.is_moe else ''})")
    metrics = MetricsLogger(run_dir, step, enabled=primary, warn=lambda msg: log(f"warning: {msg}"))
    tokens_per_step = GA * R * tcfg.seq_len
    flops = flops_per_token(mcfg, tcfg.seq_len) * tokens_per_step
    peak = peak_flops(jax.devices()[0], tcfg.compute_dtype, tcfg.peak_flops) * jax.device_count()
    meta = {"model_config": mcfg.to_hf_dict(), "train_config": tcfg.to_dict(), "mesh": dict(mesh.shape)}

    def save(s: int, data_state=None) -> None:
        # jax arrays as they are (sharded): orbax copies them to host before save() returns, so the next step may
        # donate the buffers; every host writes its own shards
        data_state = it.get_state() if data_state is None else data_state
        ckpt.save(s, params, opt_state, data_state,
                  {"step": s, **meta, "elapsed_s": elapsed0 + time.perf_counter() - t_start})

    def to_device(batch, axis):  # this host's rows -> the global batch array on the mesh
        return S.shard_batch(batch, mesh, batch_axis=axis)

    n, i = jax.process_count(), jax.process_index()  # every host holds all val rows; each feeds its slice
    val_batches = [to_device(b[i * (R // n):(i + 1) * (R // n)], 0) for b in val_batches]

    stop_signal: list[int] = []
    handlers = {}

    first_at: list[float] = []

    def on_signal(signum, frame):
        if stop_signal and signum == signal.SIGINT:  # a second Ctrl-C: at once (main says so in one line)
            raise KeyboardInterrupt
        if stop_signal and time.monotonic() - first_at[0] < SIGTERM_REPEAT_S:  # a scheduler's repeat: the same stop
            return
        if stop_signal:  # a second SIGTERM: the previous handler's behaviour, now (the default ends the process)
            signal.signal(signum, handlers.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        stop_signal.append(signum)
        first_at.append(time.monotonic())

    if sys.modules["threading"].current_thread() is sys.modules["threading"].main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            handlers[s] = signal.signal(s, on_signal)
    from tqdm.auto import tqdm

    bar = tqdm(total=tcfg.num_training_steps, initial=step, desc="train", unit="step",
               disable=not (tcfg.progress and primary),
               dynamic_ncols=True)
    status, val, failing = "finished", None, False
    t_start = time.perf_counter()
    # a resumed run already at train.stop_after stops again without training (a re-run must not creep past it)
    stopped_already = tcfg.stop_after is not None and tcfg.stop_after <= step < tcfg.num_training_steps
    if stopped_already:
        status = "stopped"
        log(f"stopped at step {step}: train.stop_after={tcfg.stop_after} is reached already; raise or drop it to "
            "go on")
    try:
        if step < tcfg.num_training_steps and not stopped_already:
            t0 = time.perf_counter()
            batch = to_device(next(it), 1)
            train_step = train_step.lower(params, opt_state, batch, step).compile()
            log(f"compiled the train step in {time.perf_counter() - t0:.1f} s")
        else:
            batch = None
        last_good = step if restored is not None else None
        t_last = time.perf_counter()
        multi_host = jax.process_count() > 1
        stop_votes: list[int] = []  # multi-host: steps at which some host had been asked to stop

        def last_good_where() -> str:
            return (f"step {last_good}" if last_good is not None else "none") + f" in {run_dir}"

        def read_back(s: int, out, vote=None) -> None:
            """Wait for step s's metrics (and its stop vote), stop on NaN/inf, log. Steady state: s is the step before
            the one the device is running, so the wait costs nothing and the device never idles on the host."""
            nonlocal t_last
            out, vote = jax.device_get((out, vote))
            if vote:
                stop_votes.append(s)
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            loss, gnorm, lr = float(out["loss"]), float(out["grad_norm"]), float(schedule(s - 1))
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                nonlocal last_good
                if "targets" in out and int(out["targets"]) == 0:
                    raise TrainingDiverged(f"step {s} has no target token: every label is padding (pad_token_id "
                                           f"{mcfg.pad_token_id}); check the data and the pad id (last good "
                                           f"checkpoint: {last_good_where()})")
                moved = ""
                if last_good is not None and last_good == s - 1:  # step s ran on that checkpoint's weights
                    try:
                        folder = ckpt.set_aside_diverged(last_good)
                    except CheckpointError as e:  # (the divergence is still what is reported)
                        raise TrainingDiverged(f"non-finite loss/grad norm at step {s}; checkpoint step {last_good} "
                                               f"holds the weights that gave it, but {e}: move it out before "
                                               "resuming") from None
                    moved = f"; checkpoint step {last_good} holds the weights that gave it: moved to {folder}"
                    last_good = max(list_steps(run_dir), default=None)
                raise TrainingDiverged(f"non-finite loss/grad norm at step {s} (loss={loss}, grad_norm={gnorm})"
                                       f"{moved}; stopped without saving; last good checkpoint: {last_good_where()}")
            tps = tokens_per_step / dt
            rec = {"step": s, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens_per_sec": tps,
                   "mfu": flops / dt / peak, "tokens": s * tokens_per_step, "elapsed_s": elapsed0 + now - t_start}
            if s % tcfg.log_every == 0 or s == tcfg.num_training_steps:
                metrics.log(rec)
                if not tcfg.progress and primary:  # no bar (logs, batch jobs): one line per logged step instead
                    log(f"step {s}: loss {loss:.4f}  lr {lr:.3e}  grad_norm {gnorm:.3f}  {tps:,.0f} tok/s  "
                        f"mfu {rec['mfu']:.1%}")
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", mfu=f"{rec['mfu']:.1%}",
                            refresh=False)
            bar.update(1)

        pending = None  # (step, metrics on the device, stop vote) of the last dispatched step, not read yet
        while step < tcfg.num_training_steps and not stopped_already:
            params, opt_state, out = train_step(params, opt_state, batch, step)
            step += 1
            # while the device runs this step: read and send the next batch (a checkpoint of this step records the
            # data position before that read), then read the previous step's metrics (one step behind)
            data_state = it.get_state()
            nxt = to_device(next(it), 1) if step < tcfg.num_training_steps else None
            if pending is not None:
                read_back(*pending)
            # (after the wait above, so a signal that arrived during it is in this vote)
            if output_closed() and not stop_signal:  # the log's reader is gone (closed_pipe): a stop as SIGTERM's
                stop_signal.append(signal.SIGPIPE)
                first_at.append(time.monotonic())
            vote = S.any_process(bool(stop_signal)) if multi_host else None
            pending = (step, out, vote)
            done = step == tcfg.num_training_steps
            # every host must stop after the same step (the checkpoint and the exit are collective): one host's
            # signal reaches the others through the vote of a step already read, i.e. one step later
            interrupted = any(s < step for s in stop_votes) if multi_host else bool(stop_signal)
            stopping = interrupted or (tcfg.stop_after is not None and step >= tcfg.stop_after)
            evaluating = (tcfg.eval_every and step % tcfg.eval_every == 0) or done
            saving = step % tcfg.checkpoint_every == 0 or done or stopping
            if evaluating or saving:  # both need this step's result, checked for NaN first
                read_back(*pending)
                pending = None
                if evaluating:
                    val = evaluate(eval_step, params, val_batches)
                    if val is not None and not math.isfinite(val[0]):
                        raise TrainingDiverged(f"non-finite val_loss at step {step} ({val[0]}): the weights after "
                                               f"its update diverged; stopped without saving; last good checkpoint: "
                                               f"{last_good_where()}")
                    if val is not None:
                        metrics.log({"step": step, "val_loss": val[0], "val_ppl": val[1]})
                        if primary:  # (the same value on every host)
                            bar.write(f"{tag()} step {step}: val_loss {val[0]:.4f}  val_ppl {val[1]:.2f}",
                                      file=sys.stderr)
                if saving:
                    # the step's loss was finite, but its update may not be (a huge learning rate): a checkpoint
                    # never holds non-finite weights
                    if not bool(jax.device_get(all_finite(params))):
                        raise TrainingDiverged(f"non-finite weights after step {step} (its loss and grad norm were "
                                               f"finite; the update overflowed); stopped without saving; last good "
                                               f"checkpoint: {last_good_where()}")
                    if stopping and not done:
                        # the stop's checkpoint, on disk before "checkpoint saved" is said
                        with _ctrl_c_waits() as pressed:
                            save(step, data_state)
                            ckpt.wait()
                        if pressed and not interrupted:  # a stop_after stop that was also interrupted
                            stop_signal.append(signal.SIGINT)
                            interrupted = True
                    else:
                        save(step, data_state)
                    last_good = step
                # the next step's time excludes eval and save (it does include one more batch read than usual)
                t_last = time.perf_counter()
            if stopping and not done:
                status = "interrupted" if interrupted else "stopped"
                how = "the same command" if interrupted else "without train.stop_after (or with a larger one)"
                log(f"{status} at step {step}; checkpoint saved. Re-run {how} to resume.")
                break
            batch = nxt
    except BaseException:
        failing = True
        raise
    finally:
        bar.close()
        try:
            ckpt.close()
        except CheckpointWriteError as e:
            if not failing:
                raise
            log(f"warning: {e}")  # (the error already on its way, e.g. a divergence, is the one to report)
        finally:
            metrics.close()
            for s, h in handlers.items():
                signal.signal(s, h)
    if primary:
        try:
            plot_loss(run_dir)
        except OSError as e:  # (the run itself is done: its checkpoints are on disk)
            log(f"warning: writing {os.path.join(run_dir, 'loss.png')} failed ({e})")
        except KeyboardInterrupt:  # a (second) Ctrl-C while plotting: the run's outcome stands, only the plot is lost
            log(f"warning: {os.path.join(run_dir, 'loss.png')} not written (interrupted); the run is as said above")
    if status == "finished":
        log(f"finished {step} steps; run directory {run_dir}")
    return TrainResult(status, step, run_dir, None if val is None else val[0], stop_signal[0] if stop_signal else None)


def main(argv: list[str] | None = None) -> int:
    with guarded_output():  # a closed log pipe stops the run with a checkpoint (exit 141)
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        S.init_distributed()  # multi-host (JAX_COORDINATOR_ADDRESS / SLURM) before anything touches a device
        with S.all_or_none("reading the configuration"):  # host-local files: --config, --init-from's config
            mcfg, tcfg, path = parse_argv(argv)
        result = train(mcfg, tcfg, path)
    except CheckpointWriteError as e:  # a failed write, not bad input (exit 1, as convert's)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, D.DataError, CheckpointError, S.OtherHostFailed, OSError) as e:
        print(f"error: {as_model_option(e)}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # before the run's signal handler is in place (start-up), or a second Ctrl-C
        print("\ninterrupted: stopped at once, without a new checkpoint (a re-run resumes from the newest, if any)",
              file=sys.stderr)
        return 130
    if result.status != "interrupted":
        return 0
    # as the shell reports the signal: 130 Ctrl-C, 143 SIGTERM, 141 a closed output pipe (SIGPIPE)
    return 128 + (result.signal or signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
