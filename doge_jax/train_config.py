"""Configuration of `python -m doge_jax.train`: the `train:` section (TrainConfig), YAML loading and
command-line overrides (`--model.hidden_size 256`, `--train.peak_lr=1e-3`, `train.seed=1`).

Every field of DogeConfig and TrainConfig can be overridden; an unknown key, a bad value or a missing file fails
at start-up and names it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
from typing import Any

import yaml

from .config import ConfigError, DogeConfig, has_type
from .hf_names import CheckpointError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")


# Both trainers: a second SIGTERM this soon after the first is the same stop (srun and slurmstepd may both deliver
# one), not the "end at once" that a later one is.
SIGTERM_REPEAT_S = 1.0


def _f(default: Any, help: str) -> Any:  # noqa: A002 - dataclass field with a help text
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # recipe (spec §6): the keys of the configs/*.yaml train: sections
    seq_len: int = _f(256, "tokens per packed row")
    global_batch_tokens: int = _f(4096, "tokens per optimizer step = grad_accum x rows x seq_len")
    grad_accum: int = _f(1, "micro-batches per optimizer step (loss normalised by the whole step's tokens)")
    peak_lr: float = _f(3e-3, "peak learning rate of the WSD schedule")
    num_training_steps: int = _f(400, "optimizer steps")
    num_warmup_steps: int = _f(40, "WSD warmup steps")
    num_decay_steps: int = _f(80, "WSD decay steps")
    warmup_type: str = _f("linear", "linear | cosine | 1-sqrt")
    decay_type: str = _f("linear", "linear | cosine | 1-sqrt")
    min_lr_ratio: float = _f(0.0, "final lr / peak lr")
    weight_decay: float = _f(0.01, "AdamW decoupled weight decay (HF-Trainer mask: norms and biases excluded)")
    adam_b1: float = _f(0.9, "AdamW beta1")
    adam_b2: float = _f(0.95, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "global-norm gradient clipping (torch rule)")
    seed: int = _f(233, "seed of init, data shuffle and validation split")
    # data
    data: list = _f([], "text/jsonl/parquet files, directories, globs or pre-tokenized dirs; PATH:WEIGHT (or "
                    "{path: P, weight: W}) entries form a mixture; empty = the embedded stdlib corpus")
    text_field: str = _f("text", "field of a .jsonl row / column of a .parquet file holding the document")
    tokenizer: str | None = _f(None, "tokenizer.json or HF tokenizer dir; null = train a byte-level BPE")
    val_fraction: float = _f(0.01, "fraction of documents held out for validation")
    cache_dir: str = _f("~/.cache/doge_jax", "token/tokenizer cache and JAX compilation cache root")
    # continue training (spec §7)
    init_from: str | None = _f(None, "start from these weights (HF dir or orbax model/run/step dir; fresh optimizer); "
                               "model config from the checkpoint, --model.* overrides where shapes allow")
    moe_freeze_steps: int = _f(0, "MoE warm-up: train only router_gate/down_embed/up_embed for the first N steps")
    # devices
    mesh: dict = _f({"data": -1, "fsdp": 1}, "device mesh axes {data, fsdp}; -1 = all remaining devices")
    # run
    name: str | None = _f(None, "run name (default: the config file's stem)")
    runs_dir: str = _f("runs", "parent of the run directory")
    out_dir: str | None = _f(None, "run directory (default: runs_dir/name)")
    checkpoint_every: int = _f(100, "save a checkpoint every K steps (and at the end, and on SIGTERM/SIGINT)")
    keep_checkpoints: int = _f(3, "keep the N newest checkpoints")
    async_checkpoint: bool = _f(True, "write checkpoints in the background")
    eval_every: int = _f(100, "validation loss/perplexity every N steps (and at the end); 0 = only at the end")
    eval_batches: int = _f(8, "validation batches (of rows-per-micro-batch rows) per evaluation")
    log_every: int = _f(1, "write metrics every N steps")
    stop_after: int | None = _f(None, "stop (with a checkpoint) after this step, as if preempted")
    compute_dtype: str = _f("float32", "float32 | bfloat16 (params and optimizer stay float32)")
    loss_chunk: int = _f(1024, "tokens per chunk of the chunked cross-entropy; 0 = plain logits loss")
    peak_flops: float | None = _f(None, "peak FLOP/s of one device for MFU (default: per-platform table)")
    progress: bool = _f(True, "show progress bars (false: a log line per logged step instead, for batch jobs)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a run name like 7 or 2024-05-01 comes out of YAML as an int or date
            v = getattr(self, f.name)
            if f.type in ("str", "str | None") and v is not None and not isinstance(v, str | list | dict):
                object.__setattr__(self, f.name, str(v))
            if f.type == "list" and isinstance(v, tuple):
                object.__setattr__(self, f.name, list(v))
        self.validate()

    def validate(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ConfigError(f"train.{field}={getattr(self, field)!r}: {why}")

        for f in dataclasses.fields(self):  # types first: the checks below compare numbers
            if not has_type(getattr(self, f.name), f.type):
                bad(f.name, f"must be {f.type.replace(' | ', ' or ')}")

        for f in ("seq_len", "global_batch_tokens", "grad_accum", "num_training_steps", "checkpoint_every",
                  "keep_checkpoints", "log_every", "eval_batches"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                bad(f, "must be a positive integer")
        for f in ("num_warmup_steps", "num_decay_steps", "eval_every", "seed", "loss_chunk", "moe_freeze_steps"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 0:
                bad(f, "must be an integer >= 0")
        if 0 < self.num_training_steps <= self.moe_freeze_steps:
            bad("moe_freeze_steps", f"must be < num_training_steps={self.num_training_steps} (else only the router "
                "and expert tables train, the whole run)")
        if self.seed >= 2**32:  # the data loader's limit; jax.random.key keeps the low 32 bits (2**32 would be 0)
            bad("seed", "must be < 2**32")
        if self.global_batch_tokens % (self.grad_accum * self.seq_len):
            bad("global_batch_tokens", f"must be a multiple of grad_accum x seq_len = {self.grad_accum * self.seq_len}")
        if self.num_warmup_steps + self.num_decay_steps > self.num_training_steps:
            bad("num_training_steps", f"must be >= num_warmup_steps + num_decay_steps = {self.num_warmup_steps} + "
                f"{self.num_decay_steps}")
        for f in ("warmup_type", "decay_type"):
            if getattr(self, f) not in ("linear", "cosine", "1-sqrt"):
                bad(f, "must be linear | cosine | 1-sqrt")
        if self.compute_dtype not in ("float32", "bfloat16"):
            bad("compute_dtype", "must be float32 | bfloat16")
        if not 0.0 <= self.val_fraction < 1.0:
            bad("val_fraction", "must be in [0, 1)")
        if not 0 < self.peak_lr < math.inf:
            bad("peak_lr", "must be > 0 and finite")
        if self.peak_lr > 3.4028234663852886e38:  # (optimizers keep it in float32: torch's Adam raised a traceback)
            bad("peak_lr", "must be at most float32's largest value, 3.4e38")
        if not 0 < self.max_grad_norm < math.inf:
            bad("max_grad_norm", "must be > 0 and finite (torch's clipping rule; a negative norm ascends)")
        if not 0 <= self.weight_decay < math.inf:
            bad("weight_decay", "must be >= 0")
        for f in ("adam_b1", "adam_b2"):
            if not 0 <= getattr(self, f) < 1:
                bad(f, "must be in [0, 1)")
        if not 0 < self.adam_eps < math.inf:
            bad("adam_eps", "must be > 0")
        if self.peak_flops is not None and not 0 < self.peak_flops < math.inf:
            bad("peak_flops", "must be > 0 and finite (FLOP/s of one device), or null for the per-platform table")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be in [0, 1]")
        if self.stop_after is not None and self.stop_after < 1:
            bad("stop_after", "must be None or >= 1")
        if not isinstance(self.mesh, dict) or set(self.mesh) - {"data", "fsdp"} or not all(
                isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or v == -1) for v in self.mesh.values()):
            bad("mesh", "must be a mapping {data: N, fsdp: M} of positive integers or -1 (e.g. {data: -1, fsdp: 1})")

    @property
    def run_dir(self) -> str:
        """The run directory, absolute: out_dir, else runs_dir/name."""
        return os.path.abspath(os.path.expanduser(self.out_dir or os.path.join(self.runs_dir, self.name or "run")))

    @property
    def rows_per_micro(self) -> int:
        return self.global_batch_tokens // (self.grad_accum * self.seq_len)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
MODEL_FIELDS = {f.name: f for f in dataclasses.fields(DogeConfig)}


BARE_OVERRIDE = re.compile(r"((model|train)\.\w+|data|name|out_dir|init_from|init-from)=")


def _coerce(section: str, key: str, value: Any, annotation: str) -> Any:
    """A YAML-parsed command-line value converted to the field's type (e.g. '1e-3' -> 1e-3 for a float)."""
    if isinstance(value, str) and value.strip().lower() in ("null", "none", "~") and (
            "None" in annotation or not annotation.startswith("str")):
        return None  # (a str field keeps the word: model.remat none is a policy's name)
    try:
        if "float" in annotation and isinstance(value, str | int) and not isinstance(value, bool):
            return float(value)
        if annotation.startswith("int") and isinstance(value, str):
            return int(value)
        if annotation.startswith("list") and not isinstance(value, list):  # (one mapping: one {path, weight} entry)
            return [value] if isinstance(value, dict) else [str(value)]
    except ValueError:
        raise ConfigError(f"{section}.{key}={value!r}: expected {annotation}") from None
    if annotation.startswith("bool") and not isinstance(value, bool):
        raise ConfigError(f"{section}.{key}={value!r}: expected true/false")
    return value


