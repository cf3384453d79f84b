"""Training-step throughput: doge_jax and doge_torch vs transformers DogeForCausalLM + torch.optim.AdamW.

Doge-20M shapes (configs/doge-20m.yaml `model:`, transformers-native variant since transformers only has that
one) at seq 512, the same random token batches for both, float32 on CPU. One "step" is a full optimizer step:
forward, backward, global-norm clipping at 1.0, AdamW. JAX uses the real `doge_jax.train` step (chunked
cross-entropy, scan over layers); further JAX rows show the plain-logits loss (`--train.loss_chunk 0`) and the
layers unrolled (`--model.scan_layers false`).
doge_torch (eager) runs the same step with its training loss, which stores no logits (`doge_torch.loss`, as
`doge_torch.train.train_step`), and through the logits (`return_logits=True`).
The machine is noisy, so the frameworks are timed as interleaved pairs and the median per-pair ratio is reported.
Prints a table and appends a dated row to benchmarks/RESULTS.md (unless --no-append).

    python benchmarks/train_throughput.py [--rows 4] [--pairs 5] [--steps 3] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"  # a CPU comparison (torch runs on the CPU): never JAX on a GPU vs torch on the CPU
import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from doge_jax.config import DogeConfig  # noqa: E402
from doge_jax.loss import DogeTrunk  # noqa: E402
from doge_jax.optim import decay_mask, make_optimizer  # noqa: E402
from doge_jax.train import make_steps  # noqa: E402
from doge_jax.train_config import TrainConfig  # noqa: E402


def jax_runner(cfg: DogeConfig, seq: int, rows: int, loss_chunk: int):
    tcfg = TrainConfig(seq_len=seq, global_batch_tokens=seq * rows, loss_chunk=loss_chunk)
    graphdef, state = nnx.split(DogeTrunk(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(state)
    tx = make_optimizer(optax.constant_schedule(1e-3), mask=decay_mask)
    opt_state = tx.init(params)
    step_fn = make_steps(graphdef, tx, cfg, tcfg)[0]
    holder = {"p": params, "o": opt_state}

    def run(batch: np.ndarray) -> float:
        p, o, out = step_fn(holder["p"], holder["o"], jnp.asarray(batch)[None], 0)
        holder["p"], holder["o"] = p, o
        return float(out["loss"])

    return run


def torch_runner(cfg: DogeConfig):
    hf = transformers.DogeConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    torch.manual_seed(0)
    model = transformers.DogeForCausalLM(hf).train()
    decay = [p for n, p in model.named_parameters() if "norm" not in n and "bias" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n or "bias" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)

    def run(batch: np.ndarray) -> float:
        ids = torch.as_tensor(batch, dtype=torch.long)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run, model.config._attn_implementation


def doge_torch_runner(cfg: DogeConfig, logits: bool):
    from doge_torch.model import DogeForCausalLM
    from doge_torch.optim import make_optimizer

    torch.manual_seed(0)
    model = DogeForCausalLM(cfg).train()
    opt = make_optimizer(model, 1e-3)

    def run(batch: np.ndarray) -> float:
        ids = torch.as_tensor(batch, dtype=torch.long)
        loss = model(ids, labels=ids, return_logits=logits).loss  # False: doge_torch.train's loss (no logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def timed(run, batches) -> float:
    t0 = time.perf_counter()
    for b in batches:
        run(b)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "doge-20m.yaml"))
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rows", type=int, default=4, help="rows per step (tokens/step = rows x seq)")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = DogeConfig.from_yaml(args.config).replace(variant="native")
    rng = np.random.default_rng(0)
    batches = [rng.integers(3, cfg.vocab_size, (args.rows, args.seq), dtype=np.int64) for _ in range(args.steps)]
    runners = {"doge_jax": jax_runner(cfg, args.seq, args.rows, 1024),
               "doge_jax (plain CE)": jax_runner(cfg, args.seq, args.rows, 0),
               # the layers the other way (configs/doge-20m.yaml unrolls them)
               f"doge_jax ({'scanned' if not cfg.scan_layers else 'unrolled'} layers)":
                   jax_runner(cfg.replace(scan_layers=not cfg.scan_layers), args.seq, args.rows, 1024),
               "doge_torch": doge_torch_runner(cfg, logits=False),
               "doge_torch (plain CE)": doge_torch_runner(cfg, logits=True)}
    t_run, attn = torch_runner(cfg)
    runners[f"transformers ({attn}) + AdamW"] = t_run
    for run in runners.values():  # warm up: compile / first allocations
        run(batches[0])
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.pairs):
        for name, run in runners.items():
            times[name].append(timed(run, batches))
    tokens = args.rows * args.seq * args.steps
    base = list(runners)[-1]
    ratios = {k: statistics.median(b / a for a, b in zip(times[k], times[base])) for k in runners}
    name = os.path.basename(args.config)
    print(f"\n{name} shapes, seq {args.seq}, {args.rows} rows/step, float32, {args.pairs} interleaved rounds "
          f"of {args.steps} steps; jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'implementation':34} {'tokens/s (median)':>18} {'best':>10} {'ratio vs transformers':>22}")
    for k in runners:
        print(f"{k:34} {tokens / statistics.median(times[k]):18,.0f} {tokens / min(times[k]):10,.0f} "
              f"{ratios[k]:21.2f}x")
    if not args.no_append:
        path = os.path.join(ROOT, "benchmarks", "RESULTS.md")
        machine = f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.system()}"
        head = "" if os.path.isfile(path) else "# Benchmark results\n"
        with open(path, "a") as f:
            f.write(f"{head}\n## train_throughput ({datetime.date.today().isoformat()}, {machine})\n\n"
                    f"{name} shapes, seq {args.seq} x {args.rows} rows per step, float32, full optimizer step; "
                    f"median of {args.pairs} interleaved rounds of {args.steps} steps.\n\n"
                    "| implementation | tokens/s | ratio vs transformers |\n|---|---|---|\n")
            for k in runners:
                f.write(f"| {k} | {tokens / statistics.median(times[k]):,.0f} | {ratios[k]:.2f}x |\n")
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
