"""Memory and time of one CDMoE training step: doge_jax and doge_torch vs transformers' DogeForCausalLM.

Each implementation runs in its own child process: build the model from a config (random init, float32), then two
full training steps (forward, backward, clip, AdamW) on the same random batch; the second step is timed. Reported:
the child's peak RSS (ru_maxrss) above its RSS after building the model and the optimizer state (gradients,
activations and temporaries of the steps, and for doge_jax also XLA's compile), doge_jax's compiled temporary bytes
(XLA memory_analysis), and the time of the second step, with ratios against transformers. Appends a dated table
to benchmarks/RESULTS.md.

    python benchmarks/moe_memory.py [--config configs/doge-480m-moe.yaml] [--seq 1024] [--rows 1] [--aux]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
IMPLS = ("transformers", "doge_torch", "doge_jax")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss() -> int:
    """The resident set now (not the peak: what was freed before the baseline does not count)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(impl: str, config: str, seq: int, rows: int, aux: bool) -> dict:
    """One implementation's two training steps; returns its measurements."""
    import numpy as np

    from doge_jax.config import DogeConfig

    cfg = DogeConfig.from_yaml(config).replace(variant="native", output_router_logits=aux)
    batch = np.random.default_rng(0).integers(3, cfg.vocab_size, (rows, seq), dtype=np.int64)
    out: dict = {}
    if impl == "doge_jax":
        import jax.numpy as jnp
        import optax
        from flax import nnx

        from doge_jax.loss import DogeTrunk
        from doge_jax.optim import decay_mask, make_optimizer
        from doge_jax.train import make_steps
        from doge_jax.train_config import TrainConfig

        tcfg = TrainConfig(seq_len=seq, global_batch_tokens=seq * rows)
        graphdef, state = nnx.split(DogeTrunk(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        params = nnx.to_pure_dict(state)
        tx = make_optimizer(optax.constant_schedule(1e-3), mask=decay_mask)
        opt = tx.init(params)
        step = make_steps(graphdef, tx, cfg, tcfg)[0]
        ids = jnp.asarray(batch)[None]
        base = _rss()
        compiled = step.lower(params, opt, ids, 0).compile()
        out["xla_temp"] = compiled.memory_analysis().temp_size_in_bytes

        def run() -> float:
            nonlocal params, opt
            params, opt, m = compiled(params, opt, ids, 0)
            return float(m["loss"])
    else:
        import torch

        torch.manual_seed(0)
        ids = torch.as_tensor(batch)
        if impl == "transformers":
            import transformers

            hf = transformers.DogeConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
            model = transformers.DogeForCausalLM(hf).train()

            def loss_fn() -> torch.Tensor:
                return model(input_ids=ids, labels=ids).loss
        else:
            from doge_torch.model import DogeForCausalLM

            model = DogeForCausalLM(cfg).train()

            def loss_fn() -> torch.Tensor:  # doge_torch.train's loss: no logits kept
                return model(ids, labels=ids, return_logits=False, output_router_logits=aux).loss
        decay = [p for n, p in model.named_parameters() if "norm" not in n and "bias" not in n]
        rest = [p for n, p in model.named_parameters() if "norm" in n or "bias" in n]
        tx = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                               lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
        # AdamW's moments exist before the baseline, as doge_jax's optimizer state does (tx.init): a zero-gradient
        # step at lr 0 makes them without moving a weight; the gradients (temporaries in doge_jax's step) are
        # freed again, so both rows count gradients, activations and temporaries
        lrs = [g["lr"] for g in tx.param_groups]
        for g in tx.param_groups:
            g["lr"] = 0.0
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        tx.step()
        tx.zero_grad(set_to_none=True)
        for g, lr in zip(tx.param_groups, lrs):
            g["lr"] = lr
        base = _rss()

        def run() -> float:
            loss = loss_fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            tx.step()
            tx.zero_grad(set_to_none=True)
            return float(loss.detach())
    out["loss"] = run()
    t0 = time.perf_counter()
    run()
    out["step_s"] = time.perf_counter() - t0
    out["rss"] = _maxrss() - base
    return out


def measure(impl: str, args: argparse.Namespace) -> dict:
    """Runs `impl` in a fresh child; its JSON line, or {"error": ...}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--config", args.config,
           "--seq", str(args.seq), "--rows", str(args.rows)] + (["--aux"] if args.aux else [])
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        why = "killed (out of memory?)" if p.returncode < 0 else (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {p.returncode}: {why}"}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "doge-480m-moe.yaml"))
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=1, help="rows per step (tokens/step = rows x seq)")
    ap.add_argument("--aux", action="store_true", help="with the MoE aux loss (output_router_logits true)")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.config = os.path.abspath(args.config)  # the children run in the repository root
    if not os.path.isfile(args.config):
        ap.error(f"--config {args.config}: no such file")
    from doge_jax.config import DogeConfig

    if not DogeConfig.from_yaml(args.config).is_moe:  # a dense model would fill a "CDMoE" table
        ap.error(f"--config {args.config}: not a MoE model (model.is_moe is false); this measures CDMoE")
    if args.child:
        print(json.dumps(child(args.child, args.config, args.seq, args.rows, args.aux)))
        return

    res = {impl: measure(impl, args) for impl in args.impls}
    base = res.get("transformers", {})
    gib = 2 ** 30
    name = os.path.basename(args.config)
    what = (f"{name}, {args.rows} x {args.seq} tokens, float32, {'with' if args.aux else 'no'} aux loss; "
            "one full training step (forward, backward, clip, AdamW), the second of two")
    rows = []
    for impl, r in res.items():
        if "error" in r:
            rows.append(f"| {impl} | {r['error']} | | | | |")
            continue
        rss_ratio = f"{r['rss'] / base['rss']:.2f}x" if "rss" in base else "-"
        t_ratio = f"{base['step_s'] / r['step_s']:.2f}x" if "step_s" in base else "-"
        temp = f"{r['xla_temp'] / gib:.2f}" if "xla_temp" in r else "-"
        rows.append(f"| {impl} | {r['rss'] / gib:.2f} | {rss_ratio} | {temp} | {r['step_s']:.2f} ({t_ratio}) "
                    f"| {r['loss']:.4f} |")
    table = ("| implementation | peak RSS above model + optimizer GiB | RSS vs transformers | XLA temp GiB | "
             "step s (speed vs transformers) | loss |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(f"\n{what}\n\n{table}")
    failed = [impl for impl, r in res.items() if "error" in r]
    if failed:  # a failed measurement is not a result: nothing appended
        sys.exit(f"failed: {', '.join(failed)}")
    if not args.no_append:
        path = os.path.join(ROOT, "benchmarks", "RESULTS.md")
        machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        with open(path, "a") as f:
            f.write(f"\n## moe_memory.py — {stamp} — {machine}\n\n{what}. Each in a fresh process.\n\n{table}")
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