def _unknown(section: str, key: str, names) -> ConfigError:
    near = difflib.get_close_matches(key, list(names), n=3)
    hint = f" (did you mean {', '.join(section + '.' + n for n in near)}?)" if near else ""
    return ConfigError(f"unknown config key {section}.{key}{hint}")


def parse_overrides(args: list[str]) -> list[tuple[str, str, Any]]:
    """['--model.x', 'v', 'train.y=w', '--train.z=u'] -> [(section, key, yaml value)]. `--data a b` feeds
    train.data (`--data a --data b` = `--data a b`: the shorthand adds up; --train.data replaces); `--name N` and
    `--out_dir D` are shorthands."""
    out: list[tuple[str, str, Any]] = []
    data_at = None  # index in `out` of the --data shorthand's list, which later --data's extend
    i = 0
    shorthands = {"data": "train.data", "name": "train.name", "out_dir": "train.out_dir", "out-dir": "train.out_dir",
                  "init-from": "train.init_from", "init_from": "train.init_from"}
    while i < len(args):
        a = args[i]
        key, value = (a[2:] if a.startswith("--") else a), None
        if "=" in key:
            key, value = key.split("=", 1)
        shorthand = key in shorthands
        key = shorthands.get(key, key)
        if "." not in key:
            raise ConfigError(f"unknown argument {a!r}: overrides are --model.FIELD VALUE or --train.FIELD VALUE "
                              "(see --help)")
        if key == "train.data" and (value is None or shorthand):
            if value is not None:  # --data=PATH, data=PATH: that one entry (added up as --data PATH)
                j, given = i + 1, [value]
            else:  # a list: every following non-option argument
                j = i + 1
                # until the next option or a bare override (`train.X=...`, `name=...`; paths may hold `=`)
                while j < len(args) and not args[j].startswith("--") and not BARE_OVERRIDE.match(args[j]):
                    j += 1
                if j == i + 1:
                    raise ConfigError(f"{a}: missing value")
                given = args[i + 1:j]
            # a YAML list, as the help says: [] or [a, b] (a lone "[ab]" stays a glob's character class)
            if len(given) == 1 and (given[0].strip() == "[]" or (given[0].lstrip().startswith("[")
                                                                  and "," in given[0])):
                try:
                    parsed = yaml.safe_load(given[0])
                except yaml.YAMLError:
                    parsed = None
                given = parsed if isinstance(parsed, list) else given
            if shorthand and data_at is not None:
                out[data_at][2].extend(given)
            else:
                data_at = len(out) if shorthand else None
                out.append(("train", "data", list(given)))
            i = j
            continue
        if value is None:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or (nxt.startswith("--") and ("." in nxt or nxt[2:].split("=")[0] in shorthands)):
                raise ConfigError(f"{a}: missing value" + (f" (the next argument, {nxt}, is an option)" if nxt else ""))
            value = nxt
            i += 1
        i += 1
        section, field = key.split(".", 1)
        if section not in ("model", "train"):
            raise ConfigError(f"unknown config section {section!r} in {a!r} (model or train)")
        try:
            parsed = value if isinstance(value, list) else yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{a} {value!r}: not a YAML value ({str(e).splitlines()[0]})") from None
        if (section, field) == ("train", "data"):
            data_at = None  # --train.data=X replaces what came before; a later --data starts anew
        out.append((section, field, parsed))
    return out


