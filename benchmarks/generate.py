"""Generation speed: doge_jax (jit-compiled decode loop) and doge_torch (eager; --torch-static: the static cache's
compiled step) vs transformers (sdpa) in one run.

Doge-20M shape (transformers-native layout), float32 on CPU, random weights with random nonzero A; a 32-token
prompt, 128 new tokens (greedy, no EOS), batch 1 and 8. Runs are interleaved pairs (the machine is noisy); the
median of each side is reported with the ratio, and a dated row is appended to benchmarks/RESULTS.md.

    python benchmarks/generate.py [--batches 1 8] [--new 128] [--prompt 32] [--repeats 2] [--torch-static]
                                  [--no-append]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

DOGE_20M = dict(vocab_size=32768, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                tie_word_embeddings=True, keep_window_size=2048, pad_token_id=2, bos_token_id=0, eos_token_id=1,
                rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})


def hf_model(path: str | None = None, **overrides):
    """A random transformers Doge-20M-shaped model (sdpa, eval) with A ~ N(0, 1); saved to `path` if given."""
    import torch
    import transformers

    cfg = transformers.DogeConfig(**{**DOGE_20M, **overrides}, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.DogeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".A"):
                p.normal_()
    if path is not None:
        model.save_pretrained(path)
    return model


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def append_results(title: str, header: list[str], rows: list[list[str]], note: str = "") -> None:
    path = os.path.join(HERE, "RESULTS.md")
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("# Benchmark results\n\nAppended by `benchmarks/*.py`; newest last. Times are medians of "
                    "interleaved runs.\n")
        f.write(f"\n## {title} — {time.strftime('%Y-%m-%d %H:%M')} — {machine()}\n\n")
        if note:
            f.write(note + "\n\n")
        f.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
        for r in rows:
            f.write("| " + " | ".join(r) + " |\n")


def worker(side: str, path: str, batch: int, prompt: int, new: int, repeats: int, threads: int) -> dict:
    """Runs in a fresh subprocess (JAX's thread pool slows a 2-thread torch in the same process ~10x here)."""
    ids = np.random.default_rng(batch).integers(3, 32768, size=(batch, prompt))
    if side == "hf":
        import torch
        import transformers

        torch.set_num_threads(threads)
        model = transformers.DogeForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
        model.generation_config.eos_token_id = None  # EOS an ordinary token, as doge_jax's eos_token_id=-1
        t_ids = torch.as_tensor(ids)

        def fn():
            with torch.no_grad():
                return model.generate(t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=new,
                                      do_sample=False, pad_token_id=2).numpy()
    elif side in ("torch", "torch-static"):
        import torch

        from doge_torch import DogeForCausalLM as TorchDoge
        from doge_torch.generate import generate

        torch.set_num_threads(threads)
        tmodel = TorchDoge.from_pretrained(path).eval()
        t_ids = torch.as_tensor(ids)

        cache = "static" if side == "torch-static" else None  # (static: the first call compiles the step)

        def fn():
            return generate(tmodel, t_ids, max_new_tokens=new, eos_token_id=-1, do_sample=False,
                            cache_implementation=cache).numpy()
    else:
        from doge_jax.model import DogeForCausalLM

        model = DogeForCausalLM.from_pretrained(path)

        def fn():
            return model.generate(ids, max_new_tokens=new, eos_token_id=-1, do_sample=False)
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"sec": statistics.median(times), "first": first, "tokens": out[:, prompt:].tolist()}


STATIC_NOTE = "; and with cache_implementation=static: its decode step compiled by inductor"
TORCH_THREADS = {1, 2, os.cpu_count() or 1}  # transformers at its best thread count (doge_jax uses every core)


