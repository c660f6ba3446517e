"""``covspec plan``'s model: expected time-to-answer of each mode, from four kinds of input.

Inputs (``Costs``): the target's step, verify and prefill times, the draft's step and
prefill times, the round trip and the image's upload time; the answer length n; and
the acceptance curve ``alpha``: alpha[i] is the chance that the draft's token at chunk
position i + 1 is accepted given that the ones before it were (positions past the
curve's end repeat its last value). ``costs_for`` derives the times from a regime's
profiles (``roofline``) and the shapes of a request. Every formula is an expectation;
times are seconds from the moment the device sends ``open``.

- target-only: F = rtt + upload + target prefill is the first token; then n - 1 steps:
  ``F + (n - 1) t_e``.
- device-led, fixed draft length k, one chunk in flight (no pipelining, no branches):
  drafting starts at D = max(F, draft prefill); a round drafts k tokens (fewer where the
  answer ends: the draft stops at its end of sequence), travels, is verified in one forward
  and commits E[accepted] + 1 tokens, where E[accepted] = sum_i prod_{j<=i} alpha_j; rounds
  follow until n - 1 tokens are expected: about ``D + (n - 1) / (E + 1) x (k t_d + rtt + t_v(k))``.
- edge-led (``lead="edge"``): the target steps by itself from F on; the
  draft is ready at D; each chunk is ``L = ceil(overlap + v)`` tokens (``LeadPlanner``'s
  rule, v = 8), where the overlap is what the edge generates while the chunk is drafted
  (after feeding the streamed tokens: one more run), travels, and waits for the edge's
  step under way: ``o = (rtt + (L + 1) t_d + t_e / 2) / t_e``. A chunk whose overlap
  agrees (chance S = prod_{i<=o} alpha_i) jumps the edge ahead by the accepted tokens
  past the overlap, G = sum_{i=o+1..L} prod_{j<=i} alpha_j on average, when its verdict
  arrives; one a streamed token contradicts is dropped when that token arrives and the
  next drafted at once. Chunks are not drafted when the overlap survives with chance
  below 0.1. The generation ends when n tokens arrived: a draft prefill still under way
  then is abandoned.

- hand-over (the default for greedy, ``lead="auto"``): edge-led until the draft is ready
  at D; then the chunk that hands the lead over is drafted (k tokens), travels and meets
  the edge mid-step, so the edge steps by itself until ``H = D + k t_d + rtt + t_e / 2``,
  streaming ``1 + (H - F) / t_e`` tokens by then; from H on, device-led rounds of k (the
  hand-over chunk's own accepted tokens are not counted). All this only if a round
  commits more than ``HAND_OVER_GAIN`` times the tokens per second of the edge stepping
  alone (the device's rule, ``LeadPlanner.device_leads_better``); else edge-led throughout.

``recommend`` picks the mode (and k) of least expected time. Device-led with adaptive
lengths, pipelining and branches is not modelled: its draft length is the plan's k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from covspec.regime import roofline
from covspec.regime.profiles import Regime

LEAD_VERIFIED = 8          # tokens past the overlap in an edge-led chunk (the device's VERIFIED_LEN)
LEAD_MAX = 32              # the longest edge-led chunk (the device's MAX_LEAD_LEN)
LEAD_MIN_SURVIVAL = 0.1    # below this chance that the overlap agrees, no chunk is drafted
MAX_DRAFT_LEN = 12
HAND_OVER_GAIN = 1.2       # an edge-led generation hands the lead to the device when its rounds commit this much faster


@dataclass(frozen=True)
class Costs:
    """Seconds: the target's decode step, prefill and verify of k tokens (``verify_s[k]``),
    the draft's decode step and prefill (vision included), the round trip and upload."""

    target_step_s: float
    target_prefill_s: float
    verify_s: tuple[float, ...]           # verify_s[k]: one forward over k draft tokens (and the last committed)
    draft_step_s: float
    draft_prefill_s: float
    rtt_s: float
    upload_s: float

    def verify(self, k: int) -> float:
        return self.verify_s[min(k, len(self.verify_s) - 1)]

    @property
    def first_token_s(self) -> float:
        return self.rtt_s + self.upload_s + self.target_prefill_s


