"""Training doge_torch with the Hugging Face recipe (spec §6): the step, and a minimal command-line loop.

`train_step` is one optimizer step with gradient accumulation as the transformers 5.23 Trainer does it: every
micro-batch loss is CE_sum / num_items_in_batch, where num_items_in_batch counts the non-ignored shifted labels
of *all* micro-batches of the step, so the step gradient is that of the token mean over the whole step; then
torch's global-norm clipping, AdamW and the LR scheduler.

    python -m doge_torch.train --config configs/tiny.yaml --data tokens.npy [--bf16] [--compile] [--out DIR]
        [--train.FIELD VALUE ...] [--model.FIELD VALUE ...]

reads the same YAML as doge_jax (`model:` -> DogeConfig, `train:` -> optimizer and WSD schedule). Data: 1-D
pre-tokenized `.npy` files or `python -m doge_jax.data` directories, or text data as doge_jax.train reads it (text,
`.jsonl`, `.parquet`; directories, globs) with `--tokenizer tokenizer.json`; all tokens are concatenated and cut
into rows of `seq_len` (packing without document masking, spec §6.4), shuffled with the train seed. With `--out`,
OUT is a run directory: metrics go to OUT/metrics.jsonl, checkpoints (transformers Trainer layout: an HF model
directory plus optimizer, scheduler and RNG state) to OUT/checkpoint-N every train.checkpoint_every steps, at the end
and on SIGTERM/Ctrl-C, and the final model to OUT/final. Re-running the same command resumes from the newest
checkpoint with the batches the run would have seen.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from doge_jax import data as D
from doge_jax import hf_io
from doge_jax.closed_pipe import EXIT_CLOSED_PIPE, guarded_output, output_closed
from doge_jax.config import ConfigError, as_model_option
from doge_jax.hf_names import CheckpointError, CheckpointWriteError
from doge_jax.train_config import BARE_OVERRIDE, DEFAULT_CONFIG, SIGTERM_REPEAT_S, load_configs, parse_overrides

from . import checkpoint
from .loss import IGNORE
from .model import DogeForCausalLM, check_labels, check_token_ids, set_sdpa_backends, token_ids_checked
from .optim import clip_grad_norm, make_optimizer, wsd_scheduler

IGNORE_INDEX = IGNORE


def _as_batch(mb: Any) -> dict[str, torch.Tensor]:
    """A micro-batch given as a dict (input_ids, optional labels / attention_mask), an (ids, labels) pair or ids."""
    if isinstance(mb, dict):
        batch = dict(mb)
    elif isinstance(mb, (tuple, list)):
        batch = {"input_ids": mb[0], "labels": mb[1]}
    else:
        batch = {"input_ids": mb}
    batch.setdefault("labels", batch["input_ids"])
    return batch


def count_items(micro_batches: Sequence[Any]) -> torch.Tensor:
    """num_items_in_batch: labels[..., 1:] != -100 summed over every micro-batch of the step (spec §6.2)."""
    return sum((_as_batch(mb)["labels"][..., 1:] != IGNORE_INDEX).sum() for mb in micro_batches)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None, micro_batches: Sequence[Any],
               max_grad_norm: float | None = 1.0, autocast_dtype: torch.dtype | None = None,
               sync: bool = True) -> dict[str, Any]:
    """One optimizer step over `micro_batches` (gradient accumulation); returns loss, grad_norm, lr, num_items.

    `loss` is the sum of the micro-batch losses, i.e. the token-mean loss of the whole step (plus the MoE aux term
    of every micro-batch when the config enables it). `lr` is the learning rate this update used; `grad_norm` the
    global norm before clipping. `autocast_dtype` (e.g. torch.bfloat16) runs the forward under autocast.
    `sync=False` returns loss and grad_norm as device tensors instead of floats, so the host does not wait for the
    step and can queue the next one (micro-batches held on the CPU, as a data loader gives them, then cost no
    device sync at all: their token ids are checked there, and the model skips its own check, a sync on a GPU).
    """
    batches = [_as_batch(mb) for mb in micro_batches]
    if not batches:
        raise ValueError("train_step: no micro-batches")
    device = next(model.parameters()).device
    cfg = getattr(getattr(model, "module", model), "config", None)  # DistributedDataParallel keeps it in .module
    if cfg is not None:  # checked where the batches are (on the CPU: no device sync); the model then skips its check
        for b in batches:
            check_token_ids(b["input_ids"], cfg.vocab_size)
            check_labels(b["labels"], cfg.vocab_size)
    checked = token_ids_checked if cfg is not None else contextlib.nullcontext
    num_items = count_items(batches)  # on the batches' device: no sync when they are on the CPU
    n_items = int(num_items)
    if n_items == 0:
        raise ValueError("train_step: every label of the step is -100 (num_items_in_batch would be 0)")
    num_items = num_items.to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float32, device=device)

    def to(x):  # non_blocking: a pageable host-to-device copy is staged at once and does not wait for queued work
        return x.to(device, non_blocking=True)

    for b in batches:
        mask = b.get("attention_mask")
        with (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
              else contextlib.nullcontext()), checked():
            out = model(to(b["input_ids"]), attention_mask=None if mask is None else to(mask), labels=to(b["labels"]),
                        num_items_in_batch=num_items, return_logits=False)  # the loss without [tokens, vocab] logits
        out.loss.backward()
        total += out.loss.detach().float()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = clip_grad_norm(params, max_grad_norm if max_grad_norm is not None else math.inf)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if not sync:
        return {"loss": total, "grad_norm": norm, "lr": float(lr), "num_items": n_items}
    return {"loss": float(total), "grad_norm": float(norm), "lr": float(lr), "num_items": n_items}


# ---- data ---------------------------------------------------------------------------------------------------------
class TokenStream:
    """Token arrays read as one stream without joining them: memory-mapped shards stay on disk (a corpus larger than
    memory trains), and each batch reads only its rows. np.asarray(stream) joins them (tests, small data)."""

    def __init__(self, parts: Sequence[np.ndarray], max_ids: Sequence[int | None] | None = None,
                 names: Sequence[str | None] | None = None):
        """`max_ids`: each part's largest id where it is known (a pre-tokenized manifest), so max() need not read
        the part from disk; `names`: where each part came from (for error messages)."""
        keep = [i for i, p in enumerate(parts) if len(p)]
        self.parts = [parts[i] for i in keep]
        self.max_ids = [max_ids[i] if max_ids else None for i in keep]
        self.names = [names[i] if names else None for i in keep]
        self.ends = np.cumsum([len(p) for p in self.parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate(self.parts) if self.parts else np.zeros(0, np.int64)
        return out.astype(dtype or np.int64, copy=False)

    def min(self) -> int:
        """The smallest id (0 for an empty stream); unsigned parts are not read."""
        return min((0 if p.dtype.kind == "u" else int(p.min()) for p in self.parts), default=0)

    def max(self) -> int:
        """The largest id (0 for an empty stream); parts with a known largest id are not read."""
        return max((int(p.max()) if m is None else int(m) for p, m in zip(self.parts, self.max_ids)), default=0)

    def split_tail(self, n: int) -> tuple[TokenStream, TokenStream]:
        """(all but the last n tokens, the last n tokens), as views of the same parts."""
        cut, head, tail = len(self) - n, [], []
        for p, m, name, end in zip(self.parts, self.max_ids, self.names, self.ends):
            start = int(end) - len(p)
            if end <= cut:
                head.append((p, m, name))
            elif start >= cut:
                tail.append((p, m, name))
            else:  # the part the cut falls in: its known largest id bounds both halves
                head.append((p[:cut - start], m, name))
                tail.append((p[cut - start:], m, name))
        return tuple(TokenStream(*map(list, zip(*half))) if half else TokenStream([]) for half in (head, tail))

    def rows(self, index: np.ndarray, seq_len: int) -> np.ndarray:
        """Rows `index` of the stream cut into rows of seq_len tokens, as int64 [len(index), seq_len]."""
        out = np.empty((len(index), seq_len), np.int64)
        for r, i in enumerate(np.asarray(index, np.int64)):
            start, filled = int(i) * seq_len, 0
            part = int(np.searchsorted(self.ends, start, side="right"))
            while filled < seq_len:  # a row may span the end of one part and the start of the next
                lo = start + filled - (int(self.ends[part - 1]) if part else 0)
                take = min(seq_len - filled, len(self.parts[part]) - lo)
                out[r, filled:filled + take] = self.parts[part][lo:lo + take]
                filled, part = filled + take, part + 1
        return out


def lm_batch(ids: torch.Tensor, pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """A causal-LM micro-batch: labels = input_ids with pad tokens ignored (the collator rule, spec §6.4)."""
    labels = ids.clone()
    if pad_token_id is not None:
        labels[ids == pad_token_id] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def check_id_range(tokens, vocab_size: int, what: str = "token ids") -> None:
    """Every id of `tokens` (a TokenStream or an array) in [0, vocab_size), else a ValueError with the span."""
    lo, hi = (int(tokens.min()), int(tokens.max())) if len(tokens) else (0, 0)
    if lo < 0 or hi >= vocab_size:
        where = ""
        if isinstance(tokens, TokenStream):  # which input: the first part out of range
            def out_of_range(p: np.ndarray, m: int | None) -> bool:
                return (p.dtype.kind != "u" and int(p.min()) < 0) or (int(p.max()) if m is None else m) >= vocab_size

            bad = next((n for p, m, n in zip(tokens.parts, tokens.max_ids, tokens.names) if out_of_range(p, m)), None)
            where = f" (first in {bad})" if bad else ""
        raise ValueError(f"{what} span [{lo}, {hi}] but model.vocab_size is {vocab_size}{where}")


def load_tokens(files: Sequence[str], tokenizer=None, eos_token_id: int | None = None,
                text_field: str = "text", val: list | None = None, exclude: Sequence[str] = (),
                val_fraction: float = 0.0, seed: int = 233, cache_dir: str | None = None) -> TokenStream:
    """All tokens of `files` as one stream; `.npy` files and pre-tokenized shards stay memory-mapped (not copied).
    `.npy` files hold 1-D token ids; a directory written by `python -m doge_jax.data` gives its training shards;
    anything else is read as doge_jax.train reads it (text files, `.jsonl`/`.parquet` rows, directories and globs of
    them) and tokenized with `tokenizer` (a tokenizer.json or HF tokenizer directory, or a loaded
    `tokenizers.Tokenizer`), EOS after each document.
    `val`: a list that receives the validation shards of pre-tokenized directories and the text documents held out
    as doge_jax.train holds them out (`val_fraction`, `seed`: the same documents); the tokenized text is cached in
    `cache_dir` (doge_jax.train's cache: a corpus is tokenized once for both). Text directory walks and globs skip
    the directories in `exclude` (the run's own --out)."""
    from doge_jax.corpora import is_pretokenized, load_pretokenized, split_note

    parts, max_ids, names, text, pre_val = [], [], [], [], []
    tok = None

    def get_tok():
        nonlocal tok
        if tok is None and tokenizer is not None:
            tok = load_tokenizer_arg(tokenizer) if isinstance(tokenizer, str | os.PathLike) else tokenizer
        return tok

    expanded = []
    for path in map(os.path.expanduser, files):  # .npy globs and directories of .npy files
        hits, others = [], []
        if glob.has_magic(path):
            hits = sorted(glob.glob(path))
            others = [p for p in hits if not p.endswith(".npy") and os.path.isfile(p)]
            hits = [p for p in hits if p.endswith(".npy")]  # none: a text glob, for resolve_paths
        elif os.path.isdir(path) and not is_pretokenized(path):
            hits = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".npy"))
            if hits:
                with contextlib.suppress(D.DataError):  # (no text file below it)
                    others = D.resolve_paths(path, list(exclude))
        if hits and others:  # the .npy files alone would be read, the text ones dropped without a word
            raise D.DataError(f"data path {path!r}: holds both .npy token arrays ({os.path.basename(hits[0])}) and "
                              f"other files ({os.path.basename(others[0])}); "
                              "pass them as separate paths")
        expanded += hits or [path]
    seen = set()
    for path in expanded:  # a file or directory given twice is read once, as doge_jax.train reads it
        key = os.path.abspath(path)
        if key in seen:
            print(f"note: data path {path!r} given twice: read once", file=sys.stderr)
            continue
        seen.add(key)
        if not glob.has_magic(path) and not os.path.exists(path):
            raise D.DataError(f"data path {path!r} does not exist")
        if path.endswith(".npy"):
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:  # not an .npy file, an object array, a cut file
                raise D.DataError(f"{path}: not a readable .npy token array ({e})") from None
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{path}: expected a 1-D integer token array, got {arr.dtype}{list(arr.shape)}")
            parts.append(arr)
            max_ids.append(None)
            names.append(path)
        elif os.path.isdir(path) and is_pretokenized(path):
            # (another tokenizer than --tokenizer's raises)
            train, held_out, manifest = load_pretokenized(path, get_tok())
            if eos_token_id is not None and manifest["eos_token_id"] != eos_token_id:
                raise D.DataError(f"{path}: pre-tokenized with EOS id {manifest['eos_token_id']}, the model's is "
                                  f"{eos_token_id}")
            if val is not None and split_note(path, manifest, val_fraction):
                print(split_note(path, manifest, val_fraction), file=sys.stderr, flush=True)
            parts += train
            max_ids += [s.get("max_id") for s in manifest["shards"]]
            names += [os.path.join(path, s["train"]) for s in manifest["shards"]]
            if val is not None and val_fraction == 0:  # no validation asked for: trained on, as in doge_jax.train
                kept = [(a, s) for a, s in zip(held_out, manifest["shards"]) if len(a)]
                parts += [a for a, _ in kept]
                max_ids += [s.get("max_id") for _, s in kept]
                names += [os.path.join(path, s["val"]) for _, s in kept]
            else:
                pre_val += held_out  # (after the text's held-out rows, as doge_jax.train orders its sources)
        elif path.endswith(".bin"):
            raise ValueError(f"{path}: a pre-tokenized shard; pass its directory (written by python -m doge_jax.data)")
        else:
            text += D.resolve_paths(path, list(exclude))
    if text:
        if tokenizer is None:
            raise ValueError(f"{text[0]}: text data needs --tokenizer PATH/tokenizer.json (or pass pre-tokenized "
                             ".npy files or a python -m doge_jax.data directory)")
        if eos_token_id is None:  # documents run into each other (doge_jax.train refuses this too)
            raise ConfigError("model.eos_token_id: the tokenizer has no known EOS token to end each document with; "
                              "set model.eos_token_id in the config")
        text = sorted(dict.fromkeys(text))  # doge_jax.train's order of the files: the same documents held out
        train, held = D.tokenize_corpus(text, get_tok(), eos_token_id, cache_dir, text_field,
                                        val_fraction if val is not None else 0.0, seed, progress=False)
        parts.append(train)
        max_ids.append(None)
        names.append("the tokenized text data")
        if val is not None and len(held):
            val.append(held)
    if val is not None:
        val += pre_val
    return TokenStream(parts, max_ids, names)


