"""`python -m doge_jax.train`: pretrain (or continue) a Doge model (design.md §4, spec §6).

Wires the pieces: train_config (YAML + overrides), data (tokenizer, packing, grain), loss (chunked CE), optim
(WSD + clipped AdamW with the HF decay mask), checkpoint (orbax, exact resume) and metrics (jsonl, TensorBoard,
MFU, loss.png). `python -m doge_jax.train --help` lists every option.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

from . import data as D
from .checkpoint import TrainCheckpointer
from .config import ConfigError, DogeConfig
from .hf_names import CheckpointError
from .loss import IGNORE, DogeTrunk, causal_lm_loss_chunked, shift_targets
from .metrics import MetricsLogger, flops_per_token, peak_flops, plot_loss
from .model import causal_lm_loss
from .optim import decay_mask, make_optimizer, wsd_schedule
from .train_config import TrainConfig, parse_argv

RUNTIME_FIELDS = ("attention_impl", "remat")


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf."""


@dataclasses.dataclass
class TrainResult:
    status: str  # finished | interrupted | stopped
    step: int
    run_dir: str
    val_loss: float | None = None


def log(msg: str) -> None:
    print(f"[doge_jax.train] {msg}", file=sys.stderr, flush=True)


# ---- setup ----------------------------------------------------------------------------------------------------------
def setup_compilation_cache(cache_dir: str) -> None:
    path = os.path.join(os.path.expanduser(cache_dir), "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def prepare_tokenizer(mcfg: DogeConfig, tcfg: TrainConfig, paths: list[str], run_dir: str):
    """(tokenizer, model config with bos/eos/pad filled in). The run's tokenizer.json wins on resume."""
    saved = os.path.join(run_dir, "tokenizer.json")
    if os.path.isfile(saved):
        tok, src = D.load_tokenizer(saved), run_dir
    elif tcfg.tokenizer:
        tok, src = D.load_tokenizer(tcfg.tokenizer), tcfg.tokenizer
    else:
        cache = os.path.join(os.path.expanduser(tcfg.cache_dir), "tokenizers")
        file = os.path.join(cache, D.corpus_fingerprint(paths, str(mcfg.vocab_size), tcfg.text_field) + ".json")
        if os.path.isfile(file):
            tok = D.load_tokenizer(file)
        else:
            log(f"training a byte-level BPE (vocab {mcfg.vocab_size}) on {len(paths)} files")
            tok = D.train_bpe(paths, mcfg.vocab_size, tcfg.text_field)
            os.makedirs(cache, exist_ok=True)
            tok.save(file + ".tmp")
            os.replace(file + ".tmp", file)
        src = None
    ids = D.special_ids(tok, src)
    changes = {f"{k}_token_id": ids[k] for k in ("bos", "eos", "pad")
               if getattr(mcfg, f"{k}_token_id") is None and ids[k] is not None}
    mcfg = mcfg.replace(**changes)
    if not mcfg.eos_token_ids:
        raise ConfigError("model.eos_token_id: the tokenizer has no known EOS token; set --model.eos_token_id")
    if tok.get_vocab_size() > mcfg.vocab_size:
        log(f"warning: tokenizer vocabulary {tok.get_vocab_size()} > model vocab_size {mcfg.vocab_size}")
    tok.save(saved)
    names = {k: tok.id_to_token(getattr(mcfg, f"{k}_token_id")) for k in ("bos", "pad")
             if getattr(mcfg, f"{k}_token_id") is not None}
    with open(os.path.join(run_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": mcfg.max_position_embeddings,
                   "eos_token": tok.id_to_token(mcfg.eos_token_ids[0]), **{f"{k}_token": v for k, v in names.items()}},
                  f, indent=2)
    return tok, mcfg


def check_same_model(run_dir: str, mcfg: DogeConfig) -> None:
    """A resumed run must use the model config it was started with (runtime fields may change)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return
    old = DogeConfig.from_json_file(path)
    diff = [f.name for f in dataclasses.fields(DogeConfig) if f.name not in RUNTIME_FIELDS
            and getattr(old, f.name) != getattr(mcfg, f.name)]
    if diff:
        raise ConfigError(f"{run_dir} holds a run with a different model config (fields: {', '.join(diff)}); "
                          "use another --name/--out_dir or the original config")


# ---- compiled steps -------------------------------------------------------------------------------------------------
def make_steps(graphdef, tx, mcfg: DogeConfig, tcfg: TrainConfig):
    """(train_step, grads_fn, eval_step). train_step(params, opt_state, batch [GA, R, S], step) -> (params,
    opt_state, {loss, grad_norm}); the loss of each micro-batch is CE_sum / (valid targets of the whole step)."""
    cdtype = jnp.bfloat16 if tcfg.compute_dtype == "bfloat16" else jnp.float32
    pad = mcfg.pad_token_id
    dropout = mcfg.hidden_dropout > 0 or mcfg.attention_dropout > 0

    def labels_of(ids):
        return ids if pad is None else jnp.where(ids == pad, IGNORE, ids)  # spec §6.4: pad labels ignored

    def ce(params, ids, num_items, rng):
        p = jax.tree.map(lambda x: x.astype(cdtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
        model = nnx.merge(graphdef, p)
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

    def grads_fn(params, batch, step):
        num_items = jnp.sum(shift_targets(labels_of(batch)) != IGNORE)
        rngs = jax.random.split(jax.random.fold_in(jax.random.key(tcfg.seed), step), batch.shape[0])

        def micro(carry, xs):
            ids, rng = xs
            loss, g = jax.value_and_grad(ce)(params, ids, num_items, rng)
            return jax.tree.map(jnp.add, carry, (loss, g)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(micro, zero, (batch, rngs))
        return loss, grads

    def train_step(params, opt_state, batch, step):
        loss, grads = grads_fn(params, batch, step)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def eval_step(params, ids):
        model = nnx.merge(graphdef, params)
        labels = labels_of(ids)
        w, vocab_major = model.head_weight()
        total = causal_lm_loss_chunked(model(ids).logits, w, labels, 1, vocab_major, tcfg.loss_chunk or 1024)
        return total, jnp.sum(shift_targets(labels) != IGNORE)

    return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(grads_fn), jax.jit(eval_step)


def evaluate(eval_step, params, batches) -> tuple[float, float] | None:
    if not batches:
        return None
    total, count = 0.0, 0
    for b in batches:
        t, c = jax.device_get(eval_step(params, b))
        total, count = total + float(t), count + int(c)
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 80.0))


# ---- the run --------------------------------------------------------------------------------------------------------
def train(mcfg: DogeConfig, tcfg: TrainConfig, config_path: str | None = None) -> TrainResult:
    run_dir = os.path.abspath(tcfg.out_dir or os.path.join(tcfg.runs_dir, tcfg.name or "run"))
    paths = D.resolve_paths(tcfg.data) if tcfg.data else D.default_corpus()  # missing paths fail here
    if tcfg.seq_len > mcfg.max_position_embeddings:
        raise ConfigError(f"train.seq_len={tcfg.seq_len} > model.max_position_embeddings="
                          f"{mcfg.max_position_embeddings}")
    os.makedirs(run_dir, exist_ok=True)
    setup_compilation_cache(tcfg.cache_dir)
    tok, mcfg = prepare_tokenizer(mcfg, tcfg, paths, run_dir)
    check_same_model(run_dir, mcfg)
    train_tok, val_tok = D.tokenize_corpus(paths, tok, mcfg.eos_token_ids[0], os.path.join(tcfg.cache_dir, "tokens"),
                                           tcfg.text_field, tcfg.val_fraction, tcfg.seed, tcfg.progress)
    D.check_vocab(train_tok, mcfg.vocab_size, "training data")
    D.check_vocab(val_tok, mcfg.vocab_size, "validation data")
    rows, val_rows = D.pack(train_tok, tcfg.seq_len), D.pack(val_tok, tcfg.seq_len)
    R, GA = tcfg.rows_per_micro, tcfg.grad_accum
    dataset = D.train_dataset(rows, GA, R, tcfg.seed, jax.process_index(), jax.process_count())
    val_batches = D.val_batches(val_rows, R, tcfg.eval_batches)
    mcfg.save_json(os.path.join(run_dir, "config.json"))
    with open(os.path.join(run_dir, "train_config.yaml"), "w") as f:
        yaml.safe_dump({"config_file": config_path, "model": mcfg.to_dict(), "train": tcfg.to_dict(),
                        "data_files": len(paths), "train_tokens": int(len(train_tok)),
                        "val_tokens": int(len(val_tok))}, f, sort_keys=False)
    log(f"run {run_dir}: {len(paths)} files, {len(train_tok):,} train / {len(val_tok):,} val tokens, "
        f"{len(rows):,} rows of {tcfg.seq_len}; {len(val_batches)} val batches")

    model = DogeTrunk(mcfg, rngs=nnx.Rngs(tcfg.seed))
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    del model, state
    schedule = wsd_schedule(tcfg.peak_lr, tcfg.num_warmup_steps, tcfg.num_decay_steps, tcfg.num_training_steps,
                            warmup_type=tcfg.warmup_type, decay_type=tcfg.decay_type, min_lr_ratio=tcfg.min_lr_ratio)
    tx = make_optimizer(schedule, tcfg.weight_decay, tcfg.adam_b1, tcfg.adam_b2, tcfg.adam_eps, tcfg.max_grad_norm,
                        mask=decay_mask)
    opt_state = tx.init(params)
    ckpt = TrainCheckpointer(run_dir, tcfg.keep_checkpoints, tcfg.async_checkpoint)
    it = iter(dataset)
    step = 0
    restored = ckpt.restore_latest(jax.eval_shape(lambda: params), jax.eval_shape(lambda: opt_state))
    if restored is not None:
        step, params, opt_state, data_state, _ = restored
        it.set_state(data_state)
        log(f"resumed from checkpoint step {step}")
    train_step, _, eval_step = make_steps(graphdef, tx, mcfg, tcfg)
    metrics = MetricsLogger(run_dir, step)
    tokens_per_step = GA * R * tcfg.seq_len
    flops = flops_per_token(mcfg, tcfg.seq_len) * tokens_per_step
    peak = peak_flops(jax.devices()[0], tcfg.compute_dtype, tcfg.peak_flops) * jax.device_count()
    meta = {"model_config": mcfg.to_hf_dict(), "train_config": tcfg.to_dict()}

    def save(s: int) -> None:
        host = jax.tree.map(np.array, (params, opt_state))  # copies: the next step donates the device buffers
        ckpt.save(s, host[0], host[1], it.get_state(), {"step": s, **meta})

    stop_signal: list[int] = []
    handlers = {}

    def on_signal(signum, frame):
        if stop_signal:  # second signal: default behaviour
            signal.signal(signum, handlers.get(signum, signal.SIG_DFL))
        stop_signal.append(signum)

    if sys.modules["threading"].current_thread() is sys.modules["threading"].main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            handlers[s] = signal.signal(s, on_signal)
    from tqdm.auto import tqdm

    bar = tqdm(total=tcfg.num_training_steps, initial=step, desc="train", unit="step", disable=not tcfg.progress,
               dynamic_ncols=True)
    status, val = "finished", None
    t_start = time.perf_counter()
    try:
        if step < tcfg.num_training_steps:
            t0 = time.perf_counter()
            batch = next(it)
            train_step = train_step.lower(params, opt_state, batch, step).compile()
            log(f"compiled the train step in {time.perf_counter() - t0:.1f} s")
        else:
            batch = None
        last_good = step if restored is not None else None
        while step < tcfg.num_training_steps:
            t0 = time.perf_counter()
            params, opt_state, out = train_step(params, opt_state, batch, step)
            out = jax.device_get(out)
            dt = time.perf_counter() - t0
            loss, gnorm, lr = float(out["loss"]), float(out["grad_norm"]), float(schedule(step))
            step += 1
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                where = f"step {last_good}" if last_good is not None else "none saved yet"
                raise TrainingDiverged(f"non-finite loss/grad norm at step {step} (loss={loss}, grad_norm={gnorm}); "
                                       f"stopped without saving; last good checkpoint: {where} in {run_dir}")
            tps = tokens_per_step / dt
            rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens_per_sec": tps,
                   "mfu": flops / dt / peak, "tokens": step * tokens_per_step,
                   "elapsed_s": time.perf_counter() - t_start}
            if step % tcfg.log_every == 0 or step == tcfg.num_training_steps:
                metrics.log(rec)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", mfu=f"{rec['mfu']:.1%}",
                            refresh=False)
            bar.update(1)
            done = step == tcfg.num_training_steps
            if (tcfg.eval_every and step % tcfg.eval_every == 0) or done:
                val = evaluate(eval_step, params, val_batches)
                if val is not None:
                    metrics.log({"step": step, "val_loss": val[0], "val_ppl": val[1]})
                    bar.write(f"step {step}: val_loss {val[0]:.4f}  val_ppl {val[1]:.2f}")
            stopping = bool(stop_signal) or (tcfg.stop_after is not None and step >= tcfg.stop_after)
            if step % tcfg.checkpoint_every == 0 or done or stopping:
                save(step)
                last_good = step
            if stopping and not done:
                status = "interrupted" if stop_signal else "stopped"
                log(f"{status} at step {step}; checkpoint saved. Re-run the same command to resume.")
                break
            if not done:
                batch = next(it)
    finally:
        bar.close()
        ckpt.close()
        metrics.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    plot_loss(run_dir)
    if status == "finished":
        log(f"finished {step} steps; run directory {run_dir}")
    return TrainResult(status, step, run_dir, None if val is None else val[0])


def main(argv: list[str] | None = None) -> int:
    try:
        mcfg, tcfg, path = parse_argv(argv)
        result = train(mcfg, tcfg, path)
    except (ConfigError, D.DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0 if result.status != "interrupted" else 130


if __name__ == "__main__":
    sys.exit(main())
