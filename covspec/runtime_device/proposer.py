"""The proposer: drafts one chunk with the draft model, and nothing else.

``Proposer.draft(prefix, start, limit)`` extends the drafter to the generated tokens
``prefix`` and drafts until the policy stops the chunk, EOS, or ``limit`` tokens. For
each drafted position it records the token, the draft's probability of it
(``confidences``), the draft's best other token and its probability (the likeliest
correction, for branches) and the wire format's row for it (what the edge verifies
against). The draft samples from exactly the distribution that row describes, so the
proposer asks the codec for both (``codec.propose``) and never branches on the wire.

``ChunkProposer`` is what a strategy of the device loop drafts with: ``Proposer`` (a
draft model's), or the recorded chunks of a ``bench load`` replay device's table. The proposer knows nothing of sessions, sockets or
verdicts. Numpy only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from covspec.protocol.sampling import SamplingParams
from covspec.runtime_device.drafter import Drafter, DrafterState
from covspec.runtime_device.policy import DraftPolicy


@dataclass
class Chunk:
    """A drafted chunk: its tokens, what travels with them, and the draft's view of them.

    ``confidences[i]`` is the draft probability of ``tokens[i]``; ``alternatives[i]`` the
    draft's best other token there and ``alternative_probs[i]`` its probability (only
    when branches are drafted); ``rows[i]`` the wire row of position i. ``start`` is the
    generated position of ``tokens[0]``; ``assumed`` the bonus this chunk assumes at
    ``start - 1`` (-1: none, it follows the last verdict) and ``assumed_confidence``
    the draft's probability of it. ``state`` is the drafter fork after drafting (kept
    for branches); ``draft_s`` the seconds spent drafting it; ``seq`` and ``sent_at``
    are set when it is sent; ``device_leads`` marks the edge-led chunk that hands the
    lead to the device (``Verify.device_leads``).
    """

    start: int
    tokens: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    alternatives: list[int] = field(default_factory=list)
    alternative_probs: list[float] = field(default_factory=list)
    rows: list = field(default_factory=list)
    assumed: int = -1
    assumed_confidence: float = 1.0
    state: DrafterState | None = None
    draft_s: float = 0.0
    seq: int = -1
    sent_at: float = 0.0
    device_leads: bool = False

    @property
    def end(self) -> int:
        """The generated position right after the chunk's last token."""
        return self.start + len(self.tokens)


class ChunkProposer(Protocol):
    """Proposes chunks: ``draft`` one after the generated tokens ``prefix``, ``guess_bonus``
    (the likeliest token after ``prefix``, for pipelining and branches) and the draft's
    state around a branch (``snapshot``, ``restore``)."""

    def draft(self, prefix: list[int], start: int, limit: int,
              interrupt: Callable[[], bool] | None = None, *, fixed_length: bool = False) -> Chunk:
        """A chunk after ``prefix``, its first token at ``start``, at most ``limit`` tokens."""

    def guess_bonus(self, prefix: list[int]) -> tuple[int, float]:
        """The likeliest token after ``prefix`` and its probability."""

    def snapshot(self) -> DrafterState | None:
        """The draft's state after the last chunk (a branch resumes from it)."""

    def restore(self, state: DrafterState | None) -> None:
        """Resume from a ``snapshot``."""


class Proposer:
    """Drafts chunks for one generation (its sampling settings and random stream)."""

    def __init__(self, drafter: Drafter, codec, sampling: SamplingParams, policy: DraftPolicy,
                 rng: np.random.Generator, eos_ids: Collection[int], alternatives: bool):
        self.drafter, self.codec, self.sampling, self.policy = drafter, codec, sampling, policy
        self.rng = rng
        self.eos_ids = eos_ids
        self.alternatives = alternatives            # record the likeliest corrections (for branches)

    def draft(self, prefix: list[int], start: int, limit: int,
              interrupt: Callable[[], bool] | None = None, *, fixed_length: bool = False) -> Chunk:
        """A chunk after the generated tokens ``prefix``, its first token at ``start``, at
        most ``limit`` (>= 1) tokens. With ``interrupt``, the chunk ends early, with the
        tokens drafted so far, as soon as it says so: never dropped, for a chunk kept or
        dropped by how long it took to draft would be chosen by its tokens (a sampled
        chunk must be what the draft's distribution gives, whatever its tokens).
        With ``fixed_length`` it is exactly ``limit`` tokens long (drafted on past EOS and
        the policy's stops), so its length and drafting time say nothing of its tokens."""
        began = time.perf_counter()
        logits = self.drafter.extend_to(prefix)
        chunk = Chunk(start=start)
        while True:
            step_began = time.perf_counter()
            q = self._q(logits)                                                    # [V]
            token, row = self.codec.propose(q, self.sampling.greedy, self.rng)
            chunk.tokens.append(token)
            chunk.confidences.append(float(q[token]))
            chunk.rows.append(row)
            if self.alternatives:
                alternative = _second_choice(q, token)
                chunk.alternatives.append(alternative)
                chunk.alternative_probs.append(float(q[alternative]))
            if len(chunk.tokens) >= limit or (not fixed_length and self._ends(chunk, limit)) \
                    or (interrupt is not None and interrupt()):
                chunk.draft_s = time.perf_counter() - began
                return chunk
            logits = self.drafter.feed([token])[-1]
            self.policy.observe_draft_step(time.perf_counter() - step_began)

    def guess_bonus(self, prefix: list[int]) -> tuple[int, float]:
        """The draft's likeliest token after the generated tokens ``prefix``, and its probability."""
        q = softmax(self.drafter.extend_to(prefix))
        bonus = int(np.argmax(q))
        return bonus, float(q[bonus])

    def snapshot(self) -> DrafterState:
        return self.drafter.snapshot()

    def restore(self, state: DrafterState) -> None:
        self.drafter.restore(state)

    def _q(self, logits: np.ndarray) -> np.ndarray:
        """The draft's distribution: plain softmax when greedy, else processed as the user asked."""
        return softmax(logits) if self.sampling.greedy else self.sampling.p(logits)

    def _ends(self, chunk: Chunk, limit: int) -> bool:
        return (chunk.tokens[-1] in self.eos_ids or len(chunk.tokens) >= limit
                or not self.policy.continue_chunk(chunk.confidences))


def _second_choice(q: np.ndarray, token: int) -> int:
    """The likeliest token other than ``token`` under q [V]."""
    top = np.argpartition(-q, 1)[:2]
    return int(top[1] if top[0] == token else top[0])


def softmax(logits: np.ndarray) -> np.ndarray:
    """float64 softmax of one logits row [V]."""
    e = np.exp(logits.astype(np.float64) - logits.max())
    return e / e.sum()
