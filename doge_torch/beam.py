"""Beam search for doge_torch: transformers' vectorized beam search (generation/utils.py `_beam_search`), step for
step, so that its very sequences come out: each step keeps the top (1 + number of EOS ids, at least 2) x num_beams
continuations of all beams, the best num_beams unfinished ones run on, and those ending (EOS or the length
limit) among the top num_beams compete, length-penalised, for the num_beams finished places."""

from __future__ import annotations

from collections.abc import Callable

import torch

from doge_jax.generation_args import beam_candidates

NEG = -1.0e9  # transformers' "never pick this" score (added, not assigned: scores keep their order among equals)


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk over the last axis with ties to the lower index (a stable sort), as doge_jax's lax.top_k: the two
    packages agree where scores tie (torch.topk, and so transformers, orders ties as it happens to)."""
    values, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, K, ...] -> x[b, idx[b, j], ...] for idx [B, J]."""
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.ndim - 2))).expand(*idx.shape, *x.shape[2:]))


def beam_search(logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                reorder: Callable[[torch.Tensor], None], ids: torch.Tensor, mask: torch.Tensor, *,
                num_beams: int, num_return_sequences: int, max_new_tokens: int, eos: list[int], fill: int,
                length_penalty: float, early_stopping: bool | str,
                processors: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
                draw: Callable[[torch.Tensor, int], torch.Tensor] | None = None, record_scores: bool = False,
                record_logits: bool = False) -> dict:
    """{"sequences": the best num_return_sequences sequences of each prompt row, [B * num_return_sequences, P + n]
    (a row's sequences best first; shorter ones filled with `fill`, n the longest returned), "sequences_scores"
    [B * num_return_sequences], "beam_indices" [B * num_return_sequences, n] (transformers'), and with
    record_scores / record_logits the tuples of each step's processed log-probabilities / raw logits [B*K, V]}.
    `ids` / `mask` [B * num_beams, P] are the prompt rows, each repeated num_beams times; `logits_of(seqs [B*K, T],
    mask [B*K, T])` gives the float32 next-token logits of the running sequences (one call per new token, each a
    token longer), `reorder(rows)` makes its cache follow the surviving beams, and `processors(seqs, log_probs, new)`
    applies the logits processors to the log-probabilities (as transformers does in beam search). With
    `draw(scores [B, K*V], n)` (beam sampling) the step's candidates are n indices drawn without replacement instead
    of the top n."""
    K = num_beams
    BK, P = ids.shape
    B = BK // K
    dev = ids.device
    max_length = P + max_new_tokens
    keep = beam_candidates(eos) * K  # candidates per step: enough for K unfinished ones if the best all end
    top_k_mask = torch.arange(keep, device=dev) < K  # only the best K candidates may enter the finished set
    eos_t = torch.tensor(eos, dtype=torch.long, device=dev)

    running = torch.full((B, K, max_length), fill, dtype=torch.long, device=dev)
    running[:, :, :P] = ids.view(B, K, P)
    seqs = running.clone()  # the finished ones
    run_scores = torch.zeros(B, K, device=dev)
    run_scores[:, 1:] = NEG  # the first step expands beam 0 only (the beams are copies of one prompt)
    scores = torch.full((B, K), NEG, device=dev)
    finished = torch.zeros(B, K, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    run_src = torch.full((B, K, max_new_tokens), -1, dtype=torch.long, device=dev)  # each token's source row
    src = run_src.clone()
    offset = torch.arange(B, device=dev)[:, None] * K
    cur = P
    all_scores, all_logits = [], []
    while True:
        flat = running[:, :, :cur].reshape(BK, cur)
        logits = logits_of(flat, mask)
        log_probs = processors(flat, torch.log_softmax(logits, dim=-1), cur - P)
        if record_scores:
            all_scores.append(log_probs)
        if record_logits:
            all_logits.append(logits)
        V = log_probs.shape[-1]
        log_probs = (log_probs.view(B, K, V) + run_scores[:, :, None]).view(B, K * V)

        # the top `keep` continuations over all beams (beam = index // V, token = index % V)
        if draw is None:
            top_lp, top_idx = _topk(log_probs, keep)
        else:
            top_idx = draw(log_probs, keep)
            top_lp = log_probs.gather(1, top_idx)
        beam = top_idx // V
        top_seqs = _gather(running, beam)
        top_seqs[:, :, cur] = top_idx % V
        top_src = _gather(run_src, beam)
        top_src[:, :, cur - P] = beam + offset
        ends = torch.isin(top_seqs[:, :, cur], eos_t) | (cur + 1 >= max_length)

        # the best K that did not end run on
        run_lp = top_lp + ends.float() * NEG
        nxt = _topk(run_lp, K)[1]
        running, run_scores, run_src = _gather(top_seqs, nxt), _gather(run_lp, nxt), _gather(top_src, nxt)

        # those of the best K that ended compete for the finished places
        just = ends & top_k_mask[None]
        fin_lp = top_lp / ((cur + 1 - P) ** length_penalty)
        fin_lp = fin_lp + (finished.all(-1, keepdim=True) & (early_stopping is True)).float() * NEG
        fin_lp = fin_lp + (~improvable).float() * NEG
        fin_lp = fin_lp + (~just) * NEG
        best = _topk(torch.cat([scores, fin_lp], 1), K)[1]
        seqs = _gather(torch.cat([seqs, top_seqs], 1), best)
        scores = _gather(torch.cat([scores, fin_lp], 1), best)
        src = _gather(torch.cat([src, top_src], 1), best)
        finished = _gather(torch.cat([finished, just], 1), best)

        reorder(run_src[:, :, cur - P].reshape(BK))
        cur += 1
        # can a running beam still beat the worst finished one? (transformers' heuristic, by early_stopping)
        hyp_len = (max_length - P) if early_stopping == "never" and length_penalty > 0.0 else cur - P
        best_run = run_scores[:, :1] / (hyp_len ** length_penalty)
        worst = torch.where(finished, scores.min(1, keepdim=True).values, torch.tensor(NEG, device=dev))
        improvable = improvable & (best_run > worst).any(-1, keepdim=True)
        go_on = (bool(improvable.any()) and not (bool(finished.all()) and early_stopping is True)
                 and not bool(ends.all()))
        if not go_on:
            break
        mask = torch.cat([mask, mask.new_ones(BK, 1)], 1)

    seqs, src = seqs[:, :num_return_sequences], src[:, :num_return_sequences]
    n = int((src >= 0).sum(-1).max())
    return {"sequences": seqs.reshape(B * num_return_sequences, max_length)[:, :P + n],
            "sequences_scores": scores[:, :num_return_sequences].reshape(-1),
            "beam_indices": src.reshape(B * num_return_sequences, -1)[:, :n],
            "scores": tuple(all_scores) if record_scores else None,
            "logits": tuple(all_logits) if record_logits else None}