def batches(tokens: TokenStream | np.ndarray, seq_len: int, rows: int, grad_accum: int, seed: int,
            pad_token_id: int | None = None, start_step: int = 0, held_out: int = 0
            ) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Endless optimizer steps: `grad_accum` micro-batches of [rows, seq_len] chunks of the stream, in a seeded
    shuffled order (reshuffled every epoch). Labels = input_ids, with pad tokens ignored (collator rule). From
    `start_step` on: a resumed run gets the batches it would have got had it not stopped. Too little data raises
    here, before the first batch is asked for."""
    n = len(tokens) // seq_len
    if n < rows * grad_accum:
        raise ValueError(f"data has {len(tokens)} tokens = {n} rows of seq_len={seq_len}; a step needs "
                         f"{rows * grad_accum} (rows {rows} x grad_accum {grad_accum})"
                         + (f"; {held_out} more tokens are held out for validation (train.val_fraction)"
                            if held_out else ""))
    stream = tokens if isinstance(tokens, TokenStream) else TokenStream([np.asarray(tokens)])
    return _batches(stream, n, seq_len, rows, grad_accum, seed, pad_token_id, start_step)


def _batches(stream: TokenStream, n: int, seq_len: int, rows: int, grad_accum: int, seed: int,
             pad_token_id: int | None, start_step: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(n, generator=gen), 0
    for _ in range(start_step * grad_accum):  # the same draws as the steps already taken, without the copies
        if pos + rows > n:
            order, pos = torch.randperm(n, generator=gen), 0
        pos += rows
    while True:
        step = []
        for _ in range(grad_accum):
            if pos + rows > n:
                order, pos = torch.randperm(n, generator=gen), 0
            step.append(lm_batch(torch.from_numpy(stream.rows(order[pos:pos + rows].numpy(), seq_len)),
                                 pad_token_id))
            pos += rows
        yield step


def val_rows(tokens: TokenStream, held_out: list, seq_len: int, fraction: float, limit: int
             ) -> tuple[TokenStream, np.ndarray | None]:
    """(training stream, validation rows [n, seq_len] or None). Pre-tokenized directories bring their own validation
    shards and text data its held-out documents (`load_tokens`); otherwise (.npy token files, or too few documents
    to hold one out) the last `fraction` of the stream (whole rows) is held out from training."""
    if held_out:
        val = TokenStream(held_out)
    elif fraction > 0 and len(tokens) // seq_len >= 2:
        n = max(1, int(len(tokens) // seq_len * fraction)) * seq_len
        tokens, val = tokens.split_tail(n)
    else:
        return tokens, None
    n_rows = min(len(val) // seq_len, limit)
    return tokens, (val.rows(np.arange(n_rows), seq_len) if n_rows else None)


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: np.ndarray, micro_rows: int, pad_token_id: int | None,
             autocast_dtype: torch.dtype | None) -> tuple[float, float]:
    """(mean next-token loss over every target of `rows`, its perplexity), in micro-batches of `micro_rows`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for i in range(0, len(rows), micro_rows):
            batch = lm_batch(torch.from_numpy(rows[i:i + micro_rows]), pad_token_id)
            n = int(count_items([batch]))  # host tensors: no device sync
            if n == 0:
                continue
            with (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                  else contextlib.nullcontext()):
                out = model(batch["input_ids"].to(device), labels=batch["labels"].to(device), return_logits=False,
                            output_router_logits=False, use_cache=False)  # cross-entropy only, as doge_jax's eval
            total += out.loss.double() * n
            count += n
    finally:
        model.train(was_training)
    loss = float(total) / max(count, 1)
    return loss, math.exp(min(loss, 80.0))


