"""doge_torch's Triton kernels compile for Hopper (sm_90) with their default launch configs, with and without a
sliding window, dense and sparse: no register spills, wgmma matrix instructions (benchmarks/triton_compile_check.py:
Triton's compiler and the wheel's ptxas, no GPU)."""

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
    names = sorted((c[0], c[1]) for c in ([x.strip() for x in r.strip("|").split("|")] for r in rows))
    kernels = ("_fwd_kernel", "_dq_kernel", "_dkv_kernel", "_fwd_kernel[sparse]", "_dq_kernel[sparse]",
               "_dkv_sparse_kernel")
    assert names == sorted((k, w) for k in kernels for w in ("False", "True"))
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[6] == "0" and cells[7] == "True", r  # no spills, wgmma
