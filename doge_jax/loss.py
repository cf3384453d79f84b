"""Training loss for doge_jax: a chunked cross-entropy whose [tokens, vocab] logits are never stored.

`chunked_ce_sum(h, w, targets)` equals `sum(CE(h @ w, targets))` over targets != -100, in float32 (float64 for
float64 inputs), computed
chunk by chunk under `lax.scan` with a `custom_vjp`: under differentiation the forward pass also forms the
gradients w.r.t. h and w from each chunk's logits (the loss is a scalar, so they are known up to the incoming
cotangent), so nothing is recomputed and only [N, d] + [d, V] are kept. With a 32768-wide vocabulary
this keeps memory flat; on the 2-core CPU it ran about as fast as the plain logits loss (benchmarks/RESULTS.md).
`causal_lm_loss_chunked` is the drop-in for
`model.causal_lm_loss` that takes final hidden states instead of logits.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .model import DogeForCausalLM

IGNORE = -100
# The chunk's logsumexp as one pass over its float32 logits (an online max and rescaled sum, one variadic reduce)
# instead of jax.nn.logsumexp's two (max, then the sum of exps): 4 GiB less traffic per Doge-160M step on an H100 by
# benchmarks/hlo_traffic.py; off until a GPU times it (gpu_check --probes "[fewer bytes]"). Read when traced.
ONE_PASS_LSE = False


class DogeTrunk(DogeForCausalLM):
    """DogeForCausalLM whose `lm_logits` is the identity, so `__call__(...).logits` is the final normed hidden
    state [B, S, d]. Same parameters and init as DogeForCausalLM; `head_logits` gives the real logits."""

    def lm_logits(self, x: jax.Array) -> jax.Array:
        return x

    def head_logits(self, x: jax.Array) -> jax.Array:
        return DogeForCausalLM.lm_logits(self, x)

    def head_weight(self) -> tuple[jax.Array, bool]:
        """(weight, vocab_major): the embedding [V, d] when tied, else lm_head's kernel [d, V]."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.embedding[...], True
        return self.lm_head.kernel[...], False


def shift_targets(labels: jax.Array) -> jax.Array:
    """Target at t is labels[t+1]; the last position is ignored (spec §3.9)."""
    return jnp.concatenate([labels[..., 1:], jnp.full_like(labels[..., :1], IGNORE)], axis=-1)


def _logits(h: jax.Array, w: jax.Array, vocab_major: bool, f) -> jax.Array:
    dims = ((1,), (1,)) if vocab_major else ((1,), (0,))
    return jax.lax.dot_general(h, w, (dims, ((), ())), preferred_element_type=f)


def _chunks(h: jax.Array, targets: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array, int]:
    """[n, d] -> [c, chunk', d] with c = ceil(n / chunk) chunks of equal size chunk' <= chunk, so at most c - 1
    padding rows (padding n = 64 up to 1024 made small steps ~5x slower than the plain loss)."""
    n = h.shape[0]
    count = -(-n // chunk)
    chunk = -(-n // count)
    pad = (-n) % chunk
    if pad:
        h = jnp.concatenate([h, jnp.zeros((pad, h.shape[1]), h.dtype)])
        targets = jnp.concatenate([targets, jnp.full((pad,), IGNORE, targets.dtype)])
    return h.reshape(-1, chunk, h.shape[1]), targets.reshape(-1, chunk), n


def _logsumexp(x: jax.Array) -> jax.Array:
    """logsumexp over the last axis reading x once (ONE_PASS_LSE): equal to jax.nn.logsumexp up to float rounding;
    -inf entries weigh nothing, an all -inf row gives -inf."""

    def combine(a, b):
        (ma, sa), (mb, sb) = a, b
        m = jnp.maximum(ma, mb)
        safe = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))  # ((-inf, 0), (-inf, 0): no exp(nan))
        return m, sa * jnp.exp(ma - safe) + sb * jnp.exp(mb - safe)

    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(0, x.dtype))
    m, s = jax.lax.reduce((x, jnp.ones_like(x)), init, combine, (x.ndim - 1,))
    return m + jnp.log(s)