# ---- command line -------------------------------------------------------------------------------------------------
def init_from(path: str, cfg) -> DogeForCausalLM:
    """A float32 model of `cfg` (the checkpoint's config with the requested fields) with the weights of the HF
    directory `path`; dense -> MoE: the new router/expert tables keep their fresh init (spec §7)."""
    from doge_jax.hf_names import check_keys, expected_hf_shapes
    from doge_jax.init import is_new_moe_param, upcast_note

    from .io import load_hf_state

    _, state = load_hf_state(path, config=cfg)
    if cfg.tie_word_embeddings:
        hf_io.check_tied_head(cfg, state.pop("lm_head.weight", None), state.get("model.embed_tokens.weight"), path)
    expected = expected_hf_shapes(cfg)
    to_moe = cfg.is_moe and not any(is_new_moe_param(k) for k in state)
    if to_moe:
        expected = {k: v for k, v in expected.items() if not is_new_moe_param(k)}
    check_keys(expected, {k: tuple(v.shape) for k, v in state.items()}, where=path)
    model = DogeForCausalLM(cfg)  # fresh float32 init from the seeded global generator
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=not to_moe)
    upcast_note(path, {str(v.dtype) for v in state.values()})
    return model


# train: fields this loop does not use (doge_jax.train's run layout, mesh, loss chunking, progress)
JAX_ONLY = ("mesh", "runs_dir", "out_dir", "async_checkpoint", "log_every", "loss_chunk", "peak_flops",
            "progress")
