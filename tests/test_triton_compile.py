"""doge_torch's Triton kernels compile for Hopper (sm_90) with their default launch configs: no register spills and
wgmma matrix instructions (benchmarks/triton_compile_check.py: Triton's compiler and the wheel's ptxas, no GPU)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile the real kernels
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "triton_compile_check.py")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| _")]
    assert sorted(r.split(" | ")[0] for r in rows) == ["| _dkv_kernel", "| _dq_kernel", "| _fwd_kernel"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[5] == "0" and cells[6] == "True", r  # no spills, wgmma
