"""Where doge_jax's `auto` should switch from the dense reference attention to blockwise: one full training step
(`doge_jax.train.make_steps`: chunked CE, AdamW) with `attention_impl` forced to each, per sequence length.

Doge-20M config by default, float32, on whatever device JAX has (the CPU here); best of `--reps` timed steps after
a warm-up, `--rounds` alternating rounds per size. Prints a table; appends it to benchmarks/RESULTS.md unless
`--no-append`. `doge_jax.attention.AUTO_DENSE_MAX` holds the chosen boundary (in score entries, S x T).

    python benchmarks/auto_threshold.py [--sizes 512x4 768x2 1024x2] [--config configs/doge-20m.yaml]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def step_rate(base, seq: int, rows: int, impl: str, reps: int) -> float:
    """Training tokens/s of one optimizer step of `base` with attention_impl=impl (best of reps)."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from doge_jax.loss import DogeTrunk
    from doge_jax.optim import decay_mask, make_optimizer
    from doge_jax.train import make_steps
    from doge_jax.train_config import TrainConfig

    cfg = base.replace(attention_impl=impl)
    graphdef, state = nnx.split(DogeTrunk(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(state)
    tx = make_optimizer(optax.constant_schedule(1e-3), 0.01, 0.9, 0.95, 1e-8, 1.0, mask=decay_mask)
    opt = tx.init(params)
    step = make_steps(graphdef, tx, cfg, TrainConfig(seq_len=seq, global_batch_tokens=seq * rows))[0]
    batch = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, rows, seq))
    params, opt, out = step(params, opt, batch, 0)
    jax.block_until_ready(out)
    best = float("inf")
    for i in range(reps):
        t0 = time.perf_counter()
        params, opt, out = step(params, opt, batch, i + 1)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t0)
    return seq * rows / best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--sizes", nargs="+", default=["512x4", "768x2", "1024x2"], help="SEQxROWS per step")
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "doge-20m.yaml"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    import jax

    from doge_jax.attention import AUTO_DENSE_MAX
    from doge_jax.config import DogeConfig

    base = DogeConfig.from_yaml(args.config)
    lines = ["| seq x rows | reference tok/s | blockwise tok/s | blockwise / reference | auto picks |",
             "|---|---|---|---|---|"]
    for size in args.sizes:
        seq, rows = (int(x) for x in size.split("x"))
        rates = {"reference": [], "blockwise": []}
        for _ in range(args.rounds):
            for impl in rates:
                rates[impl].append(step_rate(base, seq, rows, impl, args.reps))
        ref, blk = (max(rates[k]) for k in ("reference", "blockwise"))
        picks = "reference" if seq * seq <= AUTO_DENSE_MAX else "blockwise"
        lines.append(f"| {seq} x {rows} | {' / '.join(f'{r:,.0f}' for r in rates['reference'])} | "
                     f"{' / '.join(f'{r:,.0f}' for r in rates['blockwise'])} | {blk / ref:.2f}x | {picks} |")
        print(lines[-1], flush=True)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = (f"## auto_threshold.py — {now} — {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"jax {jax.__version__} on {jax.devices()[0].platform}\n\n"
            f"{os.path.basename(args.config)}, float32, one training step per impl (best of {args.reps}, "
            f"{args.rounds} alternating rounds, each listed; ratio of the best); AUTO_DENSE_MAX = {AUTO_DENSE_MAX:,} "
            f"score entries.\n")
    table = "\n".join(lines)
    print("\n" + head + "\n" + table)
    if not args.no_append:
        with open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), "a") as f:
            f.write("\n" + head + "\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