def _ce_chunks(h, w, targets, vocab_major, chunk, with_grad: bool):
    """Scan over token chunks: (sum of CE, and with_grad: (d sum / d h, d sum / d w))."""
    hc, tc, n = _chunks(h, targets, chunk)
    f = jnp.promote_types(jnp.result_type(h, w), jnp.float32)  # float32; float64 for float64 inputs

    def body(carry, xs):
        total, dw = carry
        hb, tb = xs
        logits = _logits(hb, w, vocab_major, f)  # [chunk, V] float32, never leaves the loop body
        lse = _logsumexp(logits) if ONE_PASS_LSE else jax.nn.logsumexp(logits, axis=-1)
        valid = tb != IGNORE
        picked = jnp.take_along_axis(logits, jnp.where(valid, tb, 0)[:, None], axis=-1)[:, 0]
        total = total + jnp.sum(jnp.where(valid, lse - picked, 0.0))
        if not with_grad:
            return (total, dw), None
        # d CE / d logits = softmax - onehot(target), zero for ignored targets
        d = jnp.exp(logits - lse[:, None]) - jax.nn.one_hot(jnp.where(valid, tb, -1), logits.shape[-1])
        d = jnp.where(valid[:, None], d, 0.0).astype(w.dtype)
        if vocab_major:
            dh = jnp.dot(d, w, preferred_element_type=f)
            dw = dw + jax.lax.dot_general(d, hb, (((0,), (0,)), ((), ())), preferred_element_type=f)
        else:
            dh = jax.lax.dot_general(d, w, (((1,), (1,)), ((), ())), preferred_element_type=f)
            dw = dw + jax.lax.dot_general(hb, d, (((0,), (0,)), ((), ())), preferred_element_type=f)
        return (total, dw), dh.astype(h.dtype)

    dw0 = jnp.zeros(w.shape if with_grad else (), f)
    (total, dw), dh = jax.lax.scan(body, (jnp.zeros((), f), dw0), (hc, tc))
    if not with_grad:
        return total, None
    return total, (dh.reshape(-1, h.shape[1])[:n], dw.astype(w.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def chunked_ce_sum(h: jax.Array, w: jax.Array, targets: jax.Array, vocab_major: bool = False,
                   chunk: int = 1024) -> jax.Array:
    """Sum over valid targets of float32 (float64 for float64 inputs) cross-entropy of logits h @ w. h [N, d];
    w [d, V] (or [V, d] with vocab_major, e.g. a tied embedding); targets [N] int with -100 = ignored."""
    return _ce_chunks(h, w, targets, vocab_major, chunk, with_grad=False)[0]


def _ce_fwd(h, w, targets, vocab_major, chunk):
    # The loss is a scalar, so its gradient can be formed while the chunk's logits are at hand: the forward pass
    # keeps d/dh [N, d] and d/dw (the size of w) instead of logits, and the backward pass only scales them.
    total, grads = _ce_chunks(h, w, targets, vocab_major, chunk, with_grad=True)
    return total, grads


def _ce_bwd(vocab_major, chunk, grads, g):
    dh, dw = grads
    return (dh * g.astype(dh.dtype)).astype(dh.dtype), (dw * g.astype(dw.dtype)).astype(dw.dtype), None


chunked_ce_sum.defvjp(_ce_fwd, _ce_bwd)


def causal_lm_loss_chunked(hidden: jax.Array, w: jax.Array, labels: jax.Array, num_items_in_batch=None,
                           vocab_major: bool = False, chunk: int = 1024) -> jax.Array:
    """`model.causal_lm_loss(hidden @ w, labels, num_items_in_batch)` without materialising the logits.
    hidden [B, S, d]; labels [B, S] with -100 ignored; mean over valid targets or sum / num_items_in_batch."""
    targets = shift_targets(labels).reshape(-1)
    total = chunked_ce_sum(hidden.reshape(-1, hidden.shape[-1]), w, targets, vocab_major, chunk)
    denom = jnp.asarray(jnp.sum(targets != IGNORE) if num_items_in_batch is None else num_items_in_batch,
                        total.dtype)
    # no valid target: a NaN loss (as the plain loss and torch's) but finite, zero gradients (0 * 1/0 would be NaN)
    return jnp.where(denom > 0, total / jnp.maximum(denom, 1e-30), jnp.nan)
