"""Drafting policies: when to stop a chunk and how many chunks to keep in flight.

A policy sees only numbers it is given (draft confidences, measured timings,
verdicts), never a clock, so its decisions are deterministic given a recorded trace.

- ``FixedPolicy``: every chunk has ``draft_len`` tokens (the classic fixed gamma).
- ``AdaptivePolicy`` (CoVSpec): keeps online estimates of the acceptance probability
  as a function of draft confidence (calibrated from verdicts), the draft step time,
  the round trip and the edge's verify time (linear in the chunk length), and drafts
  one more token only while that raises the expected committed tokens per second:

      E(n) = 1 + sum_{i<=n} prod_{j<=i} a(c_j)      expected tokens a round commits
      T(n) = n * t_draft + rtt + t_verify(n)        expected seconds a round takes

  The next token's acceptance is predicted from the last drafted token's confidence
  (confidence is strongly autocorrelated along a chunk). A hard maximum bounds the
  chunk. It allows a second chunk in flight (pipelining) when drafting a chunk takes
  less time than waiting for a verdict, so the wait hides the drafting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class FixedPolicy:
    name = "fixed"

    def __init__(self, draft_len: int, pipeline: bool = False):
        self.draft_len = draft_len
        self.pipeline = pipeline

    def continue_chunk(self, confidences: list[float]) -> bool:
        return len(confidences) < self.draft_len

    def in_flight(self) -> int:
        """With pipelining, always a second chunk in flight."""
        return 2 if self.pipeline else 1

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
    """P(accept | draft confidence), per confidence bin, with a Beta prior per bin."""

    bins: int = 10
    prior_accept: float = 2.0
    prior_reject: float = 1.0
    accepted: np.ndarray = field(default=None)
    total: np.ndarray = field(default=None)

    def __post_init__(self) -> None:
        self.accepted = np.zeros(self.bins)
        self.total = np.zeros(self.bins)

    def _bin(self, confidence: float) -> int:
        return min(int(confidence * self.bins), self.bins - 1)

    def probability(self, confidence: float) -> float:
        b = self._bin(confidence)
        # Prior mean leans on the confidence itself, so an uncalibrated draft is trusted
        # as far as its own probability says.
        prior_mean = min(max(confidence, 0.05), 0.95)
        strength = self.prior_accept + self.prior_reject
        return float((self.accepted[b] + strength * prior_mean) / (self.total[b] + strength))

    def observe(self, confidences: list[float], accepted: int) -> None:
        """Tokens before ``accepted`` were kept; the one at ``accepted`` was rejected;
        later ones were never judged."""
        for i, confidence in enumerate(confidences[: accepted + 1]):
            b = self._bin(confidence)
            self.total[b] += 1
            self.accepted[b] += i < accepted


class AdaptivePolicy:
    name = "adaptive"

    def __init__(self, max_len: int = 12, pipeline: bool = False, ema: float = 0.2):
        self.max_len = max_len
        self.pipeline = pipeline
        self.ema = ema
        self.calibration = AcceptanceCalibration()
        self.draft_step_s: float | None = None
        self.rtt_s: float | None = None          # round trip excluding the edge's compute
        self.verify_base_s: float | None = None   # edge verify time = base + per_token * n
        self.verify_per_token_s: float = 0.0

    # -- estimates -----------------------------------------------------------------------

    def observe_draft_step(self, seconds: float) -> None:
        self.draft_step_s = _ema(self.draft_step_s, seconds, self.ema)

    def observe_round(self, confidences: list[float], accepted: int, round_s: float, verify_s: float) -> None:
        """One verdict: calibrate acceptance and update link and edge timings."""
        self.calibration.observe(confidences, accepted)
        self.rtt_s = _ema(self.rtt_s, max(round_s - verify_s, 0.0), self.ema)
        n = len(confidences)
        predicted = self.verify_s(n)
        if self.verify_base_s is None:
            self.verify_base_s = verify_s
        else:
            # One step of least squares on (base, per_token), kept non-negative.
            error = verify_s - predicted
            self.verify_base_s = max(self.verify_base_s + self.ema * error / 2, 0.0)
            self.verify_per_token_s = max(self.verify_per_token_s + self.ema * error / (2 * max(n, 1)), 0.0)

    def verify_s(self, n: int) -> float:
        return (self.verify_base_s or 0.0) + self.verify_per_token_s * n

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
        with_next = acceptance + [acceptance[-1]]
        return self.expected_rate(with_next) > self.expected_rate(acceptance)

    def in_flight(self) -> int:
        """With pipelining allowed, two chunks in flight when a chunk drafts faster than a
        verdict comes back (the wait hides the drafting); otherwise one."""
        if not self.pipeline or self.draft_step_s is None or self.rtt_s is None:
            return 1
        wait = self.rtt_s + self.verify_s(self.max_len // 2)
        return 2 if self.draft_step_s * (self.max_len // 2) < wait else 1

    def explain(self, confidences: list[float]) -> dict:
        acceptance = [round(self.calibration.probability(c), 3) for c in confidences]
        return {"policy": self.name, "acceptance": acceptance,
                "expected_rate": round(self.expected_rate(acceptance), 2),
                "draft_step_ms": round((self.draft_step_s or 0) * 1000, 3),
                "rtt_ms": round((self.rtt_s or 0) * 1000, 3),
                "verify_ms": round(self.verify_s(len(confidences)) * 1000, 3)}
