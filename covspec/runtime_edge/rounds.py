"""The middle of a round, for many sessions at once: one target forward, one verdict.

``run_rounds(target, work)`` takes prepared rounds (``Session.prepare`` /
``prepare_step``) of distinct sessions, runs their inputs through the target as one
batched forward (``TargetModel.extend_batch``: ragged contexts and chunk lengths), judges
every chunk where the logits are (``verify_batch``: the acceptance test, correction and
bonus, greedy or lossless sampling with each session's own settings and uniforms),
and commits each session (``Session.commit``). Only the verdicts' ids leave the
target's device, plus one distribution row for sessions on the dense wire.

``run_forward`` is the same with prefill chunks (``prefill.Prefill``) in the forward
beside the rounds: a chunk is a cached extension like a round, and only the logits after
its last token leave the forward (they choose a new session's first token).

A session's verdict does not depend on which other sessions share its forward (up to
the float rounding of a different batch shape), and a sampling session's randomness
comes from its own seeded generator in ``prepare``; so batched and one-at-a-time
serving commit the same tokens. ``verify_one`` is the one-session round (prepare, run,
reply) for callers without a scheduler.

The verifier is ``verify_batch`` (torch) unless ``verifier`` names another with its
signature (the Triton kernel on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from covspec.protocol.messages import Result, Verify
from covspec.runtime_edge.prefill import Prefill
from covspec.runtime_edge.session import Round, Session
from covspec.runtime_edge.target import TargetModel


def run_rounds(target: TargetModel, work: Sequence[tuple[Session, Round]],
               verifier: Callable | None = None) -> list[Result]:
    """One forward and one verdict for each (session, round) -> each session's reply, in order."""
    return run_forward(target, work, (), verifier)[0]


def run_forward(target: TargetModel, work: Sequence[tuple[Session, Round]], chunks: Sequence[tuple[Prefill, int]],
                verifier: Callable | None = None) -> tuple[list[Result], list[np.ndarray]]:
    """One forward over the rounds of ``work`` and the prefill ``chunks`` ((prefill, tokens):
    the next ``tokens`` of each ``Prefill``'s rest, which advances) -> (each round's reply,
    each chunk's logits [V] after its last token)."""
    sessions = [session for session, _ in work]
    assert len({id(s) for s in sessions}) == len(sessions), "one round per session in a forward"
    pieces = [prefill.take(count) for prefill, count in chunks]
    logits = target.extend_batch([s.cache for s in sessions] + [prefill.cache for prefill, _ in chunks],
                                 [r.inputs for _, r in work] + pieces)                  # [total + B + chunks', V]
    ends = np.cumsum([len(r.inputs) for _, r in work] + [len(piece) for piece in pieces])
    rows = [logits[end - 1].float().cpu().numpy() for end in ends[len(work):]]
    results = _judge(target, work, logits[:int(ends[len(work) - 1])], verifier) if work else []   # rounds' rows
    for (prefill, _), piece, row in zip(chunks, pieces, rows):                # once nothing can fail any more
        prefill.advance(len(piece), row)
    return results, rows


def _judge(target: TargetModel, work: Sequence[tuple[Session, Round]], logits,
           verifier: Callable | None) -> list[Result]:
    """Verdicts for the rounds of ``work`` from their logits rows [total + B, V]; each session commits."""
    import torch

    from covspec.runtime_edge.verify_batch import verify_batch

    sessions = [session for session, _ in work]
    lengths = [len(r.tokens) for _, r in work]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)   # [B + 1]
    draft = torch.from_numpy(np.concatenate([r.tokens for _, r in work]).astype(np.int64))  # [total]
    settings = [s.sampling for s in sessions]
    temperature = torch.tensor([p.temperature for p in settings], dtype=torch.float64)     # [B]
    top_k = torch.tensor([p.top_k for p in settings], dtype=torch.int64)                   # [B]
    top_p = torch.tensor([p.top_p for p in settings], dtype=torch.float64)                 # [B]
    q = accept = sample = None
    if not all(p.greedy for p in settings):
        q, accept, sample = _sampling_inputs(work, int(offsets[-1]), logits.shape[1])
    accepted, token = (verifier or verify_batch)(draft, offsets, logits, q, temperature, top_k, top_p,
                                                 accept, sample)
    accepted, token = accepted.tolist(), token.tolist()
    results = []
    for b, (session, round_) in enumerate(work):
        first_row = int(offsets[b]) + b

        def row(i: int, first_row: int = first_row) -> np.ndarray:
            return logits[first_row + i].float().cpu().numpy()

        results.append(session.commit(target, round_, accepted[b], token[b], row))
    return results


def _sampling_inputs(work: Sequence[tuple[Session, Round]], total: int, vocab: int):
    """Dense q [total, V] (zero rows for greedy sessions) and the uniforms, as torch tensors."""
    import torch

    q = np.zeros((total, vocab), np.float64)
    accept = np.zeros(total, np.float64)
    sample = np.zeros(len(work), np.float64)
    at = 0
    for b, (session, round_) in enumerate(work):
        n = len(round_.tokens)
        if not session.sampling.greedy:
            if n:
                q[at:at + n] = round_.q
                accept[at:at + n] = round_.accept_uniforms
            sample[b] = round_.sample_uniform
        at += n
    return torch.from_numpy(q), torch.from_numpy(accept), torch.from_numpy(sample)


def pick_verifier(device: str) -> Callable | None:
    """The Triton kernel on a CUDA target when it can run there, else None (torch)."""
    if not device.startswith("cuda"):
        return None
    from covspec.runtime_edge.verify_triton import kernel_available, verify_batch_triton

    return verify_batch_triton if kernel_available(device) else None


def verify_one(target: TargetModel, session: Session, message: Verify) -> Result:
    """One verify round for ``session`` alone: prepare -> run -> the reply."""
    work = session.prepare(target, message)
    if isinstance(work, Result):
        return work
    return run_rounds(target, [(session, work)])[0]
