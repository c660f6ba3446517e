"""Batched, ragged verification with the per-session part fused in Triton.

The same contract as ``verify_batch.verify_batch`` (its module docstring defines the
terms q, p, accepted, correction, bonus, the ragged layout and the explicit uniforms),
and that torch function is the reference this one is tested against. The split follows
vLLM's rejection sampler:

1. torch, vocabulary-wide: the target's argmax per logits row and, when any session
   samples, p = ``target_probs_batch`` (temperature -> top-k -> top-p, float64).
2. Triton, one program per session (``_verify_sessions``): walk the chunk (greedy:
   argmax == draft; sampling: ``u * q(x) < p(x)``), stop at the first rejection, then
   draw the correction from norm(max(0, p - q)) (p itself when the residual has no
   mass) or the bonus from p, by inverse CDF with the session's sample uniform: one
   pass over the vocabulary in blocks for the total, a second for the first index
   whose cumulative sum exceeds ``u * total``, clamped to V - 1 (``sample_rows``'s
   searchsorted-right rule).

Only accepted [B] and token [B] (and a [B] zero-draft-probability flag, read on the
host only when some session samples) are written; p and q never leave the device.
Results equal ``verify_batch`` except where a uniform lies within float rounding of a
CDF boundary (the sums are ordered differently). Triton is optional: without it
``kernel_available`` is False and ``verify_batch_triton`` raises RuntimeError. On a
CPU tensor the kernel runs only in Triton's interpreter (``TRITON_INTERPRET=1`` set
before this module is first imported), which is for tests, not speed.
"""

from __future__ import annotations

import torch

from covspec.runtime_edge.verify_batch import checked_layout, target_probs_batch

try:
    import triton
    import triton.language as tl
except ImportError:                                     # the optional extra is not installed
    triton = tl = None

MAX_BLOCK = 1024                                        # vocabulary block one program scans at once
# _verify_sessions' argument types as launched (for ahead-of-time compile checks without a GPU).
KERNEL_SIGNATURE = {"draft_ptr": "*i64", "offsets_ptr": "*i64", "choice_ptr": "*i64", "p_ptr": "*fp64",
                    "q_ptr": "*fp64", "temperature_ptr": "*fp64", "accept_u_ptr": "*fp64", "sample_u_ptr": "*fp64",
                    "accepted_ptr": "*i64", "token_ptr": "*i64", "zero_q_ptr": "*i8", "vocab": "i32",
                    "SAMPLING": "constexpr", "BLOCK": "constexpr"}


