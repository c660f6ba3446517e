"""How long an edge-led chunk is, and whether one is worth drafting or handing the lead over.

``LeadPlanner`` is the drafting policy of edge-led generations (``edge_led.EdgeLed``):
it measures the edge's token interval and forward time, the round trip, the draft's
step time and how often the draft agrees with the target, as the generation runs, and
from them sizes each chunk (``chunk_len``), decides whether one is worth drafting now
(``worth_drafting``) and whether the device's own rounds would pay
(``device_leads_better``, the hand-over rule, through ``covspec.regime.plan``). It is
kept across generations (``CoInference.lead_planner_for``) and satisfies the part of
``DraftPolicy`` the ``Proposer`` calls (``continue_chunk``, ``observe_draft_step``).
It sends nothing and reads no reply.
"""

from __future__ import annotations

import math

from covspec.regime import plan

MAX_LEAD_LEN = 32          # the longest chunk (overlap included)
VERIFIED_LEN = 8           # tokens past the overlap with the adaptive policy (the toy pair accepts ~4.5 a round)
EXPLORE_EVERY = 16         # a chunk "not worth drafting" is drafted anyway after this many asks
STEP_LIKE_VERIFY = 1.15    # a verify forward "costs about a step" up to this many times the edge's own forward


class LeadPlanner:
    """How long an edge-led chunk is, and whether one is worth drafting now.

    A chunk is ``ceil((rtt / T + draft_len) / (1 - d / T))`` tokens long, where T is the
    edge's token interval, d the draft's step time and rtt the round trip: the first
    ``overlap`` tokens cover what the edge generates while the chunk is drafted and
    travels, the last ``draft_len`` are there to be verified (``draft_len`` alone until
    the edge's pace is known). The chunk is of use only if the draft agrees with the
    target over the whole overlap, which happens with probability about
    ``agreement ** overlap`` (agreement: the share of the draft's tokens that equalled
    the target's, counted as chunks are judged); below ``min_survival`` the device
    drafts nothing and lets the edge generate (on a slow link with a fast target,
    drafting would only spend the device's power), except now and then to keep the
    estimates current. Kept across generations
    (``CoInference.lead_planner_for``), so what it learns carries over."""

    def __init__(self, draft_len: int, max_len: int = MAX_LEAD_LEN, min_survival: float = 0.1):
        self.draft_len, self.max_len, self.min_survival = draft_len, max_len, min_survival
        self.edge_step_s: float | None = None
        self.rtt_s: float | None = None
        self.draft_step_s: float | None = None
        self.verify_s: float | None = None                  # the edge's verify forwards (chunks)
        self.edge_forward_s: float | None = None            # the edge's forwards for its own steps
        self.agreed, self.compared = 7.0, 10.0              # a prior of 0.7 worth ten tokens
        self.skipped = 0                                    # asks answered "not worth it" in a row

    def overlap(self, verified: int | None = None) -> float:
        """The tokens the edge is expected to generate before a chunk drafted now, with
        ``verified`` tokens past the overlap (default ``draft_len``), arrives."""
        if self.edge_step_s is None:
            return 0.0
        step = max(self.edge_step_s, 1e-6)
        verified = self.draft_len if verified is None else verified
        return ((self.rtt_s or 0.0) + verified * (self.draft_step_s or 0.0)) / step / \
            max(1.0 - (self.draft_step_s or 0.0) / step, 0.25)

    def reach(self) -> float:
        """The tokens the edge is expected to commit while a chunk already drafted travels
        to it and its reply travels back: a chunk from the committed end must be longer
        than this to hold a token the edge still has to verify when it arrives."""
        if self.edge_step_s is None:
            return 0.0
        return (self.rtt_s or 0.0) / max(self.edge_step_s, 1e-6)

    def survives(self, tokens: float) -> bool:
        """Whether the draft agrees with the target over ``tokens`` tokens in a row with a fair
        chance: the agreement so far to that power, at least ``min_survival``."""
        return (self.agreed / self.compared) ** tokens >= self.min_survival

    def reachable(self) -> bool:
        """Whether a chunk already drafted has a fair chance to agree with everything the edge
        commits while it travels (``reach``), so that running ahead pays."""
        return self.survives(self.reach())

    def chunk_len(self, verified: int | None = None) -> int:
        """The overlap and ``verified`` tokens past it (default ``draft_len``)."""
        verified = self.draft_len if verified is None else verified
        return int(min(self.max_len, math.ceil(self.overlap(verified) + verified)))

    def verify_costs_a_step(self) -> bool:
        """Whether the edge's verify forwards cost about what its own steps do (at most
        ``STEP_LIKE_VERIFY`` times; true until both are measured). A GPU target's are
        memory-bound, so a chunk of a few tokens costs a step; a small target on a CPU
        pays for every row."""
        if self.verify_s is None or self.edge_forward_s is None:
            return True
        return self.verify_s <= STEP_LIKE_VERIFY * self.edge_forward_s

    def worth_drafting(self) -> bool:
        """Whether to draft a chunk now; below ``min_survival`` still once every
        ``EXPLORE_EVERY`` asks, so that the estimates it rests on stay current."""
        if self.survives(self.overlap()) or self.skipped >= EXPLORE_EVERY:
            self.skipped = 0
            return True
        self.skipped += 1
        return False

    def device_leads_better(self) -> bool:
        return self.hand_over_len() is not None

    def hand_over_len(self) -> int | None:
        """The length of the device-led rounds once the lead is handed over (the best
        round length k below; the first round's chunk is drafted while the hand-over
        chunk is verified), or None while the edge stepping alone is better.

        Whether device-led rounds would commit ``HAND_OVER_GAIN`` times the tokens per
        second of the target stepping alone (``plan.round_rate``, the plan's own formula): a
        round of k drafted tokens commits ``1 + a + ... + a**k`` tokens (a: the agreement
        so far) in ``k d + rtt + F``
        (draft steps, the round trip, one target forward over the chunk: the edge's
        step T, or the verify forwards measured so far when they took longer), at the
        best k. T is the edge's own forward time for a step (what its streamed tokens
        report), not their spacing on arrival, which bunches while the device drafts;
        the round trip measured edge-led includes waiting for the step under way, half
        a step on average, which a device-led round does not. None until the edge's
        step, the draft's step and the round trip have been measured."""
        if self.edge_forward_s is None or self.draft_step_s is None or self.rtt_s is None:
            return None
        step = max(self.edge_forward_s, 1e-6)
        costs = plan.Costs(target_step_s=step, target_prefill_s=0.0, verify_s=(max(step, self.verify_s or 0.0),),
                           draft_step_s=self.draft_step_s, draft_prefill_s=0.0,
                           rtt_s=max(self.rtt_s - step / 2, 0.0), upload_s=0.0)
        agreement = [self.agreed / self.compared]
        rate, k = max((plan.round_rate(costs, agreement, k), k) for k in range(1, self.max_len + 1))
        return k if rate * step > plan.HAND_OVER_GAIN else None

    def observe_agreement(self, agreed: int, compared: int) -> None:
        self.agreed, self.compared = self.agreed + agreed, self.compared + compared

    # the Proposer's drafting-policy interface: chunks end only at their length
    def continue_chunk(self, confidences: list[float]) -> bool:
        return True

    def observe_draft_step(self, seconds: float) -> None:
        self.draft_step_s = _ema(self.draft_step_s, seconds)

    def observe_edge_step(self, seconds: float) -> None:
        self.edge_step_s = _ema(self.edge_step_s, seconds)

    def observe_round(self, seconds: float, verify_s: float) -> None:
        self.rtt_s = _ema(self.rtt_s, max(seconds - verify_s, 0.0))

    def observe_verify(self, verify_s: float) -> None:
        self.verify_s = _ema(self.verify_s, verify_s)

    def observe_edge_forward(self, seconds: float) -> None:
        self.edge_forward_s = _ema(self.edge_forward_s, seconds)


def _ema(old: float | None, new: float, weight: float = 0.2) -> float:
    return new if old is None else (1 - weight) * old + weight * new
