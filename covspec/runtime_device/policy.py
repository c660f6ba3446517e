"""Drafting policies: when to stop a chunk and how many chunks to keep in flight.

A policy sees only numbers it is given (draft confidences, measured timings,
verdicts), never a clock, so its decisions are deterministic given a recorded trace.

- ``FixedPolicy``: every chunk has ``draft_len`` tokens (the classic fixed gamma); with
  pipelining, always ``max_in_flight`` chunks in flight.
- ``AdaptivePolicy`` (CoVSpec): keeps online estimates of the acceptance probability
  as a function of draft confidence (calibrated from verdicts), the draft step time,
  the round trip and the edge's verify time (linear in the chunk length), and drafts
  one more token only while that raises the expected committed tokens per second:

      E(n) = 1 + sum_{i<=n} prod_{j<=i} a(c_j)      expected tokens a round commits
      T(n) = n * t_draft + rtt + t_verify(n)        expected seconds a round takes

  The acceptance of the token not yet drafted is calibrated on its own, as
  P(accepted | the previous token's confidence), from verdicts: reusing the last
  token's acceptance under-drafts, because a hesitant word (a color in a
  description) is mostly followed by confident ones. A hard maximum bounds the
  chunk. With pipelining it keeps as many chunks in flight as drafting them hides in
  the wait for a verdict (one more per typical chunk's drafting time that fits in a
  round trip plus verify, up to ``max_in_flight``).

  ``t_verify(n)`` is a weighted least-squares line with a ridge prior on its slope
  (``VerifyModel``): verify time is nearly flat in n on an edge accelerator, and an
  unregularized online fit of noisy timings over a narrow range of n invents a
  slope that stops chunks early (measured: 1-token chunks on loopback).

A policy lives as long as its device's ``CoInference``: what it learned about the
draft, the link and the edge carries over from one generation to the next.

A new policy is one class that satisfies ``DraftPolicy`` and is decorated with
``@register``; ``DraftingOptions(policy=NAME)`` then selects it by its ``name``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class DraftPolicy(Protocol):
    """When to stop a chunk, how many chunks to keep in flight, and what it learns."""

    name: str
    max_len: int                   # no chunk is longer

    @classmethod
    def from_options(cls, options) -> "DraftPolicy":
        """The policy as ``DraftingOptions`` configure it."""

    def continue_chunk(self, confidences: list[float]) -> bool:
        """Draft one more token after tokens of these draft confidences?"""

    def in_flight(self) -> int:
        """How many chunks may await a verdict at once (1: no pipelining)."""

    def acceptance(self, confidence: float) -> float:
        """P(a drafted token of this draft confidence is accepted)."""

    def pipeline_weight(self) -> float:
        """What a used pipelined chunk saves, relative to a used branch."""

    def observe_round(self, confidences: list[float], accepted: int, round_s: float, verify_s: float) -> None:
        """A verdict: ``accepted`` of these tokens were kept; the round and the edge's timing."""

    def observe_draft_step(self, seconds: float) -> None:
        """One draft decoder step took ``seconds``."""

    def explain(self, confidences: list[float]) -> dict:
        """The numbers behind a chunk's length, for the trace."""


POLICIES: dict[str, type] = {}


def register(policy: type) -> type:
    """Make ``policy`` selectable by its ``name``."""
    POLICIES[policy.name] = policy
    return policy


@register
class FixedPolicy:
    name = "fixed"

    def __init__(self, draft_len: int, pipeline: bool = False, max_in_flight: int = 2):
        self.draft_len = draft_len
        self.max_len = draft_len
        self.pipeline = pipeline
        self.max_in_flight = max_in_flight

    @classmethod
    def from_options(cls, options) -> "FixedPolicy":
        return cls(options.draft_len, pipeline=options.pipeline, max_in_flight=options.max_in_flight)

    def continue_chunk(self, confidences: list[float]) -> bool:
        return len(confidences) < self.draft_len

    def in_flight(self) -> int:
        """With pipelining, always ``max_in_flight`` chunks in flight."""
        return self.max_in_flight if self.pipeline else 1

    def acceptance(self, confidence: float) -> float:
        """Uncalibrated: the draft's own probability."""
        return confidence

    def pipeline_weight(self) -> float:
        """No timings: a pipelined chunk and a branch are weighed by probability alone."""
        return 1.0

    def observe_round(self, confidences: list[float], accepted: int, round_s: float, verify_s: float) -> None:
        """Fixed drafting learns nothing."""

    def observe_draft_step(self, seconds: float) -> None:
        """Fixed drafting learns nothing."""

    def explain(self, confidences: list[float]) -> dict:
        return {"policy": self.name, "draft_len": self.draft_len}


