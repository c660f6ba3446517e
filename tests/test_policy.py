"""Drafting policies: deterministic given a recorded trace, and sensible."""

import numpy as np
import pytest

from covspec.runtime_device.policy import AcceptanceCalibration, AdaptivePolicy, FixedPolicy, VerifyModel


def replay(policy, trace):
    """Feed recorded observations; return the chunk length chosen before each round."""
    lengths = []
    for step_s, confidences, accepted, round_s, verify_s in trace:
        policy.observe_draft_step(step_s)
        n = 0
        while n < len(confidences) and policy.continue_chunk(confidences[: n + 1]):
            n += 1
        lengths.append(n + 1)
        policy.observe_round(confidences[: n + 1], min(accepted, n + 1), round_s, verify_s)
    return lengths


def recorded_trace(seed, rtt_s, acceptance):
    rng = np.random.default_rng(seed)
    trace = []
    for _ in range(40):
        confidences = list(np.clip(rng.normal(acceptance, 0.1, size=16), 0.01, 0.99))
        accepted = int(np.argmin(rng.random(16) < confidences)) if not all(rng.random(16) < confidences) else 16
        trace.append((0.0004, confidences, accepted, rtt_s + 0.004, 0.004))
    return trace


def test_decisions_are_deterministic_given_a_trace():
    trace = recorded_trace(0, 0.01, 0.8)
    assert replay(AdaptivePolicy(), trace) == replay(AdaptivePolicy(), trace)


def test_longer_chunks_on_slower_links_and_confident_drafts():
    slow_confident = replay(AdaptivePolicy(max_len=12), recorded_trace(1, 0.060, 0.9))
    fast_unsure = replay(AdaptivePolicy(max_len=12), recorded_trace(1, 0.0002, 0.3))
    assert np.mean(slow_confident[10:]) > np.mean(fast_unsure[10:]) + 2
    assert max(slow_confident) <= 12


def test_calibration_learns_from_verdicts():
    calibration = AcceptanceCalibration()
    for _ in range(200):
        calibration.observe([0.95, 0.95, 0.95], accepted=0)      # confident but always rejected
    assert calibration.probability(0.95) < 0.1
    # A bin no verdict fell into keeps its prior: the draft's own probability.
    assert calibration.probability(0.55) == pytest.approx(0.55)
    assert calibration.probability(0.05) == pytest.approx(0.05)


def test_fixed_policy():
    policy = FixedPolicy(3, pipeline=True)
    assert [policy.continue_chunk([0.5] * n) for n in (1, 2, 3)] == [True, True, False]
    assert policy.in_flight() == 2 and FixedPolicy(3).in_flight() == 1
    assert FixedPolicy(3, pipeline=True, max_in_flight=4).in_flight() == 4


def test_adaptive_keeps_as_many_chunks_in_flight_as_the_wait_hides():
    """A round of 30 ms (25 ms link + 5 ms verify) hides 15 chunks of 4 tokens drafted at
    0.5 ms a token (capped at ``max_in_flight``), one at 5 ms a token, none at 50 ms."""
    def in_flight(draft_step_s: float) -> int:
        policy = AdaptivePolicy(max_len=8, pipeline=True)
        policy.observe_draft_step(draft_step_s)
        policy.observe_round([0.9] * 4, 4, round_s=0.030, verify_s=0.005)
        return policy.in_flight()

    assert in_flight(0.0005) == AdaptivePolicy().max_in_flight == 4
    assert in_flight(0.005) == 2
    assert in_flight(0.050) == 1


def test_pipeline_weight_grows_with_the_round_trip():
    """A used pipelined chunk saves the round trip and the drafting, a used branch only the
    drafting: 4 tokens at 0.5 ms against a 25 ms link weigh (25 + 2) / 2."""
    policy = AdaptivePolicy(max_len=8, pipeline=True)
    assert policy.pipeline_weight() == FixedPolicy(4).pipeline_weight() == 1.0    # nothing measured
    policy.observe_draft_step(0.0005)
    policy.observe_round([0.9] * 4, 4, round_s=0.030, verify_s=0.005)
    assert policy.pipeline_weight() == pytest.approx(13.5)


def test_verify_model_finds_no_slope_in_flat_noisy_timings():
    """Flat verify time (6-12 ms of noise) over chunks of 3-5 tokens: the slope stays
    near zero (an unregularized online fit drifted upward and cut chunks to 1 token)."""
    rng = np.random.default_rng(0)
    model = VerifyModel()
    for _ in range(200):
        model.observe(int(rng.integers(3, 6)), float(rng.uniform(0.006, 0.012)))
    base, per_token = model.line()
    assert per_token < 0.0005 and abs(base + per_token * 4 - 0.009) < 0.002


def test_verify_model_recovers_a_real_slope():
    rng = np.random.default_rng(1)
    model = VerifyModel()
    for _ in range(300):
        n = int(rng.integers(1, 13))
        model.observe(n, 0.004 + 0.002 * n + float(rng.normal(0, 0.0005)))
    base, per_token = model.line()
    assert abs(per_token - 0.002) < 0.0006 and abs(model.seconds(10) - 0.024) < 0.003


def test_next_token_acceptance_is_calibrated_apart_from_the_current_one():
    """A hesitant token that is rejected half the time but always followed by an
    accepted one: the token after it is predicted likely, not as likely as it."""
    calibration = AcceptanceCalibration()
    for i in range(200):
        calibration.observe([0.95, 0.35, 0.95], accepted=3 if i % 2 else 1)
    assert calibration.probability(0.35) < 0.6
    assert calibration.next_probability(0.35) > 0.9
