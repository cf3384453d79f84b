"""doge_torch's causal-LM loss: through the logits (`causal_lm_loss`, the transformers path) and, for training,
without the [tokens, vocab] logits (`causal_lm_loss_fused`; the counterpart of doge_jax/loss.py).

`linear_cross_entropy_sum(x, w, target)` equals `F.cross_entropy(x @ w.T, target, reduction="sum")` over targets
!= -100, in float32 (float64 for float64 inputs), computed a chunk of tokens at a time. The loss is a scalar, so
while a chunk's logits are at hand the forward pass also forms that chunk's share of d/dx and d/dw (known up to the
incoming gradient, which the backward pass only multiplies in). Nothing is recomputed, and the temporaries are one
chunk's logits instead of logits for every token (at Doge-160M's 32768-word vocabulary and 16 x 2048 tokens:
chunks of 2048 tokens, 256 MB per float32 copy, instead of 2 GB of bf16 logits, their 4 GB float32 copy and their
gradients). Under autocast the products run in the autocast dtype as the plain `F.linear` would, and the softmax
in float32.
"""

from __future__ import annotations

import warnings

import torch
from torch.autograd.function import once_differentiable

IGNORE = -100
CHUNK_ELEMENTS = 1 << 26  # logits per chunk (256 MB in float32)
# On CUDA each chunk's softmax, target log-probability and d CE / d logits run as one torch.compile'd function
# (`_chunk_softmax_grad`: a few fused passes over the chunk's logits instead of eager log_softmax, gather, exp,
# scatter and cast kernels); False: the eager ops everywhere (the CPU always runs them)
COMPILE_CHUNKS = True
COMPILE_DEVICES = ("cuda",)  # where COMPILE_CHUNKS applies
_compiled_chunk = None


