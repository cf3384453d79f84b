"""Compile doge_torch's Triton DMA kernels for a Hopper GPU (sm_90) without one; report registers, spills and
shared memory.

Triton compiles to PTX on any machine, and its wheel ships NVIDIA's `ptxas`; `ptxas -v` then says how many registers
each kernel needs and whether it spills to local memory, and Triton's metadata how much shared memory a block asks
for (more than sm_90's 227 KB fails at launch). That is the first thing to check when choosing block sizes, and it
costs no GPU time. Also confirms that the matrix products use Hopper's `wgmma` instructions.

    python benchmarks/triton_compile_check.py                 # the launch configs dma_triton uses
    python benchmarks/triton_compile_check.py --sweep         # a few alternative block / warp choices

The defaults: bf16 at D 128 (with and without a sliding window), float32 at D 128 and 256, dense and sparse, with
the blocks and pipelining depths dma_triton picks (`default_blocks`, `num_stages`). Exit code 1 if one of them fails
to compile, needs more shared memory than sm_90 has, spills (bf16; float32's 3xTF32 products are the accuracy
path and do spill), or (64-wide blocks) lacks wgmma. Run it without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

POINTERS = {"_fwd_kernel": ["Q", "K", "V", "DT", "E", "IDX", "CNTQ", "O", "LSE"],
            "_dq_kernel": ["Q", "K", "V", "DT", "E", "IDX", "CNTQ", "DO", "LSE", "DELTA", "DQ"],
            "_dkv_kernel": ["Q", "K", "V", "DT", "E", "DO", "LSE", "DELTA", "DK", "DV", "DDT"],
            "_dkv_sparse_kernel": ["Q", "K", "V", "DT", "E", "IDX", "CNT", "DO", "LSE", "DELTA", "DK", "DV", "DDT"]}
SCALARS = {"_fwd_kernel": ["scale", "window", "Tp", "H", "G", "NDT", "NQB", "NS", "LMAX"],
           "_dq_kernel": ["scale", "window", "Tp", "H", "G", "NDT", "NQB", "NS", "LMAX"],
           "_dkv_kernel": ["scale", "window", "Tp", "H", "G", "NDT"],
           "_dkv_sparse_kernel": ["scale", "window", "Tp", "H", "G", "NDT", "NS", "LMAX"]}
INT_POINTERS = {"E", "IDX", "CNT", "CNTQ"}
FP32_POINTERS = {"DT", "LSE", "DELTA", "DDT"}


def label(name: str, sparse: bool) -> str:
    """The kernel column: the fwd/dq kernels compile as two variants (dense key blocks, SPARSE key lists)."""
    return name + ("[sparse]" if sparse and name in ("_fwd_kernel", "_dq_kernel") else "")


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill bytes) of a kernel's PTX for sm_90a, from `ptxas -v` (the triton wheel's)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        info = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    return regs, sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))


def compile_one(name: str, bq: int, bk: int, warps: int, stages: int, window: bool = False, sparse: bool = False,
                skip: bool | None = None, D: int = 128, dtype: str = "bf16") -> dict:
    """Compile one kernel for sm_90 (q/k/v in `dtype`, bf16 or fp32; float32 dt/lse; GQA 2); returns registers,
    spill bytes, shared memory bytes, wgmma."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import doge_torch.triton_attention as ta

    const = dict(R=2, RDT=2, D=D, BQ=bq, BK=bk, HAS_WINDOW=window, ACC=tl.float32,
                 PREC="tf32x3" if dtype == "fp32" else "tf32",  # as _launch_args on a GPU
                 SKIP=ta.SKIP_FULL_TILE_MASK if skip is None else skip)
    if name != "_dkv_kernel":
        const["SB"] = ta.SUPERBLOCK
    if name in ("_fwd_kernel", "_dq_kernel"):
        const["SPARSE"] = sparse
    fp32 = FP32_POINTERS | ({"DK", "DV"} if name == "_dkv_sparse_kernel" else set())  # atomic float32 sums
    sig = {p: "*i32" if p in INT_POINTERS else "*fp32" if p in fp32 else f"*{dtype}" for p in POINTERS[name]}
    sig.update({a: "fp32" if a == "scale" else "i32" for a in SCALARS[name]})
    sig.update({c: "constexpr" for c in const})
    kernel = triton.compile(ASTSource(fn=getattr(ta, name), signature=sig, constexprs=const),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptx = kernel.asm["ptx"]
    regs, spills = ptxas_usage(ptx)
    name_ = label(name, sparse) + (" skip-full" if const["SKIP"] else "")
    return {"kernel": name_, "bq": bq, "bk": bk, "warps": warps, "stages": stages, "window": window,
            "registers": regs, "spill_bytes": spills, "wgmma": "wgmma" in ptx, "shared": kernel.metadata.shared,
            "D": D, "dtype": dtype}


def default_configs() -> list[tuple]:
    """The configs dma_triton launches (doge_torch.triton_attention's default_blocks / num_stages / BLOCK_Q_DKV),
    dense and SPARSE: bf16 at D = 128 without and with a sliding window, float32 at D = 128 and 256."""
    import doge_torch.triton_attention as ta

    out = []
    for dtype, D, windows in (("bf16", 128, (False, True)), ("fp32", 128, (False,)), ("fp32", 256, (False,))):
        size = 2 if dtype == "bf16" else 4
        bq, bk = ta.default_blocks(D, size)
        warps = 8 if D >= 128 else 4  # _launch_args
        bqd = min(bq, ta.BLOCK_Q_DKV)
        kernels = (("_fwd_kernel", bq, False, "fwd"), ("_dq_kernel", bq, False, "dq"),
                   ("_dkv_kernel", bqd, False, "dkv"), ("_fwd_kernel", bq, True, "fwd"),
                   ("_dq_kernel", bq, True, "dq"), ("_dkv_sparse_kernel", bqd, True, "dkv"))
        for window in windows:
            for name, q_block, sparse, kind in kernels:
                out.append((name, q_block, bk, warps, ta.num_stages(kind, D, size), window, sparse, None, D, dtype))
    return out


SWEEP = [("_fwd_kernel", 128, 64, 8, 2, False, False), ("_fwd_kernel", 128, 64, 8, 3, False, False),
         ("_fwd_kernel", 64, 64, 4, 2, False, False), ("_dq_kernel", 128, 32, 8, 2, False, False),
         ("_dq_kernel", 128, 64, 8, 2, False, False), ("_dkv_kernel", 64, 64, 8, 2, False, False),
         ("_dkv_kernel", 32, 128, 8, 2, False, False), ("_dkv_kernel", 16, 64, 4, 2, False, False),
         ("_fwd_kernel", 128, 64, 8, 2, False, True), ("_dq_kernel", 128, 64, 8, 2, False, True),
         ("_dkv_sparse_kernel", 64, 64, 8, 2, False, True), ("_dkv_sparse_kernel", 32, 128, 8, 2, False, True),
         ("_fwd_kernel", 64, 64, 8, 2, False, False, True), ("_dq_kernel", 64, 64, 8, 2, False, False, True),
         ("_dkv_kernel", 32, 64, 8, 2, False, False, True), ("_fwd_kernel", 64, 64, 8, 2, False, True, True),
         ("_dq_kernel", 64, 64, 8, 2, False, True, True), ("_dkv_sparse_kernel", 32, 64, 8, 2, False, True, True)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--sweep", action="store_true", help="also compile a few alternative configs")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter replaces the kernels")
    import doge_torch.triton_attention as ta

    rows, bad = [], []
    defaults = default_configs()
    for cfg in defaults + (SWEEP if args.sweep else []):
        is_default = cfg in defaults
        try:
            r = compile_one(*cfg)
        except Exception as e:  # noqa: BLE001 - report every config
            r = {"kernel": label(cfg[0], cfg[6]), "bq": cfg[1], "bk": cfg[2], "warps": cfg[3], "stages": cfg[4],
                 "window": cfg[5], "error": str(e), "D": cfg[8] if len(cfg) > 8 else 128,
                 "dtype": cfg[9] if len(cfg) > 9 else "bf16"}
        r["default"] = is_default
        rows.append(r)
        # float32 (3xTF32 products) is the accuracy path: its spills cost speed only; bf16 must not spill
        if is_default and ("error" in r or (r["dtype"] == "bf16" and r["spill_bytes"])
                           or r["shared"] > ta.SMEM_LIMIT_SM90 or (r["bk"] >= 64 and not r["wgmma"])):
            bad.append(r)
    print("| kernel | dtype | D | window | BQ x BK | warps | stages | registers | spill bytes | shared bytes | wgmma | "
          "default |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = (f"| {r['kernel']} | {r['dtype']} | {r['D']} | {r['window']} | {r['bq']}x{r['bk']} | {r['warps']} | "
                f"{r['stages']} | ")
        if "error" in r:
            print(head + f"error: {r['error'].splitlines()[0][:80]} | | | | {r['default']} |")
        else:
            print(head + f"{r['registers']} | {r['spill_bytes']} | {r['shared']} | {r['wgmma']} | {r['default']} |")
    print(f"sm_90 shared memory per block: {ta.SMEM_LIMIT_SM90} bytes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
