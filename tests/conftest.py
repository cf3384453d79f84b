"""Shared helpers and fixtures for the parity tests (torch and JAX).

Reference models are tiny random `transformers.DogeForCausalLM`s (eager attention, float32, seeded) whose
parameters are pushed away from their init values (random nonzero A, perturbed norms/residuals/biases), so that
every part of the function is exercised. Inputs are numpy arrays, so the JAX tests can use the same helpers.
"""

from __future__ import annotations

import os
import random
import sys

# Triton kernels (doge_torch.triton_attention) run in Triton's interpreter on CPU tensors in these tests. The flag must
# be set before triton is first imported (importing doge_torch.model already imports it, via torch.compile); nothing
# else here uses Triton (there is no GPU, and inductor's CPU backend does not).
os.environ.setdefault("TRITON_INTERPRET", "1")

# XLA compiles the tests' tiny programs without LLVM's optimization passes: compiling, not running, is most of the
# suite's CPU time, and this takes ~40% off it (measured on the blockwise attention tests). XLA's own HLO passes
# (fusion, layouts, buffer assignment: what the HLO-reading tests check) still run. Set before JAX starts, in the
# environment, so the subprocesses tests start (the CLIs, benchmarks/gpu_check.py's CPU fallback) compile the same
# way; the multi-device subprocesses add it to their own XLA_FLAGS. DOGE_TEST_XLA_OPT=1 keeps XLA's default.
TEST_XLA_FLAGS = "" if os.environ.get("DOGE_TEST_XLA_OPT") == "1" else "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()


