"""One script that checks and times everything GPU-specific in doge_jax and doge_torch (issue 7), in < 8 minutes.

On a lent GPU machine (device tool `run`, one H100/H200), from the repository root:

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py 2>&1 | tee $OUT/gpu_check.log      # timeout_s 540

It needs only the GPU image's packages (torch 2.11+cu130, jax 0.11.2 + cuda13 plugin, flax, optax, numpy, yaml,
safetensors, ml_dtypes; see the device tool's KINDS.md): nothing to carry but the working tree. It does not
import grain, tensorboardX or matplotlib (transformers only as the training and generation baselines, skipped
without it); `doge_jax.train.make_steps` is used when importable, else
an equivalent step is built from doge_jax.loss + doge_jax.optim. It writes no files except the RESULTS.md append
(and torch/jax compile caches under /tmp: a rerun on the same machine loads its compiled programs, so its
"compile" times are shorter; with --sections profile and $OUT set, the profiles and the doge_jax step's optimized
HLO under $OUT). `--sections attention,train` runs a subset; `--regional none|160m|all`
compiles the torch training model layer by layer instead of as one graph (default: all rows; whole-model inductor
compiles took 72 s for Doge-20M and 190 s for Doge-160M on an H200); `--budget 420` (the default) is the total
wall-clock budget in seconds: the rows the issue asks for (parity, the train targets, the attention core rows,
generation) run while any of it is left, the extra rows (attention comparisons, --probes, profile) only within
their section's share of what is left; a row that would not fit is printed as SKIP.
`--probes` adds the exploratory rows (other attention paths, tiles and layouts; see the sections) to the checks
and targets, which alone are meant to fit the 8 minutes; the RESULTS.md entry says how long each section took.

Sections (one table at the end, one row per check):
  (setup)    before parity/attention/train: each framework's DMA kernels once in a child process (a kernel fault
             poisons the CUDA context); a failure skips that framework's kernel rows, not the whole run.
  parity     a tiny random doge_torch model (random nonzero A, perturbed norms, dynamic RoPE past max positions,
             T > keep_window, a left-padded row) saved with save_pretrained and loaded by both frameworks; logits
             (and loss gradients) on the device against doge_torch's float32 eager reference on the CPU; also
             doge_torch's fast paths on unpadded input: folded-bias causal sdpa (T <= keep_window; also with the
             bias folded into the values, FUSED_FOLD = "v", logits and gradients) and
             FlexAttention (T > keep_window, logits and gradients: its backward exists only on CUDA); CDMoE;
             keep-window ties (A = 0: every dt 1, the lower-index rule decides) on every attention path.
             float32: |diff| <= 1e-4 (TF32 off in torch, `highest` matmul precision in JAX). bf16 (torch autocast,
             JAX bf16 compute = the training step's parameter cast): |diff| <= 2e-2 * max|logit|, on inputs with
             T <= keep_window (bf16-rounded dt near-ties flip keep-window choices; spec §9).
  train      tokens/s and MFU of one optimizer step at seq 2048 for Doge-20M (32 rows) and Doge-160M (16 rows; with
             --probes then with the kernels, doge_torch with sdpa's cuDNN kernel first, both with the bias folded
             into the values (FUSED_FOLD = "v" in doge_jax.attention and doge_torch.model), doge_torch's loss
             chunks as eager ops (doge_torch.loss.COMPILE_CHUNKS = False), doge_jax's loss in 4096-token chunks
             (train.loss_chunk; 1024 by default), doge_jax's byte-saving variants (fewer_bytes), doge_jax's layers
             the other way, and
             32 rows, as budget allows):
             doge_jax bf16 compute with fused attention (make_steps, donated buffers, chunked CE; layers as the
             config says, unrolled in configs/doge-*.yaml), doge_torch bf16
             autocast + torch.compile(fullgraph=True) + fused AdamW (doge_torch.train.train_step).
  attention  forward+backward (grads of q, k, v, dt) at 16k (the target, first), 2k, 8k, 32k keys (the core rows
             at every size first: the causal baselines and each framework's default DMA path), batch 1,
             Doge-160M heads (H 6, G 3, D 128), keep_window 2048, bf16: torch sdpa plain causal (flash; the 1.00x
             baseline; also cuDNN's), doge_torch's Triton kernels
             (sparse key lists from T >= 2 keep_window, dense; the model path compiled at 16k), its fast path
             (compiled: folded-bias causal sdpa at T <= keep_window, FlexAttention with the key-expiry block mask
             beyond) and its dense-bias sdpa path (eager), doge_jax pallas (Triton kernels, sparse and dense) /
             blockwise / fused (folded-bias cuDNN), and JAX cuDNN plain causal. With --probes also 64 x 64 tiles
             at 16k, doge_torch's dense kernels with SKIP_FULL_TILE_MASK flipped, and at 2k doge_torch's folded
             path with sdpa's cuDNN kernel first and both frameworks' v-side fold.
  generate   doge_jax generate tokens/s (Doge-20M shape, 32-token prompt, 128 new tokens, greedy, batch 1 and 8)
             as a ratio to transformers' generate (sdpa, same checkpoint, same device), and doge_torch eager
             generate at batch 1.
  profile    (opt-in) Doge-160M's training step: doge_jax's under jax.profiler and doge_torch's under
             torch.profiler, device time by kernel category; a doge_jax forward / grad / step breakdown.

Status: PASS/FAIL (correctness), MET/MISSED (performance targets: Doge-160M >= 40% MFU, Doge-20M >= 400k tokens/s,
DMA fwd+bwd at 16k <= 1.5x causal flash), ERROR (the check raised), OOM (out of device memory: a result, not a
failure), SKIP (budget: fewer than a row's minimum seconds left when it would start, or a failed kernel smoke test;
the last line counts them), '-' (information). The exit code is 1 if any row is FAIL or ERROR (MISSED targets do not
fail it). The budget is checked before each item, so a run can exceed it by its last item.

Without a GPU (or with --cpu) the same code paths run at tiny sizes (configs/tiny.yaml, seq 128, 2 timed steps,
attention at 256/512 keys with keep_window 128, 16 new tokens) in about a minute; torch.compile then uses
dynamo's `eager` backend (the fullgraph capture is the same; inductor codegen takes minutes on 2 cores). The
device column says "cpu-fallback" and nothing is appended to RESULTS.md unless --append.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import gzip
import importlib.util
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SECTIONS = ("parity", "attention", "train", "generate")
OPT_IN = ("profile",)  # run only when named in --sections
SHARE = {"parity": 0.25, "train": 0.45, "attention": 0.3, "generate": 0.1, "profile": 0.3}
F32_TOL = 1e-4
BF16_REL_TOL = 2e-2
GRAD_REL_TOL = 1e-4
TARGET_MFU_160M = 0.40
TARGET_TOKS_20M = 400e3
TARGET_DMA_16K = 1.5
JAX_CACHE = os.path.join(tempfile.gettempdir(), "gpu_check_jax_cache")  # compiled programs, kept across runs


class Budget:
    def __init__(self, total: float):
        self.t0, self.total = time.perf_counter(), total
        self.section_end = self.t0 + total

    def start(self, share: float, remaining_shares: float) -> None:
        now = time.perf_counter()
        left = self.t0 + self.total - now
        self.section_end = now + left * share / max(remaining_shares, share)

    def left(self, core: bool = False) -> float:
        """Seconds left for a row: an extra row (--probes rows, attention comparisons, profile) has the section's
        share; a core row (what issue 7 asks: parity, the train targets, the attention core rows, generation) the
        whole budget, so an earlier section that ran over its share costs the extras, not a later section's core."""
        return (self.t0 + self.total if core else self.section_end) - time.perf_counter()


class Report:
    def __init__(self, device: str):
        self.rows: list[list[str]] = []
        self.device = device

    def add(self, section: str, check: str, measured: str, target: str = "", status: str = "-",
            device: str | None = None) -> None:
        row = [str(x).replace("|", "/") for x in (section, check, device or self.device, measured, target, status)]
        self.rows.append(row)
        print(f"  [{status}] {section}: {check}: {measured} {('(target ' + target + ')') if target else ''}",
              flush=True)

    def failed(self) -> bool:
        return any(r[5] in ("FAIL", "ERROR") for r in self.rows)

    def table(self) -> str:
        head = ["section", "check", "device", "measured", "target", "status"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def guarded(report: Report, section: str, check: str):
    """Context manager: an exception becomes an ERROR row (section goes on with its next item)."""

    @contextlib.contextmanager
    def cm():
        try:
            yield
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            if "out of memory" in str(e).lower() or "RESOURCE_EXHAUSTED" in str(e):
                report.add(section, check, "out of memory", status="OOM")
            else:
                traceback.print_exc()
                report.add(section, check, msg.replace("|", "/"), status="ERROR")

    return cm()


# ---- helpers ------------------------------------------------------------------------------------------------------
def save_entry(entry: str, results: str, out: str | None) -> list[str]:
    """Append the RESULTS.md entry to `results` and, when `out` (the device tool's $OUT, the only folder that comes
    back from the GPU machine) is a directory, to out/gpu_check_results.md; the paths written."""
    paths = [results] + ([os.path.join(out, "gpu_check_results.md")] if out and os.path.isdir(out) else [])
    for path in paths:
        with open(path, "a") as f:
            f.write(entry)
    return paths


def tiny_parity_config():
    from doge_jax.config import DogeConfig

    return DogeConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, keep_window_size=32,
                      rope_type="dynamic", rope_factor=4.0, tie_word_embeddings=False, pad_token_id=None,
                      bos_token_id=None, eos_token_id=None)