def _chunk_softmax_grad(logits: torch.Tensor, tc: torch.Tensor, f: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p(target) over targets != IGNORE, softmax - onehot(target) in the logits' dtype) of one chunk,
    computed in f; written for inductor to fuse (the one-hot as a comparison, no in-place ops)."""
    logp = logits.log_softmax(-1, dtype=f)
    valid = tc != IGNORE
    safe = torch.where(valid, tc, 0)
    loss = -torch.where(valid, logp.gather(-1, safe[:, None])[:, 0], 0.0).sum()
    hot = torch.arange(logits.shape[-1], device=logits.device)[None, :] == safe[:, None]
    return loss, (logp.exp() - hot.to(f)).to(logits.dtype)


def _chunk_fn(device: torch.device):
    """The compiled `_chunk_softmax_grad` on CUDA (made on first use; inside a compiled graph the plain function,
    which the outer compile captures), else None."""
    global _compiled_chunk
    if not COMPILE_CHUNKS or device.type not in COMPILE_DEVICES:
        return None
    if torch.compiler.is_compiling():
        return _chunk_softmax_grad
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_softmax_grad, dynamic=False, fullgraph=True)
    return _run_compiled


def _run_compiled(logits: torch.Tensor, tc: torch.Tensor, f: torch.dtype):
    """The compiled chunk function; where it cannot be compiled (no working Triton for the GPU, say), a warning and
    the plain function from then on."""
    global COMPILE_CHUNKS
    try:
        return _compiled_chunk(logits, tc, f)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any compile failure: the same values without the compiler
        COMPILE_CHUNKS = False
        warnings.warn(f"doge_torch.loss: compiling the loss's chunk function failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''}); it runs as eager ops from now on",
                      stacklevel=2)
        return _chunk_softmax_grad(logits, tc, f)


def chunk_rows(vocab_size: int) -> int:
    """Tokens per chunk: about CHUNK_ELEMENTS logits, at least 256."""
    return max(256, CHUNK_ELEMENTS // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, chunk: int, need_x: bool,
                need_w: bool) -> torch.Tensor:
        f = torch.promote_types(x.dtype, torch.float32)  # float32 (float64 for float64 inputs: gradcheck)
        dev = x.device.type
        # the products' dtype: autocast's (which casts float32 and mixed inputs, not float64) as F.linear would run
        # them, else the inputs'. Cast explicitly, the weight once, with autocast off inside
        mm = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and f == torch.float32 else x.dtype
        total = torch.zeros((), dtype=f, device=x.device)
        dx = torch.empty_like(x) if need_x else None
        dw = torch.zeros(w.shape, dtype=f, device=w.device) if need_w else None
        fused = _chunk_fn(x.device) if need_x or need_w else None
        with torch.autocast(dev, enabled=False):
            wm = w.to(mm)
            for i, (xc, tc) in enumerate(zip(x.split(chunk), target.split(chunk))):
                xm = xc.to(mm)
                if fused is not None:  # the same values as the eager ops below, in fewer passes
                    loss, d = fused(xm @ wm.t(), tc, f)
                    total = total + loss
                    valid = tc != IGNORE
                else:
                    logp = (xm @ wm.t()).log_softmax(-1, dtype=f)  # logits rounded to mm as F.linear's, then f32
                    valid = tc != IGNORE
                    safe = torch.where(valid, tc, 0)
                    total = total - torch.where(valid, logp.gather(-1, safe[:, None])[:, 0], 0.0).sum()
                    if not (need_x or need_w):
                        del logp  # (before the next chunk's is made)
                        continue
                    # d CE / d logits = softmax - onehot(target), in mm as autograd's backward through F.linear
                    # would see it. Temporaries are dropped as soon as possible
                    d = logp.exp_()
                    del logp
                    d.scatter_add_(-1, safe[:, None], torch.full_like(d[:, :1], -1.0))
                    d = d.to(mm)
                # ignored targets: their rows of x and of dx are zeroed instead of their rows of d (a [chunk, d]
                # pass instead of a [chunk, vocab] one)
                keep = valid[:, None].to(mm)
                if need_x:
                    dx[i * chunk:i * chunk + len(xc)] = ((d @ wm) * keep).to(x.dtype)
                if need_w:
                    dw += (d.t() @ (xm * keep)).to(f)
                del d
        ctx.w_dtype = w.dtype
        ctx.save_for_backward(dx, dw)  # dw kept in float32: rounded once, after the incoming gradient
        return total

    @staticmethod
    @once_differentiable  # the gradients are constants formed in the forward: no second derivative
    def backward(ctx, g: torch.Tensor):
        dx, dw = ctx.saved_tensors
        gx = None if dx is None else (dx.to(g.dtype) * g).to(dx.dtype)  # g unrounded (a bf16 model's dx)
        gw = None if dw is None else (dw * g.to(dw.dtype)).to(ctx.w_dtype)
        return gx, gw, None, None, None, None


def linear_cross_entropy_sum(x: torch.Tensor, w: torch.Tensor, target: torch.Tensor,
                             chunk: int | None = None) -> torch.Tensor:
    """Sum over targets != -100 of the cross-entropy of logits x @ w.T (float32; float64 for float64 inputs),
    without storing them. x [N, d]; w [V, d] (lm_head's weight or the tied embedding); target [N] int.
    Differentiable in x and w; their gradients are formed only where needed (none under no_grad)."""
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(x, w, target, chunk or chunk_rows(w.shape[0]), grad and x.requires_grad,
                                     grad and w.requires_grad)


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """Target at t is labels[t + 1]; the last position is ignored (spec §3.9)."""
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[:, 1:]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Shifted cross-entropy in float32 (float64 for float64 logits, as `causal_lm_loss_fused`), -100 ignored; mean,
    or sum / num_items_in_batch (spec §3.9)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_targets(labels).reshape(-1),
                                             ignore_index=IGNORE,
                                             reduction="sum" if num_items_in_batch is not None else "mean")
    if num_items_in_batch is not None:
        loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
    return loss


def causal_lm_loss_fused(hidden: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch=None) -> torch.Tensor:
    """`causal_lm_loss(hidden @ w.T, labels, num_items_in_batch)` from the final hidden states [B, S, d] without
    the logits: shifted targets, -100 ignored; the mean over valid targets or the sum / num_items_in_batch."""
    target = shift_targets(labels).reshape(-1)
    total = linear_cross_entropy_sum(hidden.reshape(-1, hidden.shape[-1]), w, target)
    if num_items_in_batch is None:
        denom = (target != IGNORE).sum()
    else:
        denom = torch.as_tensor(num_items_in_batch, device=total.device)
    # no target at all: NaN (0 / 0) as through the logits, and zero gradients there too (not 0 * inf = NaN)
    return torch.where(denom > 0, total / torch.where(denom > 0, denom, 1), total.detach() / denom)