def load_configs(config_path: str | None, overrides: list[tuple[str, str, Any]], where: str = "--init-from",
                 resume_runs: bool = False) -> tuple[DogeConfig, TrainConfig]:
    """(model config, train config) from a YAML file (model: + train:) plus command-line overrides. `where` names
    train.init_from's checkpoint in errors. `resume_runs` (doge_jax.train): a command without --init-from that
    resumes a doge_jax run started with one takes that run's model config and its recorded init_from. An error
    about a value the YAML file set (not a command-line override) names the file."""
    try:
        return _load_configs(config_path, overrides, where, resume_runs)
    except ConfigError as e:
        raise _naming_the_file(e, config_path or DEFAULT_CONFIG, overrides) from None


def _naming_the_file(e: ConfigError, path: str, overrides: list[tuple[str, str, Any]]) -> ConfigError:
    """`e` with "(set in PATH)" added when the field it names ("train.X=...", "DogeConfig.X=...") has its value
    from the config file rather than from an override."""
    m = re.match(r"(train|model|DogeConfig)\.(\w+)=", str(e)) or re.match(r"unknown config key (train|model)\.(\w+)",
                                                                          str(e))
    if not m:
        return e
    section = "train" if m[1] == "train" else "model"
    if any((s, k) == (section, m[2]) for s, k, _ in overrides):
        return e
    try:
        with open(path) as f:
            settings = (yaml.safe_load(f) or {}).get(section) or {}
    except Exception:  # (it was read once already: an error here only means no file to name)
        return e
    return ConfigError(f"{e} (set in {path})") if isinstance(settings, dict) and m[2] in settings else e