# train: fields whose change on resume is worth a warning (the schedule, the optimizer, the batch, the data order);
# a resumed run uses the new values
RESUME_NOTED = ("seq_len", "global_batch_tokens", "grad_accum", "peak_lr", "num_training_steps", "num_warmup_steps",
                "num_decay_steps", "warmup_type", "decay_type", "min_lr_ratio", "weight_decay", "adam_b1", "adam_b2",
                "adam_eps", "max_grad_norm", "seed")


# what a run directory of another kind holds at its top: a saved model (HF, PyTorch) or a doge_jax run / orbax model
_FOREIGN = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json", "checkpoints", "params")


def check_out_dir(out: str) -> None:
    """--out must be a new directory, an empty one, or a doge_torch.train run; a saved model or a doge_jax run there
    is refused (this run's checkpoints and OUT/final would sit beside it and its files would win on load)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out}: is a file, not a directory")
    if not os.path.isdir(out):
        return
    found = [f for f in _FOREIGN if os.path.exists(os.path.join(out, f))]
    if found and checkpoint.steps(out):  # a doge_jax run written into this run's directory: neither is resumed
        raise ConfigError(f"--out {out}: holds this trainer's checkpoints and also {found[0]!r} (a saved model or a "
                          "doge_jax run); move one of them out, or use a new directory")
    if found:
        raise ConfigError(f"--out {out}: holds {found[0]!r} (a saved model or a doge_jax run), not a "
                          "doge_torch.train run; use a new or empty directory (to start from that model: --init-from)")


def data_args(args: argparse.Namespace, tc, run_tok: str | None = None) -> tuple[list[str], str | None]:
    """(data paths, tokenizer): --data / --tokenizer, else the config's train.data / train.tokenizer; no data with a
    tokenizer (--tokenizer, the resumed run's `run_tok`, the --init-from checkpoint's) is the stdlib sources. Mixture
    weights are doge_jax.train's and refused here."""
    from doge_jax.corpora import split_weight
    from doge_jax.init import find_tokenizer

    if args.data is None and not tc.data:
        start = getattr(args, "init_from", None) or tc.init_from
        if not (args.tokenizer or tc.tokenizer or (run_tok and os.path.isfile(run_tok))
                or (start and find_tokenizer(start))):
            raise ConfigError("no training data: pass --data PATH... or set train.data in the config (with a "
                              "tokenizer, --tokenizer or --init-from's, this Python's standard-library sources are "
                              "the default, as in doge_jax.train)")
        print("note: no --data: training on this Python's standard-library sources (as doge_jax.train does)",
              flush=True)
        return D.default_corpus(), args.tokenizer or tc.tokenizer
    if args.data is not None and tc.data:
        print("note: --data replaces the config's train.data", flush=True)
    where = "--data" if args.data is not None else "train.data"
    data = []
    for entry in args.data if args.data is not None else tc.data:
        path, weight = split_weight(entry)
        if weight is not None:
            raise ConfigError(f"{where} entry {entry!r}: a mixture weight; doge_torch.train reads its data as one "
                              "stream (mix with python -m doge_jax.train, or drop the weights)")
        data.append(path)
    return data, args.tokenizer or tc.tokenizer


def load_tokenizer_arg(path: str):
    """The --tokenizer (or train.tokenizer) file or directory, its errors named as that argument's."""
    try:
        return D.load_tokenizer(path)
    except D.DataError as e:
        raise D.DataError(f"--tokenizer: {e}") from None


def tokenizer_source(data: Sequence[str], tokenizer: str | None, start: str | None) -> str | None:
    """Where the run's tokenizer comes from: --tokenizer, else the first pre-tokenized directory of --data, else the
    --init-from checkpoint's tokenizer.json; None for token files alone."""
    from doge_jax.corpora import is_pretokenized

    if tokenizer:
        return tokenizer
    for d in [*(d for d in data if os.path.isdir(d) and is_pretokenized(d)), start]:
        if d and os.path.isfile(os.path.join(d, "tokenizer.json")):
            return d
    return None


