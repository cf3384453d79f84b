"""Block-size sweep of the two DMA flash kernels (doge_torch Triton, doge_jax Pallas; dense and sparse) against flash
causal attention.

For a GPU session after gpu_check.py has shown the kernels run: forward and forward+backward times per block
config at Doge-160M's head shape (batch 1, H 6, G 3, D 128, keep_window 2048, bf16), as ratios to torch's flash
causal sdpa in the same run. Appends the table to benchmarks/RESULTS.md on a GPU.

    PYTHONUNBUFFERED=1 python3 benchmarks/kernel_tune.py --seq 16384 2>&1 | tee $OUT/tune.log

Without a GPU it runs a tiny CPU check of the same code paths (T 128, D 16; the kernels in Triton's interpreter
and Pallas interpret mode: TRITON_INTERPRET=1 is set when no GPU is visible), prints the table and appends
nothing; --seq and --keep apply to the GPU run only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# the bf16 default (128 x 64) first: the first config of each list also gets the SKIP_FULL_TILE_MASK row
CONFIGS = ((128, 64), (128, 128), (64, 64), (128, 32), (64, 32))
# the SPARSE Triton kernels (per-superblock key lists): block_q, block_k, superblock (the first two also in Pallas)
SPARSE_CONFIGS = ((128, 64, 256), (64, 64, 256), (128, 64, 512), (128, 128, 256), (128, 64, 128))


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--keep", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=float, help="seconds: rows after this are listed as skipped")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    import torch  # (does not import triton)

    if not torch.cuda.is_available():  # the Triton kernels run in Triton's interpreter (set before triton's import)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch.nn.functional as F

    import doge_torch.triton_attention as ta
    from doge_jax.attention import key_expiry as jax_key_expiry
    from doge_jax.pallas_attention import dma_pallas
    from doge_torch.model import key_expiry
    from doge_torch.triton_attention import dma_triton

    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    B, H, G = 1, 6, 3
    T, D, keep, configs, sparse_configs = ((args.seq, 128, args.keep, CONFIGS, SPARSE_CONFIGS) if gpu else
                                           (128, 16, 32, ((32, 32), (64, 32)), ((32, 32, 32), (32, 16, 64))))
    dtype = torch.bfloat16 if gpu else torch.float32

    def sync(x=None):
        if gpu:
            torch.cuda.synchronize()
        if x is not None:
            jax.block_until_ready(x)

    rng = np.random.default_rng(0)
    qn, kn, vn = (rng.standard_normal(s).astype(np.float32) for s in ((B, H, T, D), (B, G, T, D), (B, G, T, D)))
    dtn = np.exp(rng.standard_normal((B, G, T))).astype(np.float32)
    don = rng.standard_normal((B, H, T, D)).astype(np.float32)
    q, k, v = (torch.tensor(x, dtype=dtype, device=dev, requires_grad=True) for x in (qn, kn, vn))
    dt = torch.tensor(dtn, device=dev, requires_grad=True)
    do = torch.tensor(don, dtype=dtype, device=dev)
    e = key_expiry(dt.detach(), torch.ones(B, T, dtype=torch.bool, device=dev), keep)
    rows = []
    start = time.perf_counter()
    default_skip = ta.SKIP_FULL_TILE_MASK

    def timed(name, fwd, fwdbwd):
        if args.budget is not None and time.perf_counter() - start > args.budget:
            rows.append((name, "skipped", "budget", None))
        else:
            try:
                f_ms = median_ms(lambda: (fwd(), sync()), args.reps)
                b_ms = median_ms(lambda: (fwdbwd(), sync()), args.reps)
                rows.append((name, f"{f_ms:.3f}", f"{b_ms:.3f}", b_ms))
            except Exception as ex:  # noqa: BLE001 - a config that does not compile or run is a row, not the end
                rows.append((name, "error", f"{type(ex).__name__}: {str(ex).splitlines()[0][:80]}", None))
        print(rows[-1][:3], flush=True)

    def torch_rows(kw_list, label, skip=False):
        """Rows of dma_triton calls; `skip`: with triton_attention.SKIP_FULL_TILE_MASK set during them."""
        def call(fn, kw):
            ta.SKIP_FULL_TILE_MASK = skip
            try:
                return fn(kw)
            finally:
                ta.SKIP_FULL_TILE_MASK = default_skip

        # check=False: e comes from key_expiry (as in the model); the check is a host sync the timing should not pay
        fwd = lambda kw: dma_triton(q, k, v, dt, e, check=False, **kw)  # noqa: E731
        bwd = lambda kw: torch.autograd.grad(dma_triton(q, k, v, dt, e, check=False, **kw), (q, k, v, dt),  # noqa: E731
                                             do)
        for kw in kw_list:
            timed(label(kw) + (" skip-full-tile-mask" if skip else ""), lambda kw=kw: call(fwd, kw),
                  lambda kw=kw: call(bwd, kw))

    jdt_type = jnp.bfloat16 if gpu else jnp.float32
    jq, jk, jv, jdo = (jnp.asarray(x, jdt_type) for x in (qn, kn, vn, don))
    jdt = jnp.asarray(dtn)
    je = jax_key_expiry(jdt, jnp.ones((B, T), bool), keep)

    def jax_rows(kw_list, label):
        for kw in kw_list:
            fwd = jax.jit(lambda q, k, v, dt, kw=kw: dma_pallas(q, k, v, dt, je, **kw))

            def loss(q, k, v, dt, kw=kw):
                return jnp.sum(dma_pallas(q, k, v, dt, je, **kw).astype(jnp.float32) * jdo.astype(jnp.float32))

            grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
            timed(label(kw), lambda fwd=fwd: sync(fwd(jq, jk, jv, jdt)), lambda grad=grad: sync(grad(jq, jk, jv, jdt)))

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def causal(flash: bool):  # flash forced on a GPU (some torch builds rank cuDNN first): the label must be true
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if flash else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    flash = gpu
    try:
        causal(flash)
    except RuntimeError:  # flash refuses these shapes: the default order, labelled so
        flash = False
    timed("torch flash causal sdpa" if flash else "torch causal sdpa (default backend)", lambda: causal(flash),
          lambda: torch.autograd.grad(causal(flash), (q, k, v), do))
    # most informative first (the sparse kernels), so that --budget cuts the least useful rows
    sparse = [dict(block_q=bq, block_k=bk, keep=keep, sparse=True, superblock=sb) for bq, bk, sb in sparse_configs]
    dense = [dict(block_q=bq, block_k=bk, sparse=False) for bq, bk in configs]
    sparse_name = "sparse {block_q}x{block_k} superblock {superblock}".format_map
    dense_name = "{block_q}x{block_k}".format_map
    torch_rows(sparse, lambda kw: "doge_torch Triton " + sparse_name(kw))
    torch_rows(sparse[:1], lambda kw: "doge_torch Triton " + sparse_name(kw), skip=not default_skip)
    jax_rows(sparse[:2], lambda kw: "doge_jax Pallas " + sparse_name(kw))
    torch_rows(dense, lambda kw: "doge_torch Triton " + dense_name(kw))
    torch_rows(dense[:1], lambda kw: "doge_torch Triton " + dense_name(kw), skip=not default_skip)
    jax_rows(dense, lambda kw: "doge_jax Pallas " + dense_name(kw))

    base = rows[0][3]
    card = torch.cuda.get_device_name(0) if gpu else "cpu-check"
    lines = ["| kernel | fwd ms | fwd+bwd ms | fwd+bwd vs flash |", "|---|---|---|---|"]
    for name, f_ms, b_ms, b in rows:
        ratio = f"{b / base:.2f}x" if (b is not None and base) else ""
        lines.append(f"| {name} | {f_ms} | {b_ms} | {ratio} |")
    table = "\n".join(lines)
    dname = str(dtype).replace("torch.", "")
    title = (f"## kernel_tune.py — {datetime.datetime.now():%Y-%m-%d %H:%M} — {card} (T {T}, B {B}, H {H}, G {G}, "
             f"D {D}, keep {keep}, {dname}; torch {torch.__version__}, jax {jax.__version__})")
    print(f"\n{title}\n\n{table}")
    if gpu and not args.no_append:
        with open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), "a") as f:
            f.write(f"\n{title}\n\n{table}\n")
    return 0 if all(r[1] != "error" for r in rows) else 1  # skipped rows are not errors


if __name__ == "__main__":
    sys.exit(main())