def perturb_(model, seed: int = 0, scale: float = 0.1) -> None:
    """As tests/conftest.perturb_: A ~ N(0, 1), norms/residuals ~ 1 + N(0, scale), biases ~ N(0, scale/5)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith(".A"):
                p.copy_(noise)
            elif name.endswith("norm.weight") or name.endswith("_residual"):
                p.copy_(1.0 + scale * noise)


def unique_ids(B: int, T: int, vocab: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(vocab)[:T] for _ in range(B)]).astype(np.int64)


def max_abs(a, b) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def rel_norm(got: dict, want: dict) -> float:
    import numpy as np

    keys = sorted(want)
    missing = [k for k in keys if k not in got]
    if missing:
        raise KeyError(f"gradient keys missing: {missing[:3]}")
    g = np.concatenate([np.asarray(got[k], np.float64).ravel() for k in keys])
    w = np.concatenate([np.asarray(want[k], np.float64).ravel() for k in keys])
    return float(np.linalg.norm(g - w) / np.linalg.norm(w))


def tcompile(model_or_fn, cpu: bool, **kw):
    import torch

    return torch.compile(model_or_fn, fullgraph=True, backend="eager" if cpu else "inductor", **kw)


def sync(x=None):
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if x is not None and hasattr(x, "block_until_ready"):
        x.block_until_ready()


def time_queued(fn, steps: int, warmup: int = 1) -> float:
    """Mean seconds per call of `steps` back-to-back calls of fn() with one sync at the end (training steps: the
    host queues the next step while the device runs this one, as in a training loop that logs now and then)."""
    for _ in range(warmup):
        sync(fn())
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn()
    sync(out)
    return (time.perf_counter() - t0) / steps


def time_fn(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of fn() (which must return something to block on, or sync itself)."""
    for _ in range(warmup):
        out = fn()
        sync(out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        sync(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- kernel smoke tests (child processes) --------------------------------------------------------------------------
# A fault in a custom kernel (an illegal address) poisons the CUDA context for every later call in the process, JAX's
# included. So each framework's DMA kernels first run once in a child process; where that fails, this process skips
# every row that would run them and goes on with the rest. framework -> why.
KERNEL_FAULTS: dict[str, str] = {}


def faulted(report: Report, section: str, check: str, framework: str) -> bool:
    """True (and a SKIP row) when `framework`'s ("triton" or "pallas") kernels failed their smoke test."""
    why = KERNEL_FAULTS.get(framework)
    if why is not None:
        report.add(section, check, f"not run: the {framework} kernel smoke test failed ({why})", status="SKIP")
    return why is not None


def kernel_smoke(report: Report, cpu: bool, timeout: float) -> None:
    """Run `--kernel-smoke FW` for both frameworks in child processes; a failure fills KERNEL_FAULTS."""
    import subprocess

    for fw, what in (("triton", "doge_torch Triton"), ("pallas", "doge_jax Pallas")):
        check = f"{what} kernels smoke test (own process: dense + sparse, forward + backward)"
        cmd = [sys.executable, os.path.abspath(__file__), "--kernel-smoke", fw] + (["--cpu"] if cpu else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
            ok = [line for line in proc.stdout.splitlines() if line.startswith(f"SMOKE {fw} OK ")]
            if proc.returncode == 0 and ok:
                report.add("setup", check, f"{ok[-1].split(' OK ', 1)[1]}, {time.perf_counter() - t0:.0f}s",
                           status="PASS")
                continue
            lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
            why = lines[-1].strip()[:160] if lines else f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            why = f"no answer in {timeout:.0f}s"
        KERNEL_FAULTS[fw] = why
        report.add("setup", check, why, status="FAIL")


# what the smoke test runs: the defaults and the block-size probe of the attention section (a fault in either would
# poison the main process)
# the reference is the first: dense 64 x 64 tiles (the default before 16-bit inputs got 128 x 64)
VARIANTS = (("dense 64x64", dict(sparse=False, block_q=64, block_k=64)), ("dense", dict(sparse=False)),
            ("sparse", dict(sparse=True)), ("sparse 64x64", dict(sparse=True, block_q=64, block_k=64)))


def kernel_smoke_child(fw: str, cpu: bool) -> int:
    """`--kernel-smoke triton|pallas` (a child of `kernel_smoke`): that framework's DMA kernels once, dense and
    sparse (T >= 2 keep_window), forward and backward, bf16 with GQA and head dim 128 (float32 and tiny under
    --cpu, in Triton's interpreter / Pallas interpret mode); both must be finite and agree (the same function).
    Prints 'SMOKE <fw> OK ...'."""
    import numpy as np

    if os.environ.get("GPU_CHECK_BREAK_KERNELS") == fw:  # tests: a smoke test that fails
        raise RuntimeError(f"{fw} kernels broken on purpose (GPU_CHECK_BREAK_KERNELS)")
    B, H, G, D, T, keep = (1, 4, 2, 16, 64, 16) if cpu else (1, 4, 2, 128, 1024, 256)
    rng = np.random.default_rng(0)
    qn = rng.standard_normal((B, H, T, D)).astype(np.float32)
    kn, vn = (rng.standard_normal((B, G, T, D)).astype(np.float32) for _ in range(2))
    dtn = np.exp(rng.standard_normal((B, G, T))).astype(np.float32)
    don = rng.standard_normal((B, H, T, D)).astype(np.float32)
    outs = {}
    if fw == "triton":
        if cpu:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        import torch

        from doge_torch.model import key_expiry
        from doge_torch.triton_attention import dma_triton

        dev, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.bfloat16)
        for name, kw in VARIANTS:
            q, k, v = (torch.tensor(x, dtype=dtype, device=dev, requires_grad=True) for x in (qn, kn, vn))
            dt = torch.tensor(dtn, device=dev, requires_grad=True)  # float32, as under autocast
            e = key_expiry(dt.detach(), torch.ones(B, T, dtype=torch.bool, device=dev), keep)
            o = dma_triton(q, k, v, dt, e, keep=keep, **kw)
            grads = torch.autograd.grad(o, (q, k, v, dt), torch.tensor(don, dtype=dtype, device=dev))
            outs[name] = [x.detach().float().cpu().numpy() for x in (o, *grads)]
    else:
        import jax
        import jax.numpy as jnp

        from doge_jax.attention import key_expiry
        from doge_jax.pallas_attention import dma_pallas

        # a second run on the same machine (gpu_check split in two calls) reuses the compiled kernels, as
        # Triton's own cache does for doge_torch's
        jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

        dtype = jnp.float32 if cpu else jnp.bfloat16
        q, k, v, dt = (jnp.asarray(x, dtype) for x in (qn, kn, vn, dtn))
        for name, kw in VARIANTS:
            def f(q, k, v, dt, kw=kw):
                return dma_pallas(q, k, v, dt, key_expiry(dt, jnp.ones((B, T), bool), keep), keep=keep, **kw)

            o, vjp = jax.vjp(jax.jit(f), q, k, v, dt)
            outs[name] = [np.asarray(x, np.float32) for x in (o, *vjp(jnp.asarray(don, dtype)))]
    worst = 0.0
    for variant, _ in VARIANTS[1:]:
        for name, a, b in zip(("o", "dq", "dk", "dv", "d(dt)"), outs[VARIANTS[0][0]], outs[variant]):
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise FloatingPointError(f"{variant}: {name} is not finite")
            worst = max(worst, float(np.abs(a - b).max() / max(float(np.abs(a).max()), 1e-6)))
    tol = 1e-4 if cpu else 5e-2
    if worst > tol:
        raise AssertionError(f"sparse and dense kernels differ by {worst:.1e} of max|dense| (> {tol:g})")
    print(f"SMOKE {fw} OK dense (default blocks), sparse (default, 64x64) vs dense 64x64 kernels {worst:.1e} of "
          "max|value|", flush=True)
    return 0


# ---- (a) parity ---------------------------------------------------------------------------------------------------
def section_parity(report: Report, budget: Budget, cpu: bool, tdev, jdev_label: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    import doge_jax
    import doge_torch
    from doge_jax.hf import to_hf_arrays
    from doge_jax.model import with_attention_impl
    from doge_torch.model import flex_available
    from doge_torch.triton_attention import triton_available

    S = "parity"
    cfg = tiny_parity_config()
    torch.manual_seed(0)
    src = doge_torch.DogeForCausalLM(cfg)
    perturb_(src)
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # saved test models
    src.save_pretrained(tmp)

    # fp32 input: T = 48 > keep_window 32 (key expiry) and > max_position_embeddings 32 (dynamic RoPE), row 1
    # left-padded; bf16 input: T = 32 <= keep_window.
    ids_a = unique_ids(2, 48, cfg.vocab_size, 1)
    mask_a = np.ones_like(ids_a)
    mask_a[1, :5] = 0
    labels_a = np.where(mask_a == 1, ids_a, -100)
    ids_b = unique_ids(2, 32, cfg.vocab_size, 2)
    mask_b = np.ones_like(ids_b)  # the folds with padding keys (row 1 left-padded)
    mask_b[1, :5] = 0
    labels_bp = np.where(mask_b == 1, ids_b, -100)

    ref = doge_torch.DogeForCausalLM.from_pretrained(tmp, config=cfg.replace(attention_impl="reference")).eval()
    ta, tm, tl, tb, tmb, tlb = (torch.as_tensor(x) for x in (ids_a, mask_a, labels_a, ids_b, mask_b, labels_bp))
    out = ref(ta, attention_mask=tm, labels=tl)
    out.loss.backward()
    ref_grads = {n: p.grad.numpy().copy() for n, p in ref.named_parameters()}
    ref_a = out.logits.detach().numpy()
    # unpadded T = 80 > 2 keep_window: doge_torch's FlexAttention path on CUDA (the dense-bias path elsewhere) and
    # the sparse Triton kernels with attention_impl="pallas"
    ids_c = unique_ids(2, 80, cfg.vocab_size, 3)
    ref.zero_grad(set_to_none=True)
    out_c = ref(torch.as_tensor(ids_c), labels=torch.as_tensor(ids_c))
    out_c.loss.backward()
    ref_grads_c = {n: p.grad.numpy().copy() for n, p in ref.named_parameters()}
    ref_c = out_c.logits.detach().numpy()
    ref.zero_grad(set_to_none=True)
    out_b = ref(tb, labels=tb)  # unpadded T = keep_window: the folded paths
    out_b.loss.backward()
    ref_grads_b = {n: p.grad.numpy().copy() for n, p in ref.named_parameters()}
    ref_b = out_b.logits.detach().numpy()
    ref.zero_grad(set_to_none=True)
    out_bp = ref(tb, attention_mask=tmb, labels=tlb)  # padded T = keep_window: the folds with padding keys
    out_bp.loss.backward()
    ref_grads_bp = {n: p.grad.numpy().copy() for n, p in ref.named_parameters()}
    ref_bp = out_bp.logits.detach().numpy()
    scale_b = float(np.abs(ref_b).max())
    f32_t = f"<= {F32_TOL:g}"
    bf16_t = f"<= {BF16_REL_TOL:g}"

    def f32_row(check, diff):
        report.add(S, check, f"max abs diff {diff:.2e}", f32_t, "PASS" if diff <= F32_TOL else "FAIL")

    def bf16_row(check, diff):
        report.add(S, check, f"max abs diff / max abs logit {diff / scale_b:.2e}", bf16_t,
                   "PASS" if diff <= BF16_REL_TOL * scale_b else "FAIL")

    def grad_row(check, rel):
        report.add(S, check, f"rel. L2 grad error {rel:.2e}", f"<= {GRAD_REL_TOL:g}",
                   "PASS" if rel <= GRAD_REL_TOL else "FAIL")

    # -- doge_torch on the device (float32 rows in true float32; the previous TF32 settings come back after them)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tmodel = doge_torch.DogeForCausalLM.from_pretrained(tmp).to(tdev).eval()  # attention_impl auto: sdpa
    dev = lambda x: x.to(tdev)  # noqa: E731
    def torch_rows(what, model, ids, want, want_grads, padding=None, owner=None):
        """Logits and loss gradients of `model` on the device against the CPU float32 reference (`padding`: the
        (attention_mask, labels) pair; `owner` holds the parameters when `model` is a compiled wrapper)."""
        x = dev(torch.as_tensor(ids))
        mask, labels = (dev(padding[0]), dev(padding[1])) if padding is not None else (None, x)
        o = model(x, attention_mask=mask, labels=labels)
        o.loss.backward()
        owner = owner or model
        f32_row(f"{what} logits", max_abs(o.logits.detach().cpu(), want))
        grad_row(f"{what} loss gradients", rel_norm({n: p.grad.cpu().numpy() for n, p in owner.named_parameters()},
                                                    want_grads))
        owner.zero_grad(set_to_none=True)

    flex = "FlexAttention" if flex_available(tdev) else "sdpa+bias"
    with guarded(report, S, f"doge_torch fp32 {flex} with padding"):
        torch_rows(f"doge_torch fp32 {flex} (T>keep_window, padding, dynamic RoPE)", tmodel, ids_a, ref_a, ref_grads,
                   padding=(tm, tl))
    with guarded(report, S, "doge_torch fp32 folded causal sdpa"):
        with torch.no_grad():
            lb = tmodel(dev(tb)).logits.cpu().numpy()
        f32_row("doge_torch fp32 folded-bias causal sdpa logits (T<=keep_window)", max_abs(lb, ref_b))
    with guarded(report, S, "doge_torch fp32 folded sdpa with padding"):
        torch_rows("doge_torch fp32 folded sdpa (T<=keep_window, padding)", tmodel, ids_b, ref_bp, ref_grads_bp,
                   padding=(tmb, tlb))
    with guarded(report, S, "doge_torch fp32 v-side fold"), fused_fold("v"):
        torch_rows("doge_torch fp32 folded sdpa, v-side fold (T<=keep_window)", tmodel, ids_b, ref_b, ref_grads_b)
        torch_rows("doge_torch fp32 folded sdpa, v-side fold (T<=keep_window, padding)", tmodel, ids_b, ref_bp,
                   ref_grads_bp, padding=(tmb, tlb))
    with guarded(report, S, f"doge_torch fp32 {flex}"):
        torch_rows(f"doge_torch fp32 {flex} (T>keep_window, no padding)", tmodel, ids_c, ref_c, ref_grads_c)
    kern = "Triton kernel" if triton_available(tdev) else "sdpa (kernel needs CUDA)"
    km = doge_torch.DogeForCausalLM.from_pretrained(tmp, config=cfg.replace(attention_impl="pallas")).to(tdev)
    uses_triton = triton_available(tdev)
    if not (uses_triton and faulted(report, S, f"doge_torch fp32 {kern}", "triton")):
        with guarded(report, S, f"doge_torch fp32 {kern}"):
            sparse = ": sparse kernels" if uses_triton else ""
            torch_rows(f"doge_torch fp32 {kern} (T>2 keep_window{sparse}, no padding)", km, ids_c, ref_c,
                       ref_grads_c)
            torch_rows(f"doge_torch fp32 {kern} (T>keep_window, padding)", km, ids_a, ref_a, ref_grads,
                       padding=(tm, tl))
    if budget.left(core=True) > (3 if cpu else 20):
        with guarded(report, S, "doge_torch fp32 compiled"):
            torch_rows("doge_torch fp32 torch.compile(fullgraph)", tcompile(tmodel, cpu), ids_a, ref_a, ref_grads,
                       padding=(tm, tl), owner=tmodel)
    else:
        report.add(S, "doge_torch fp32 compiled", "budget", status="SKIP")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32  # (before: TF32 on for the rest)
    # "fused": the sdpa paths in bf16 on the CPU too (where "auto" runs the eager reference in reduced precision)
    fmodel = doge_torch.DogeForCausalLM.from_pretrained(tmp, config=cfg.replace(attention_impl="fused")).to(tdev)
    with guarded(report, S, "doge_torch bf16 autocast"):
        with torch.no_grad(), torch.autocast(tdev.type, dtype=torch.bfloat16):
            lb = fmodel.eval()(dev(tb)).logits.float().cpu().numpy()
        bf16_row("doge_torch bf16 autocast (sdpa) logits", max_abs(lb, ref_b))
        with torch.no_grad(), torch.autocast(tdev.type, dtype=torch.bfloat16):
            lb = fmodel(dev(tb), attention_mask=dev(tmb)).logits.float().cpu().numpy()
        bf16_row("doge_torch bf16 autocast (sdpa) logits, padding", max_abs(lb, ref_bp))
    with guarded(report, S, "doge_torch bf16 autocast v-side fold"), fused_fold("v"):
        with torch.no_grad(), torch.autocast(tdev.type, dtype=torch.bfloat16):
            lb = fmodel(dev(tb)).logits.float().cpu().numpy()
        bf16_row("doge_torch bf16 autocast (sdpa, v-side fold) logits", max_abs(lb, ref_b))
    if not (uses_triton and faulted(report, S, f"doge_torch bf16 autocast {kern}", "triton")):
        with guarded(report, S, f"doge_torch bf16 autocast {kern}"):
            with torch.no_grad(), torch.autocast(tdev.type, dtype=torch.bfloat16):
                lb = km(dev(tb)).logits.float().cpu().numpy()
            bf16_row(f"doge_torch bf16 autocast {kern} logits", max_abs(lb, ref_b))
    with guarded(report, S, "doge_torch pure bf16"):
        m16 = doge_torch.DogeForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).to(tdev).eval()
        with torch.no_grad():
            lb = m16(dev(tb)).logits.float().cpu().numpy()
        bf16_row("doge_torch bf16 weights logits", max_abs(lb, ref_b))
    with guarded(report, S, "doge_torch train_step(sync=False) host syncs"):
        what = "doge_torch train_step(sync=False), 2 micro-batches from the CPU: host syncs"
        n = host_syncs_of_step(tmp, tdev, torch.as_tensor(ids_b))
        if n is None:
            report.add(S, what, "sync debug mode needs CUDA (the step ran)", status="SKIP")
        else:
            report.add(S, what, f"{n} synchronizing CUDA calls", "0", "PASS" if n == 0 else "FAIL")
    with guarded(report, S, "doge_torch train_step(sync=False) v-side fold host syncs"), fused_fold("v"):
        # information: torch.cond's predicate (does dt span <= V_FOLD_MAX_SPREAD?) is read on the host
        what = "doge_torch train_step(sync=False), v-side fold (torch.cond per layer): host syncs"
        n = host_syncs_of_step(tmp, tdev, torch.as_tensor(ids_b))
        if n is not None:
            report.add(S, what, f"{n} synchronizing CUDA calls")

    # -- doge_jax on the device
    jmodel = doge_jax.DogeForCausalLM.from_pretrained(tmp)
    graphdef, state = nnx.split(jmodel, nnx.Param)
    ja, jm, jl, jb, jmb = (jnp.asarray(x) for x in (ids_a, mask_a, labels_a, ids_b, mask_b))
    with jax.default_matmul_precision("highest"):
        for impl in ("reference", "blockwise", "pallas", "auto"):
            if impl == "pallas" and faulted(report, S, f"doge_jax fp32 {impl}", "pallas"):
                continue
            with guarded(report, S, f"doge_jax fp32 {impl}"):
                m = with_attention_impl(nnx.merge(graphdef, state), impl)
                lg = nnx.jit(lambda m, i, k: m(i, attention_mask=k).logits)(m, ja, jm)
                f32_row(f"doge_jax fp32 {impl} logits (T>keep_window, padding)", max_abs(lg, ref_a))
        for fold in ("qk", "v"):
            name = "fused" if fold == "qk" else "fused (v-side fold)"
            with guarded(report, S, f"doge_jax fp32 {name}"), fused_fold(fold):
                m = with_attention_impl(nnx.merge(graphdef, state), "fused")
                lg = nnx.jit(lambda m, i: m(i).logits)(m, jb)
                f32_row(f"doge_jax fp32 {name} logits (T<=keep_window)", max_abs(lg, ref_b))
                lg = nnx.jit(lambda m, i, k: m(i, attention_mask=k).logits)(m, jb, jmb)
                f32_row(f"doge_jax fp32 {name} logits (T<=keep_window, padding)", max_abs(lg, ref_bp))
        if not faulted(report, S, "doge_jax fp32 pallas sparse", "pallas"):
            with guarded(report, S, "doge_jax fp32 pallas sparse"):  # T = 80 >= 2 keep_window, no padding
                jc = jnp.asarray(ids_c)
                gd = nnx.split(with_attention_impl(nnx.merge(graphdef, state), "pallas"), nnx.Param)[0]
                lg = jax.jit(lambda st: nnx.merge(gd, st)(jc).logits)(state)
                f32_row("doge_jax fp32 pallas logits (T>2 keep_window: sparse kernels, no padding)",
                        max_abs(lg, ref_c))
                grads = jax.jit(jax.grad(lambda st: nnx.merge(gd, st)(jc, labels=jc).loss))(state)
                flat = {tuple(str(p) for p in path): (v[...] if hasattr(v, "__getitem__") else v.value)
                        for path, v in nnx.to_flat_state(grads)}
                grad_row("doge_jax fp32 pallas sparse loss gradients", rel_norm(to_hf_arrays(flat), ref_grads_c))
        for impl in ("blockwise", "pallas"):
            if impl == "pallas" and faulted(report, S, f"doge_jax fp32 {impl} gradients", "pallas"):
                continue
            with guarded(report, S, f"doge_jax fp32 {impl} gradients"):
                gd = nnx.split(with_attention_impl(nnx.merge(graphdef, state), impl), nnx.Param)[0]

                def loss(st, gd=gd):
                    return nnx.merge(gd, st)(ja, attention_mask=jm, labels=jl).loss

                grads = jax.jit(jax.grad(loss))(state)
                flat = {tuple(str(p) for p in path): (v[...] if hasattr(v, "__getitem__") else v.value)
                        for path, v in nnx.to_flat_state(grads)}
                grad_row(f"doge_jax fp32 {impl} loss gradients", rel_norm(to_hf_arrays(flat), ref_grads))
    for impl, fold in (("fused", "qk"), ("fused", "v"), ("blockwise", "qk"), ("pallas", "qk")):
        if impl == "pallas" and faulted(report, S, f"doge_jax bf16 {impl}", "pallas"):
            continue
        name = impl if fold == "qk" else f"{impl} (v-side fold)"
        with guarded(report, S, f"doge_jax bf16 {name}"), fused_fold(fold):
            st16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                state)
            m = with_attention_impl(nnx.merge(graphdef, st16), impl)
            lg = nnx.jit(lambda m, i: m(i).logits.astype(jnp.float32))(m, jb)
            bf16_row(f"doge_jax bf16 compute {name} logits", max_abs(lg, ref_b))
    with guarded(report, S, "MoE"):
        moe_parity(report, tdev, ids_b, f32_row, grad_row)
    if budget.left(core=True) < (3 if cpu else 20):
        report.add(S, "keep-window ties", "budget", status="SKIP")
    else:
        with guarded(report, S, "keep-window ties"):
            tie_parity(report, tdev, tmp, cfg, ids_c, f32_row)


def tie_parity(report: Report, tdev, path: str, cfg, ids, f32_row) -> None:
    """Keep-window ties on the device: with A = 0 every dt is exactly 1, so which keys a query keeps beyond
    keep_window is decided by the tie rule alone (lower key index wins, spec §9.1; both packages). Each path's
    float32 logits at T > 2 keep_window against doge_torch's CPU reference: doge_jax's keep_top_k (lax.top_k's
    k-th value, ties broken by a cumsum) and key-expiry paths, doge_torch's key expiry (a stable sort on the
    device). The rule was untested on a GPU before."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import doge_jax
    import doge_torch
    from doge_jax.model import with_attention_impl
    from doge_torch.triton_attention import triton_available

    S = "parity"
    ties = tempfile.mkdtemp(prefix="gpu_check_ties_")
    atexit.register(shutil.rmtree, ties, ignore_errors=True)
    src = doge_torch.DogeForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name.endswith(".A"):
                p.zero_()
    src.save_pretrained(ties)
    ref = doge_torch.DogeForCausalLM.from_pretrained(ties, config=cfg.replace(attention_impl="reference")).eval()
    with torch.no_grad():
        want = ref(torch.as_tensor(ids)).logits.numpy()
    what = "ties (A=0: every dt 1; T>2 keep_window) logits"
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        impls = ["auto"] + (["pallas"] if triton_available(tdev) and not faulted(report, S, "ties Triton",
                                                                                  "triton") else [])
        for impl in impls:
            with guarded(report, S, f"doge_torch fp32 {impl} ties"), torch.no_grad():
                m = doge_torch.DogeForCausalLM.from_pretrained(ties, config=cfg.replace(attention_impl=impl))
                got = m.to(tdev).eval()(torch.as_tensor(ids).to(tdev)).logits.cpu().numpy()
                f32_row(f"doge_torch fp32 {impl} {what}", max_abs(got, want))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    jmodel = doge_jax.DogeForCausalLM.from_pretrained(ties)
    jids = jnp.asarray(ids)
    with jax.default_matmul_precision("highest"):
        for impl in ("reference", "blockwise", "pallas"):
            if impl == "pallas" and faulted(report, S, "doge_jax fp32 pallas ties", "pallas"):
                continue
            with guarded(report, S, f"doge_jax fp32 {impl} ties"):
                m = with_attention_impl(jmodel, impl)
                got = nnx.jit(lambda m, i: m(i).logits)(m, jids)
                f32_row(f"doge_jax fp32 {impl} {what}", max_abs(got, want))


def moe_parity(report: Report, tdev, ids, f32_row, grad_row) -> None:
    """CDMoE on the device (k x k corner routing, aux loss as a product of softmaxes, rematerialised experts under
    torch.utils.checkpoint / jax.checkpoint) against the CPU float32 reference: logits and gradients of CE + aux in
    both frameworks, and bf16 autocast logits in doge_torch (autocast through the checkpoint's recompute)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    import doge_jax
    import doge_torch
    from doge_jax.hf import to_hf_arrays

    S = "parity"
    cfg = tiny_parity_config().replace(is_moe=True, num_experts=64, num_experts_per_tok=4,
                                       output_router_logits=True, router_aux_loss_coef=0.1)
    torch.manual_seed(1)
    src = doge_torch.DogeForCausalLM(cfg)
    perturb_(src, seed=1)
    tmp = tempfile.mkdtemp(prefix="gpu_check_moe_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # saved test models
    src.save_pretrained(tmp)
    ref = doge_torch.DogeForCausalLM.from_pretrained(tmp, config=cfg.replace(attention_impl="reference"))
    x = torch.as_tensor(ids)
    out = ref(x, labels=x)
    out.loss.backward()
    want_logits = out.logits.detach().numpy()
    want_grads = {n: p.grad.numpy().copy() for n, p in ref.named_parameters()}
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        tm = doge_torch.DogeForCausalLM.from_pretrained(tmp).to(tdev).train()  # train(): the experts rematerialise
        xd = x.to(tdev)
        o = tm(xd, labels=xd)
        o.loss.backward()
        f32_row("doge_torch fp32 MoE (aux loss) logits", max_abs(o.logits.detach().cpu(), want_logits))
        grad_row("doge_torch fp32 MoE (aux loss) loss gradients",
                 rel_norm({n: p.grad.cpu().numpy() for n, p in tm.named_parameters()}, want_grads))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    # bf16 logits are not compared: a bf16 router picks another expert for some tokens (a discrete change; seen
    # 1 of 64 tokens, 3e-2 of max|logit| on the CPU), so the step's loss and gradients are checked instead
    tm.zero_grad(set_to_none=True)
    with torch.autocast(tdev.type, dtype=torch.bfloat16):
        o = tm(xd, labels=xd)
    o.loss.backward()
    want_loss = float(out.loss)
    rel = abs(float(o.loss) - want_loss) / abs(want_loss)
    g = {n: p.grad.float().cpu().numpy() for n, p in tm.named_parameters()}
    finite = all(np.isfinite(v).all() for v in g.values())
    report.add(S, "doge_torch bf16 autocast MoE training step (experts recomputed under autocast)",
               f"loss rel. diff {rel:.2e}, gradient rel. L2 {rel_norm(g, want_grads):.2e}, "
               f"{'all finite' if finite else 'NON-FINITE gradients'}", f"loss <= {BF16_REL_TOL:g}, finite",
               "PASS" if rel <= BF16_REL_TOL and finite else "FAIL")
    jm = doge_jax.DogeForCausalLM.from_pretrained(tmp)
    graphdef, state = nnx.split(jm, nnx.Param)
    jx = jnp.asarray(ids)
    with jax.default_matmul_precision("highest"):
        lg = jax.jit(lambda st: nnx.merge(graphdef, st)(jx).logits)(state)
        f32_row("doge_jax fp32 MoE (aux loss) logits", max_abs(lg, want_logits))
        grads = jax.jit(jax.grad(lambda st: nnx.merge(graphdef, st)(jx, labels=jx).loss))(state)
    flat = {tuple(str(p) for p in path): (v[...] if hasattr(v, "__getitem__") else v.value)
            for path, v in nnx.to_flat_state(grads)}
    grad_row("doge_jax fp32 MoE (aux loss) loss gradients", rel_norm(to_hf_arrays(flat), want_grads))


def host_syncs_of_step(path: str, tdev, ids) -> int | None:
    """Synchronizing CUDA calls during one doge_torch `train_step(sync=False)` (bf16 autocast, fused AdamW, two
    micro-batches held on the CPU, after a warm-up step), counted with torch's sync debug mode; None off CUDA."""
    import warnings

    import torch

    import doge_torch
    from doge_torch.train import train_step

    model = doge_torch.DogeForCausalLM.from_pretrained(path).to(tdev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=tdev.type == "cuda")
    mbs = [(ids, ids), (ids.flip(0), ids.flip(0))]
    step = lambda: train_step(model, opt, None, mbs, 1.0, torch.bfloat16, sync=False)  # noqa: E731
    out = step()
    if tdev.type != "cuda":
        assert isinstance(out["loss"], torch.Tensor)
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        print(f"  sync: {str(w.message).splitlines()[0][:160]}")
    return len(sync_warnings(str(w.message) for w in caught))


def sync_warnings(messages) -> list[str]:
    """The warnings of torch's sync debug mode that report a synchronizing call ("called a synchronizing CUDA
    operation"); not its notice that the mode is a prototype ("... does not yet detect all synchronizing
    operations"), which torch 2.11 gives when the mode is switched on and which once counted as a sync."""
    return [m for m in messages if "called a synchronizing CUDA operation" in m]


# ---- (b) training throughput --------------------------------------------------------------------------------------
def train_configs(cpu: bool):
    from doge_jax.config import DogeConfig

    if cpu:
        tiny = DogeConfig.from_yaml(os.path.join(ROOT, "configs", "tiny.yaml"))
        return [("tiny (as Doge-160M)", tiny, 128, 2, "160m")]  # one: both rows would run the same code
    # micro-batches of 64k / 32k tokens: a sensible size for one GPU (the recipe's 1.5M-token step accumulates them)
    return [("Doge-20M", DogeConfig.from_yaml(os.path.join(ROOT, "configs", "doge-20m.yaml")), 2048, 32, "20m"),
            ("Doge-160M", DogeConfig.from_yaml(os.path.join(ROOT, "configs", "doge-160m.yaml")), 2048, 16, "160m")]


def _jax_step(cfg, seq: int, rows: int, loss_chunk: int = 1024):
    """(step(params, opt_state, batch) -> (params, opt_state, metrics), params, opt_state): bf16 compute."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from doge_jax.loss import IGNORE, DogeTrunk, causal_lm_loss_chunked, shift_targets
    from doge_jax.optim import decay_mask, make_optimizer

    graphdef, state = nnx.split(DogeTrunk(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(state)
    tx = make_optimizer(optax.constant_schedule(1e-3), mask=decay_mask)
    opt_state = tx.init(params)
    try:
        from doge_jax.train import make_steps
        from doge_jax.train_config import TrainConfig

        tcfg = TrainConfig(seq_len=seq, global_batch_tokens=seq * rows, compute_dtype="bfloat16",
                           loss_chunk=loss_chunk)
        jstep = make_steps(graphdef, tx, cfg, tcfg)[0]

        def step(p, o, b):
            return jstep(p, o, b, 0)

        step.lower, step.extra = (lambda p, o, b: jstep.lower(p, o, b, 0)), (0,)  # for AOT compiles (profile)
        return step, params, opt_state, "make_steps"
    except Exception as e:  # noqa: BLE001 - doge_jax.train unimportable here: the same step, built directly
        print(f"  (doge_jax.train.make_steps unavailable: {type(e).__name__}: {e}; using the built-in step)")

    def loss_fn(p, ids, num_items):
        p = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, p)
        model = nnx.merge(graphdef, p)
        h = model(ids).logits
        w, vocab_major = model.head_weight()
        labels = ids if cfg.pad_token_id is None else jnp.where(ids == cfg.pad_token_id, IGNORE, ids)
        return causal_lm_loss_chunked(h, w, labels, num_items, vocab_major, loss_chunk)

    def step(p, o, batch):
        ids = batch[0]
        num_items = jnp.sum(shift_targets(ids) != IGNORE)
        loss, g = jax.value_and_grad(loss_fn)(p, ids, num_items)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, {"loss": loss}

    jstep = jax.jit(step, donate_argnums=(0, 1))
    jstep.extra = ()
    return jstep, params, opt_state, "built-in step"


def torch_train_setup(base, tdev, cpu: bool, regional: bool):
    """(model, the module to call, optimizer) for a doge_torch bf16 training step: fused AdamW on CUDA; the model
    compiled whole with fullgraph, or layer by layer (`regional`: one graph shared by the identical decoder layers,
    a much shorter compile)."""
    import torch

    from doge_torch.model import DogeForCausalLM
    from doge_torch.optim import make_optimizer

    torch.manual_seed(0)
    model = DogeForCausalLM(base).to(tdev).train()
    opt = make_optimizer(model, 1e-3)  # fused AdamW when the parameters are on CUDA
    # dynamic=False: the 2x-rows row gets its own static graph, not a dynamic-shape recompile of the warm one
    if not regional:
        return model, tcompile(model, cpu, dynamic=False), opt
    for layer in model.model.layers:
        layer.compile(fullgraph=True, backend="eager" if cpu else "inductor", dynamic=False)
    return model, model, opt


def cudnn_refuses(head_dim: int, tdev, v_dim: int | None = None, gqa: bool = False) -> str | None:
    """Why torch's sdpa cuDNN kernel alone cannot run causal bf16 forward+backward at `head_dim` (the folded-bias
    path pads 128 to 136; the v-side fold keeps q/k at 128 and gives v `v_dim` 136), with grouped kv heads
    (enable_gqa) if `gqa`, or None. With only cuDNN enabled a refusal raises instead of silently running another
    kernel (flash; for the v-side fold, whose head dims differ, the mem-efficient kernel or with gqa the math one)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if tdev.type != "cuda":
        return "no CUDA"
    mk = lambda h, d: torch.randn(1, h, 128, d, device=tdev, dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v = mk(4, head_dim), mk(2 if gqa else 4, head_dim), mk(2 if gqa else 4, v_dim or head_dim)
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).sum().backward()
        torch.cuda.synchronize()
        return None
    except RuntimeError as e:
        dims = f"head dims {head_dim}/{v_dim}" if v_dim else f"head dim {head_dim}"
        return f"{dims}{' with grouped kv heads' if gqa else ''}: {str(e).splitlines()[0][:100]}"


def hf_train_rate(base, tdev, batch, warm: int, timed: int) -> tuple[float, str]:
    """(tokens/s, note) of transformers' own DogeForCausalLM (sdpa, eager, bf16 autocast, fused AdamW, clip 1.0)
    on `batch`: the training baseline. Out of memory, the same step as 2, 4 or 8 accumulated micro-batches."""
    import torch
    import transformers

    torch.manual_seed(0)
    hc = transformers.DogeConfig(**base.to_hf_dict())
    model = transformers.DogeForCausalLM._from_config(hc, attn_implementation="sdpa").to(tdev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01,
                            fused=tdev.type == "cuda")
    tb = torch.as_tensor(batch).to(tdev)
    for parts in (1, 2, 4, 8):
        if len(batch) % parts:
            break
        mbs = tb.chunk(parts)

        def run(mbs=mbs, parts=parts):
            for mb in mbs:
                with torch.autocast(tdev.type, torch.bfloat16):
                    loss = model(input_ids=mb, labels=mb).loss / parts
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        try:
            loss0 = float(run()) * parts
            sec = time_queued(run, timed, warmup=warm - 1)
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        split = "" if parts == 1 else f", {parts} accumulated micro-batches"
        return tb.numel() / sec, f"transformers {transformers.__version__} sdpa eager{split}, loss {loss0:.2f}"
    raise torch.OutOfMemoryError(f"transformers step out of memory even as {parts} micro-batches")


@contextlib.contextmanager
def torch_sdpa_order(names):
    """doge_torch's sdpa backend priority (doge_torch.model.set_sdpa_backends) inside the block, if `names`."""
    from doge_torch.model import set_sdpa_backends

    set_sdpa_backends(names)
    try:
        yield
    finally:
        set_sdpa_backends(None)


def section_train(report: Report, budget: Budget, cpu: bool, tdev, peak: float, regional: str,
                  only: tuple[str, ...] = (), probes: bool = False) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from doge_jax.metrics import flops_per_token
    from doge_torch.train import train_step

    S = "train"
    warm, timed = (1, 2) if cpu else (2, 6)
    ran = [0]  # framework rows that passed --train-only

    def one(label, base, seq, rows, kind, jax_row=True, sdpa_backends=None, hf_row=False, torch_row=True,
            fold="qk", compiled_ce=True, loss_chunk=1024, fewer=False, core=False):
        # --train-only: a framework's row runs only if "label framework seq S x R rows" has every term (and none of
        # the ~terms)
        hf_row, jax_row, torch_row = (on and train_row_wanted(f"{label} {fw} seq {seq} x {rows} rows", only)
                                      for on, fw in ((hf_row, "transformers"), (jax_row, "doge_jax"),
                                                     (torch_row, "doge_torch")))
        ran[0] += hf_row + jax_row + torch_row
        fpt = flops_per_token(base, seq)
        tokens = seq * rows
        batch = np.random.default_rng(0).integers(3, base.vocab_size, (rows, seq), dtype=np.int64)
        hf_tps = None

        def row(framework: str, sec: float, note: str):
            tps = tokens / sec
            mfu = tps * fpt / peak
            vs = "" if hf_tps is None else f"{tps / hf_tps:.2f}x transformers, "
            measured = f"{tps:,.0f} tok/s, MFU {100 * mfu:.1f}% ({vs}{note})"
            if kind == "160m":
                status = "MET" if mfu >= TARGET_MFU_160M else "MISSED"
                target = f">= {100 * TARGET_MFU_160M:.0f}% MFU"
            else:
                status = "MET" if tps >= TARGET_TOKS_20M else "MISSED"
                target = f">= {TARGET_TOKS_20M / 1e3:.0f}k tok/s"
            report.add(S, f"{label} {framework} seq {seq} x {rows} rows", measured, target,
                       "-" if cpu else status)

        if hf_row and importlib.util.find_spec("transformers") is None:
            report.add(S, f"{label} transformers", "not installed (no baseline)", status="SKIP")
        elif hf_row and budget.left(core) < (5 if cpu else 45):
            report.add(S, f"{label} transformers", "budget", status="SKIP")
        elif hf_row:
            with guarded(report, S, f"{label} transformers seq {seq} x {rows} rows"):
                hf_tps, note = hf_train_rate(base, tdev, batch, warm, timed)
                report.add(S, f"{label} transformers bf16 autocast seq {seq} x {rows} rows",
                           f"{hf_tps:,.0f} tok/s, MFU {100 * hf_tps * fpt / peak:.1f}% ({note}; the baseline)")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

        kernels = base.attention_impl == "pallas"
        if not jax_row or (kernels and faulted(report, S, f"{label} doge_jax", "pallas")):
            pass
        elif budget.left(core) < (5 if cpu else 40):
            report.add(S, f"{label} doge_jax", "budget", status="SKIP")
        else:
            with guarded(report, S, f"{label} doge_jax seq {seq} x {rows} rows"), fused_fold(fold), \
                    fewer_bytes(fewer):
                cfg = base.replace(attention_impl="fused") if base.attention_impl == "auto" else base
                step, params, opt_state, how = _jax_step(cfg, seq, rows, loss_chunk)
                jb = jnp.asarray(batch, jnp.int32)[None]
                holder = {"p": params, "o": opt_state}

                def run():
                    holder["p"], holder["o"], m = step(holder["p"], holder["o"], jb)
                    return m["loss"]

                t0 = time.perf_counter()
                loss0 = float(run())
                comp = time.perf_counter() - t0
                sec = time_queued(run, timed, warmup=warm - 1)
                if not math.isfinite(loss0):
                    raise FloatingPointError(f"loss {loss0}")
                row(f"doge_jax bf16 {cfg.attention_impl}", sec,
                    f"{how}, {timed} queued steps, compile {comp:.0f}s, loss {loss0:.2f}")
        jax.clear_caches()

        if not torch_row or (kernels and tdev.type == "cuda" and faulted(report, S, f"{label} doge_torch", "triton")):
            return
        if budget.left(core) < (5 if cpu else 60):
            report.add(S, f"{label} doge_torch", "budget", status="SKIP")
            return
        with (guarded(report, S, f"{label} doge_torch seq {seq} x {rows} rows"), torch_sdpa_order(sdpa_backends),
              fused_fold(fold), compiled_loss_chunks(compiled_ce)):
            model, cm, opt = torch_train_setup(base, tdev, cpu, regional == "all" or (regional == "160m"
                                                                                  and kind == "160m"))
            tb = torch.as_tensor(batch)
            mb = [{"input_ids": tb, "labels": tb}]

            def trun():  # no host sync per step: the timing's final sync waits for the queued steps
                return train_step(cm, opt, None, mb, 1.0, torch.bfloat16, sync=False)

            if tdev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(tdev)
            t0 = time.perf_counter()
            m0 = {k: float(v) for k, v in trun().items()}
            comp = time.perf_counter() - t0
            sec = time_queued(trun, timed, warmup=warm - 1)
            fused = "fused AdamW" if opt.defaults.get("fused") else "AdamW"
            # peak memory of the step (the loss stores no [tokens, vocab] logits: doge_torch.loss)
            peak_gb = f", peak {torch.cuda.max_memory_allocated(tdev) / 2**30:.1f} GiB" if tdev.type == "cuda" else ""
            row("doge_torch bf16 autocast compiled" + (" (regional)" if cm is model else ""), sec,
                f"{fused}, {timed} queued steps, compile {comp:.0f}s, loss {m0['loss']:.2f}{peak_gb}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    configs = train_configs(cpu)
    for args in configs:
        one(*args, hf_row=True, core=True)
    def refused(label, seq, rows, why) -> bool:
        """A wanted doge_torch row whose cuDNN shapes `why()` says cuDNN refuses: a SKIP row (a row --train-only
        matched) instead of a silent fallback to another kernel."""
        name = f"{label} doge_torch seq {seq} x {rows} rows"
        reason = None if cpu or not train_row_wanted(name, only) else why()
        if reason:
            ran[0] += 1
            report.add(S, name, f"not run: cuDNN refuses {reason}", status="SKIP")
        return reason is not None

    if probes:
        train_probes(one, refused, cpu, tdev, *configs[-1])
    if only and not ran[0]:
        hint = "" if probes else " (the probe rows, [...], run only with --probes)"
        report.add(S, f"--train-only {','.join(only)}", "matched no train row" + hint, status="FAIL")


def train_probes(one, refused, cpu: bool, tdev, label, base, seq, rows, kind) -> None:
    """--probes: the Doge-160M rows other ways, after the targets, as budget allows."""
    # the Triton/Pallas kernels in training (T = keep_window: causal + bias)
    one(label + " [pallas/Triton kernels]", base.replace(attention_impl="pallas"), seq, rows, kind)
    # sdpa's cuDNN kernel first for the folded attention (JAX's fused path uses cuDNN), if cuDNN takes the folded
    # head dim at all (else sdpa would silently run flash and the row would repeat the first one)
    folded = -(-(base.head_size + 1) // 8) * 8
    gqa = base.num_dt_heads != base.num_attention_heads  # (both folds: kv heads grouped when dt has G heads)
    if not refused(label + " [sdpa cuDNN first]", seq, rows, lambda: cudnn_refuses(folded, tdev, gqa=gqa)):
        one(label + " [sdpa cuDNN first]", base, seq, rows, kind, jax_row=False, sdpa_backends=["cudnn"])
    # the bias folded into the values (q/k keep head dim 128): doge_jax's fused path (cuDNN) and doge_torch's
    # folded sdpa path (sdpa's cuDNN kernel first: flash needs equal head dims), if cuDNN takes those shapes
    no_torch = refused(label + " [v-side fold]", seq, rows,
                       lambda: cudnn_refuses(base.head_size, tdev, v_dim=folded, gqa=gqa))
    one(label + " [v-side fold]", base, seq, rows, kind, fold="v", torch_row=not no_torch)
    # doge_torch without a fold: FlexAttention at T <= keep_window too (the bias as its score_mod, a causal block
    # mask, head dim 128; on the CPU, where FlexAttention has no backward, the q/k fold runs: the first row again)
    one(label + " [FlexAttention, no fold]", base, seq, rows, kind, fold="flex", jax_row=False)
    # doge_torch's loss with its per-chunk softmax and gradient as eager ops (the default compiles them on CUDA)
    one(label + " [eager loss chunks]", base, seq, rows, kind, jax_row=False, compiled_ce=False)
    # doge_jax's loss in 4096-token chunks instead of 1024: 6.75 GiB less traffic per step (benchmarks/hlo_traffic.py,
    # H100 compile: the chunks' dW accumulator and per-chunk launches), 512 MB of float32 logits at a time
    one(label + " [loss_chunk 4096]", base, seq, rows, kind, torch_row=False, loss_chunk=4096)
    # doge_jax's byte-saving variants together (-15.7 GiB per step by hlo_traffic.py: v not padded for the fold's
    # cuDNN call, the CE's logsumexp in one pass, gate and up as one matmul; see fewer_bytes)
    one(label + " [fewer bytes]", base, seq, rows, kind, torch_row=False, fewer=True)
    # doge_jax with its decoder layers the other way (scanned or unrolled: the GPU configs unroll them)
    other = "[scanned layers]" if not base.scan_layers else "[unrolled layers]"
    one(f"{label} {other}", base.replace(scan_layers=not base.scan_layers), seq, rows, kind, torch_row=False)
    # a micro-batch twice as large: how much of the gap is per-step overhead (launches, optimizer, host syncs)
    if not cpu:  # on the CPU the same code as the first rows
        one(label, base, seq, 2 * rows, kind)


def compiled_loss_chunks(on: bool):
    """doge_torch.loss.COMPILE_CHUNKS (the loss's per-chunk softmax and gradient compiled on CUDA) inside."""
    from doge_torch import loss

    return mock.patch.object(loss, "COMPILE_CHUNKS", on)


@contextlib.contextmanager
def fused_fold(fold: str):
    """doge_jax's fused attention and doge_torch's folded sdpa path fold the bias into q/k ("qk", the default) or
    into the values ("v") while inside (read when a step is traced: the rows build and compile their steps inside;
    torch's compiled code guards on it)."""
    import doge_torch.model
    from doge_jax import attention

    with mock.patch.object(attention, "FUSED_FOLD", fold), mock.patch.object(doge_torch.model, "FUSED_FOLD", fold):
        yield


@contextlib.contextmanager
def fewer_bytes(on: bool):
    """doge_jax's byte-saving variants (attention.FUSED_V_UNPADDED, loss.ONE_PASS_LSE, model.FUSED_GATE_UP; off by
    default) on while inside (read when the step is traced)."""
    from doge_jax import attention, loss, model

    with mock.patch.object(attention, "FUSED_V_UNPADDED", on), mock.patch.object(loss, "ONE_PASS_LSE", on), \
            mock.patch.object(model, "FUSED_GATE_UP", on):
        yield


def train_row_wanted(name: str, terms: tuple[str, ...]) -> bool:
    """--train-only: `name` has every term and none of the ~terms (case-insensitive)."""
    low = name.lower()
    return all((t[1:] not in low) if t.startswith("~") else (t in low) for t in terms)


# ---- (c) attention ------------------------------------------------------------------------------------------------
BASELINE = "torch sdpa causal (flash)"
BASELINE_DEFAULT = "torch sdpa causal (default backend)"


def section_attention(report: Report, budget: Budget, cpu: bool, tdev, probes: bool = False) -> None:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from doge_jax.attention import MaskInfo, attention
    from doge_jax.attention import key_expiry as jkey_expiry
    from doge_jax.config import DogeConfig
    from doge_jax.pallas_attention import dma_pallas
    from doge_torch import triton_attention
    from doge_torch.model import (
        V_FOLD_MAX_SPREAD,
        allowed_mask,
        dma_attention,
        flex_available,
        key_expiry,
        set_sdpa_backends,
    )
    from doge_torch.triton_attention import dma_triton, triton_available

    # in the CPU fallback the kernel runs only under Triton's interpreter (TRITON_INTERPRET=1 before import)
    kernel_interpreted = (triton_attention.triton is not None
                          and type(triton_attention._fwd_kernel).__name__ == "InterpretedFunction")

    S = "attention"
    B, H, G, D = 1, 6, 3, 128
    keep = 128 if cpu else 2048
    # the target size first; one T <= keep_window (CPU: 256 = 2 keep_window already runs the sparse kernels)
    sizes = (256, 128) if cpu else (16384, 2048, 8192, 32768)
    cfg = DogeConfig(vocab_size=256, hidden_size=H * D, intermediate_size=256, num_hidden_layers=1,
                     num_attention_heads=H, num_key_value_heads=G, keep_window_size=keep,
                     max_position_embeddings=keep)
    on_gpu = jax.default_backend() == "gpu"
    # "fused": the sdpa paths (folded bias, FlexAttention), which "auto" leaves for the Triton kernels past 4 windows
    dma_fast = tcompile(functools.partial(dma_attention, cfg.replace(attention_impl="fused")), cpu, dynamic=False)
    dma_kernels = tcompile(functools.partial(dma_attention, cfg.replace(attention_impl="pallas")), cpu, dynamic=False)
    times_at = {T: {} for T in sizes}  # T -> {row: seconds}, in the order the rows ran

    def one(T, core_pass):
        """The rows at T of one pass: first the core rows at every T (the causal baselines and each framework's
        default DMA path: what the issue asks at 2k, 8k, 16k, 32k), then the rest, so the budget never spends
        on comparisons what the core rows at a later T need."""
        reps = 2 if cpu else (5 if T <= 8192 else 3)
        rng = np.random.default_rng(T)
        qn = rng.standard_normal((B, H, T, D)).astype(np.float32)
        kn = rng.standard_normal((B, G, T, D)).astype(np.float32)
        vn = rng.standard_normal((B, G, T, D)).astype(np.float32)
        dtn = np.exp(rng.standard_normal((B, G, T))).astype(np.float32)
        don = rng.standard_normal((B, H, T, D)).astype(np.float32)
        times = times_at[T]

        def cell(name, fn, probe=False, core=False):
            if core != core_pass or (probe and not probes):  # another pass's row; an exploratory row: --probes
                return
            fw = "triton" if "Triton" in name else ("pallas" if "pallas" in name else None)
            if fw and faulted(report, S, f"T={T} {name}", fw):
                return
            if budget.left(core) < (2 if cpu else 15):
                report.add(S, f"T={T} {name}", "budget", status="SKIP")
                return
            try:
                with guarded(report, S, f"T={T} {name}"):
                    times[name] = time_fn(fn, reps)
                    row(T, name)  # said at once: a later fault or kill must not lose it
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

        # torch
        bf = torch.bfloat16
        q = torch.tensor(qn, dtype=bf, device=tdev, requires_grad=True)
        k = torch.tensor(kn, dtype=bf, device=tdev, requires_grad=True)
        v = torch.tensor(vn, dtype=bf, device=tdev, requires_grad=True)
        dt = torch.tensor(dtn, device=tdev, requires_grad=True)  # float32, as under autocast (spec §9.9)
        do = torch.tensor(don, dtype=bf, device=tdev)

        def t_causal(q=q, k=k, v=v, do=do, backends=None):
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return torch.autograd.grad(o, (q, k, v), do)[0]

        def t_dma(fn, q=q, k=k, v=v, dt=dt, do=do, T=T):
            allowed = allowed_mask(cfg, B, T, 0, None, q.device)
            o = fn(q, k, v, dt, allowed, torch.float32)
            return torch.autograd.grad(o, (q, k, v, dt), do)[0]

        def t_fast(q=q, k=k, v=v, dt=dt, do=do):  # allowed None: folded-bias flash (T <= keep) / FlexAttention
            o = dma_fast(q, k, v, dt, None, torch.float32)
            return torch.autograd.grad(o, (q, k, v, dt), do)[0]

        def t_causal_cudnn(q=q, k=k, v=v, do=do):  # kv heads repeated outside: cuDNN may not take enable_gqa
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return torch.autograd.grad(o, (q, k, v), do)[0]

        # (dt capped so that no row spans more than V_FOLD_MAX_SPREAD: else the q/k fold runs under the cell's name)
        dt_v = dt.detach().clamp_max(V_FOLD_MAX_SPREAD).requires_grad_()

        def t_fast_v(q=q, k=k, v=v, dt=dt_v, do=do):  # the bias folded into the values (cuDNN first by itself)
            with fused_fold("v"):
                o = dma_fast(q, k, v, dt, None, torch.float32)  # dynamo guards on FUSED_FOLD: its own graph
            return torch.autograd.grad(o, (q, k, v, dt), do)[0]

        def t_fast_cudnn(q=q, k=k, v=v, dt=dt, do=do):  # the folded path with sdpa's cuDNN kernel first
            set_sdpa_backends(["cudnn"])
            try:
                o = dma_fast(q, k, v, dt, None, torch.float32)  # dynamo guards on the order: its own graph
            finally:
                set_sdpa_backends(None)
            return torch.autograd.grad(o, (q, k, v, dt), do)[0]

        fast = "folded causal sdpa" if T <= keep else ("FlexAttention" if flex_available(q.device) else "sdpa+bias")
        # the baseline is flash itself (some torch builds rank cuDNN first); the default order where flash refuses
        flash = [SDPBackend.FLASH_ATTENTION]
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA")
            sync(t_causal(backends=flash))
        except RuntimeError:
            flash = None
        cell(BASELINE if flash else BASELINE_DEFAULT, functools.partial(t_causal, backends=flash), core=True)
        if torch.cuda.is_available():  # cuDNN's flash kernel
            kh, vh = (x.detach().repeat_interleave(H // G, 1).requires_grad_() for x in (k, v))
            cell("torch sdpa causal (cuDNN, kv heads repeated)", functools.partial(t_causal_cudnn, k=kh, v=vh))
            del kh, vh
            if T <= keep and probes and not core_pass:
                why = cudnn_refuses(-(-(D + 1) // 8) * 8, q.device, gqa=G != H)
                if why:
                    report.add(S, f"T={T} doge_torch DMA folded causal sdpa, cuDNN first",
                               f"not run: cuDNN refuses the folded {why}", status="SKIP")
                else:
                    cell("doge_torch DMA folded causal sdpa, cuDNN first (compiled)", t_fast_cudnn, probe=True)
        if T <= keep and probes and flex_available(q.device):
            def t_fast_flex(q=q, k=k, v=v, dt=dt, do=do):  # no fold: FlexAttention (score_mod bias, causal blocks)
                with fused_fold("flex"):
                    o = dma_fast(q, k, v, dt, None, torch.float32)  # dynamo guards on FUSED_FOLD: its own graph
                return torch.autograd.grad(o, (q, k, v, dt), do)[0]

            cell("doge_torch DMA FlexAttention, no fold (compiled)", t_fast_flex, probe=True)
        if T <= keep and probes and not core_pass:
            why = cudnn_refuses(D, q.device, v_dim=-(-(D + 1) // 8) * 8, gqa=G != H) if not cpu else None
            if why:
                report.add(S, f"T={T} doge_torch DMA folded causal sdpa, v-side fold",
                           f"not run: cuDNN refuses {why}", status="SKIP")
            else:
                cell("doge_torch DMA folded causal sdpa, v-side fold (compiled)", t_fast_v, probe=True)
        if triton_available(q.device) or kernel_interpreted:
            def t_model(q=q, k=k, v=v, dt=dt, do=do):  # the model's path: expiry, key lists, kernels, compiled
                o = dma_kernels(q, k, v, dt, None, torch.float32)
                return torch.autograd.grad(o, (q, k, v, dt), do)[0]

            e = key_expiry(dt.detach(), torch.ones(B, T, dtype=torch.bool, device=q.device), keep)

            def t_kernel(q=q, k=k, v=v, dt=dt, do=do, e=e, **kw):  # kernels only (key lists included)
                o = dma_triton(q, k, v, dt, e, keep=keep, check=False, **kw)  # e from key_expiry: no sync check
                return torch.autograd.grad(o, (q, k, v, dt), do)[0]

            def t_kernel_skip(**kw):
                with mock.patch.object(triton_attention, "SKIP_FULL_TILE_MASK", not skip_default):
                    return t_kernel(**kw)

            skip_default = triton_attention.SKIP_FULL_TILE_MASK
            which = ("Triton kernels (" + ("sparse" if T >= 2 * keep else "dense") if triton_available(q.device)
                     else "impl pallas (no CUDA: sdpa")
            if T == sizes[0]:  # one inductor compile (expiry, key lists, kernels), at the target size
                cell(f"doge_torch DMA {which}; model path, compiled)", t_model, core=True)
            if T > keep:  # per-superblock key lists: about keep_window keys per query block instead of all
                cell("doge_torch DMA Triton sparse (kernels only)", functools.partial(t_kernel, sparse=True),
                     core=True)
            cell("doge_torch DMA Triton dense (kernels only)", functools.partial(t_kernel, sparse=False))
            if T <= keep:  # the training case: every tile below the diagonal is full (no mask needed)
                cell(f"doge_torch DMA Triton dense, SKIP_FULL_TILE_MASK={not skip_default} (kernels only)",
                     functools.partial(t_kernel_skip, sparse=False), probe=True)
            if T == sizes[0]:  # a block-size probe at the target size: 64-query blocks (bf16's default is 128)
                cell("doge_torch DMA Triton sparse 64x64 blocks (kernels only)",
                     functools.partial(t_kernel, sparse=True, block_q=64, block_k=64), probe=True)
            del e
        # (the fast path is `auto`'s choice up to 4 keep_windows, the Triton kernels' beyond)
        cell(f"doge_torch DMA {fast} (compiled)", t_fast, core=T <= 4 * keep)
        cell("doge_torch DMA sdpa+bias (eager)", functools.partial(t_dma, functools.partial(dma_attention, cfg)))
        del q, k, v, dt, do
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

        # jax
        jq, jk, jv = (jnp.asarray(x, jnp.bfloat16) for x in (qn, kn, vn))
        jdt, jdo = jnp.asarray(dtn, jnp.bfloat16), jnp.asarray(don, jnp.bfloat16)

        def jgrad(impl, dt=None):
            def f(q, k, v, dt):
                o = attention(q, k, v, dt, MaskInfo(), keep, impl=impl)
                return jnp.sum(o.astype(jnp.float32) * jdo.astype(jnp.float32))

            g = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))
            dt = jdt if dt is None else dt
            return lambda: g(jq, jk, jv, dt)[0]

        def jcausal():
            impl = "cudnn" if on_gpu else None
            tq, tk, tv = (x.transpose(0, 2, 1, 3) for x in (jq, jk, jv))

            def f(q, k, v):
                o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
                return jnp.sum(o.astype(jnp.float32) * jdo.transpose(0, 2, 1, 3).astype(jnp.float32))

            g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
            return lambda: g(tq, tk, tv)[0]

        cell("jax causal (cudnn)" if on_gpu else "jax causal (xla)", jcausal(), core=True)
        def jpallas(**kw):
            def f(q, k, v, dt):
                e = jkey_expiry(dt, jnp.ones((B, T), bool), keep)
                o = dma_pallas(q, k, v, dt, e, keep=keep, **kw)
                return jnp.sum(o.astype(jnp.float32) * jdo.astype(jnp.float32))

            g = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))
            return lambda: g(jq, jk, jv, jdt)[0]

        if T > keep:
            cell("doge_jax DMA pallas (sparse)", jpallas(sparse=True), core=True)
        cell("doge_jax DMA pallas (dense)", jpallas(sparse=False))
        if T == sizes[0]:  # a block-size probe at the target size: 64-query blocks (bf16's default is 128)
            cell("doge_jax DMA pallas (sparse) 64x64 blocks", jpallas(sparse=True, block_q=64, block_k=64),
                 probe=True)
        cell("doge_jax DMA blockwise", jgrad("blockwise"))
        if T <= keep:
            cell("doge_jax DMA fused", jgrad("fused"), core=True)
            with fused_fold("v"):  # its own jit, traced (so folded) on its first call in the cell
                # (dt capped as in the torch cell: no row may span more than the value fold takes)
                cell("doge_jax DMA fused (v-side fold)", jgrad("fused", jnp.minimum(jdt, V_FOLD_MAX_SPREAD)),
                     probe=True)
        jax.clear_caches()

    def row(T, name):
        """The table row of a timed cell, as a ratio to that size's baseline (a core cell: timed first)."""
        times = times_at[T]
        sec = times[name]
        base = times.get(BASELINE) or times.get(BASELINE_DEFAULT)
        what = "causal flash" if BASELINE in times else "causal sdpa"
        ratio = f", {sec / base:.2f}x {what}" if base else ""
        target, status = "", "-"
        if T == 16384 and "DMA" in name and base:
            target = f"<= {TARGET_DMA_16K}x"
            status = "MET" if sec / base <= TARGET_DMA_16K else "MISSED"
        report.add(S, f"T={T} {name} fwd+bwd", f"{1e3 * sec:.2f} ms{ratio}", target, "-" if cpu else status)

    for core_pass in (True, False):
        for T in sizes:
            # (a failure outside the cells, e.g. the inputs at 32k, is that size's row: the other sizes still run)
            with guarded(report, S, f"T={T} {'core rows' if core_pass else 'comparisons'}"):
                one(T, core_pass)


# ---- (d) generation -----------------------------------------------------------------------------------------------
def section_generate(report: Report, budget: Budget, cpu: bool, tdev) -> None:
    """Greedy generation tokens/s of one random checkpoint in doge_jax (compiled decode loop), transformers (sdpa,
    the baseline, when importable) and doge_torch (eager, and its static-cache compiled step:
    `static_torch_generation`), float32 on the device; as ratios to transformers, and whether the tokens agree
    (information: random weights can have near-ties)."""
    import jax
    import numpy as np
    import torch

    import doge_jax
    import doge_torch
    from doge_jax.config import DogeConfig

    S = "generate"
    name = "tiny.yaml" if cpu else "doge-20m.yaml"
    cfg = DogeConfig.from_yaml(os.path.join(ROOT, "configs", name))
    prompt, new = (16, 16) if cpu else (32, 128)
    least = 2 if cpu else 10
    torch.manual_seed(0)
    path = tempfile.mkdtemp(prefix="gpu_check_gen_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)  # saved test models
    doge_torch.DogeForCausalLM(cfg).save_pretrained(path)
    model = doge_jax.DogeForCausalLM.from_pretrained(path)
    try:
        import transformers

        hf = transformers.DogeForCausalLM.from_pretrained(path, attn_implementation="sdpa").to(tdev).eval()
        hf.generation_config.eos_token_id = None  # as doge_jax's eos_token_id=-1: EOS is an ordinary token here
    except Exception as e:  # noqa: BLE001 - the baseline is optional (not in every image)
        print(f"  (transformers baseline unavailable: {type(e).__name__}: {e})")
        hf = None
    hf_rates = {}
    for B in (1, 8):
        if budget.left(core=True) < least:
            report.add(S, f"batch {B}", "budget", status="SKIP")
            continue
        ids = np.random.default_rng(B).integers(3, cfg.vocab_size, (B, prompt))
        hf_rate, hf_out = None, None
        if hf is not None:
            with guarded(report, S, f"transformers batch {B}"):
                t_ids = torch.as_tensor(ids).to(tdev)

                def hf_gen(t_ids=t_ids):
                    with torch.no_grad():
                        return hf.generate(t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=new,
                                           do_sample=False, pad_token_id=cfg.pad_token_id)
                hf_out = hf_gen().cpu().numpy()  # also the warm-up
                sec = time_fn(hf_gen, 2, warmup=0)  # median of 2, as doge_jax's
                hf_rate = hf_rates[B] = B * new / sec
                report.add(S, f"transformers {transformers.__version__} sdpa fp32 batch {B}, {prompt}+{new} tokens",
                           f"{hf_rate:,.0f} tok/s (baseline)")
        # float32 as transformers' (TF32 off): JAX's default GPU matmul precision is TF32
        with guarded(report, S, f"doge_jax batch {B}"), jax.default_matmul_precision("highest"):
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new, eos_token_id=-1, do_sample=False)
            first = time.perf_counter() - t0
            assert out.shape == (B, prompt + new), out.shape
            sec = time_fn(lambda ids=ids: model.generate(ids, max_new_tokens=new, eos_token_id=-1, do_sample=False), 2,
                          warmup=0)
            vs = "" if hf_rate is None else (f", {B * new / sec / hf_rate:.2f}x transformers, same tokens: "
                                             f"{'yes' if np.array_equal(np.asarray(out), hf_out) else 'no'}")
            report.add(S, f"doge_jax fp32 batch {B}, {prompt}+{new} tokens",
                       f"{B * new / sec:,.0f} tok/s (first call {first:.1f}s{vs})")
    if budget.left(core=True) < least:
        report.add(S, "doge_torch batch 1", "budget", status="SKIP")
        return
    tm = t_ids = eager_out = None
    with guarded(report, S, "doge_torch batch 1"):
        t_ids = torch.as_tensor(np.random.default_rng(1).integers(3, cfg.vocab_size, (1, prompt))).to(tdev)
        tm = doge_torch.DogeForCausalLM.from_pretrained(path).to(tdev).eval()
        eager_out = tm.generate(t_ids, max_new_tokens=new, eos_token_id=-1, do_sample=False)
        sec = time_fn(lambda: tm.generate(t_ids, max_new_tokens=new, eos_token_id=-1, do_sample=False), 2,
                      warmup=0)
        vs = f" ({new / sec / hf_rates[1]:.2f}x transformers)" if 1 in hf_rates else ""
        report.add(S, f"doge_torch fp32 eager batch 1, {prompt}+{new} tokens", f"{new / sec:,.0f} tok/s{vs}")
    static_torch_generation(report, budget, cpu, tm, t_ids, eager_out, new, prompt, hf_rates)


def static_torch_generation(report: Report, budget: Budget, cpu: bool, tm, ids, eager_out, new: int, prompt: int,
                            hf_rates: dict) -> None:
    """doge_torch's static-cache decoding (cache_implementation="static": one torch.compile'd step; CUDA graphs on
    CUDA): tokens/s, the first call's seconds (the compile) and whether its tokens are eager's. On the CPU fallback
    the step runs under dynamo's eager backend (inductor's CPU compile would take the test's minutes)."""
    from unittest import mock

    import torch

    import doge_torch.decode as dd

    S = "generate"
    if tm is None or budget.left(core=True) < (5 if cpu else 90):
        report.add(S, "doge_torch static cache batch 1", "budget" if tm is not None else "no model", status="SKIP")
        return
    backend = "eager" if cpu else dd.COMPILE_BACKEND
    with guarded(report, S, "doge_torch static cache batch 1"), mock.patch.object(dd, "COMPILE_BACKEND", backend):
        def gen():
            return tm.generate(ids, max_new_tokens=new, eos_token_id=-1, do_sample=False,
                               cache_implementation="static")

        t0 = time.perf_counter()
        out = gen()
        first = time.perf_counter() - t0
        sec = time_fn(gen, 2, warmup=0)
        vs = f", {new / sec / hf_rates[1]:.2f}x transformers" if 1 in hf_rates else ""
        same = "yes" if eager_out is not None and torch.equal(out, eager_out) else "no"
        what = "CUDA graphs" if ids.device.type == "cuda" else f"{backend} backend"
        report.add(S, f"doge_torch fp32 static cache, compiled step ({what}) batch 1, {prompt}+{new} tokens",
                   f"{new / sec:,.0f} tok/s (first call {first:.1f}s{vs}, same tokens as eager: {same})")


# ---- (e) profile (opt-in) -----------------------------------------------------------------------------------------
def section_profile(report: Report, budget: Budget, cpu: bool, tdev, regional: str) -> None:
    """Where a Doge-160M training step spends its time (the MFU target), most useful first: the train section's
    doge_jax step under jax.profiler (device time by kernel category; when OUT is set, $OUT/profile_jax.txt, the
    trace $OUT/jax_step.xplane.pb.gz and the optimized HLO $OUT/jax_step_hlo.txt.gz), doge_torch's under
    torch.profiler (the top kernels by device time; the full table to $OUT/profile_torch.txt), and doge_jax as a
    breakdown: forward+loss, value_and_grad, full step."""
    import jax
    import numpy as np

    S = "profile"
    label, base, seq, rows, _ = train_configs(cpu)[-1]  # Doge-160M on a GPU
    batch = np.random.default_rng(0).integers(3, base.vocab_size, (rows, seq), dtype=np.int64)
    reps = 2 if cpu else 5
    out = os.environ.get("OUT")
    out = out if out and os.path.isdir(out) else None
    parts = (("doge_jax step profile", 40, lambda: jax_step_profile(report, S, label, base, seq, rows, batch, reps,
                                                                     cpu, out)),
             ("doge_torch profile", 30, lambda: torch_step_profile(report, S, label, base, seq, rows, batch, reps,
                                                                   cpu, tdev, regional, out)),
             ("doge_jax breakdown", 30, lambda: jax_breakdown(report, S, label, base, seq, rows, batch, reps)))
    for what, need, fn in parts:
        if budget.left() < (2 if cpu else need):
            report.add(S, f"{label} {what}", "budget", status="SKIP")
            continue
        with guarded(report, S, f"{label} {what}"):
            fn()
        jax.clear_caches()


def jax_breakdown(report: Report, S: str, label: str, base, seq: int, rows: int, batch, reps: int) -> None:
    """doge_jax's forward+loss, value_and_grad and full step (optax.adamw), each jitted on its own."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from doge_jax.loss import IGNORE, DogeTrunk, causal_lm_loss_chunked, shift_targets

    cfg = base.replace(attention_impl="fused")
    graphdef, state = nnx.split(DogeTrunk(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(state)
    ids = jnp.asarray(batch, jnp.int32)

    def loss_fn(p):
        p = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, p)
        model = nnx.merge(graphdef, p)
        h = model(ids).logits
        w, vocab_major = model.head_weight()
        n = jnp.sum(shift_targets(ids) != IGNORE)
        return causal_lm_loss_chunked(h, w, ids, n, vocab_major, 1024)

    tx = optax.adamw(1e-4)
    opt = tx.init(params)

    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    parts = {"forward+loss": jax.jit(loss_fn), "value_and_grad": jax.jit(jax.value_and_grad(loss_fn))}
    times = {name: time_fn(lambda f=f: jax.block_until_ready(f(params)), reps) for name, f in parts.items()}
    jstep = jax.jit(step)
    times["full step (adamw)"] = time_fn(lambda: jax.block_until_ready(jstep(params, opt)), reps)
    report.add(S, f"{label} doge_jax bf16 fused seq {seq} x {rows}",
               ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in times.items()))


def torch_step_profile(report: Report, S: str, label: str, base, seq: int, rows: int, batch, reps: int, cpu: bool,
                       tdev, regional: str, out: str | None) -> None:
    """The train section's doge_torch step under torch.profiler: device time by kernel category."""
    import torch

    from doge_torch.train import train_step

    _, cm, opt = torch_train_setup(base, tdev, cpu, regional in ("160m", "all"))
    tb = torch.as_tensor(batch)
    mb = [{"input_ids": tb, "labels": tb}]
    for _ in range(2):
        train_step(cm, opt, None, mb, 1.0, torch.bfloat16)
    sync()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if not cpu else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            train_step(cm, opt, None, mb, 1.0, torch.bfloat16)
        sync()
    key = "self_cpu_time_total" if cpu else "self_device_time_total"
    wall = time_fn(lambda: train_step(cm, opt, None, mb, 1.0, torch.bfloat16), reps)
    table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
    print(table, flush=True)
    if out:
        with open(os.path.join(out, "profile_torch.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by=key, row_limit=200, max_name_column_width=120))
    # on the GPU, the kernels only: a CPU op (aten::mm, an inductor launch) carries the device time of the kernels it
    # launched, which are entries of their own, and GPU user annotations (the optimizer step) span kernels too
    events = [e for e in prof.key_averages()
              if cpu or (e.device_type != torch.autograd.DeviceType.CPU and not e.is_user_annotation)]
    cats = kernel_categories([(e.key, getattr(e, key)) for e in events])
    busy = sum(cats.values()) / 1e6 / reps  # seconds of kernel (CPU: op) time per step
    report.add(S, f"{label} doge_torch bf16 step profile",
               ", ".join(f"{k} {100 * v / max(sum(cats.values()), 1):.0f}%" for k, v in cats.items())
               + f"; {'kernels' if not cpu else 'ops'} {1e3 * busy:.1f} ms of a {1e3 * wall:.1f} ms step "
               f"(top kernels printed above)")

def jax_step_profile(report: Report, S: str, label: str, base, seq: int, rows: int, batch, reps: int, cpu: bool,
                     out: str | None) -> None:
    """The train section's doge_jax step (make_steps: bf16 compute, fused attention, donated buffers) under
    jax.profiler: device time by kernel category, the top kernels and HLO ops printed (all of them, the trace and
    the optimized HLO of the step to $OUT when set, for reading after the machine is gone)."""
    import glob

    import jax
    import jax.numpy as jnp
    from jax.profiler import ProfileData

    cfg = base.replace(attention_impl="fused") if base.attention_impl == "auto" else base
    step, params, opt_state, how = _jax_step(cfg, seq, rows)
    jb = jnp.asarray(batch, jnp.int32)[None]
    compiled = step.lower(params, opt_state, jb).compile()  # ahead of time, for its optimized HLO
    if out:  # GPU fusions, cuBLAS/cuDNN custom calls: what the kernel names below came from
        with gzip.open(os.path.join(out, "jax_step_hlo.txt.gz"), "wt") as f:
            f.write(compiled.as_text())
    holder = {"p": params, "o": opt_state}

    def run():
        holder["p"], holder["o"], m = compiled(holder["p"], holder["o"], jb, *step.extra)
        return m["loss"]

    wall = time_queued(run, reps, warmup=2)
    tdir = tempfile.mkdtemp(prefix="gpu_check_jax_trace_")
    try:
        with jax.profiler.trace(tdir):
            for _ in range(reps):
                loss = run()
            jax.block_until_ready(loss)
        files = sorted(glob.glob(os.path.join(tdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
        if not files:
            raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {tdir}")
        kernels, ops = device_events(ProfileData.from_file(files[-1]), cpu)  # raises if it has none
        if out:  # $OUT returns files at most 2 folders down: the trace itself, gzipped, at the top
            with open(files[-1], "rb") as f, gzip.open(os.path.join(out, "jax_step.xplane.pb.gz"), "wb") as g:
                shutil.copyfileobj(f, g)
    finally:
        shutil.rmtree(tdir, ignore_errors=True)
    tables = [("kernels", top_table(kernels, reps, 25 if not out else 400))]
    if ops:
        tables.append(("HLO ops", top_table(ops, reps, 25 if not out else 400)))
    for what, table in tables:
        print(f"-- doge_jax step: top {what} by device time\n" + "\n".join(table.splitlines()[:26]), flush=True)
    if out:
        with open(os.path.join(out, "profile_jax.txt"), "w") as f:
            f.write("\n\n".join(f"{what}\n{table}" for what, table in tables) + "\n")
    cats = kernel_categories(kernels)
    total = max(sum(cats.values()), 1.0)
    busy = total / 1e9 / reps
    report.add(S, f"{label} doge_jax bf16 step profile",
               ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in cats.items())
               + f"; {'kernels' if not cpu else 'XLA thunks'} {1e3 * busy:.1f} ms per step traced (the profiler "
               f"runs XLA op by op, without command buffers) vs {1e3 * wall:.1f} ms per step untraced ({how}; top "
               "kernels printed above)")


KERNEL_CATEGORIES = (  # first match wins; lower-case substrings of kernel (or, on CPU, op) names
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa", "_fwd_kernel", "_dq_kernel", "_dkv")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "aten::mm", "aten::addmm", "aten::bmm")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy/cast", ("memcpy", "memset", "copy", "cast", "to_copy", "transpose")),
    ("scatter/gather", ("scatter", "gather")),
    ("inductor fused", ("triton_",)),
    ("XLA fusion", ("fusion", "wrapped_", "loop_", "input_")),  # XLA's elementwise/reduction kernels
)


def device_events(data, cpu: bool) -> tuple[list, list]:
    """(kernels, ops) from a jax.profiler.ProfileData: (name, nanoseconds) of every kernel on the GPU planes'
    "Stream #..." lines (the other lines are derived from them, "XLA Ops", "Async XLA Ops", ..., or are not
    device work, "CUPTI overhead"), and of every HLO op on their "XLA Ops" line (empty if the trace has none). On
    the CPU the XLA thunks of the executor threads stand in for kernels. Raises, naming the lines seen, if no
    kernel is found."""
    kernels, ops, seen = [], [], []
    for plane in data.planes:
        name = plane.name.lower()
        if cpu and name.startswith("/host:cpu"):
            for line in plane.lines:
                seen.append(f"{plane.name}/{line.name}")
                if line.name.startswith("tf_XLA"):
                    kernels += [(e.name, e.duration_ns) for e in line.events  # a while thunk spans its body's
                                if "::" not in e.name and not e.name.startswith(("end: ", "while", "call"))]
        elif not cpu and name.startswith("/device:gpu"):
            for line in plane.lines:
                seen.append(f"{plane.name}/{line.name}")
                low = line.name.lower()
                if low == "xla ops":
                    ops += [(e.name, e.duration_ns) for e in line.events]
                elif low.startswith("stream #"):
                    kernels += [(e.name, e.duration_ns) for e in line.events]
    if not kernels:
        raise RuntimeError(f"no kernel events in the trace; its lines: {seen[:40]}")
    return kernels, ops


def top_table(events, reps: int, limit: int) -> str:
    """The `limit` names with the most total time: ms per step, share, calls per step."""
    tot: dict[str, list] = {}
    for name, ns in events:
        t = tot.setdefault(name, [0.0, 0])
        t[0] += ns
        t[1] += 1
    total = max(sum(t[0] for t in tot.values()), 1.0)
    lines = [f"{'ms/step':>9} {'share':>6} {'calls':>6}  name"]
    for name, (ns, n) in sorted(tot.items(), key=lambda kv: -kv[1][0])[:limit]:
        lines.append(f"{ns / 1e6 / reps:9.3f} {100 * ns / total:5.1f}% {n / reps:6.1f}  {name[:150]}")
    return "\n".join(lines)


def kernel_categories(events) -> dict:
    """Sum (name, self time) pairs into KERNEL_CATEGORIES plus "other", largest first."""
    out: dict[str, float] = {}
    for name, t in events:
        low = name.lower()
        cat = next((c for c, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")
        out[cat] = out.get(cat, 0.0) + t
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# ---- main ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--cpu", action="store_true", help="tiny CPU fallback even if a GPU is present")
    ap.add_argument("--append", action="store_true", help="append to RESULTS.md also in the CPU fallback")
    ap.add_argument("--no-append", action="store_true", help="never append to RESULTS.md")
    ap.add_argument("--budget", type=float, default=None, help="total seconds (default 420 GPU, 90 CPU)")
    ap.add_argument("--regional", choices=("none", "160m", "all"), default="all",
                    help="torch training rows compiled layer by layer instead of as one graph: none, the Doge-160M "
                         "row, or all (the default: whole-model inductor compiles took 72 s (20M) and 190 s (160M) "
                         "on an H200)")
    ap.add_argument("--train-only", default="", metavar="TERMS",
                    help="comma list: run only the train rows whose name ('LABEL FRAMEWORK seq S x R rows') has "
                         "every term and none of the ~terms, e.g. '160m,doge_jax,x 16 rows,~[' for the main "
                         "Doge-160M doge_jax row alone (an A/B under other XLA_FLAGS); a filter that matches no "
                         "row is a FAIL; the transformers ratio is left out unless its row matches")
    ap.add_argument("--probes", action="store_true",
                    help="also the exploratory rows: Doge-160M training with the kernels, cuDNN first, the v-side "
                         "fold, eager loss chunks, doge_jax's loss_chunk 4096 and fewer-bytes variants, the other "
                         "layer layout and 2x rows; "
                         "attention block-size, cuDNN-first, v-side fold and full-tile-mask cells (default: the checks "
                         "and targets only, to fit 8 minutes)")
    ap.add_argument("--kernel-smoke", choices=("triton", "pallas"), help=argparse.SUPPRESS)  # kernel_smoke's child
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma list of {', '.join(SECTIONS + OPT_IN)} (default: all but {', '.join(OPT_IN)})")
    args = ap.parse_args(argv)
    sections = list(dict.fromkeys(s.strip() for s in args.sections.split(",") if s.strip()))  # (once each)
    only = tuple(t.strip().lower() for t in args.train_only.split(",") if t.strip())
    unknown = set(sections) - set(SECTIONS + OPT_IN)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")
    if not sections:
        ap.error(f"--sections {args.sections!r}: no section named (choose from {', '.join(SECTIONS + OPT_IN)})")
    if only and "train" not in sections:
        ap.error(f"--train-only {args.train_only!r} filters the train section's rows, which --sections leaves out")
    if args.budget is not None and not args.budget > 0:
        ap.error(f"--budget {args.budget}: must be > 0 seconds")

    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # share the GPU with torch: JAX allocates on demand, up to half the card (its BFC pool is never returned)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    if args.kernel_smoke:
        return kernel_smoke_child(args.kernel_smoke, args.cpu)
    import jax
    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    cpu = not gpu
    if gpu:  # the profile section compiles the train section's steps again (ahead of time): from this cache
        jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
    budget = Budget(args.budget if args.budget is not None else (90.0 if cpu else 420.0))
    tdev = torch.device("cuda" if gpu else "cpu")
    if gpu:
        card = torch.cuda.get_device_name(0)
        jkind = jax.devices()[0].device_kind
        device = card
    else:
        torch.set_num_threads(1)  # JAX's thread pool in the same process starves a multi-threaded torch
        card = jkind = "cpu"
        device = "cpu-fallback"
    report = Report(device)

    class _Dev:  # for doge_jax.metrics.peak_flops
        platform = "gpu" if gpu else "cpu"
        device_kind = card

    from doge_jax.metrics import peak_flops

    peak = peak_flops(_Dev, "bfloat16")
    print(f"gpu_check: torch {torch.__version__} on {card}; jax {jax.__version__} on {jax.default_backend()} "
          f"({jkind}); peak bf16 {peak / 1e12:.3g} TFLOP/s; budget {budget.total:.0f}s; sections {sections}",
          flush=True)
    if gpu and jax.default_backend() != "gpu":
        report.add("setup", "jax sees the GPU", f"jax backend {jax.default_backend()}", "gpu", "FAIL")

    smoke_s = None
    if {"parity", "attention", "train"} & set(sections):
        t0 = time.perf_counter()
        kernel_smoke(report, cpu, timeout=120.0)
        smoke_s = time.perf_counter() - t0
        print(f"== kernel smoke tests done in {smoke_s:.0f}s", flush=True)

    funcs = {"parity": lambda: section_parity(report, budget, cpu, tdev, jkind),
             "train": lambda: section_train(report, budget, cpu, tdev, peak, args.regional, only, args.probes),
             "attention": lambda: section_attention(report, budget, cpu, tdev, args.probes),
             "generate": lambda: section_generate(report, budget, cpu, tdev),
             "profile": lambda: section_profile(report, budget, cpu, tdev, args.regional)}
    took = {"kernel smoke tests": smoke_s} if smoke_s is not None else {}
    for i, name in enumerate(sections):
        budget.start(SHARE[name], sum(SHARE[s] for s in sections[i:]))
        t0 = time.perf_counter()
        print(f"== {name} (budget {budget.left():.0f}s)", flush=True)
        with guarded(report, name, "section"):
            funcs[name]()
        took[name] = time.perf_counter() - t0
        print(f"== {name} done in {took[name]:.0f}s", flush=True)

    total = time.perf_counter() - budget.t0
    table = report.table()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = (f"## gpu_check.py — {stamp} — {card} (torch {torch.__version__}, jax {jax.__version__} "
             f"on {jkind})" + (f" — train rows matching {args.train_only!r}" if only else "")
             + (" — with --probes" if args.probes else "")
             + (f" — XLA_FLAGS={os.environ['XLA_FLAGS']!r}" if os.environ.get("XLA_FLAGS") else ""))
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in took.items())
    skipped = sum(r[-1] == "SKIP" for r in report.rows)
    print(f"\n{title}\n\n{table}\n\ntotal {total:.0f}s ({timing}); "
          f"{'FAILED' if report.failed() else 'all checks passed'}"
          + (f" ({skipped} row{'s' if skipped > 1 else ''} SKIP: not run)" if skipped else ""))
    if (gpu or args.append) and not args.no_append:
        entry = (f"\n{title}\n\nbenchmarks/gpu_check.py, total {total:.0f}s ({timing}). Targets (issue 7): "
                 "Doge-160M >= 40% MFU, Doge-20M >= 400k tokens/s, DMA fwd+bwd at 16k <= 1.5x causal flash. MFU = "
                 "6N_matmul + 6LHDS FLOPs/token over the card's bf16 peak (doge_jax.metrics).\n\n"
                 f"{table}\n")
        for path in save_entry(entry, os.path.join(ROOT, "benchmarks", "RESULTS.md"), os.environ.get("OUT")):
            print(f"appended to {path}")
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
