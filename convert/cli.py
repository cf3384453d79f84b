"""The `python -m convert` command line."""

from __future__ import annotations

import argparse
import signal
import sys

from doge_jax.config import ConfigError
from doge_jax.hf_names import CheckpointError

from .plan import DTYPES, TARGETS
from .variants import VARIANT_CHOICES

EPILOG = """\
source formats (detected):
  HF directory        config.json + model.safetensors | sharded safetensors + index | pytorch_model.bin
  orbax model         DIR/config.json + DIR/params/            (doge_jax save_model / convert --to jax)
  orbax training run  RUN/config.json + RUN/checkpoints/<step>/ (--step N, default latest; optimizer dropped)
  orbax step dir      RUN/checkpoints/<step>/                   (config.json from RUN/)
  state-dict file     FILE.pt/.bin/.pth/.safetensors with config.json beside it (or --config)

output layouts (DST is a directory; every target gets config.json, generation_config.json, tokenizer files):
  hf     model.safetensors (or shards + model.safetensors.index.json above --shard-size)
  torch  pytorch_model.bin: torch.load(...) gives doge_torch's state_dict (less a tied lm_head.weight);
         DST also loads with from_pretrained in doge_torch and transformers
  jax    params/ (orbax): doge_jax.DogeForCausalLM.from_pretrained(DST)

variants: native (transformers) and small_doge (remote code; legacy names are renamed to it) are different
functions; converting between them is refused. Tensors are copied bit for bit unless --dtype casts them.

examples:
  python -m convert SmallDoge-Doge-20M/ doge20m-jax --to jax
  python -m convert runs/tiny doge-tiny-hf --to hf --step 400 --dtype bfloat16
  python -m convert weights.pt out --to hf --config config.json --shard-size 500MB
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert", description="Convert Doge checkpoints between HF, JAX (orbax) and PyTorch, "
        "streaming tensor by tensor, written atomically.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="source checkpoint (directory or state-dict file)")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--to", required=True, choices=TARGETS, help="output format")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: keep source dtypes)")
    p.add_argument("--variant", choices=VARIANT_CHOICES,
                   help="assert the source's variant: the variant is detected from the weights' names (q_norm/k_norm "
                        "present: native), so this only confirms it; a contradiction is refused (native <-> "
                        "small_doge is not a conversion)")
    p.add_argument("--step", type=int, help="step of a training run directory (default: the latest)")
    p.add_argument("--config", help="config.json (or our YAML) for a state-dict file or to override SRC's")
    p.add_argument("--shard-size", help="largest safetensors shard for --to hf (default 5GB)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and name mapping, write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def _on_signal(signum, frame):
    """SIGINT/SIGTERM: noted, and acted on after the current tensor (core.STOP); a second Ctrl-C stops at once.
    Either way the exception unwinds through atomic_output_dir, which removes its temporary directory."""
    from .core import STOP

    if STOP and signum == signal.SIGINT:
        raise KeyboardInterrupt
    STOP.append(signum)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .core import STOP, convert

    if args.shard_size is not None and args.to != "hf":
        print(f"note: --shard-size applies to --to hf; {args.to} output is not sharded", file=sys.stderr)
    STOP.clear()
    old = {}
    if _main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) is not signal.SIG_IGN:  # an ignored signal stays ignored (background jobs)
                old[s] = signal.signal(s, _on_signal)
    try:
        convert(args.src, args.dst, args.to, dtype=args.dtype, variant=args.variant, step=args.step,
                config=args.config, shard_size=args.shard_size or "5GB", dry_run=args.dry_run, overwrite=args.overwrite)
        if STOP and args.dry_run:
            raise KeyboardInterrupt
    except (CheckpointError, ConfigError, FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            ValueError) as e:  # bad input (the source, DST, a flag): exit 2, as train and generate
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout's reader went away (`--dry-run | head`): quietly, as SIGPIPE would end it
        return 141
    except OSError as e:  # the write failed (disk full, permissions): exit 1
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing written", file=sys.stderr)
        return 130
    except SystemExit as e:  # SIGTERM, acted on between tensors (core._check_stop)
        if e.code == 128 + signal.SIGTERM:
            print("error: terminated (SIGTERM); nothing written", file=sys.stderr)
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        late = list(STOP)
        STOP.clear()  # (a later in-process convert() call must not see this command's signal)
    if late:  # it came after DST was renamed into place: the output is whole
        print(f"note: {signal.Signals(late[0]).name} came after {args.dst} was complete; it is kept", file=sys.stderr)
    return 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
