"""Which head-dim layout makes cuDNN's causal attention fastest for DMA at the training shape (a GPU probe).

The fused/folded DMA paths fold the per-key bias into one extra head dim (128 -> 136), and cuDNN then runs its
192-wide kernels: on an H200 the Doge-160M step's attention backward took 4.5x its forward (benchmarks/RESULTS.md,
2026-11-30). Folding the bias into the values instead (softmax(s + b_j) = softmax(s) reweighted by w_j = exp(b_j - c):
attend over [w * v, w], divide by the last column) keeps q and k at 128 and gives v 129 -> 136. This probe times
causal forward+backward for (d_qk, d_v) in CASES at B 16, H 6, G 3, T 2048, bf16 (a Doge-160M layer), through torch's
sdpa with only the cuDNN backend and JAX's cuDNN fused attention (jax.nn.dot_product_attention when d_v == d_qk, the
private cuDNN wrapper otherwise; a refusal is a row), then doge_torch's whole DMA paths at the same shape (the q/k fold
and the value fold through sdpa, FlexAttention with the bias as a score_mod and a causal block mask, the Triton dense
kernel at head dim 128; fold ops, casts and dt's gradient included: the choice for training at T <= keep_window),
and prints one table (appended to RESULTS.md on a GPU).

    python benchmarks/headdim_probe.py            # GPU: ~1-2 min; CPU: a tiny smoke run of the same code
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (d_qk, d_v): plain causal (the floor), today's fold, today's fold without padding v (the q/k fold needs no extra v
# column: by bytes it would spare doge_jax's step ~6.9 GiB of pad/slice traffic, benchmarks/hlo_traffic.py), V-side
# folds, and 192 to see the tile the fold pays for
CASES = ((128, 128), (136, 136), (136, 128), (128, 136), (128, 144), (128, 192), (192, 192))


def median_ms(fn, sync, reps: int) -> float:
    """Median milliseconds of fn() over `reps` calls after two warm-ups."""
    for _ in range(2):
        sync(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def torch_rows(shape, gpu: bool, reps: int) -> list[tuple[str, str]]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, G, T = shape
    dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    backends = [SDPBackend.CUDNN_ATTENTION] if gpu else [SDPBackend.MATH]
    sync = (lambda _: torch.cuda.synchronize()) if gpu else (lambda _: None)
    out = []
    for dq, dv in CASES:
        gen = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, H, T, dq, device=dev, dtype=dtype, generator=gen, requires_grad=True)
        k = torch.randn(B, G, T, dq, device=dev, dtype=dtype, generator=gen, requires_grad=True)
        v = torch.randn(B, G, T, dv, device=dev, dtype=dtype, generator=gen, requires_grad=True)
        do = torch.randn(B, H, T, dv, device=dev, dtype=dtype, generator=gen)

        def fwd(q=q, k=k, v=v):
            with sdpa_kernel(backends), torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def fwd_bwd(q=q, k=k, v=v, do=do):
            with sdpa_kernel(backends):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return torch.autograd.grad(o, (q, k, v), do)

        name = f"torch sdpa {'cuDNN' if gpu else 'math'} d_qk {dq} d_v {dv}"
        try:
            out.append((name, f"{median_ms(fwd, sync, reps):.3f}", f"{median_ms(fwd_bwd, sync, reps):.3f}"))
        except RuntimeError as e:  # cuDNN refuses the shapes (sdpa_kernel allows no fallback)
            out.append((name, "refused: " + str(e).splitlines()[0][:100].replace("|", "/"), ""))
        del q, k, v, do
    return out


def dma_rows(shape, gpu: bool, reps: int) -> list[tuple[str, str, str]]:
    """doge_torch's DMA paths for T <= keep_window at `shape`, compiled (bf16 q, k, v and float32 dt, as under
    autocast; fwd+bwd includes dt's gradient). Off the GPU the folds run through the math kernel (inductor swapped
    for dynamo's eager backend) and the CUDA-only paths are rows saying so."""
    import functools
    from unittest import mock

    import torch

    sys.path.insert(0, ROOT)
    import doge_torch.model as dm
    from doge_torch import DogeConfig
    from doge_torch.triton_attention import dma_triton, triton_available

    B, H, G, T = shape
    D = 128 if gpu else 16
    dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    sync = (lambda _: torch.cuda.synchronize()) if gpu else (lambda _: None)
    cfg = DogeConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=G, keep_window_size=T,
                     max_position_embeddings=T, attention_impl="fused")
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(B, G, T, D, device=dev, dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(B, G, T, D, device=dev, dtype=dtype, generator=gen, requires_grad=True)
    # dt spanning 1..25 per row (a trained model's spread is of this order): the value fold takes rows spanning at
    # most V_FOLD_MAX_SPREAD (60) and falls back to the q/k fold otherwise; exp(randn) over 16 x 3 rows of 2048
    # keys spans more than 60 somewhere most of the time, and the row would time the fallback under its name
    dt = (1.0 + 24.0 * torch.rand(B, G, T, device=dev, generator=gen)).requires_grad_()
    assert float(dt.amax(-1).sub(dt.amin(-1)).max()) <= dm.V_FOLD_MAX_SPREAD
    do = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=gen)
    backend = "inductor" if gpu else "eager"

    def compiled(fn):
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)

    fold = compiled(functools.partial(dm.dma_attention, cfg, allowed=None, mask_dtype=torch.float32))
    flex = compiled(functools.partial(dm.flex_dma, cfg, compute=dtype))
    ok = torch.ones(B, T, dtype=torch.bool, device=dev)

    def triton_dense(q, k, v, dt):
        return dma_triton(q, k, v, dt, dm.key_expiry(dt.detach(), ok, T), keep=T, sparse=False, check=False)

    paths = [("q/k fold (sdpa, compiled)", fold, "qk", True),
             ("value fold (sdpa, compiled)", fold, "v", True),
             ("FlexAttention, bias score_mod + causal block mask (compiled)", flex, "qk", gpu),
             ("Triton dense kernel", triton_dense, "qk", triton_available(dev))]
    out = []
    for name, fn, how, runs in paths:
        name = f"doge_torch DMA {name} d {D}"
        if not runs:
            out.append((name, "not run: CUDA only", ""))
            continue

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(q, k, v, dt)

        def fwd_bwd(fn=fn):
            return torch.autograd.grad(fn(q, k, v, dt), (q, k, v, dt), do)

        try:
            with mock.patch.object(dm, "FUSED_FOLD", how):  # (compiled code guards on it: a graph per fold)
                out.append((name, f"{median_ms(fwd, sync, reps):.3f}", f"{median_ms(fwd_bwd, sync, reps):.3f}"))
        except Exception as e:  # noqa: BLE001 - a failing path is a result, the others still run
            out.append((name, f"failed: {type(e).__name__}: " + str(e).splitlines()[0][:100].replace("|", "/"), ""))
    return out


