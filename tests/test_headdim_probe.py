"""benchmarks/headdim_probe.py (a GPU probe) runs its tiny CPU smoke version end to end: every row timed, none
refused (the CUDA-only DMA paths say so), and nothing appended to RESULTS.md off the GPU."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~17 s of CPU for a GPU probe (the default suite is at its ~15-minute budget)
def test_headdim_probe_cpu_smoke():
    results = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    before = open(results).read()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}  # the smoke version on any machine
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "headdim_probe.py"), "--reps", "1",
                           "--no-append"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| torch") or line.startswith("| jax")]
    assert len(rows) == 14 and not any("refused" in r for r in rows), proc.stdout[-3000:]
    assert "cpu-smoke" in proc.stdout
    for r in rows:
        f_ms, b_ms = (float(c) for c in r.strip("|").split("|")[1:3])
        assert f_ms > 0 and b_ms > 0, r
    # doge_torch's DMA paths at the same shape: the two folds run (compiled, dynamo's eager backend), the CUDA-only
    # ones say so
    dma = [line for line in proc.stdout.splitlines() if line.startswith("| doge_torch DMA")]
    assert len(dma) == 4 and sum("not run: CUDA only" in r for r in dma) == 2, dma
    for r in dma[:2]:
        assert all(float(c) > 0 for c in r.strip("|").split("|")[1:3]), r
    assert open(results).read() == before