def kernel_available(device: torch.device | str) -> bool:
    """True when ``verify_batch_triton`` can run on ``device``: triton imports and either
    the device is CUDA (with a CUDA torch) or the kernel was built in interpret mode."""
    if triton is None:
        return False
    if interpreted():
        return True
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def interpreted() -> bool:
    """Whether the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return triton is not None and type(_verify_sessions).__name__ == "InterpretedFunction"


def verify_batch_triton(draft: torch.Tensor, offsets: torch.Tensor, target_logits: torch.Tensor,
                        q: torch.Tensor | None, temperature: torch.Tensor, top_k: torch.Tensor,
                        top_p: torch.Tensor, accept_uniforms: torch.Tensor | None = None,
                        sample_uniforms: torch.Tensor | None = None, *,
                        block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify B ragged chunks at once -> (accepted [B] int64, token [B] int64), as
    ``verify_batch`` (same arguments, shapes, results and ValueError on a reached draft
    token with zero draft probability), the per-session work in one Triton kernel.

    draft: [total] int64; offsets: [B + 1] int64; target_logits: [total + B, V] float;
    q: [total, V] float or None (all greedy); temperature: [B] float (0: greedy);
    top_k: [B] int; top_p: [B] float; accept_uniforms: [total]; sample_uniforms: [B].
    ``block`` (keyword only, a power of two) is the vocabulary block the kernel scans;
    the default is min(1024, V rounded up to a power of two).
    """
    if not kernel_available(target_logits.device):
        raise RuntimeError(f"no Triton kernel for {target_logits.device}: needs the triton package and "
                           "a CUDA device, or TRITON_INTERPRET=1 set before this module is imported")
    device = target_logits.device
    draft, offsets, temperature = checked_layout(draft, offsets, target_logits, temperature, top_k, top_p)
    sessions, total, vocab = offsets.numel() - 1, draft.numel(), target_logits.shape[1]
    lengths = offsets[1:] - offsets[:-1]                                               # [B]
    sampling = temperature > 0                                                         # [B]
    any_sampling = bool(sampling.any())
    block = block or min(MAX_BLOCK, triton.next_power_of_2(vocab))
    assert block > 0 and block & (block - 1) == 0, "block must be a power of two"

    # 1. torch, vocabulary-wide: the argmax per row and, if any session samples, p.
    choice = target_logits.argmax(dim=-1)                                              # [total + B]
    p = q_f64 = accept_u = sample_u = None
    if any_sampling:
        assert q is not None and q.shape == (total, vocab), "q: [total, V] when any session samples"
        assert accept_uniforms is not None and accept_uniforms.shape == (total,), "accept_uniforms: [total]"
        assert sample_uniforms is not None and sample_uniforms.shape == (sessions,), "sample_uniforms: [B]"
        rows_of = torch.repeat_interleave(torch.arange(sessions, device=device), lengths + 1,
                                          output_size=total + sessions)                # [total + B]
        row_temperature = torch.where(sampling, temperature, torch.ones_like(temperature))[rows_of]
        p = target_probs_batch(target_logits, row_temperature, top_k.to(device)[rows_of],
                               top_p.to(device)[rows_of])                              # [total + B, V] f64
        q_f64, accept_u, sample_u = q, accept_uniforms, sample_uniforms

    # 2. Triton, one program per session: the chunk walk, then the correction or bonus.
    accepted = torch.empty(sessions, dtype=torch.int64, device=device)                 # [B]
    token = torch.empty(sessions, dtype=torch.int64, device=device)                    # [B]
    zero_q = torch.zeros(sessions, dtype=torch.int8, device=device)                    # [B] 1: raise
    _verify_sessions[(sessions,)](
        _operand(draft, torch.int64, device), offsets, choice.contiguous(), _operand(p, torch.float64, device),
        _operand(q_f64, torch.float64, device), temperature, _operand(accept_u, torch.float64, device),
        _operand(sample_u, torch.float64, device), accepted, token, zero_q, vocab,
        SAMPLING=any_sampling, BLOCK=block, num_warps=4 if block <= 1024 else 8, enable_fp_fusion=False)

    # 3. host: the reference's error, read only when some session samples.
    if any_sampling and bool(zero_q.any()):
        b = int(torch.nonzero(zero_q)[0, 0])
        i = int(accepted[b])
        raise ValueError(f"draft token {int(draft[int(offsets[b]) + i])} at chunk position {i} "
                         f"of session {b} has zero draft probability")
    return accepted, token


