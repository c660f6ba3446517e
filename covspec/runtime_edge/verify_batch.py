"""Batched, ragged verification in torch, on the device where the target's logits are.

The same math as the numpy reference in ``covspec.protocol.verification``
(``target_probs``, ``verify_greedy``, ``verify_sampling``, ``residual``, ``sample``),
for B sessions at once, each with its own chunk length, temperature, top-k and top-p.
Terms as there: **q** the draft distribution at a drafted position, **p** the target
distribution after temperature -> top-k -> top-p, **accepted** the length of the kept
prefix of a chunk, **correction** the token drawn from ``norm(max(0, p - q))`` at the
first rejection (greedy: the target's argmax there), **bonus** the token drawn from p
after a fully accepted chunk. Stopping (``apply_stops``) stays with the caller.

Layout (as vLLM's rejection sampler takes it): the chunks are flattened into
``draft`` [total] with ``offsets`` [B + 1] (``offsets[b]:offsets[b + 1]`` is session
b's chunk, length n_b >= 0; n_b = 0 is a target-only step, which only draws the
bonus). ``target_logits`` has n_b + 1 rows per session, in session order, so session
b's rows start at ``offsets[b] + b``; row i scores chunk position i, row n_b follows
the last draft token. A session with ``temperature`` 0 is greedy (argmax, q and
uniforms unused); the others use lossless speculative sampling.

Randomness is passed in explicitly so the result is comparable with the reference:
session b's acceptance test at chunk position i uses ``accept_uniforms[offsets[b] + i]``
(accepted when ``u * q_i(x_i) < p_i(x_i)``), and its one correction/bonus draw uses
``sample_uniforms[b]`` by inverse CDF: ``min(searchsorted(cumsum(d), u * cumsum(d)[-1],
right), V - 1)``, as ``verification.sample``. ``verify_sampling(draft, q, p, rng)``
consumes ``rng.random()`` in the order u_0 .. u_j (the first rejection, or all n)
then the draw, so feeding it those values gives the same verdict.

Everything is computed in float64 (p, like ``target_probs``). On CPU, results equal the
reference exactly in practice (p agrees to ~1e-16; the reductions are ordered differently,
so only a uniform landing within rounding of a boundary could differ). On CUDA the
cumulative sum is a parallel scan, so the same caveat holds with a slightly larger
window. No Triton kernel here: this is the reference such a kernel would be tested against.
"""

from __future__ import annotations

import torch


