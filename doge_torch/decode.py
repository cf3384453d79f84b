"""Static-cache decoding for doge_torch: a preallocated KV cache and a one-token step of fixed shapes, so that
torch.compile captures the whole step once (and on CUDA replays it as a CUDA graph) instead of launching each
layer's kernels from Python per token (spec §4; the eager path with its growing cache is doge_torch.generate's
default)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .model import DogeCache, LayerCache, rotary_cos_sin

# torch.compile settings of the decode step: the backend (tests use "eager"), and whether to compile at all
COMPILE_BACKEND = "inductor"
COMPILE = True
SLOTS = 64  # static caches have a multiple of this many slots: lengths within it share one compiled step
_compiled: dict = {}


class StaticCache:
    """Per layer keys and values [B, G, L, D] and the dynamic-mask bias dt [B, n_dt, L] in preallocated buffers of
    L = prompt + new tokens slots, the key mask `valid` [B, L] (the prompt's attention mask, then each written
    slot), and `slot` (a one-element int64 tensor): where `update` writes the next token's keys. Duck-types
    DogeCache.update for DogeAttention."""

    def __init__(self, prefill: DogeCache, attention_mask: torch.Tensor, max_len: int):
        first = prefill.layers[0]
        B, _, P, _ = first.k.shape

        def empty(x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(*x.shape[:2], max_len, *x.shape[3:])

        self.layers = [LayerCache(empty(lc.k), empty(lc.v), empty(lc.dt)) for lc in prefill.layers]
        self.valid = torch.zeros(B, max_len, dtype=torch.bool, device=first.k.device)
        self.slot = torch.zeros(1, dtype=torch.int64, device=first.k.device)
        self.max_len = max_len
        self.fill(prefill, attention_mask)

    def fits(self, prefill: DogeCache, max_len: int) -> bool:
        """Whether this cache's buffers can take `prefill` (a reuse keeps their addresses: CUDA graphs replay)."""
        return self.max_len == max_len and len(self.layers) == len(prefill.layers) and all(
            a.shape[:2] + a.shape[3:] == b.shape[:2] + b.shape[3:] and a.dtype == b.dtype and a.device == b.device
            for lc, pc in zip(self.layers, prefill.layers) for a, b in ((lc.k, pc.k), (lc.v, pc.v), (lc.dt, pc.dt)))

    def fill(self, prefill: DogeCache, attention_mask: torch.Tensor) -> None:
        """The prompt's keys, values and dt into the first slots, in place; later slots count as empty."""
        P = prefill.layers[0].k.shape[2]
        if self.max_len < P:
            raise ValueError(f"static cache of {self.max_len} slots for a {P}-token prompt")
        for lc, pc in zip(self.layers, prefill.layers):
            for buf, x in ((lc.k, pc.k), (lc.v, pc.v), (lc.dt, pc.dt)):
                buf[:, :, :P] = x
        self.valid.zero_()
        self.valid[:, :P] = attention_mask.bool()
        self.slot.fill_(P)

    def buffers(self) -> list[torch.Tensor]:
        return [t for lc in self.layers for t in (lc.k, lc.v, lc.dt)] + [self.valid, self.slot]

    def reorder(self, rows: torch.Tensor) -> None:
        """Row r becomes old row rows[r], in place (beam search; the buffers keep their addresses)."""
        for t in self.buffers()[:-1]:
            t.copy_(t.index_select(0, rows))

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor) -> LayerCache:
        lc = self.layers[i]
        lc.k.index_copy_(2, self.slot, k)
        lc.v.index_copy_(2, self.slot, v)
        lc.dt.index_copy_(2, self.slot, dt)
        return lc


def static_cache(model, prefill: DogeCache, attention_mask: torch.Tensor, max_len: int) -> StaticCache:
    """A StaticCache holding the prompt: the model's previous one refilled where it fits (as transformers keeps its
    static cache on the model: the buffers stay allocated between calls), else a new one (on CUDA its buffers
    marked as static addresses for CUDA graphs)."""
    old = getattr(model, "_doge_static_cache", None)
    if old is not None and old.fits(prefill, max_len):
        old.fill(prefill, attention_mask)
        return old
    model._doge_static_cache = None  # (free the old buffers first)
    cache = StaticCache(prefill, attention_mask, max_len)
    if cache.slot.device.type == "cuda":
        for t in cache.buffers():
            torch._dynamo.mark_static_address(t)
    model._doge_static_cache = cache
    return cache


def decode_step(model, cache: StaticCache, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One new token per row: tok and pos [B, 1] -> float32 logits [B, V]; writes the token's keys at cache.slot
    and advances it. Every shape is fixed by the cache, so a compiled step is reused for every token."""
    cfg = model.config
    x = model.model.embed_tokens(tok)
    cos, sin = rotary_cos_sin(cfg, pos, x.dtype)  # (dynamic RoPE: max(position) + 1, a tensor)
    cache.valid.index_fill_(1, cache.slot, True)
    j = torch.arange(cache.max_len, device=tok.device)
    ok = (j <= cache.slot) & cache.valid  # [B, L]: the written slots up to this one, padding excluded
    if cfg.sliding_window is not None:
        ok = ok & (cache.slot - j < cfg.sliding_window)
    allowed = ok[:, None, None, :]
    for layer in model.model.layers:
        x, _ = layer(x, cos, sin, allowed, cache)
    x = model.model.norm(x)
    cache.slot.add_(1)
    return F.linear(x[:, -1], model.lm_weight()).float()


def step_function(device: torch.device):
    """The decode step to call: compiled once per process and backend (fullgraph, static shapes; inductor rounds
    to bf16/fp16 wherever eager does, so reduced-precision models decode eager's tokens; on CUDA with CUDA graphs,
    what mode "reduce-overhead" sets), or `decode_step` itself with COMPILE False."""
    if not COMPILE:
        return decode_step
    cuda = device.type == "cuda"
    key = (COMPILE_BACKEND, cuda)
    if key not in _compiled:
        kw = {}
        if COMPILE_BACKEND == "inductor":
            kw["options"] = {"emulate_precision_casts": True, **({"triton.cudagraphs": True} if cuda else {})}
        _compiled[key] = torch.compile(decode_step, fullgraph=True, dynamic=False, backend=COMPILE_BACKEND, **kw)
    return _compiled[key]


def run_step(step, model, cache: StaticCache, tok: torch.Tensor, pos: torch.Tensor):
    """(logits, step): one decode step. Where torch.compile fails before running the step (no working compiler,
    or dynamo's recompile limit after many batch sizes and lengths in one process), a warning, then the eager
    step for the rest of the call."""
    # (inputs laid out alike call after call: dynamo guards on strides, also of size-1 dimensions)
    tok, pos = (x.clone(memory_format=torch.contiguous_format) for x in (tok, pos))
    if step is not decode_step:
        if cache.slot.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return step(model, cache, tok, pos).clone(), step  # (clone: a CUDA graph's output is overwritten)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            warnings.warn("doge_torch static-cache decoding: dynamo's recompile limit (torch._dynamo.config."
                          f"recompile_limit = {torch._dynamo.config.recompile_limit}) is reached: each batch size "
                          "and slot count compiles the step once per process; decoding eagerly (raise the limit or "
                          "call torch._dynamo.reset() to compile again)", stacklevel=3)
        except torch._dynamo.exc.TorchDynamoException as err:
            warnings.warn(f"doge_torch static-cache decoding: torch.compile failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); decoding eagerly", stacklevel=3)
    return decode_step(model, cache, tok, pos), decode_step