def cpu_devices_env(devices: int, **extra: str) -> dict:
    """The environment for a subprocess on `devices` simulated CPU devices: this one's without JAX_* variables and
    XLA_FLAGS, then JAX_PLATFORMS=cpu, the device count and the tests' XLA flags, then `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    count = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"{count} {TEST_XLA_FLAGS}".strip(), **extra)
    return env

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Tiny shapes shared by every parity test: D = 64 / 4 = 16, GQA with 2 kv heads.
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    keep_window_size=64,
)
# A small CDMoE: K = 4 product keys, 4 experts per token.
TINY_MOE = dict(is_moe=True, num_experts=16, num_experts_per_tok=4)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def seed_all(seed: int = 0) -> None:
    """Seed python, numpy and torch (only if something already imported it: JAX-only runs stay torch-free)."""
    random.seed(seed)
    np.random.seed(seed)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def _limit_torch_threads() -> None:
    """One intra-op thread for torch (env DOGE_TEST_TORCH_THREADS overrides).

    The test models are tiny, so a second thread buys nothing; on a shared 2-core machine every matmul's thread
    barrier then waits for a descheduled sibling, which made a 0.03 s generation take 10+ s. One thread also
    fixes the reduction order, so results do not depend on the core count.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        n = int(os.environ.get("DOGE_TEST_TORCH_THREADS", "1"))
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same seeds, whatever ran before it, with torch on one thread."""
    _limit_torch_threads()
    seed_all(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _shared_xla_compilations(tmp_path_factory):
    """XLA's persistent compilation cache for the in-process JAX tests, one per pytest-xdist worker: many tests
    compile the very same tiny programs (measured: ~20% less CPU time for the JAX model and generation tests). Set
    in-process only, never in the environment of the subprocesses tests start: on a simulated multi-device CPU,
    executables read back from the cache deadlock (doge_jax.train.setup_compilation_cache). Not shared by the two
    workers: two CI runs of 2026-11-30 segfaulted in JAX's cache (a write, then a read: deserialize_executable) in a
    worker's doge_jax training step while the directory was shared; the cause is not known."""
    if "jax" not in sys.modules:  # (no collected test module uses JAX)
        yield
        return
    import jax
    from jax._src import compilation_cache

    if jax.device_count() > 1:
        yield
        return
    root = tmp_path_factory.getbasetemp()  # (the worker's own directory under xdist)
    jax.config.update("jax_compilation_cache_dir", str(root / "xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
    jax.config.update("jax_compilation_cache_max_size", 2**31)  # (bounded; reads and writes under its file lock)
    compilation_cache.reset_cache()  # (in case something compiled before: the cache is decided once)
    yield


def perturb_(model, seed: int = 0, scale: float = 0.1) -> None:
    """Move a torch Doge model (transformers or doge_torch, any variant) away from its init, in place.

    A ~ N(0, 1) (nonzero, so dt varies per key and the keep-window top-k has no ties on unique tokens);
    RMSNorm weights and residual scales ~ 1 + N(0, scale); biases ~ N(0, scale / 5). Weights keep their init.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            if name.endswith(".A"):
                p.copy_(noise)
            elif name.endswith("norm.weight") or name.endswith("_residual"):
                p.copy_(1.0 + scale * noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * scale * noise)


def make_hf_model(seed: int = 0, perturb: bool = True, dtype=None, **overrides):
    """A tiny random transformers DogeForCausalLM (TINY shapes updated by `overrides`), eval mode, float32."""
    import torch
    import transformers

    kwargs = {**TINY, **overrides}
    kwargs.setdefault("attn_implementation", "eager")
    cfg = transformers.DogeConfig(**kwargs)
    torch.manual_seed(seed)
    model = transformers.DogeForCausalLM(cfg)
    if perturb:
        perturb_(model, seed)
    model = model.eval()
    if dtype is not None:
        model = model.to(dtype)
    return model


def save_hf(model, path) -> str:
    """`model.save_pretrained(path)` (transformers or doge_torch); returns the path as a string."""
    path = os.fspath(path)
    model.save_pretrained(path)
    return path


def unique_ids(B: int, T: int, vocab: int, seed: int = 0) -> np.ndarray:
    """[B, T] int64 token ids, each row a prefix of a random permutation (no repeated id within a row).

    Repeated ids give repeated layer-0 values and therefore tied dt; unique ids keep the keep-window top-k
    (T > keep_window_size) free of ties, so any top-k implementation picks the same keys.
    """
    if T > vocab:
        raise ValueError(f"unique_ids: T={T} > vocab={vocab}")
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(vocab)[:T] for _ in range(B)]).astype(np.int64)


def random_ids(B: int, T: int, vocab: int, seed: int = 0) -> np.ndarray:
    """[B, T] int64 token ids drawn uniformly (repeats allowed)."""
    return np.random.default_rng(seed).integers(0, vocab, size=(B, T), dtype=np.int64)


def left_pad_mask(B: int, T: int, pad_lens) -> np.ndarray:
    """[B, T] int64 attention mask with pad_lens[b] leading zeros in row b."""
    mask = np.ones((B, T), dtype=np.int64)
    for b, n in enumerate(pad_lens):
        mask[b, :n] = 0
    return mask


def hf_config_dict(model) -> dict:
    """The config.json dict of a transformers model (what `save_pretrained` writes)."""
    return model.config.to_dict()


def hf_state_numpy(model) -> dict[str, np.ndarray]:
    """A transformers model's state dict as float32 numpy arrays (tied lm_head included, as in state_dict())."""
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def hf_logits(model, ids, attention_mask=None, **kwargs) -> np.ndarray:
    """float32 numpy logits of a transformers model for numpy (or torch) inputs."""
    import torch

    ids = torch.as_tensor(np.asarray(ids))
    if attention_mask is not None:
        attention_mask = torch.as_tensor(np.asarray(attention_mask))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention_mask, **kwargs)
    return out.logits.float().numpy()


def max_abs_diff(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


# Current HF name -> legacy small-doge remote-code name (spec §2.2 c): the inverse of doge_jax.hf_names.LEGACY_RENAMES.
LEGACY_PATTERNS = (
    ("model.embed_tokens.weight", "model.word_embed.weight"),
    ("model.norm.weight", "model.final_layernorm.weight"),
    (".input_layernorm.weight", ".pre_layernorm.weight"),
    (".input_residual", ".pre_residual.weight"),
    (".post_attention_layernorm.weight", ".post_layernorm.weight"),
    (".post_attention_residual", ".post_residual.weight"),
    (".mlp.", ".feed_forward."),
)


def to_legacy_name(key: str) -> str:
    for new, old in LEGACY_PATTERNS:
        if key == new or (new.startswith(".") and new in key):
            return key.replace(new, old)
    return key


def write_legacy_checkpoint(tmodel, path, extra_config: dict | None = None) -> str:
    """Save a small_doge doge_torch model as a legacy remote-code checkpoint: legacy key names, a router bias per
    MoE layer (dropped on load), no tied lm_head, and a legacy config.json (rope_theta/rope_scaling, hidden_bias,
    dynamic_mask_ratio)."""
    import json

    import torch
    from safetensors.torch import save_file

    cfg = tmodel.config
    sd = {to_legacy_name(k): v.detach().contiguous() for k, v in tmodel.state_dict().items()
          if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    if cfg.is_moe:
        for i in range(cfg.num_hidden_layers):
            sd[f"model.layers.{i}.feed_forward.router_gate.bias"] = torch.zeros(2 * cfg.num_keys)
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    raw = cfg.to_hf_dict()
    raw.pop("rope_parameters")
    raw.pop("doge_variant")
    raw.update(rope_theta=cfg.rope_theta, rope_scaling=None, hidden_bias=False, dynamic_mask_ratio=0.0)
    raw.update(extra_config or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    return os.fspath(path)