def run_worker(*args) -> dict:
    import json
    import subprocess

    cmd = [sys.executable, __file__, "--worker", *map(str, args)]
    # a CPU comparison: JAX pinned to the CPU, as torch runs there (on a GPU machine, not GPU JAX vs CPU torch)
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(p.stderr[-3000:])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per subprocess (after one warm-up)")
    ap.add_argument("--pairs", type=int, default=2,
                    help="interleaved rounds of (transformers, doge_jax, doge_torch) subprocesses")
    ap.add_argument("--torch-static", action="store_true",
                    help="also doge_torch with cache_implementation='static' (its decode step compiled by inductor "
                         "in each subprocess: about a minute each on 2 cores)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)

    import atexit
    import shutil
    import tempfile

    import jax
    import torch
    import transformers

    path = tempfile.mkdtemp(prefix="doge_bench_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    hf_model(path)
    rows = []
    for B in args.batches:
        hf_t = {th: [] for th in TORCH_THREADS}
        pt_t = {th: [] for th in TORCH_THREADS}
        our_t, outputs, st_t, st_first = [], [], {th: [] for th in TORCH_THREADS}, []
        for _ in range(args.pairs):
            hf_runs = {th: run_worker("hf", path, B, args.prompt, args.new, args.repeats, th) for th in TORCH_THREADS}
            ours = run_worker("jax", path, B, args.prompt, args.new, args.repeats, 0)
            pt_runs = {th: run_worker("torch", path, B, args.prompt, args.new, args.repeats, th)
                       for th in TORCH_THREADS}
            for th in TORCH_THREADS:
                hf_t[th].append(hf_runs[th]["sec"])
                pt_t[th].append(pt_runs[th]["sec"])
            our_t.append(ours["sec"])
            outputs += [r["tokens"] for r in (ours, *hf_runs.values(), *pt_runs.values())]
            if args.torch_static:
                for th in TORCH_THREADS:
                    st = run_worker("torch-static", path, B, args.prompt, args.new, args.repeats, th)
                    st_t[th].append(st["sec"])
                    st_first.append(st["first"] - st["sec"])
                    outputs.append(st["tokens"])
        same = all(o == outputs[0] for o in outputs)  # every run of every side, at every thread count
        best_th = min(hf_t, key=lambda th: statistics.median(hf_t[th]))
        best_pt = min(pt_t, key=lambda th: statistics.median(pt_t[th]))
        hf_s, our_s = statistics.median(hf_t[best_th]), statistics.median(our_t)
        pt_s = statistics.median(pt_t[best_pt])
        n_tok = B * args.new
        rows.append([str(B), f"{n_tok / hf_s:.0f} ({best_th} thr)", f"{n_tok / our_s:.0f}", f"{hf_s / our_s:.2f}x",
                     f"{n_tok / pt_s:.0f} ({best_pt} thr)", f"{hf_s / pt_s:.2f}x",
                     f"{ours['first'] - ours['sec']:.1f}"])
        if args.torch_static:
            best_st = min(st_t, key=lambda th: statistics.median(st_t[th]))
            st_s = statistics.median(st_t[best_st])
            rows[-1] += [f"{n_tok / st_s:.0f} ({best_st} thr)", f"{hf_s / st_s:.2f}x",
                         f"{statistics.median(st_first):.0f}"]
        rows[-1].append("yes" if same else "no")
        print(" | ".join(rows[-1]), flush=True)
    header = ["batch", "transformers tok/s (best torch threads)", "doge_jax tok/s", "doge_jax speed-up",
              "doge_torch tok/s (best threads)", "doge_torch speed-up", "doge_jax compile s"]
    if args.torch_static:
        header += ["doge_torch static tok/s (best threads)", "doge_torch static speed-up",
                   "doge_torch static compile s"]
    header.append("same greedy tokens (all sides)")
    print("| " + " | ".join(header) + " |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if not args.no_append:
        note = (f"Doge-20M shape, float32, {args.prompt}-token prompt, {args.new} new tokens, greedy, no EOS; "
                f"transformers {transformers.__version__} sdpa (torch {torch.__version__}, best of "
                f"{sorted(TORCH_THREADS)} threads) "
                f"vs doge_jax (jax {jax.__version__}) and doge_torch (eager, same torch, best of the same thread "
                f"counts{STATIC_NOTE if args.torch_static else ''}); each side in its own subprocess, "
                f"{args.pairs} interleaved pairs x {args.repeats} timed runs after a warm-up, medians.")
        append_results("Generation (benchmarks/generate.py)", header, rows, note)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        import json

        a = sys.argv[2:]
        print(json.dumps(worker(a[0], a[1], *map(int, a[2:]))), flush=True)
    else:
        main()