def _ema(old: float | None, new: float, weight: float) -> float:
    return new if old is None else (1 - weight) * old + weight * new


@dataclass
class AcceptanceCalibration:
    """P(accept | draft confidence), per confidence bin, with a Beta prior per bin; and
    P(the next token is accepted | this token's confidence), for the token not yet drafted."""

    bins: int = 10
    prior_accept: float = 2.0
    prior_reject: float = 1.0
    accepted: np.ndarray = field(default=None)
    total: np.ndarray = field(default=None)
    next_accepted: np.ndarray = field(default=None)
    next_total: np.ndarray = field(default=None)

    def __post_init__(self) -> None:
        self.accepted, self.total = np.zeros(self.bins), np.zeros(self.bins)
        self.next_accepted, self.next_total = np.zeros(self.bins), np.zeros(self.bins)

    def _bin(self, confidence: float) -> int:
        return min(int(confidence * self.bins), self.bins - 1)

    def _posterior(self, hits: np.ndarray, totals: np.ndarray, confidence: float) -> float:
        b = self._bin(confidence)
        # Prior mean leans on the confidence itself, so an uncalibrated draft is trusted
        # as far as its own probability says.
        prior_mean = min(max(confidence, 0.05), 0.95)
        strength = self.prior_accept + self.prior_reject
        return float((hits[b] + strength * prior_mean) / (totals[b] + strength))

    def probability(self, confidence: float) -> float:
        """P(a drafted token of this confidence is accepted | the ones before it were)."""
        return self._posterior(self.accepted, self.total, confidence)

    def next_probability(self, previous_confidence: float) -> float:
        """P(the token after one of this confidence is accepted | the ones before it were)."""
        return self._posterior(self.next_accepted, self.next_total, previous_confidence)

    def observe(self, confidences: list[float], accepted: int) -> None:
        """Tokens before ``accepted`` were kept; the one at ``accepted`` was rejected;
        later ones were never judged."""
        judged = confidences[: accepted + 1]
        for i, confidence in enumerate(judged):
            b = self._bin(confidence)
            self.total[b] += 1
            self.accepted[b] += i < accepted
            if i > 0:
                previous = self._bin(judged[i - 1])
                self.next_total[previous] += 1
                self.next_accepted[previous] += i < accepted


@dataclass
class VerifyModel:
    """Edge verify seconds for a chunk of n tokens, ``base + per_token * n``.

    Exponentially weighted sufficient statistics of (n, seconds); the slope is
    ``cov(n, s) / (var(n) + ridge)``, so it stays near 0 until chunks of clearly
    different lengths show clearly different times, and never goes negative."""

    weight: float = 0.05          # per observation: a memory of about 20 rounds
    ridge: float = 4.0            # tokens^2 of pseudo-variance pulling the slope to 0
    moments: np.ndarray = field(default=None)   # weighted sums of 1, n, n^2, s, n*s

    def __post_init__(self) -> None:
        self.moments = np.zeros(5)

    @property
    def observed(self) -> bool:
        return bool(self.moments[0] > 0)

    def observe(self, n: int, seconds: float) -> None:
        sample = np.array([1.0, n, n * n, seconds, n * seconds])
        if not self.observed:
            self.moments = sample
        else:
            self.moments = (1 - self.weight) * self.moments + self.weight * sample

    def line(self) -> tuple[float, float]:
        """(base, per_token) seconds."""
        if not self.observed:
            return 0.0, 0.0
        w, sn, snn, ss, sns = self.moments
        mean_n, mean_s = sn / w, ss / w
        variance = max(snn / w - mean_n ** 2, 0.0)
        per_token = max((sns / w - mean_n * mean_s) / (variance + self.ridge), 0.0)
        return max(mean_s - per_token * mean_n, 0.0), per_token

    def seconds(self, n: int) -> float:
        base, per_token = self.line()
        return base + per_token * n