def _load_configs(config_path: str | None, overrides: list[tuple[str, str, Any]], where: str,
                  resume_runs: bool) -> tuple[DogeConfig, TrainConfig]:
    path = config_path or DEFAULT_CONFIG
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: unreadable YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected model: and train: sections, got {type(raw).__name__}")
    # a run's train_config.yaml also holds its record (run:; before, its fields at the top level): not settings
    extra = set(raw) - {"model", "train", "run", "config_file", "data_files", "train_tokens", "val_tokens"}
    if extra:
        raise ConfigError(f"{path}: unknown section(s) {sorted(extra)} (expected model:, train:)")
    for section in ("model", "train"):
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise ConfigError(f"{path}: {section}: must be a mapping of settings (key: value lines), got "
                              f"{type(raw[section]).__name__} {raw[section]!r}"[:300])
    model = dict(raw.get("model") or {})
    train = dict(raw.get("train") or {})
    given = {k for s, k, _ in overrides if s == "train"}
    record = raw.get("run") if isinstance(raw.get("run"), dict) else {}
    home = os.path.dirname(os.path.abspath(path))
    if (os.path.basename(path) == "train_config.yaml" and os.path.isfile(os.path.join(home, "config.json"))
            and not given & {"name", "out_dir"}):
        train["out_dir"] = home  # a run's own record names that run, from whatever directory it is given
    started_in = record.get("cwd")
    if isinstance(started_in, str) and os.path.isabs(started_in) and started_in != os.getcwd():
        # the record's relative paths were typed in the directory the run started from
        moved = {k: v for k, v in (("data", absolute_data(train.get("data"), started_in)),
                                   ("tokenizer", _absolute(train.get("tokenizer"), started_in)),
                                   ("cache_dir", _absolute(train.get("cache_dir"), started_in)))
                 if k not in given and v != train.get(k)}
        if moved:
            print(f"note: {path}: relative paths taken from {started_in}, where the run started "
                  f"({', '.join('train.' + k for k in moved)})", file=sys.stderr)
            train.update(moved)
    if "name" in given and "out_dir" not in given and train.get("out_dir"):
        # --name picks a new run directory (runs_dir/name): the file's out_dir (a run's record holds its own)
        # would win over it and resume that run
        print(f"note: --name given: the run directory is runs_dir/name, not {path}'s out_dir {train['out_dir']!r}",
              file=sys.stderr)
        train["out_dir"] = None
    if {"name", "out_dir"} <= given:  # (the name only picks runs_dir/name; it was ignored without a word)
        name = next(v for s, k, v in overrides if (s, k) == ("train", "name"))
        print(f"note: --out_dir given: --name {name} has no effect (it only picks runs_dir/NAME)", file=sys.stderr)
    for key in model:
        if key not in MODEL_FIELDS:
            raise _unknown("model", key, MODEL_FIELDS)
    for key in train:
        if key not in TRAIN_FIELDS:
            raise _unknown("train", key, TRAIN_FIELDS)
    for section, key, value in overrides:
        fields, target = (MODEL_FIELDS, model) if section == "model" else (TRAIN_FIELDS, train)
        if key not in fields:
            raise _unknown(section, key, fields)
        target[key] = _coerce(section, key, value, str(fields[key].type))
    for key in list(train):
        train[key] = _coerce("train", key, train[key], str(TRAIN_FIELDS[key].type))
    for key in list(model):
        model[key] = _coerce("model", key, model[key], str(MODEL_FIELDS[key].type))
    train.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    try:
        tcfg = TrainConfig(**train)
    except TypeError as e:
        raise ConfigError(f"train: {e}") from None
    if tcfg.init_from:  # ~ as in the data paths (it was read before anything expanded it)
        tcfg = dataclasses.replace(tcfg, init_from=os.path.expanduser(tcfg.init_from))
    resumed = _resumed_init_run(tcfg) if resume_runs else None
    if config_path and not raw.get("model") and not tcfg.init_from and not resumed:
        given = sorted(k for s, k, _ in overrides if s == "model")
        print(f"warning: {path} has no model: section; the model is DogeConfig's defaults (transformers', ~400M "
              "parameters)" + (f" with only model.{', model.'.join(given)} set" if given else ""), file=sys.stderr)
    if tcfg.init_from or resumed:
        # The model config comes from the checkpoint (resuming a run started with --init-from without it: from the
        # run, whose config.json holds the merged one); the fields asked for explicitly (command line, and the
        # model: section of a config file given with --config) are applied on top where shapes allow.
        from .init import checkpoint_config, merge_config

        keys = (set(raw.get("model") or {}) if config_path else set()) | {k for s, k, _ in overrides if s == "model"}
        requested = {k: model[k] for k in keys}
        if resumed:  # the run's config (no need for its start checkpoint), and its start should nothing restore
            run_dir, started = resumed
            print(f"[doge_jax.train] resuming {run_dir} (started with --init-from {started}): the model config is the "
                  "run's", file=sys.stderr)
            base = DogeConfig.from_json_file(os.path.join(run_dir, "config.json"))
            return merge_config(base, requested, f"the run's ({run_dir})"), dataclasses.replace(tcfg, init_from=started)
        try:
            start = checkpoint_config(tcfg.init_from)
        except CheckpointError as e:  # (which option: a data folder given to --init-from said only "no ... found")
            raise CheckpointError(str(e) if "--init-from" in str(e) else
                                  f"--init-from {tcfg.init_from!r}: not a checkpoint ({e})") from None
        return merge_config(start, requested, where), tcfg
    return DogeConfig.from_dict(model), tcfg


