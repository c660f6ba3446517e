"""Drafting policies: deterministic given a recorded trace, and sensible."""

import numpy as np

from covspec.runtime_device.policy import AcceptanceCalibration, AdaptivePolicy, FixedPolicy


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
    assert calibration.probability(0.55) == calibration.probability(0.55)


def test_fixed_policy():
    policy = FixedPolicy(3, pipeline=True)
    assert [policy.continue_chunk([0.5] * n) for n in (1, 2, 3)] == [True, True, False]
    assert policy.in_flight() == 2 and FixedPolicy(3).in_flight() == 1


def test_adaptive_pipelines_only_when_drafting_hides_in_the_wait():
    policy = AdaptivePolicy(max_len=8, pipeline=True)
    policy.observe_draft_step(0.0005)
    policy.observe_round([0.9] * 4, 4, round_s=0.030, verify_s=0.005)
    assert policy.in_flight() == 2
    slow_draft = AdaptivePolicy(max_len=8, pipeline=True)
    slow_draft.observe_draft_step(0.050)
    slow_draft.observe_round([0.9] * 4, 4, round_s=0.006, verify_s=0.005)
    assert slow_draft.in_flight() == 1
