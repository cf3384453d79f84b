"""benchmarks/headdim_probe.py (a GPU probe) runs its tiny CPU smoke version end to end: every row timed, none
refused, and nothing appended to RESULTS.md off the GPU."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_headdim_probe_cpu_smoke():
    results = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    before = open(results).read()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}  # the smoke version on any machine
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "headdim_probe.py"), "--reps", "1",
                           "--no-append"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| torch") or line.startswith("| jax")]
    assert len(rows) == 12 and not any("refused" in r for r in rows), proc.stdout[-3000:]
    assert "cpu-smoke" in proc.stdout
    for r in rows:
        f_ms, b_ms = (float(c) for c in r.strip("|").split("|")[1:3])
        assert f_ms > 0 and b_ms > 0, r
    assert open(results).read() == before