def _absolute(path: Any, cwd: str) -> Any:
    """A relative path string joined to `cwd` (absolute, ~ and non-strings as they are)."""
    if not isinstance(path, str) or not path or os.path.isabs(path) or path.startswith("~"):
        return path
    return os.path.join(cwd, path)


def absolute_data(entries: Any, cwd: str) -> Any:
    """`train.data` entries (PATH, PATH:WEIGHT or {path, weight}) with relative paths joined to `cwd`."""
    if not isinstance(entries, list):
        return entries
    from .corpora import split_weight

    out = []
    for e in entries:
        try:
            p, w = split_weight(e)
        except ValueError:  # a bad weight: said when the data is read
            out.append(e)
            continue
        if isinstance(e, dict):
            out.append({**e, "path": _absolute(p, cwd)})
        else:
            out.append(_absolute(p, cwd) + str(e)[len(p):] if w is not None else _absolute(str(e), cwd))
    return out


def read_run_record(run_dir: str, section: str = "train") -> dict[str, Any] | None:
    """A section of a run directory's train_config.yaml (train:, or run: the record); None without the file; a
    damaged file is a ConfigError naming it."""
    path = os.path.join(run_dir, "train_config.yaml")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        train = raw.get(section) or {}
        if not isinstance(train, dict):
            raise ValueError(f"{section}: is a {type(train).__name__}")
    except (OSError, ValueError, AttributeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: unreadable run record ({type(e).__name__}: {e}); restore it, or start a new run "
                          "(another --name/--out_dir)") from None
    return train