def costs_for(regime: Regime, rtt_ms: float, bandwidth_mbps: float, *, edge_context: int, draft_rows: int,
              image_bytes: int, frames: int = 1, context_at_decode: int | None = None) -> Costs:
    """The costs of a request of the given shapes under ``regime`` over a link."""
    target, device = regime.target, regime.device
    decode_context = context_at_decode or edge_context + 32
    upload = image_bytes * 8 / (bandwidth_mbps * 1e6) if bandwidth_mbps > 0 else 0.0
    verify = tuple(roofline.forward_s(target, [decode_context], [k + 1]) for k in range(LEAD_MAX + 1))
    draft_prefill = roofline.vision_s(device, frames) + roofline.decoder_s(device, draft_rows, prefill=True)
    return Costs(target_step_s=roofline.step_s(target, decode_context),
                 target_prefill_s=roofline.prefill_s(target, edge_context),
                 verify_s=verify, draft_step_s=roofline.decoder_s(device, 1, prefill=False),
                 draft_prefill_s=draft_prefill, rtt_s=rtt_ms / 1000, upload_s=upload)


def _alpha(alpha: Sequence[float], i: int) -> float:
    """The acceptance chance at chunk position i (1-based)."""
    return float(alpha[min(i, len(alpha)) - 1])


def survival(alpha: Sequence[float], positions: int) -> float:
    """The chance that the first ``positions`` draft tokens are all accepted."""
    return math.prod(_alpha(alpha, i) for i in range(1, positions + 1))


def expected_accepted(alpha: Sequence[float], k: int, skip: int = 0) -> float:
    """Expected accepted tokens among chunk positions skip + 1 .. k (each counted when it
    and every position before it are accepted)."""
    return sum(survival(alpha, i) for i in range(skip + 1, k + 1))


def target_only_s(costs: Costs, n: int) -> float:
    return costs.first_token_s + max(n - 1, 0) * costs.target_step_s


def device_led_s(costs: Costs, n: int, alpha: Sequence[float], k: int) -> float:
    start = max(costs.first_token_s, costs.draft_prefill_s)
    return _rounds_s(costs, start, float(max(n - 1, 0)), alpha, k)


def round_rate(costs: Costs, alpha: Sequence[float], k: int) -> float:
    """Tokens per second that device-led rounds of k commit."""
    return (expected_accepted(alpha, k) + 1) / (k * costs.draft_step_s + costs.rtt_s + costs.verify(k))


def hand_over_s(costs: Costs, n: int, alpha: Sequence[float], k: int) -> float:
    first, step = costs.first_token_s, costs.target_step_s
    if round_rate(costs, alpha, k) * step <= HAND_OVER_GAIN:
        return edge_led_s(costs, n, alpha)
    handed = max(first, costs.draft_prefill_s) + k * costs.draft_step_s + costs.rtt_s + step / 2
    streamed = 1 + (handed - first) / step
    if streamed >= n:
        return target_only_s(costs, n)
    return _rounds_s(costs, handed, n - streamed, alpha, k)


def _rounds_s(costs: Costs, start: float, remaining: float, alpha: Sequence[float], k: int) -> float:
    """When ``remaining`` more tokens are committed by device-led rounds of k from ``start``."""
    seconds = start
    while remaining > 0:
        drafted = max(1, min(k, math.ceil(remaining)))      # the draft stops where the answer ends (its EOS)
        seconds += drafted * costs.draft_step_s + costs.rtt_s + costs.verify(drafted)
        remaining -= expected_accepted(alpha, drafted) + 1   # a round commits at least one token
    return seconds


