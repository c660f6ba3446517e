"""Visual token selection on crafted inputs."""

import numpy as np
import pytest

from covspec.runtime_device.pruning import METHODS, TokenScores, keep_count, low_rank_select, select


def scores_for(n, relevance=None, activity=None, importance=None):
    ones = np.ones(n)
    return TokenScores(relevance=ones if relevance is None else np.asarray(relevance, float),
                       activity=ones if activity is None else np.asarray(activity, float),
                       importance=ones if importance is None else np.asarray(importance, float))


def test_duplicate_tokens_are_not_both_kept():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(6, 16))
    tokens[3] = tokens[1] * 1.01                        # near-duplicate of token 1
    importance = np.array([1.0, 5.0, 1.0, 4.9, 1.0, 1.0])  # both duplicates look most important
    kept = select("covspec", tokens, scores_for(6, importance=importance), k=3)
    assert 1 in kept and 3 not in kept


def test_relevant_token_beats_salient_irrelevant_one_when_weights_say_so():
    tokens = np.eye(4) * np.array([1.0, 3.0, 1.0, 1.0])[:, None]   # token 1 has the largest norm
    importance = np.array([0.2, 0.5, 4.0, 0.2])                      # but token 2 is far more relevant
    assert select("covspec", tokens, scores_for(4, importance=importance), k=1).tolist() == [2]
    assert low_rank_select(tokens, np.ones(4), 1).tolist() == [1]   # without weights, norm wins


@pytest.mark.parametrize("method", METHODS)
def test_k_respected_sorted_and_deterministic(method):
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(50, 8))
    scores = scores_for(50, rng.random(50), rng.random(50), rng.random(50))
    first = select(method, tokens, scores, k=12, seed=3)
    assert len(first) == 12 == len(set(first.tolist()))
    assert np.all(np.diff(first) > 0)
    assert np.array_equal(first, select(method, tokens, scores, k=12, seed=3))


def test_relevance_and_activity_baselines_take_the_top():
    tokens = np.random.default_rng(2).normal(size=(5, 4))
    scores = scores_for(5, relevance=[0.1, 0.9, 0.3, 0.8, 0.0], activity=[5, 0, 0, 0, 4])
    assert select("relevance", tokens, scores, 2).tolist() == [1, 3]
    assert select("activity", tokens, scores, 2).tolist() == [0, 4]


def test_diversity_spreads_over_clusters():
    base = np.eye(3) * 10
    tokens = np.concatenate([base + 0.01 * i for i in range(4)])   # 3 clusters of 4 tokens
    kept = select("diversity", tokens, scores_for(12), k=3)
    assert sorted(k % 3 for k in kept) == [0, 1, 2]


def test_keep_count():
    assert keep_count(144, keep_ratio=0.25) == 36
    assert keep_count(144, keep_ratio=0.125) == 18
    assert keep_count(144, keep_tokens=500) == 144
    assert keep_count(10, keep_ratio=0.01) == 1
    with pytest.raises(ValueError):
        keep_count(10, keep_ratio=1.5)
    with pytest.raises(ValueError, match="unknown selection"):
        select("magic", np.ones((3, 2)), scores_for(3), 2)