def _resumed_init_run(tcfg: TrainConfig) -> tuple[str, str] | None:
    """(run directory, its recorded init_from) when the command resumes a run started with --init-from without
    passing it again: the run's own config.json is then the model config (also before its first checkpoint: the
    run then starts again from the recorded init_from)."""
    if tcfg.init_from:
        return None
    run_dir = tcfg.run_dir
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        return None
    started = (read_run_record(run_dir) or {}).get("init_from")
    return (run_dir, started) if started else None


def _shown(path: str) -> str:
    """`path` relative to the working directory when it lies below it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def help_text(prog: str = "python -m doge_jax.train") -> str:
    lines = [
        f"usage: {prog} [--config FILE.yaml] [--data PATH ...] [--model.FIELD VALUE] [--train.FIELD VALUE] ...",
        "",
        "Pretrain (or continue) a Doge model. With no argument: configs/tiny.yaml on the embedded corpus (this",
        "interpreter's standard-library sources) with a byte-level BPE trained on it; run dir ./runs/tiny.",
        "Re-running the same command resumes from the newest good checkpoint.",
        "",
        "Overrides: --section.field VALUE, --section.field=VALUE or section.field=VALUE (VALUE is YAML:",
        "1e-3, true, null, [a, b]). Shorthands: --data PATH... = train.data, --name = train.name,",
        "--out_dir (or --out-dir) = train.out_dir, --init-from PATH = train.init_from. Unknown keys fail at start-up.",
        "--data entries: FILE | DIR | GLOB | pre-tokenized DIR, each optionally PATH:WEIGHT for a mixture.",
        "",
        "options:",
        f"  --config FILE      YAML with model: and train: sections (default {_shown(DEFAULT_CONFIG)})",
        "  -h, --help         show this help",
        "",
        "train fields (defaults; a config's train: section overrides them):",
    ]
    for name, f in TRAIN_FIELDS.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  --train.{name:<20} {f.metadata.get('help', '')} [{default!r}]")
    lines += ["", "model fields (DogeConfig, spec §1.1; defaults as in transformers, the config file sets them):"]
    names = list(MODEL_FIELDS)
    for i in range(0, len(names), 4):
        lines.append("  " + "  ".join(f"--model.{n}" for n in names[i:i + 4]))
    lines += ["", "Runtime model fields (not saved with the model): --model.remat none|full|dots_saveable,",
              "--model.attention_impl auto|reference|blockwise|fused|pallas, --model.scan_layers true|false."]
    return "\n".join(lines)


def parse_argv(argv: list[str] | None) -> tuple[DogeConfig, TrainConfig, str]:
    """Command line -> (model config, train config, config path). Prints help and exits on -h/--help."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        raise SystemExit(0)
    config_path = None
    rest = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config" or argv[i].startswith("--config="):
            if "=" in argv[i]:
                config_path = argv[i].split("=", 1)[1]
            elif i + 1 < len(argv):
                config_path = argv[i + 1]
                i += 1
            else:
                raise ConfigError("--config: missing value")
        else:
            rest.append(argv[i])
        i += 1
    model, train = load_configs(config_path, parse_overrides(rest), resume_runs=True)
    return model, train, config_path or DEFAULT_CONFIG