def lead_chunk(costs: Costs, alpha: Sequence[float]) -> tuple[int, float, bool]:
    """(chunk length L, the overlap it meets at the edge, whether it is drafted at all):
    ``LeadPlanner``'s length rule and its test that the estimated overlap survives with
    chance at least 0.1. A chunk is drafted after the tokens streamed meanwhile are fed
    (one decoder run), and meets the edge mid-step (half a step later on average)."""
    step, draft = costs.target_step_s, costs.draft_step_s
    estimate = (costs.rtt_s + LEAD_VERIFIED * draft) / step / max(1.0 - draft / step, 0.25)
    length = int(min(LEAD_MAX, math.ceil(estimate + LEAD_VERIFIED)))
    overlap = (costs.rtt_s + (length + 1) * draft + step / 2) / step
    return length, overlap, survival(alpha, math.ceil(estimate)) >= LEAD_MIN_SURVIVAL


def edge_led_s(costs: Costs, n: int, alpha: Sequence[float]) -> float:
    first, step = costs.first_token_s, costs.target_step_s
    length, overlap, drafted = lead_chunk(costs, alpha)
    covered = math.ceil(overlap)
    if not drafted or covered >= length:
        return target_only_s(costs, n)
    survive = survival(alpha, covered)
    gain = expected_accepted(alpha, length, skip=covered)
    drafting = (length + 1) * costs.draft_step_s
    # a chunk whose overlap agrees is verified and answered; one a streamed token contradicts
    # is dropped when that token arrives, and the next is drafted at once
    cycle = survive * (drafting + costs.rtt_s + step / 2 + costs.verify(length - covered)) + \
        (1 - survive) * (drafting + costs.rtt_s / 2)
    now = max(first, costs.draft_prefill_s)
    gained = 0.0
    while (now + cycle - first) / step + gained < n - 1:        # tokens after the first, by the next verdict
        gained += gain
        now += cycle
    return first + max(n - 1 - gained, 0) * step


@dataclass(frozen=True)
class Plan:
    mode: str                       # "target-only", "device-led", "edge-led" or "hand-over"
    draft_len: int                  # device-led, hand-over: the draft length; edge-led: the chunk length
    seconds: float
    target_only_s: float
    times: dict                     # every mode's expected time, device-led by draft length

    @property
    def speedup(self) -> float:
        return self.target_only_s / self.seconds


def recommend(costs: Costs, n: int, alpha: Sequence[float], max_draft_len: int = MAX_DRAFT_LEN) -> Plan:
    """The mode and draft length of least expected time-to-answer."""
    baseline = target_only_s(costs, n)
    times = {"target-only": baseline, "edge-led": edge_led_s(costs, n, alpha)}
    times.update({f"device-led k={k}": device_led_s(costs, n, alpha, k) for k in range(1, max_draft_len + 1)})
    times.update({f"hand-over k={k}": hand_over_s(costs, n, alpha, k) for k in range(1, max_draft_len + 1)})
    best = min(times, key=times.get)
    if best.startswith(("device-led", "hand-over")):
        mode, length = best.split(" k=")[0], int(best.split("=")[1])
    else:
        mode, length = best, lead_chunk(costs, alpha)[0] if best == "edge-led" else 0
    return Plan(mode, length, times[best], baseline, times)


def acceptance_curve(accepted_counts: Sequence[int], draft_len: int) -> list[float]:
    """alpha by position from the accepted counts of fixed-length rounds of ``draft_len``:
    alpha_i = P(accepted >= i) / P(accepted >= i - 1)."""
    assert accepted_counts, "the curve needs at least one round"
    reached = [sum(1 for a in accepted_counts if a >= i) for i in range(draft_len + 1)]
    return [reached[i] / reached[i - 1] if reached[i - 1] else 0.0 for i in range(1, draft_len + 1)]
