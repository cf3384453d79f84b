"""doge_torch's Triton kernels compile for Hopper (sm_90) with their default launch configs, dense and sparse:
within the shared memory a block may have; in bf16 (with and without a sliding window) no register spills and wgmma
matrix instructions (benchmarks/triton_compile_check.py: Triton's compiler and the wheel's ptxas, no GPU).

Slow tests (`-m slow`): ~50 s of CPU alone and up to ~150 s next to the rest of the suite on a 2-core machine,
for a property only a kernel or launch-config change can move (the kernels' results are checked in Triton's and
Pallas' interpreters by the default suite)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_for_sm90_within_limits():
    """bf16 (D 128): no spills and wgmma; every default config (also float32 at D 128 and 256) within sm_90's
    shared memory per block (the float32 dq kernel at D 128 needs 257 KB with two pipeline stages: one stage)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile the real kernels
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "triton_compile_check.py")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| _")]
    kernels = ("_fwd_kernel", "_dq_kernel", "_dkv_kernel", "_fwd_kernel[sparse]", "_dq_kernel[sparse]",
               "_dkv_sparse_kernel")
    got = sorted((c[0], c[1], c[2], c[3]) for c in rows)
    want = [(k, "bf16", "128", w) for k in kernels for w in ("False", "True")]
    want += [(k, "fp32", d, "False") for k in kernels for d in ("128", "256")]
    assert got == sorted(want)
    for c in rows:
        assert int(c[9]) <= 232448, c  # shared memory bytes
        if c[1] == "bf16":
            assert c[8] == "0" and c[10] == "True", c  # no spills, wgmma
    dq32 = [c for c in rows if c[0] == "_dq_kernel" and c[1:3] == ["fp32", "128"]]
    assert dq32[0][6] == "1"  # one pipeline stage


def test_pallas_kernels_fit_sm90_shared_memory():
    """doge_jax's Pallas kernels (Triton IR from a CUDA export on the CPU, compiled by the triton wheel for sm_90):
    every default config fits in a block's shared memory, bf16 without spills (but a few bytes in one kernel);
    float32 at D 256 with 64-wide tiles would not fit (which is why default_blocks gives it 32 x 32), and the check
    says so."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(ROOT, "benchmarks", "pallas_compile_check.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| bf16") or line.startswith("| fp32")]
    assert len(rows) == 15 and all(int(r[9]) <= 232448 for r in rows), rows  # shared memory bytes
    assert all(r[10] == "True" for r in rows if r[0] == "bf16"), rows  # wgmma
    # no spills in bf16, except the sparse forward's 128 x 64 tiles: 48 bytes here, and still faster on an H200 than
    # 64 x 64 (4.65 vs 5.43 ms forward+backward at T 16384, benchmarks/RESULTS.md 2026-11-30)
    spills = {(r[2], r[4]): int(r[8]) for r in rows if r[0] == "bf16"}
    assert spills.pop(("sparse", "forward")) <= 64 and set(spills.values()) == {0}, rows
    proc = subprocess.run([sys.executable, script, "--configs", "fp32,256,sparse,64"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]

