"""Training loss for doge_torch without the [tokens, vocab] logits (the counterpart of doge_jax/loss.py).

`linear_cross_entropy_sum(x, w, target)` equals `F.cross_entropy(x @ w.T, target, reduction="sum")` over targets
!= -100, in float32, computed a chunk of tokens at a time. The loss is a scalar, so while a chunk's logits are at
hand the forward pass also forms that chunk's share of d/dx and d/dw (known up to the incoming gradient, which the
backward pass only multiplies in). Nothing is recomputed, and the temporaries are one chunk's logits instead of
logits for every token (at Doge-160M's 32768-word vocabulary and 16 x 2048 tokens: chunks of 2048 tokens, 256 MB
per float32 copy, instead of 2 GB of bf16 logits, their 4 GB float32 copy and their gradients). Under autocast the
products run in the autocast dtype as the plain `F.linear` would, and the softmax in float32.
"""

from __future__ import annotations

import torch

IGNORE = -100
CHUNK_ELEMENTS = 1 << 26  # logits per chunk (256 MB in float32)


def chunk_rows(vocab_size: int) -> int:
    """Tokens per chunk: about CHUNK_ELEMENTS logits, at least 256."""
    return max(256, CHUNK_ELEMENTS // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, chunk: int) -> torch.Tensor:
        grads = any(ctx.needs_input_grad[:2])
        f = torch.promote_types(x.dtype, torch.float32)  # float32 (float64 for float64 inputs: gradcheck)
        total = torch.zeros((), dtype=f, device=x.device)
        dx = torch.empty_like(x) if grads else None
        dw = torch.zeros(w.shape, dtype=f, device=w.device) if grads else None
        for i in range(0, x.shape[0], chunk):
            xc, tc = x[i:i + chunk], target[i:i + chunk]
            logits = xc @ w.t()  # the autocast dtype under autocast, as F.linear
            logp = logits.log_softmax(-1, dtype=f)  # one pass: reads the autocast dtype, writes float32
            valid = tc != IGNORE
            safe = torch.where(valid, tc, 0)
            total = total - torch.where(valid, logp.gather(-1, safe[:, None])[:, 0], 0.0).sum()
            if grads:
                # d CE / d logits = softmax - onehot(target), cast to the logits' dtype as autograd's backward
                # through F.linear would see it. Ignored targets: their rows of x and of dx are zeroed instead of
                # their rows of d (a [chunk, d] pass instead of a [chunk, vocab] one)
                d = logp.exp_()
                d.scatter_add_(-1, safe[:, None], torch.full_like(d[:, :1], -1.0))
                d = d.to(logits.dtype)
                keep = valid[:, None].to(d.dtype)
                dx[i:i + chunk] = ((d @ w.to(d.dtype)) * keep).to(x.dtype)
                dw += (d.t() @ (xc.to(d.dtype) * keep)).to(f)
        if grads:
            ctx.save_for_backward(dx, dw.to(w.dtype))
        return total

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        dx, dw = ctx.saved_tensors
        return (dx * g.to(dx.dtype)).to(dx.dtype), (dw * g.to(dw.dtype)).to(dw.dtype), None, None


def linear_cross_entropy_sum(x: torch.Tensor, w: torch.Tensor, target: torch.Tensor,
                             chunk: int | None = None) -> torch.Tensor:
    """Sum over targets != -100 of the float32 cross-entropy of logits x @ w.T, without storing them. x [N, d];
    w [V, d] (lm_head's weight or the tied embedding); target [N] int. Differentiable in x and w."""
    return _LinearCrossEntropy.apply(x, w, target, chunk or chunk_rows(w.shape[0]))


def causal_lm_loss_fused(hidden: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch=None) -> torch.Tensor:
    """`doge_torch.model.causal_lm_loss(hidden @ w.T, labels, num_items_in_batch)` from the final hidden states
    [B, S, d]: shifted targets, -100 ignored; the mean over valid targets or the sum / num_items_in_batch."""
    target = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[:, 1:].reshape(-1)
    total = linear_cross_entropy_sum(hidden.reshape(-1, hidden.shape[-1]), w, target)
    if num_items_in_batch is None:
        return total / (target != IGNORE).sum()
    return total / torch.as_tensor(num_items_in_batch, device=total.device)
