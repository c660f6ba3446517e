"""Verification math: crafted logits, stops, logits processing, statistical exactness."""

import numpy as np
import pytest
from scipy.stats import chisquare

from covspec.protocol import verification
from covspec.protocol.verification import (
    NO_TOKEN, apply_stops, dense_q, sample, sparse_proposal, sparse_q, target_probs, trim_proposals, verify_greedy,
    verify_sampling)

V = 8


def one_hot_logits(choices):
    logits = np.zeros((len(choices), V))
    logits[np.arange(len(choices)), choices] = 5.0
    return logits


def test_greedy_all_accepted_gives_bonus():
    assert verify_greedy(np.array([3, 1, 4]), one_hot_logits([3, 1, 4, 6])) == (3, 6)


def test_greedy_first_rejected_gives_correction():
    assert verify_greedy(np.array([2, 1, 4]), one_hot_logits([3, 1, 4, 6])) == (0, 3)


def test_greedy_middle_rejected():
    assert verify_greedy(np.array([3, 1, 5, 7]), one_hot_logits([3, 1, 4, 6, 0])) == (2, 4)


def test_stops_at_accepted_eos():
    draft = np.array([3, 2, 4])                     # 2 is EOS
    verdict = apply_stops(draft, accepted=3, token=6, eos_ids={2}, remaining=50)
    assert (verdict.accepted, verdict.token, verdict.done) == (2, NO_TOKEN, True)
    assert verdict.committed(draft) == [3, 2]


def test_correction_eos_ends_generation():
    verdict = apply_stops(np.array([3, 5]), accepted=1, token=2, eos_ids={2}, remaining=50)
    assert (verdict.accepted, verdict.token, verdict.done) == (1, 2, True)


def test_stops_at_max_new_tokens():
    draft = np.array([3, 5, 6, 7])
    assert apply_stops(draft, 4, 1, {2}, remaining=2) == verification.Verdict(2, NO_TOKEN, True)
    assert apply_stops(draft, 4, 1, {2}, remaining=5) == verification.Verdict(4, 1, True)
    assert apply_stops(draft, 4, 1, {2}, remaining=6) == verification.Verdict(4, 1, False)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                     (0.5, 3, 0.6), (1.0, 50, 0.95)])
def test_target_probs_matches_transformers_warpers(temperature, top_k, top_p):
    torch = pytest.importorskip("torch")
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(0).normal(size=(4, 40)) * 3
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    expected = torch.softmax(warpers(None, torch.tensor(logits)), dim=-1).numpy()
    np.testing.assert_allclose(target_probs(logits, temperature, top_k, top_p), expected, atol=1e-12)


def test_sparse_proposal_round_trip():
    q = np.array([0.05, 0.5, 0.1, 0.3, 0.05])
    ids, probs = sparse_proposal(q, 3)
    assert ids.tolist() == [1, 3, 2] and probs.dtype == np.float16
    np.testing.assert_allclose(sparse_q(probs), [0.5 / 0.9, 0.3 / 0.9, 0.1 / 0.9], rtol=1e-3)
    dense = dense_q(ids[None], probs[None], 5)
    assert dense.shape == (1, 5) and dense[0, 0] == 0 and abs(dense.sum() - 1) < 1e-12


def test_sparse_proposal_nucleus_and_trim():
    """Past the ids holding ``mass`` of q the probs are 0; columns 0 in every row of a
    chunk are trimmed, and what remains samples the same distribution."""
    peaked = np.array([0.001, 0.95, 0.0005, 0.045, 0.0035])
    flat = np.array([0.3, 0.2, 0.1, 0.25, 0.15])
    ids_a, probs_a = sparse_proposal(peaked, 4, mass=0.99)
    assert ids_a.tolist() == [1, 3, 4, 0] and probs_a[2:].tolist() == [0, 0]
    ids_b, probs_b = sparse_proposal(flat, 4, mass=0.99)
    assert (probs_b > 0).all()
    ids, probs = trim_proposals(np.stack([ids_a, ids_a]), np.stack([probs_a, probs_a]))
    assert ids.shape == (2, 2) and (probs > 0).all()
    np.testing.assert_array_equal(sparse_q(probs[0]), sparse_q(probs_a)[:2])
    ids, probs = trim_proposals(np.stack([ids_a, ids_b]), np.stack([probs_a, probs_b]))
    assert ids.shape == (2, 4)


def random_dist(rng, vocab, concentration=1.0):
    return rng.dirichlet(np.full(vocab, concentration))


def draft_then_verify(p, q_full, k, rng):
    """One round with a 2-token chunk drafted from sparse top-k proposals; returns
    the first two committed tokens (the bonus fills in when both are accepted)."""
    n = q_full.shape[0]
    ids, probs = zip(*(sparse_proposal(q_full[i], k) for i in range(n)))
    ids, probs = np.stack(ids), np.stack(probs)
    draft = np.array([ids[i, sample(sparse_q(probs[i]), rng)] for i in range(n)])
    accepted, token = verify_sampling(draft, dense_q(ids, probs, V), p, rng)
    committed = list(draft[:accepted]) + [token]
    return committed


def committed_counts(rng, p, q_full, draws):
    first = np.zeros(V)
    second_given_accepted = np.zeros(V)
    for _ in range(draws):
        committed = draft_then_verify(p, q_full, k=4, rng=rng)
        first[committed[0]] += 1
        if len(committed) >= 2:
            second_given_accepted[committed[1]] += 1
    return first, second_given_accepted


def chi2_pvalue(counts, dist):
    mask = dist > 0
    assert counts[~mask].sum() == 0, "sampled a token with zero target probability"
    expected = dist[mask] * counts.sum()
    return chisquare(counts[mask], expected).pvalue


@pytest.fixture(scope="module")
def exactness_setup():
    rng = np.random.default_rng(1234)
    p = np.stack([random_dist(rng, V) for _ in range(3)])        # [n + 1, V], positions independent
    q_full = np.stack([random_dist(rng, V, 0.7) for _ in range(2)])
    return p, q_full


def test_sampling_follows_target_distribution(exactness_setup):
    p, q_full = exactness_setup
    first, second = committed_counts(np.random.default_rng(7), p, q_full, draws=20_000)
    assert chi2_pvalue(first, p[0]) > 1e-3
    assert chi2_pvalue(second, p[1]) > 1e-3


def test_wrong_residual_is_caught(exactness_setup, monkeypatch):
    """Negative control: drawing the correction from p instead of the residual
    biases the output, and the same test detects it."""
    monkeypatch.setattr(verification, "residual", lambda p_row, q_row: p_row)
    p, q_full = exactness_setup
    first, _ = committed_counts(np.random.default_rng(7), p, q_full, draws=20_000)
    assert chi2_pvalue(first, p[0]) < 1e-6


def test_zero_probability_draft_token_is_refused():
    p = np.full((2, V), 1 / V)
    q = np.zeros((1, V))
    q[0, 1] = 1.0
    with pytest.raises(ValueError, match="zero draft probability"):
        verify_sampling(np.array([3]), q, p, np.random.default_rng(0))
