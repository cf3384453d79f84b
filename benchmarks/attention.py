"""Long-context forward: doge_jax attention implementations vs transformers (sdpa) in the same run (issue 5).

Doge-20M shape (transformers-native layout), float32 on CPU, random weights with random nonzero A, batch 1,
`logits_to_keep=1` on both sides (the 32768-wide logits of every position would otherwise dominate memory).
Every measurement runs in a fresh subprocess (model loaded, one warm-up call for compilation), and reports the
median forward time and the peak extra resident memory during the timed call (RSS sampled every millisecond
minus RSS before the call). Sides alternate (interleaved pairs; the machine is noisy). A dated table is appended
to benchmarks/RESULTS.md.

    python benchmarks/attention.py [--lengths 512 2048 8192 32768] [--impls auto] [--repeats 2] [--pairs 3]
        [--no-append]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

HF_MAX_LEN = 8192  # transformers materialises [heads, L, L] masks plus a top-k: 32k needs tens of GB


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(fn, repeats: int) -> tuple[float, int]:
    """(median seconds, peak extra RSS bytes) of fn() over `repeats` timed calls."""
    times, peak = [], 0
    for _ in range(repeats):
        base = _rss()
        top = [base]
        stop = threading.Event()

        def sample(stop=stop, top=top):
            while not stop.is_set():
                top[0] = max(top[0], _rss())
                time.sleep(0.001)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        stop.set()
        th.join()
        peak = max(peak, max(top[0], _rss()) - base)
    return statistics.median(times), peak


def worker(side: str, path: str, length: int, impl: str, repeats: int, threads: int = 0) -> dict:
    import numpy as np

    ids = np.random.default_rng(0).integers(3, 32768, size=(1, length))
    if side == "hf":
        import torch
        import transformers

        if threads:
            torch.set_num_threads(threads)
        model = transformers.DogeForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
        t_ids = torch.as_tensor(ids)

        def fn():
            with torch.no_grad():
                return model(input_ids=t_ids, logits_to_keep=1).logits.numpy()
    else:
        import jax
        from flax import nnx

        from doge_jax.model import DogeForCausalLM, with_attention_impl

        model = with_attention_impl(DogeForCausalLM.from_pretrained(path), impl)
        fwd = nnx.jit(lambda m, x: m(x, logits_to_keep=1).logits)
        x = jax.numpy.asarray(ids)

        def fn():
            return np.asarray(fwd(model, x))
    out = fn()  # warm-up (compilation)
    sec, extra = _measure(fn, repeats)
    return {"sec": sec, "extra_mb": extra / 2**20, "logits": out.reshape(-1)[:8].tolist()}


TORCH_THREADS = (1, 2, os.cpu_count() or 1)  # transformers at its best thread count (a 2-thread torch suffers most
# from a busy machine; doge_jax uses every core)


def run_worker(side, path, length, impl, repeats, timeout, threads: int = 0) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", side, path, str(length), impl, str(repeats), str(threads)]
    try:  # a CPU comparison: JAX pinned to the CPU, as torch runs there
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
    except subprocess.TimeoutExpired:
        return None
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    print(p.stderr[-2000:], file=sys.stderr)
    return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    ap.add_argument("--impls", nargs="+", default=["auto"], help="doge_jax attention_impl values to time")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per subprocess")
    ap.add_argument("--pairs", type=int, default=3, help="interleaved (transformers, doge_jax) subprocess pairs")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)

    import atexit
    import shutil
    import tempfile

    from generate import append_results, hf_model

    path = tempfile.mkdtemp(prefix="doge_bench_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    hf_model(path)
    load0 = os.getloadavg()[0]
    header = ["tokens", "impl", "transformers s", "doge_jax s", "speed-up", "transformers +MB", "doge_jax +MB",
              "memory ratio"]
    rows = []
    for L in args.lengths:
        for impl in args.impls:
            hf_runs, our_runs = [], []
            for _ in range(args.pairs):
                if L <= HF_MAX_LEN:  # the best torch thread count of this pair
                    runs = [r for th in sorted(set(TORCH_THREADS))
                            if (r := run_worker("hf", path, L, impl, args.repeats, args.timeout, th))]
                    hf_runs.append(min(runs, key=lambda r: r["sec"]) if runs else None)
                our_runs.append(run_worker("jax", path, L, impl, args.repeats, args.timeout))
            hf_ok = [r for r in hf_runs if r]
            our_ok = [r for r in our_runs if r]
            hs = statistics.median(r["sec"] for r in hf_ok) if hf_ok else None
            hm = max(r["extra_mb"] for r in hf_ok) if hf_ok else None
            os_ = statistics.median(r["sec"] for r in our_ok) if our_ok else None
            om = max(r["extra_mb"] for r in our_ok) if our_ok else None
            row = [str(L), impl, f"{hs:.2f}" if hs else "skipped" if L > HF_MAX_LEN else "failed",
                   f"{os_:.2f}" if os_ else "failed", f"{hs / os_:.1f}x" if hs and os_ else "-",
                   f"{hm:.0f}" if hm is not None else "-", f"{om:.0f}" if om is not None else "-",
                   f"{om / hm:.2f}" if hm and om is not None else "-"]
            rows.append(row)
            print(" | ".join(row), flush=True)
    print("| " + " | ".join(header) + " |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if not args.no_append:
        import jax
        import torch
        import transformers

        note = (f"Doge-20M shape, float32, batch 1, forward with logits_to_keep=1; transformers "
                f"{transformers.__version__} sdpa (torch {torch.__version__}, best of {sorted(set(TORCH_THREADS))} "
                f"threads per pair) vs doge_jax (jax {jax.__version__}, CPU); {args.pairs} interleaved pairs of fresh "
                f"subprocesses, each the median of {args.repeats} timed calls after a warm-up, medians over pairs; "
                f"'+MB' = peak RSS above the pre-call RSS. transformers beyond {HF_MAX_LEN} tokens is skipped "
                f"(dense [heads, L, L] masks). Load average {load0:.1f} at the start, "
                f"{os.getloadavg()[0]:.1f} at the end.")
        append_results("Forward pass, long context (benchmarks/attention.py)", header, rows, note)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        side, path, length, impl, repeats, threads = sys.argv[2:8]
        print(json.dumps(worker(side, path, int(length), impl, int(repeats), int(threads))), flush=True)
    else:
        main()