def target_probs_batch(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """p per row, as ``verification.target_probs`` row by row: temperature, top-k (ties at
    the k-th value kept), top-p (smallest set with mass > top_p, at least one token).

    logits: [R, V] any float dtype; temperature: [R] float (> 0); top_k: [R] int (0 or
    >= V: off); top_p: [R] float (>= 1: off) -> p: [R, V] float64, rows summing to 1.
    """
    assert logits.dim() == 2, "logits: [R, V]"
    rows, vocab = logits.shape
    device = logits.device
    temperature = temperature.to(device=device, dtype=torch.float64)                    # [R]
    top_k = top_k.to(device=device, dtype=torch.int64)                                  # [R]
    top_p = top_p.to(device=device, dtype=torch.float64)                                # [R]
    assert temperature.shape == top_k.shape == top_p.shape == (rows,), "one setting per row"
    assert bool((temperature > 0).all()), "temperature must be > 0 for sampling"
    scores = logits.to(torch.float64) / temperature[:, None]                            # [R, V]
    limit_k = (top_k > 0) & (top_k < vocab)                                             # [R]
    if bool(limit_k.any()):
        descending = torch.sort(scores, dim=-1, descending=True).values                 # [R, V]
        kth = descending.gather(-1, (top_k.clamp(1, vocab) - 1)[:, None])               # [R, 1]
        kth = torch.where(limit_k[:, None], kth, torch.full_like(kth, -torch.inf))
        scores = scores.masked_fill(scores < kth, -torch.inf)
    limit_p = top_p < 1.0                                                               # [R]
    if bool(limit_p.any()):
        ascending, order = torch.sort(scores, dim=-1, stable=True)                      # [R, V]
        cumulative = torch.cumsum(_softmax(ascending), dim=-1)                          # [R, V]
        drop_sorted = cumulative <= (1.0 - top_p)[:, None]
        drop_sorted[:, -1] = False                                                      # keep >= 1 token
        drop_sorted &= limit_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)           # [R, V]
        scores = scores.masked_fill(drop, -torch.inf)
    return _softmax(scores)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """The reference's softmax, step for step. scores: [R, V] -> [R, V]."""
    e = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def sample_rows(dist: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row by inverse CDF, as ``verification.sample``.

    dist: [B, V] non-negative (any positive total); uniforms: [B] in [0, 1) -> [B] int64.
    """
    assert dist.dim() == 2 and uniforms.shape == (dist.shape[0],), "dist: [B, V], uniforms: [B]"
    cumulative = torch.cumsum(dist, dim=-1)                                             # [B, V]
    target = uniforms.to(cumulative)[:, None] * cumulative[:, -1:]                      # [B, 1]
    index = torch.searchsorted(cumulative, target, right=True)[:, 0]                   # [B]
    return index.clamp(max=dist.shape[1] - 1)


def residual_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) per row, p itself where no mass is left, as
    ``verification.residual``. p, q: [B, V] float64 -> [B, V] float64."""
    r = torch.clamp(p - q, min=0.0)                                                     # [B, V]
    total = r.sum(dim=-1, keepdim=True)                                                 # [B, 1]
    return torch.where(total > 0, r / torch.where(total > 0, total, torch.ones_like(total)), p)


def checked_layout(draft: torch.Tensor, offsets: torch.Tensor, target_logits: torch.Tensor,
                   temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """Check the ragged layout (module docstring) -> (draft [total] int64, offsets [B + 1]
    int64, temperature [B] float64), contiguous on target_logits' device."""
    device = target_logits.device
    assert draft.dim() == 1 and offsets.dim() == 1 and offsets.numel() >= 2, "draft: [total], offsets: [B + 1]"
    assert target_logits.dim() == 2, "target_logits: [total + B, V]"
    draft = draft.to(device=device, dtype=torch.int64)                                  # [total]
    offsets = offsets.to(device=device, dtype=torch.int64).contiguous()                 # [B + 1]
    sessions, total, vocab = offsets.numel() - 1, draft.numel(), target_logits.shape[1]
    lengths = offsets[1:] - offsets[:-1]                                                # [B]
    assert int(offsets[0]) == 0 and int(offsets[-1]) == total and bool((lengths >= 0).all()), \
        "offsets must be cumulative chunk lengths from 0 to total"
    assert target_logits.shape[0] == total + sessions, "need n_b + 1 logits rows per session"
    assert temperature.shape == top_k.shape == top_p.shape == (sessions,), "one setting per session"
    assert total == 0 or (0 <= int(draft.min()) and int(draft.max()) < vocab), "draft ids out of vocab"
    temperature = temperature.to(device=device, dtype=torch.float64).contiguous()       # [B]
    assert bool((temperature >= 0).all()), "temperature must be >= 0"
    return draft, offsets, temperature


def verify_batch(draft: torch.Tensor, offsets: torch.Tensor, target_logits: torch.Tensor,
                 q: torch.Tensor | None, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor, accept_uniforms: torch.Tensor | None = None,
                 sample_uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify B ragged chunks at once -> (accepted [B] int64, token [B] int64).

    draft: [total] int64, the chunks flattened; offsets: [B + 1] int64, cumulative chunk
    lengths (offsets[0] = 0, offsets[B] = total); target_logits: [total + B, V] float,
    n_b + 1 rows per session (see the module docstring); q: [total, V] float dense draft
    distributions (rows of greedy sessions unused), or None when every session is greedy;
    temperature: [B] float (0: greedy); top_k: [B] int (0: off); top_p: [B] float (1: off);
    accept_uniforms: [total] float in [0, 1); sample_uniforms: [B] float in [0, 1) (both
    may be None when every session is greedy). All on target_logits' device; results too.
    ``token`` is the correction (at chunk position ``accepted`` < n_b) or the bonus.
    Raises ValueError, like the reference, when a sampling session's draft token that
    the test reaches has zero draft probability.
    """
    device = target_logits.device
    draft, offsets, temperature = checked_layout(draft, offsets, target_logits, temperature, top_k, top_p)
    sessions, total, vocab = offsets.numel() - 1, draft.numel(), target_logits.shape[1]
    lengths = offsets[1:] - offsets[:-1]                                                # [B]
    greedy = temperature == 0                                                           # [B]
    sampling = ~greedy
    any_sampling = bool(sampling.any())
    if any_sampling:
        assert q is not None and q.shape == (total, vocab), "q: [total, V] when any session samples"
        assert accept_uniforms is not None and accept_uniforms.shape == (total,), "accept_uniforms: [total]"
        assert sample_uniforms is not None and sample_uniforms.shape == (sessions,), "sample_uniforms: [B]"

    arange_b = torch.arange(sessions, device=device)                                    # [B]
    session_of = torch.repeat_interleave(arange_b, lengths, output_size=total)          # [total]
    position = torch.arange(total, device=device) - offsets[:-1][session_of]            # [total]
    draft_row = torch.arange(total, device=device) + session_of                        # [total] logits row
    choice = target_logits.argmax(dim=-1)                                               # [total + B]
    ok = choice[draft_row] == draft                                                     # [total] greedy test

    p = None
    if any_sampling:
        rows_of = torch.repeat_interleave(arange_b, lengths + 1, output_size=total + sessions)  # [total + B]
        row_temperature = torch.where(sampling, temperature, torch.ones_like(temperature))[rows_of]
        p = target_probs_batch(target_logits, row_temperature, top_k.to(device)[rows_of],
                               top_p.to(device)[rows_of])                               # [total + B, V]
        q = q.to(device=device, dtype=torch.float64)                                    # [total, V]
        px = p[draft_row, draft]                                                        # [total]
        qx = q[torch.arange(total, device=device), draft]                               # [total]
        u = accept_uniforms.to(device=device, dtype=torch.float64)                      # [total]
        ok = torch.where(sampling[session_of], u * qx < px, ok)

    first_reject = torch.where(ok, lengths[session_of], position)                       # [total]
    accepted = lengths.clone().scatter_reduce_(0, session_of, first_reject, reduce="amin")  # [B]
    token_row = offsets[:-1] + arange_b + accepted                                      # [B] logits row
    token = choice[token_row]                                                           # [B] greedy
    if any_sampling:
        reached = position <= accepted[session_of]                                      # [total] tested
        if bool((reached & sampling[session_of] & (qx <= 0)).any()):
            bad = int(torch.nonzero(reached & sampling[session_of] & (qx <= 0))[0, 0])
            raise ValueError(f"draft token {int(draft[bad])} at chunk position {int(position[bad])} "
                             f"of session {int(session_of[bad])} has zero draft probability")
        rejected = accepted < lengths                                                   # [B]
        q_row = (offsets[:-1] + accepted).clamp(max=max(total - 1, 0))                  # [B]
        p_at = p[token_row]                                                             # [B, V]
        if total:
            dist = torch.where(rejected[:, None], residual_rows(p_at, q[q_row]), p_at)  # [B, V]
        else:
            dist = p_at
        drawn = sample_rows(dist, sample_uniforms.to(device=device, dtype=torch.float64))
        token = torch.where(sampling, drawn, token)
    return accepted, token
