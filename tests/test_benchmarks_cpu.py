"""The CPU benchmark scripts (generation, training throughput, long-context forward) run end to end on short
inputs and print their tables (slow: each starts several subprocesses; `pytest -m slow`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _run(script: str, *args: str) -> list[list[str]]:
    """The script's table rows (cells) from a --no-append run; fails on a non-zero exit."""
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args, "--no-append"], capture_output=True,
                          text=True, timeout=900, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| ") and "---" not in line]


@pytest.mark.slow
@pytest.mark.parametrize("static", [False, True])
def test_generate_benchmark_three_sides_same_tokens(static):
    """(--torch-static: doge_torch's static cache too, compiled by inductor in each worker: ~1 minute each.)"""
    extra = ["--torch-static"] if static else []
    rows = _run("generate.py", "--batches", "2", "--new", "4", "--prompt", "4", "--pairs", "1", "--repeats", "1",
                *extra)
    header, row = rows[0], rows[-1]
    assert "doge_torch speed-up" in header and row[0] == "2" and row[-1] == "yes", rows  # (all sides)
    assert all(float(row[i].split()[0]) > 0 for i in (1, 2, 4)), row
    assert ("doge_torch static speed-up" in header) == static and len(row) == len(header), rows


@pytest.mark.slow
def test_train_throughput_benchmark_rows():
    out = subprocess.run([sys.executable, os.path.join(BENCH, "train_throughput.py"), "--config",
                          os.path.join(ROOT, "configs", "tiny.yaml"), "--seq", "64", "--rows", "2", "--pairs", "1",
                          "--steps", "1", "--no-append"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    names = [line[:34].strip() for line in out.stdout.splitlines() if line.startswith(("doge_", "transformers"))]
    assert names == ["doge_jax", "doge_jax (plain CE)", "doge_jax (unrolled layers)", "doge_torch",
                     "doge_torch (plain CE)", "transformers (sdpa) + AdamW"], out.stdout


@pytest.mark.slow
def test_attention_benchmark_rows():
    rows = _run("attention.py", "--lengths", "256", "--pairs", "1", "--repeats", "1")
    assert rows[-1][0] == "256" and rows[-1][1] == "auto", rows
    assert float(rows[-1][2]) >= 0 and float(rows[-1][3]) >= 0, rows  # a failed worker's cell reads "failed"