def _resume_configs(args: argparse.Namespace, overrides: list, path: str, before: str | None):
    """(model config, train config) of a run resumed from its checkpoint `path`, started from `before`. The model
    config is the checkpoint's (the directory the run started from need not exist any more); the --config file's
    model: fields must agree with it, and the start the command names (--init-from or train.init_from) must be the
    run's."""
    import yaml

    from doge_jax.config import RUNTIME_FIELDS
    from doge_jax.init import checkpoint_config

    try:
        with open(args.config or DEFAULT_CONFIG) as f:
            raw = yaml.safe_load(f)
        train = raw.get("train") if isinstance(raw, dict) else None
        in_file = train.get("init_from") if isinstance(train, dict) else None
    except (OSError, yaml.YAMLError):  # load_configs below says what is wrong with the file
        in_file = None
    in_file = next((v for s, k, v in overrides if (s, k) == ("train", "init_from")), in_file)
    asked = args.init_from or in_file
    if asked and os.path.abspath(asked) != before:
        raise ConfigError(f"train.init_from={asked!r}: {args.out} holds a run started from "
                          f"{before or 'a fresh init'} ({path}); a re-run resumes it. Use another --out to start anew")
    # the checkpoint as the start: its config with the file's model: fields applied, as --init-from merges
    cfg, tc = load_configs(args.config, [*overrides, ("train", "init_from", path)],
                           where=f"the run's newest ({path})")
    old = checkpoint_config(path)
    diff = [f.name for f in dataclasses.fields(old)
            if f.name not in RUNTIME_FIELDS and getattr(old, f.name) != getattr(cfg, f.name)]
    if diff:
        raise ConfigError(f"{args.out} holds a run of another model config (fields: {', '.join(diff)}; see "
                          f"{path}/config.json); use another --out or the run's config")
    return cfg, dataclasses.replace(tc, init_from=before)


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    """`python -m doge_torch.train` (see the module docstring); returns the metrics of the steps it ran."""
    with contextlib.ExitStack() as held:  # --out's lock, from when the directory exists to the end
        return _main(argv, held)


