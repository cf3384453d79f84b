"""Peak memory and wall time of `python -m convert` on a Doge-320M-sized checkpoint (issue 4, item 6).

Builds a random checkpoint with the configs/doge-320m.yaml model (float32, ~1.3 GB), written tensor by tensor
(the generator holds one tensor at a time), converts it HF -> hf / torch / jax and the jax output back to hf,
each in its own subprocess, and records wall time and the child's peak RSS (ru_maxrss of that one child, via
os.wait4) against the checkpoint size. The import-only baseline is a --dry-run of the same command. Appends a
dated row per conversion to benchmarks/RESULTS.md.

    python benchmarks/convert_memory.py [--workdir /tmp/x] [--targets hf torch jax] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from convert.safetensors_io import SafetensorsWriter  # noqa: E402
from doge_jax.config import DogeConfig  # noqa: E402
from doge_jax.hf_names import expected_hf_shapes  # noqa: E402


def make_checkpoint(path: str, cfg: DogeConfig, seed: int = 0) -> int:
    """Random float32 weights for every key of `cfg`, streamed into path/model.safetensors; returns its size."""
    os.makedirs(path, exist_ok=True)
    shapes = expected_hf_shapes(cfg)
    f32 = np.dtype(np.float32)
    w = SafetensorsWriter(os.path.join(path, "model.safetensors"), [(k, s, f32) for k, s in shapes.items()])
    rng = np.random.default_rng(seed)
    for k, s in shapes.items():
        w.put(k, rng.standard_normal(s, dtype=np.float32) * np.float32(0.02))
    w.close()
    cfg.save_json(os.path.join(path, "config.json"), dtype="float32")
    return os.path.getsize(os.path.join(path, "model.safetensors"))


def measure(argv: list[str]) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes) of `python -m convert ARGV` in a fresh child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "convert", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    secs = time.perf_counter() - t0
    err = p.stderr.read().decode()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        print(err, file=sys.stderr)
    return p.returncode, secs, ru.ru_maxrss * 1024  # Linux reports KiB


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}"


def run(workdir: str, targets=("hf", "torch", "jax")) -> list[dict]:
    cfg = DogeConfig.from_yaml(os.path.join(ROOT, "configs", "doge-320m.yaml"))
    src = os.path.join(workdir, "src")
    t0 = time.perf_counter()
    size = make_checkpoint(src, cfg)
    print(f"checkpoint: {size / 1e9:.3f} GB ({cfg.variant}, {cfg.num_hidden_layers} layers) in "
          f"{time.perf_counter() - t0:.1f} s")
    jobs = [("hf", src, to) for to in targets]
    if "jax" in targets:  # the orbax output back to HF: the streaming (leaf by leaf) orbax reader
        jobs.append(("jax", os.path.join(workdir, "out-jax"), "hf"))
    rows = []
    for kind, source, to in jobs:
        dst = os.path.join(workdir, f"out-{kind}-{to}" if kind != "hf" else f"out-{to}")
        _, _, base = measure([source, dst, "--to", to, "--dry-run"])
        rc, secs, peak = measure([source, dst, "--to", to])
        out_size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs) if rc == 0 else 0
        row = {"conversion": f"{kind} -> {to}", "rc": rc, "seconds": secs, "peak_rss": peak, "baseline_rss": base,
               "ckpt_bytes": size, "out_bytes": out_size}
        rows.append(row)
        print(f"{kind} -> {to:5s}: {secs:6.1f} s, peak RSS {peak / 1e9:.2f} GB = {peak / size:.2f}x checkpoint "
              f"(import/dry-run baseline {base / 1e9:.2f} GB), output {out_size / 1e9:.2f} GB, rc {rc}")
        if kind != "hf" or to != "jax":
            shutil.rmtree(dst, ignore_errors=True)
    shutil.rmtree(os.path.join(workdir, "out-jax"), ignore_errors=True)
    return rows


def append_results(rows: list[dict]) -> None:
    path = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("# Benchmark results\n\nRows are appended by the scripts in benchmarks/ (newest last).\n")
        today = datetime.date.today().isoformat()
        f.write(f"\n## convert_memory.py: Doge-320M-sized checkpoint (random float32, "
                f"{rows[0]['ckpt_bytes'] / 1e9:.2f} GB), {today}\n\n")
        f.write(f"Machine: {machine()}, CPU only. Peak RSS = ru_maxrss of the `python -m convert` child; "
                "baseline = the same command with --dry-run (imports + header reads).\n\n")
        f.write("| date | conversion | wall s | peak RSS GB | peak / ckpt | dry-run baseline GB | output GB |\n")
        f.write("|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {today} | {r['conversion']} | {r['seconds']:.1f} | {r['peak_rss'] / 1e9:.2f} | "
                    f"{r['peak_rss'] / r['ckpt_bytes']:.2f}x | {r['baseline_rss'] / 1e9:.2f} | "
                    f"{r['out_bytes'] / 1e9:.2f} |\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--workdir", help="scratch directory (default: a temporary one, removed at the end)")
    ap.add_argument("--targets", nargs="+", default=["hf", "torch", "jax"], choices=["hf", "torch", "jax"])
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    workdir = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="convert-mem-")
    try:
        rows = run(workdir, tuple(args.targets))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if not args.no_append and all(r["rc"] == 0 for r in rows):
        append_results(rows)


if __name__ == "__main__":
    main()
