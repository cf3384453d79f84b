"""Compile doge_jax's Pallas DMA kernels for a Hopper GPU (sm_90) without one, and report their shared memory.

JAX lowers each `pallas_call` to a Triton IR module and hands it to XLA, which needs a GPU to go further. This script
exports the kernels' forward + backward for CUDA on the CPU, catches the modules at `lower_jaxpr_to_triton_module`
(a JAX internal: the script says so if it moved), and compiles them with the `triton` wheel for sm_90: the shared
memory a block asks for (more than sm_90's 227 KB fails at launch), registers and spills (`ptxas -v`), and whether
the products use `wgmma`. XLA's own
Triton may pipeline slightly differently; the wheel's is the closest check without a GPU.

    python benchmarks/pallas_compile_check.py                            # the default configs (dma_pallas)
    python benchmarks/pallas_compile_check.py --configs fp32,128,sparse  # dtype,D,dense|sparse[,block] ...

Exit code 1 if a config needs more shared memory than sm_90 has. Run it without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # triton_compile_check's ptxas_usage
os.environ.setdefault("JAX_PLATFORMS", "cpu")

SMEM_LIMIT_SM90 = 232448  # bytes per block (227 KB)
DEFAULTS = ["bf16,128,dense", "bf16,128,sparse", "fp32,128,dense", "fp32,128,sparse", "fp32,256,sparse"]
KERNELS = ("forward", "dq", "dk/dv/d(dt)")


def modules(dtype: str, D: int, sparse: bool, block: int | None) -> list[str]:
    """The Triton IR of the forward, dq and key-side kernels of dma_pallas (B 1, H 4, G 2, T 1024, keep 256)."""
    import jax
    import jax.numpy as jnp
    from jax import export

    try:
        from jax._src.pallas.triton import pallas_call_registration as registration
    except ImportError as e:
        raise SystemExit(f"this JAX moved its Pallas Triton lowering ({e}); the check needs updating") from e
    from doge_jax.pallas_attention import dma_pallas

    caught, lower = [], registration.lowering.lower_jaxpr_to_triton_module

    def catch(*a, **k):
        result = lower(*a, **k)
        caught.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = catch
    try:
        dt_ = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[dtype]
        B, H, G, T, keep = 1, 4, 2, 1024, 256

        def loss(q, k, v, dt, e):
            o = dma_pallas(q, k, v, dt, e, interpret=False, keep=keep, sparse=sparse, block_q=block, block_k=block)
            return o.astype(jnp.float32).sum()

        shapes = [((B, H, T, D), dt_), ((B, G, T, D), dt_), ((B, G, T, D), dt_), ((B, G, T), dt_),
                  ((B, G, T), jnp.int32)]
        export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), platforms=["cuda"],
                      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            *(jax.ShapeDtypeStruct(s, d) for s, d in shapes))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    if len(caught) != len(KERNELS):
        raise SystemExit(f"expected {len(KERNELS)} Pallas kernels (forward, dq, key side), caught {len(caught)}")
    return caught


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--configs", nargs="+", default=DEFAULTS, help="dtype,D,dense|sparse[,block] (bf16|fp32)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton_compile_check import ptxas_usage

    from doge_jax.pallas_attention import _params

    print("| dtype | D | kernels | blocks | kernel | warps | stages | registers | spill bytes | shared bytes | wgmma |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    bad = 0
    for spec in args.configs:
        dtype, D, kind, *blk = spec.split(",")
        D, block = int(D), int(blk[0]) if blk else None
        params = _params(D)
        mods = modules(dtype, D, kind == "sparse", block)
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in zip(KERNELS, mods):
                path = os.path.join(tmp, "k.ttir")
                with open(path, "w") as f:
                    f.write(text)
                k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                                   options={"num_warps": params.num_warps, "num_stages": params.num_stages})
                shared = k.metadata.shared
                bad += shared > SMEM_LIMIT_SM90
                regs, spills = ptxas_usage(k.asm["ptx"])
                print(f"| {dtype} | {D} | {kind} | {block or 'default'} | {name} | {params.num_warps} | "
                      f"{params.num_stages} | {regs} | {spills} | {shared} | {'wgmma' in k.asm['ptx']} |", flush=True)
    print(f"sm_90 shared memory per block: {SMEM_LIMIT_SM90} bytes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