def _operand(tensor: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``tensor`` as a contiguous kernel operand, or a one-element stand-in where it is
    None or empty (the kernel never reads it then)."""
    if tensor is None or tensor.numel() == 0:
        return torch.zeros(1, dtype=dtype, device=device)
    return tensor.to(device=device, dtype=dtype).contiguous()


if triton is not None:

    @triton.jit
    def _draw(p_row, q_row, q_width, u, vocab, BLOCK: tl.constexpr):
        """One inverse-CDF draw from norm(max(0, p - q[:q_width])), or from p when that has
        no mass. p_row, q_row: pointers to [V] float64 rows; q_width: V after a rejection,
        0 for a bonus (q unread); u: float64 in [0, 1) -> index in [0, V)."""
        lanes = tl.arange(0, BLOCK)                                                    # [BLOCK]
        residual_mass = tl.zeros((), dtype=tl.float64)
        p_mass = tl.zeros((), dtype=tl.float64)
        for start in range(0, vocab, BLOCK):                                           # pass 1: totals
            cols = start + lanes
            pv = tl.load(p_row + cols, mask=cols < vocab, other=0.0)
            qv = tl.load(q_row + cols, mask=cols < q_width, other=0.0)
            residual_mass += tl.sum(tl.maximum(pv - qv, 0.0), axis=0)
            p_mass += tl.sum(pv, axis=0)
        q_width = tl.where(residual_mass > 0, q_width, 0)                              # no mass: p itself
        target = u * tl.where(q_width > 0, residual_mass, p_mass)
        first = vocab                                                                  # none crossed yet
        running = tl.zeros((), dtype=tl.float64)
        start = 0
        while (start < vocab) & (first == vocab):                                      # pass 2: the crossing
            cols = start + lanes
            pv = tl.load(p_row + cols, mask=cols < vocab, other=0.0)
            qv = tl.load(q_row + cols, mask=cols < q_width, other=0.0)
            d = tl.maximum(pv - qv, 0.0)                                               # [BLOCK]
            cumulative = running + tl.cumsum(d, axis=0)                                # [BLOCK]
            crossed = tl.where((cumulative > target) & (d > 0), cols, vocab)           # never a 0-mass id
            first = tl.min(crossed, axis=0)
            running += tl.sum(d, axis=0)
            start += BLOCK
        return tl.minimum(first, vocab - 1)

    @triton.jit
    def _verify_sessions(draft_ptr, offsets_ptr, choice_ptr, p_ptr, q_ptr, temperature_ptr, accept_u_ptr,
                         sample_u_ptr, accepted_ptr, token_ptr, zero_q_ptr, vocab,
                         SAMPLING: tl.constexpr, BLOCK: tl.constexpr):
        """Program b verifies session b. draft: [total] i64; offsets: [B + 1] i64; choice:
        [total + B] i64 argmax; p: [total + B, V] f64; q: [total, V] f64; temperature: [B] f64;
        accept_u: [total] f64; sample_u: [B] f64 -> accepted, token: [B] i64; zero_q: [B] i8."""
        b = tl.program_id(0)
        start = tl.load(offsets_ptr + b)                                               # i64
        n = tl.load(offsets_ptr + b + 1) - start                                       # chunk length
        row0 = start + b                                                               # first logits row
        accepted = n
        first_zero = n                                                                 # first q(x) <= 0
        if SAMPLING:
            greedy = tl.load(temperature_ptr + b) == 0.0
        for i in range(0, n):                                                          # 1. walk the chunk
            x = tl.load(draft_ptr + start + i)
            keep = tl.load(choice_ptr + row0 + i) == x
            if SAMPLING:
                qx = tl.load(q_ptr + (start + i) * vocab + x)
                px = tl.load(p_ptr + (row0 + i) * vocab + x)
                u = tl.load(accept_u_ptr + start + i)
                keep = tl.where(greedy, keep, (u * qx < px) & (qx > 0))
                first_zero = tl.minimum(first_zero, tl.where(greedy | (qx > 0), n, i))
            accepted = tl.minimum(accepted, tl.where(keep, n, i))
        token_row = row0 + accepted
        token = tl.load(choice_ptr + token_row)                                        # greedy verdict
        if SAMPLING:                                                                   # 2. correction or bonus
            tl.store(zero_q_ptr + b, ((first_zero == accepted) & (accepted < n)).to(tl.int8))
            if tl.load(temperature_ptr + b) > 0.0:
                q_row = q_ptr + (start + tl.minimum(accepted, tl.maximum(n - 1, 0))) * vocab
                q_width = tl.where(accepted < n, vocab, 0)                             # 0: a bonus
                token = _draw(p_ptr + token_row * vocab, q_row, q_width, tl.load(sample_u_ptr + b),
                              vocab, BLOCK).to(tl.int64)
        tl.store(accepted_ptr + b, accepted)
        tl.store(token_ptr + b, token)