def _main(argv: Sequence[str] | None, held: contextlib.ExitStack) -> list[dict[str, float]]:
    ap = argparse.ArgumentParser(prog="python -m doge_torch.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="YAML with model: and train: sections (configs/*.yaml; default "
                    "configs/tiny.yaml); any field of it is also an option: --train.FIELD VALUE, --model.FIELD "
                    "VALUE (or FIELD=VALUE), as in doge_jax.train")
    ap.add_argument("--data", nargs="+", action="extend",
                    help=".npy token files, python -m doge_jax.data directories, or text data as doge_jax.train reads "
                    "it (.txt/.jsonl/.parquet files, directories, globs) with --tokenizer (default: the config's "
                    "train.data)")
    ap.add_argument("--tokenizer", help="tokenizer.json or HF tokenizer directory for text data (default: the "
                    "config's train.tokenizer)")
    ap.add_argument("--init-from", help="start from this HF directory instead of a fresh init; the --config file's "
                    "model: fields apply on top where shapes allow (dense -> MoE: fresh router and expert tables)")
    ap.add_argument("--max-steps", type=int, help="stop after this many steps (schedule unchanged; with --out a "
                    "checkpoint is saved, and a re-run with a larger --max-steps continues)")
    ap.add_argument("--out", help="run directory: metrics.jsonl, OUT/checkpoint-N every train.checkpoint_every steps "
                    "(the newest train.keep_checkpoints kept; a re-run resumes from the newest) and the final model "
                    "(OUT/final, an HF directory); without it nothing is saved (a note says so)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: cuda when available, else cpu)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (float32 parameters and optimizer); also "
                    "on when the config sets train.compute_dtype: bfloat16")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--sdpa-backends", help="comma list: torch sdpa kernels to prefer, in order (cudnn, flash, "
                    "efficient, math; default: torch's order, flash first)")
    ap.add_argument("--log-every", type=int, default=1,
                    help="print every N steps (metrics.jsonl keeps every step; each step's loss is read back one "
                    "step late, while the device runs the next one)")
    # a bare override (train.seed=7) as the option it stands for: it ends --data's list, as in doge_jax.train, and
    # keeps its place among the overrides (the last one wins)
    argv = [f"--{a}" if BARE_OVERRIDE.match(a) else a for a in (sys.argv[1:] if argv is None else argv)]
    # argparse takes an option-like argument with a space ('--train.mesh={fsdp: 2}', '--out_dir=my runs') for a value
    # of --data: such overrides go through it as space-free stand-ins (holding a NUL, which no argument can)
    standins = {}
    known = {o for action in ap._actions for o in action.option_strings}
    for i, a in enumerate(argv):
        key = a.split("=", 1)[0]
        if a.startswith("--") and "=" in a and key not in known and re.search(r"\s", a):
            standins[f"{key}=\0{i}"] = a
            argv[i] = f"{key}=\0{i}"
    args, rest = ap.parse_known_args(argv)
    rest = [standins.get(a, a) for a in rest]
    try:  # --train.FIELD / --model.FIELD overrides, as doge_jax.train takes them
        overrides = parse_overrides(rest)
    except ConfigError as e:
        ap.error(str(e))
    layout = [f"train.{k}" for s, k, _ in overrides if s == "train" and k in ("out_dir", "name", "runs_dir")]
    if layout:  # (doge_jax.train's run layout: this trainer would say "nothing is saved" and save nothing)
        ap.error(f"{layout[0]} (or --out_dir / --name): doge_jax.train's run directory; doge_torch.train writes its "
                 "run to --out DIR")
    if args.sdpa_backends:
        try:
            set_sdpa_backends(args.sdpa_backends.split(","))
        except ValueError as e:
            ap.error(f"--sdpa-backends: {e}")
    try:
        torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device {args.device}: not a torch device (cpu, cuda, cuda:1, ...)")
    if args.log_every < 1:
        ap.error(f"--log-every {args.log_every}: must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        ap.error(f"--max-steps {args.max_steps}: must be >= 1")

    # the same validation and defaults as doge_jax.train (unknown keys, types, ranges named); of train:, this loop
    # uses the recipe fields (batch, schedule, optimizer, seed), the checkpoint fields and compute_dtype
    # with --init-from the model config is the checkpoint's, with the --config file's model: fields applied on top
    # where shapes allow (dense -> MoE included), as in doge_jax.train
    locked = False
    if args.out:
        check_out_dir(args.out)
        if os.path.isdir(args.out):  # before its checkpoints are read: another trainer may be rotating them
            held.enter_context(hf_io.run_lock(args.out))
            locked = True
    have = checkpoint.steps(args.out) if args.out else []
    resume = checkpoint.path_of(args.out, have[-1]) if have else None
    with _unreadable_names(resume, args.out):
        old = checkpoint.read_state(resume) if resume else {}  # the run's record: its start, schedule and data
    if resume:
        from doge_jax.init import checkpoint_config

        with _unreadable_names(resume, args.out, config_is_damage=True):  # its config.json and weight headers
            checkpoint_config(resume)
        cfg, tc = _resume_configs(args, overrides, resume, old.get("init_from"))
    else:
        cfg, tc = load_configs(args.config, [*overrides, *([("train", "init_from", args.init_from)]
                                                           if args.init_from else [])])
    if tc.seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"train.seq_len={tc.seq_len} > model.max_position_embeddings={cfg.max_position_embeddings}")
    if tc.moe_freeze_steps:
        raise ConfigError(f"train.moe_freeze_steps={tc.moe_freeze_steps}: doge_torch.train does not freeze "
                          "parameters; run the MoE warm-up with python -m doge_jax.train")
    defaults = type(tc)()
    unused = [f"{k}={getattr(tc, k)!r}" for k in JAX_ONLY if getattr(tc, k) != getattr(defaults, k)]
    if unused:
        print(f"note: doge_torch.train does not use train.{', train.'.join(unused)} (doge_jax.train settings)",
              flush=True)
    run_tok = os.path.join(resume, "tokenizer.json") if resume else None
    data_paths, tokenizer = data_args(args, tc, run_tok)
    seq_len, grad_accum, rows = tc.seq_len, tc.grad_accum, tc.rows_per_micro
    steps = tc.num_training_steps
    max_steps = min(steps, args.max_steps or steps, tc.stop_after or steps)
    seed = tc.seed

    torch.manual_seed(seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this torch has no CUDA device (torch {torch.__version__})")
    start = tc.init_from  # --init-from, or train.init_from in the config file
    tok = None
    if run_tok and os.path.isfile(run_tok):  # the run's own (checkpoints carry it): a resume keeps its token ids
        tok_src, tok = resume, D.load_tokenizer(run_tok)
        if tokenizer and load_tokenizer_arg(tokenizer).get_vocab() != tok.get_vocab():
            raise ConfigError(f"--tokenizer {tokenizer}: differs from the tokenizer of the run in {args.out} "
                              f"({run_tok}); resume with the run's own (omit --tokenizer) or use another --out")
    else:
        tok_src = tokenizer_source(data_paths, tokenizer, start)
        if tok_src:
            tok = load_tokenizer_arg(tok_src) if tokenizer else D.load_tokenizer(tok_src)
        from doge_jax.init import find_tokenizer

        start_tok = start and tok is not None and tok_src != start and find_tokenizer(start)
        if start_tok and D.load_tokenizer(start_tok).get_vocab() != tok.get_vocab():  # (as doge_jax.train says)
            print(f"warning: --tokenizer {tok_src} is not the tokenizer of {start} ({start_tok}/tokenizer.json): "
                  "the checkpoint's embeddings belong to that one", file=sys.stderr, flush=True)
    tok_extras = D.tokenizer_extras(tok_src) if tok is not None else {}
    if tok is not None:
        # a config without special ids gets the tokenizer's, as in doge_jax.train (a run resumed from before
        # doge_torch did this gets them now, and its data its EOS: the token count change is said on resume)
        before = (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)
        cfg, warnings = D.with_special_ids(cfg, tok, tok_src)
        for w in warnings:
            print(f"warning: {w}", flush=True)
        if resume and before != (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id):
            print(f"note: the run's config had no bos/eos/pad_token_id {before}; from the tokenizer now: "
                  f"{(cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)}", flush=True)
    if start and not resume:  # (said as doge_jax.train says it)
        from doge_jax.init import checkpoint_config, config_changes

        changes = config_changes(checkpoint_config(start), cfg)
        model = init_from(start, cfg)
        try:  # its generate settings too (written with every checkpoint): a fine-tuned model samples as it did
            from doge_jax.init import start_generation_config

            model.generation_config = start_generation_config(start, cfg) or model.generation_config
        except ConfigError as e:
            print(f"warning: {e}; the checkpoints' generation_config.json is made from the token ids", flush=True)
        print(f"initialised from {start} (fresh optimizer state)"
              + (f"; model config changes: {'; '.join(changes)}" if changes else ""), flush=True)
    else:  # a fresh init; resuming, the checkpoint's weights are loaded below
        model = DogeForCausalLM(cfg)
    model = model.to(device).train()
    optimizer = make_optimizer(model, tc.peak_lr, weight_decay=tc.weight_decay, b1=tc.adam_b1, b2=tc.adam_b2,
                               eps=tc.adam_eps)
    scheduler = wsd_scheduler(optimizer, tc.num_warmup_steps, tc.num_decay_steps, steps, warmup_type=tc.warmup_type,
                              decay_type=tc.decay_type, min_lr_ratio=tc.min_lr_ratio)
    step_model = torch.compile(model) if args.compile else model

    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    held_out: list = []
    tokens = load_tokens(data_paths, tok, eos, tc.text_field, val=held_out,
                         exclude=[args.out] if args.out else [], val_fraction=tc.val_fraction, seed=tc.seed,
                         cache_dir=os.path.join(tc.cache_dir, "tokens"))
    check_id_range(tokens, cfg.vocab_size)
    # validation: eval_batches micro-batches every eval_every steps (0: only at the end), as in doge_jax.train
    all_tokens = len(tokens)
    tokens, val = val_rows(tokens, held_out, seq_len, tc.val_fraction, tc.eval_batches * rows)
    held_tokens = sum(map(len, held_out)) if held_out else all_tokens - len(tokens)
    if val is None and (held_out or tc.val_fraction > 0):
        where = ("in the held-out documents or validation shards" if held_out
                 else f"(train.val_fraction={tc.val_fraction})")
        print(f"note: no validation row of {seq_len} tokens {where}; the run reports no val_loss", flush=True)
    if val is not None:  # (held-out shards: not checked above)
        check_id_range(val, cfg.vocab_size, "validation token ids")
    bf16 = args.bf16 or tc.compute_dtype == "bfloat16"
    run = {"init_from": os.path.abspath(start) if start else None, "data": [os.path.abspath(d) for d in data_paths],
           "tokens": int(len(tokens)), "compute": "bf16 autocast" if bf16 else "float32",
           **{k: getattr(tc, k) for k in RESUME_NOTED}}
    done = 0
    if resume:
        with _unreadable_names(resume, args.out):
            done = checkpoint.load(resume, model, optimizer, scheduler)
        changed = [f"{k} {old[k]!r} -> {run[k]!r}" for k in ("data", "tokens", "compute", *RESUME_NOTED)
                   if k in old and old[k] != run[k]]
        print(f"resuming {resume} (step {done})"
              + (f"; warning: changed since: {'; '.join(changed)}" if changed else ""), flush=True)
    data = batches(tokens, seq_len, rows, grad_accum, seed, cfg.pad_token_id, start_step=done, held_out=held_tokens)
    autocast = torch.bfloat16 if bf16 else None
    max_norm = tc.max_grad_norm
    print(f"doge_torch.train: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {len(tokens)} tokens, "
          f"{max_steps} steps of {grad_accum} x [{rows}, {seq_len}] on {device}"
          f"{' bf16' if bf16 else ''}{' compiled' if args.compile else ''}", flush=True)
    if not args.out:
        print("note: no --out: nothing is saved (no checkpoints, metrics or final model)", file=sys.stderr, flush=True)

    metrics_file = None
    if args.out:
        if not locked:  # (OUT may have appeared since: another trainer's, made while this one started up)
            os.makedirs(args.out, exist_ok=True)
            held.enter_context(hf_io.run_lock(args.out))  # one trainer per run directory
        mpath = os.path.join(args.out, "metrics.jsonl")
        if resume and os.path.isfile(mpath):  # the steps after the checkpoint are done again: cut them
            kept = []
            with open(mpath) as f:
                for ln in f:
                    try:
                        rec = json.loads(ln)
                    except ValueError:  # a line cut short by a kill
                        continue
                    if rec.get("step", 0) <= done:
                        kept.append(json.dumps(rec) + "\n")
            with hf_io.atomic_file(mpath) as tmp, open(tmp, "w") as f:  # a kill now keeps the old file
                f.writelines(kept)
        elif os.path.isfile(mpath) and os.path.getsize(mpath):  # a start that saved no checkpoint (it diverged)
            aside = " (its diverged checkpoints are in diverged_checkpoints/)" if os.path.isdir(
                os.path.join(args.out, "diverged_checkpoints")) else ""
            how = f"from {start}" if start else "from scratch (a run started with --init-from needs it again)"
            print(f"note: {args.out} holds no checkpoint to resume from: an earlier start saved none{aside}; "
                  f"starting over from step 0, {how} (its metrics.jsonl records are replaced)", file=sys.stderr,
                  flush=True)
        metrics_file = open(mpath, "a" if resume else "w")
    history = []
    t_last = time.perf_counter()

    def record(rec: dict[str, Any]) -> None:
        nonlocal metrics_file
        if metrics_file:
            try:
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
            except OSError as e:  # (a full disk: the checkpoints matter more; their own failure ends the run)
                print(f"warning: writing {metrics_file.name} failed ({e}); metrics.jsonl is off for the rest of "
                      "the run", file=sys.stderr, flush=True)
                with contextlib.suppress(OSError):
                    metrics_file.close()
                metrics_file = None

    def read_back(m: dict[str, Any]) -> None:
        """Wait for step m's loss (the step before the one the device is running: no idle device), NaN-check,
        record, print every --log-every steps."""
        nonlocal t_last
        m.update(loss=float(m["loss"]), grad_norm=float(m["grad_norm"]))
        now = m.pop("_done", None) or time.perf_counter()
        m["tokens_per_sec"], t_last = grad_accum * rows * seq_len / (now - t_last), now
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):  # no checkpoint of this step
            diverged(f"non-finite loss/grad norm at step {m['step']} (loss={m['loss']}, grad_norm={m['grad_norm']})",
                     implicated=m["step"] - 1)
        history.append(m)
        record(m)
        if m["step"] % args.log_every == 0 or m["step"] in (1, max_steps):
            print(f"step {m['step']:6d}  loss {m['loss']:.4f}  lr {m['lr']:.3e}  grad_norm {m['grad_norm']:.3f}  "
                  f"{m['tokens_per_sec']:.0f} tok/s", flush=True)

    def diverged(what: str, implicated: int | None = None):
        """Stop without saving. The newest checkpoint, if it is step `implicated` (whose weights gave the
        non-finite value), is moved to OUT/diverged_checkpoints/: a re-run must not resume from it."""
        moved = ""
        if args.out and implicated is not None and checkpoint.steps(args.out)[-1:] == [implicated]:
            folder = checkpoint.set_aside_diverged(args.out, implicated)
            moved = f"; checkpoint-{implicated} holds the weights that gave it: moved to {folder}"
        good = checkpoint.steps(args.out) if args.out else []
        where = checkpoint.path_of(args.out, good[-1]) if good else "none saved"
        raise Diverged(f"{what}{moved}; stopped without saving; last good checkpoint: {where}")

    def validate(step: int) -> None:
        loss, ppl = evaluate(model, val, rows, cfg.pad_token_id, autocast)
        if not math.isfinite(loss):
            diverged(f"non-finite val_loss at step {step} ({loss}): the weights after its update diverged")
        record({"step": step, "val_loss": loss, "val_ppl": ppl})
        print(f"step {step:6d}  val_loss {loss:.4f}  val_ppl {ppl:.2f}", flush=True)

    def save(step: int) -> None:
        # the step's loss was finite, but its update may not be (a huge learning rate): never saved
        if not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):  # (one sync)
            diverged(f"non-finite weights after step {step} (its loss and grad norm were finite; the update "
                     "overflowed)")
        path = checkpoint.save(args.out, step, model, optimizer, scheduler, run, tc.keep_checkpoints, tok, tok_extras)
        print(f"saved {path}", flush=True)

    pending = None
    with _stop_on_signals(enabled=bool(args.out)) as stop:
        try:
            for step in range(done, max_steps):
                # queue this step, then read the previous one's loss: one step behind, so the host never makes the
                # device wait (train_step(sync=False) leaves loss and grad norm on the device)
                m = train_step(step_model, optimizer, scheduler, next(data), max_norm, autocast, sync=False)
                m["step"] = step + 1  # steps done, as doge_jax's metrics count them (lr: the one this update used)
                if device.type not in ("cuda", "mps", "xpu"):  # synchronous: done when train_step returns (tokens/s)
                    m["_done"] = time.perf_counter()
                if pending is not None:
                    read_back(pending)
                pending = m
                if output_closed() and not stop and args.out:  # the log's reader is gone (doge_jax.closed_pipe)
                    stop.extend(["a closed output pipe", EXIT_CLOSED_PIPE, time.monotonic()])
                stopping = bool(stop)  # read once: a signal arriving below waits for the next step
                evaluating = val is not None and ((tc.eval_every and (step + 1) % tc.eval_every == 0)
                                                  or step + 1 == max_steps)
                saving = args.out and (stopping or (step + 1) % tc.checkpoint_every == 0 or step + 1 == max_steps)
                if evaluating or saving:
                    read_back(pending)  # a checkpoint holds no step whose loss is not finite
                    pending = None
                if evaluating:
                    validate(step + 1)
                if saving:
                    save(step + 1)
                if evaluating or saving:
                    t_last = time.perf_counter()  # the next step's tokens/s leaves them out
                if stopping:
                    print(f"stopped by {stop[0]} after step {step + 1}; the same command resumes from "
                          f"{checkpoint.path_of(args.out, step + 1)}", file=sys.stderr, flush=True)
                    raise SystemExit(stop[1])
            if pending is not None:
                read_back(pending)
        finally:
            if metrics_file:
                metrics_file.close()
    if resume and done >= max_steps:
        print(f"nothing to train: {resume} is at step {done} of {steps}"
              + (f" (past the {max_steps} asked for)" if done > max_steps else ""), flush=True)
    elif max_steps < steps:
        print(f"stopped after step {max_steps} of {steps}"
              + ("; a re-run with a larger --max-steps (or train.stop_after) continues" if args.out else ""),
              flush=True)
    if args.out:
        final = os.path.join(args.out, "final")
        try:
            model.save_pretrained(final)
            if tok is not None:  # the tokenizer goes with the model (python -m doge_jax.generate --model OUT/final)
                D.save_tokenizer(tok, model.config, final, tok_extras)
        except OSError as e:  # a failed write (full disk), not bad input: exit 1, as a checkpoint's
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointWriteError.of("the final model", final, first) from e
        at = done if resume and done >= max_steps else max_steps
        print(f"saved {final} (the model at step {at})", flush=True)
    return history


@contextlib.contextmanager
def _stop_on_signals(enabled: bool) -> Iterator[list]:
    """While enabled, SIGTERM/SIGINT fill the yielded list with (name, exit code) instead of killing the run, which
    then saves a checkpoint after its current step; a second Ctrl-C interrupts at once. Elsewhere a no-op."""
    stop: list = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if stop and time.monotonic() - stop[2] < SIGTERM_REPEAT_S:  # a scheduler's repeat: the same stop
            return
        if stop:  # a second SIGTERM: the previous handler's behaviour, now (the default ends the process)
            signal.signal(signum, previous.get(signum) or signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        if not stop:
            name = signal.Signals(signum).name
            print(f"{name}: stopping after this step (with a checkpoint)", file=sys.stderr, flush=True)
            stop.extend([name, 128 + signum, time.monotonic()])

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s, h in previous.items():
        if h is not signal.SIG_IGN:  # an ignored signal stays ignored (background jobs)
            signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _unreadable_names(path: str | None, out: str, config_is_damage: bool = False):
    """A checkpoint whose files do not parse becomes one error naming it and the way on, not a traceback from
    torch.load, json or safetensors (saves are atomic, so this is damage after the fact: a disk, a copy, a hand).
    Out of memory, CUDA errors and programming errors (AttributeError, TypeError, ...) pass through unchanged: a
    good checkpoint must not be called damaged. A ConfigError is the command's own unless `config_is_damage` (the
    checkpoint's config.json is what is read)."""
    import pickle
    import zipfile

    from safetensors import SafetensorError

    try:
        yield
    except (torch.OutOfMemoryError, torch.AcceleratorError):
        raise
    except (OSError, ValueError, EOFError, KeyError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile,
            SafetensorError) as e:
        if isinstance(e, RuntimeError) and "CUDA" in str(e):
            raise
        if isinstance(e, ConfigError) and not config_is_damage:  # the command's own config: not damage
            raise
        # (torch.load's own advice for a file that does not unpickle is to load it unsafely: not for damage)
        first = ("not a file torch.save wrote" if isinstance(e, pickle.UnpicklingError)
                 else (str(e).splitlines() or [""])[0][:200])
        way = ("to resume from the one before it" if len(checkpoint.steps(out)) > 1 else
               "to start the run anew (it is the run's only checkpoint)")
        raise CheckpointError(f"the run's newest checkpoint {path} cannot be read ({type(e).__name__}: {first}); move "
                              f"it out of {out} {way}, or use another --out") from e


def cli(argv: Sequence[str] | None = None) -> int:
    """`python -m doge_torch.train`: main() with bad input reported as one `error:` line (exit 2)."""
    with guarded_output():  # a closed log pipe stops the run with a checkpoint (exit 141)
        return _cli(argv)


class Diverged(SystemExit):
    """A non-finite loss, gradient norm, val_loss or weights: the run stopped without saving (its message says
    where the last good checkpoint is). The command line exits 3, as doge_jax.train."""


def _cli(argv: Sequence[str] | None) -> int:
    try:
        main(argv)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CheckpointWriteError as e:  # a failed write, not bad input (exit 1, as convert's)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {as_model_option(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # during start-up, or a second Ctrl-C (the first one saves a checkpoint first)
        print("\ninterrupted: stopped at once, without a new checkpoint (with --out, a re-run resumes from the newest, "
              "if any)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