def jax_rows(shape, gpu: bool, reps: int) -> list[tuple[str, str]]:
    import jax
    import jax.numpy as jnp

    B, H, G, T = shape
    dtype = jnp.bfloat16 if gpu else jnp.float32
    out = []
    for dq, dv in CASES:
        kq, kk, kv, kd = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(kq, (B, T, H, dq), dtype)
        k = jax.random.normal(kk, (B, T, G, dq), dtype)
        v = jax.random.normal(kv, (B, T, G, dv), dtype)
        do = jax.random.normal(kd, (B, T, H, dv), dtype)
        if dq == dv:
            impl = "cudnn" if gpu else "xla"

            def attn(q, k, v, impl=impl):
                return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        elif gpu:  # jax.nn.dot_product_attention wants v shaped as k: the cuDNN wrapper it calls does not
            from jax._src.cudnn.fused_attention_stablehlo import MaskType
            from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

            def attn(q, k, v, dq=dq):
                return cudnn_attention(q, k, v, scale=dq ** -0.5, mask_type=MaskType.CAUSAL, qkv_layout="BTNH")
        else:  # the CPU smoke run: the same contraction written out
            def attn(q, k, v, dq=dq):
                kr, vr = (jnp.repeat(x, H // G, axis=2) for x in (k, v))
                s = jnp.einsum("bqhd,bkhd->bhqk", q, kr) * dq ** -0.5
                s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
                return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), vr)

        fwd = jax.jit(attn)

        def loss(q, k, v, attn=attn, do=do):
            return jnp.sum(attn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        name = f"jax {'cuDNN' if gpu else 'xla'} d_qk {dq} d_v {dv}"
        try:
            f_ms = median_ms(lambda fwd=fwd, q=q, k=k, v=v: fwd(q, k, v), jax.block_until_ready, reps)
            b_ms = median_ms(lambda grad=grad, q=q, k=k, v=v: grad(q, k, v), jax.block_until_ready, reps)
            out.append((name, f"{f_ms:.3f}", f"{b_ms:.3f}"))
        except Exception as e:  # noqa: BLE001 - a refusal (shapes, cuDNN version) is a result
            out.append((name, f"refused: {type(e).__name__}: " + str(e).splitlines()[0][:100].replace("|", "/"), ""))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--reps", type=int, default=10, help="timed calls per row (median)")
    ap.add_argument("--no-append", action="store_true", help="never append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    import jax
    import torch

    gpu = torch.cuda.is_available()
    shape = (16, 6, 3, 2048) if gpu else (1, 2, 1, 32)
    rows = torch_rows(shape, gpu, args.reps) + jax_rows(shape, gpu and jax.default_backend() == "gpu", args.reps)
    rows += dma_rows(shape, gpu, args.reps)
    card = torch.cuda.get_device_name(0) if gpu else "cpu-smoke"
    B, H, G, T = shape
    title = (f"## headdim_probe.py — {datetime.datetime.now():%Y-%m-%d %H:%M} — {card} (B {B}, H {H}, G {G}, T {T}, "
             f"causal, {'bf16' if gpu else 'float32'}; torch {torch.__version__}, jax {jax.__version__})")
    lines = ["| kernel | fwd ms | fwd+bwd ms |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    table = "\n".join(lines)
    print(f"\n{title}\n\n{table}")
    if gpu and not args.no_append:
        with open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), "a") as f:
            f.write(f"\n{title}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