@register
class AdaptivePolicy:
    name = "adaptive"

    def __init__(self, max_len: int = 12, pipeline: bool = False, ema: float = 0.2, max_in_flight: int = 4):
        self.max_len = max_len
        self.pipeline = pipeline
        self.ema = ema
        self.max_in_flight = max_in_flight
        self.chunk_len: float | None = None     # drafted tokens per chunk (EMA)
        self.calibration = AcceptanceCalibration()
        self.draft_step_s: float | None = None
        self.rtt_s: float | None = None          # round trip excluding the edge's compute
        self.verify = VerifyModel()

    @classmethod
    def from_options(cls, options) -> "AdaptivePolicy":
        return cls(max_len=options.max_draft_len, pipeline=options.pipeline, max_in_flight=options.max_in_flight)

    # -- estimates -----------------------------------------------------------------------

    def observe_draft_step(self, seconds: float) -> None:
        self.draft_step_s = _ema(self.draft_step_s, seconds, self.ema)

    def observe_round(self, confidences: list[float], accepted: int, round_s: float, verify_s: float) -> None:
        """One verdict: calibrate acceptance and update link and edge timings."""
        self.calibration.observe(confidences, accepted)
        self.chunk_len = _ema(self.chunk_len, len(confidences), self.ema)
        self.rtt_s = _ema(self.rtt_s, max(round_s - verify_s, 0.0), self.ema)
        self.verify.observe(len(confidences), verify_s)

    def verify_s(self, n: int) -> float:
        return self.verify.seconds(n)

    def acceptance(self, confidence: float) -> float:
        """Calibrated P(accepted) of a drafted token of this confidence."""
        return self.calibration.probability(confidence)

    def expected_rate(self, acceptance: list[float]) -> float:
        """Expected committed tokens per second of a round drafting len(acceptance) tokens."""
        n = len(acceptance)
        tokens = 1.0 + float(np.sum(np.cumprod(acceptance))) if n else 1.0
        seconds = n * (self.draft_step_s or 0.0) + (self.rtt_s or 0.0) + self.verify_s(n)
        return tokens / max(seconds, 1e-9)

    # -- decisions -----------------------------------------------------------------------

    def continue_chunk(self, confidences: list[float]) -> bool:
        n = len(confidences)
        if n == 0:
            return True
        if n >= self.max_len:
            return False
        if self.draft_step_s is None or self.rtt_s is None:
            return n < 4                           # no measurements yet: a classic start
        acceptance = [self.calibration.probability(c) for c in confidences]
        with_next = acceptance + [self.calibration.next_probability(confidences[-1])]
        return self.expected_rate(with_next) > self.expected_rate(acceptance)

    def in_flight(self) -> int:
        """With pipelining allowed, one chunk plus as many as drafting hides in the wait
        for a verdict (at most ``max_in_flight``); otherwise one."""
        drafting = self._chunk_draft_s()
        if not self.pipeline or drafting is None:
            return 1
        wait = self.rtt_s + self.verify_s(round(max(self.chunk_len, 1.0)))
        return int(min(self.max_in_flight, 1 + wait // drafting))

    def pipeline_weight(self) -> float:
        """What a used pipelined chunk saves against a used branch, ``(rtt + d) / d``: a
        branch saves drafting a chunk (d) once its verdict is in; a pipelined chunk also
        saves the round trip, since its verdict follows right behind the one before."""
        drafting = self._chunk_draft_s()
        return 1.0 if drafting is None else 1.0 + self.rtt_s / drafting

    def _chunk_draft_s(self) -> float | None:
        """Seconds to draft a typical chunk; None until draft steps and a round were seen."""
        if self.draft_step_s is None or self.rtt_s is None or self.chunk_len is None:
            return None
        return max(self.draft_step_s * max(self.chunk_len, 1.0), 1e-9)

    def explain(self, confidences: list[float]) -> dict:
        acceptance = [round(self.calibration.probability(c), 3) for c in confidences]
        return {"policy": self.name, "acceptance": acceptance,
                "expected_rate": round(self.expected_rate(acceptance), 2),
                "draft_step_ms": round((self.draft_step_s or 0) * 1000, 3),
                "rtt_ms": round((self.rtt_s or 0) * 1000, 3),
                "verify_ms": round(self.verify_s(len(confidences)) * 1000, 3),
                "verify_per_token_ms": round(self.verify.line()[1] * 1000, 3)}
