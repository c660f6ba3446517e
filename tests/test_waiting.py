"""What a wait for a verdict is spent on (``runtime_device.waiting``): pure functions on crafted numbers, and the
device loop on crafted scenarios (table-driven draft and target, in-process edge)."""

import secrets
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from crafted import InProcessEdge, TableDraft, TableTarget, greedy_sequence, random_table, swap_top_two
from scipy.stats import chisquare

from covspec.protocol.messages import Result
from covspec.protocol.verification import target_probs
from covspec.runtime_device import waiting
from covspec.runtime_device.engine import CoInference
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.proposer import Chunk
from covspec.runtime_device.stats import GenerationStats
from covspec.runtime_device.verdicts import judge

# -- pure functions ------------------------------------------------------------------------------


def test_branch_outcomes_on_crafted_numbers():
    acceptance = [0.9, 0.5]
    outcomes = waiting.branch_outcomes(acceptance, confidences=[0.9, 0.6], alternatives=[7, 8],
                                           alternative_probs=[0.05, 0.3], bonus=(9, 0.8))
    by_verdict = {(o.accepted, o.token): o.probability for o in outcomes}
    assert by_verdict[(0, 7)] == pytest.approx(0.1 * 0.05 / 0.1)            # (1 - a0) * q(alt)/(1 - q(tok))
    assert by_verdict[(1, 8)] == pytest.approx(0.9 * 0.5 * 0.3 / 0.4)
    assert by_verdict[(2, 9)] == pytest.approx(0.9 * 0.5 * 0.8)              # full acceptance, then the bonus
    assert [o.probability for o in outcomes] == sorted(by_verdict.values(), reverse=True)
    # The share of the rest of the draft's mass is capped at 1; no bonus, no full-acceptance outcome.
    capped = waiting.branch_outcomes([0.0], [0.5], [3], [0.9])
    assert capped == [waiting.Outcome(1.0, 0, 3)]


def test_all_accepted_probability_counts_open_assumed_bonuses():
    chunks = [SimpleNamespace(start=3, confidences=[0.5, 0.5], assumed=-1, assumed_confidence=1.0),
              SimpleNamespace(start=6, confidences=[0.5], assumed=4, assumed_confidence=0.25)]
    assert waiting.all_accepted_probability(chunks, 3, lambda c: c) == pytest.approx(0.5 ** 3 * 0.25)
    # Once a verdict confirmed the second chunk's assumption, only its own tokens are open.
    assert waiting.all_accepted_probability(chunks[1:], 6, lambda c: c) == pytest.approx(0.5)
    assert waiting.all_accepted_probability([], 0, lambda c: c) == 1.0


def test_next_use_weighs_a_pipelined_chunk_by_what_it_saves():
    likely_branch = [waiting.Outcome(0.3, 1, 5)]
    assert waiting.next_use(True, 0.2, 1.0, likely_branch) == "branch"
    assert waiting.next_use(True, 0.2, 2.0, likely_branch) == "pipeline"      # saves the round trip too
    assert waiting.next_use(False, 1.0, 9.0, likely_branch) == "branch"
    assert waiting.next_use(True, 0.0, 1.0, []) == "pipeline"
    assert waiting.next_use(False, 0.0, 1.0, []) is None


def test_ends_generation_and_assumed_prefix():
    assert waiting.ends_generation(2, end=5, eos_ids={2}, max_new_tokens=64)
    assert waiting.ends_generation(3, end=7, eos_ids={2}, max_new_tokens=8)       # the bonus is the last token
    assert not waiting.ends_generation(3, end=6, eos_ids={2}, max_new_tokens=8)
    chunks = [SimpleNamespace(start=2, tokens=[5, 6], assumed=-1), SimpleNamespace(start=5, tokens=[8], assumed=7)]
    assert waiting.assumed_prefix([1, 2], chunks) == [1, 2, 5, 6, 7, 8]
    # After a verdict confirmed it, the follower's assumed bonus is committed: not counted twice.
    assert waiting.assumed_prefix([1, 2, 5, 6, 7], chunks[1:]) == [1, 2, 5, 6, 7, 8]


def test_judge_keeps_followers_only_when_the_assumption_came_true():
    chunk, follower = Chunk(start=3, tokens=[5, 6]), Chunk(start=6, tokens=[8], assumed=7)
    branch = Chunk(start=5, tokens=[9])
    branches = {(1, 4): branch}
    full = Result(session="s", seq=1, accepted=2, token=7)
    assert judge(chunk, full, follower, branches).followers_valid
    wrong_bonus = Result(session="s", seq=1, accepted=2, token=3)
    assert not judge(chunk, wrong_bonus, follower, branches).followers_valid
    rejected = judge(chunk, Result(session="s", seq=1, accepted=1, token=4), follower, branches)
    assert rejected.committed == [5, 4] and not rejected.followers_valid and rejected.branch is branch
    done = judge(chunk, Result(session="s", seq=1, accepted=1, token=4, done=True), None, branches)
    assert done.branch is None and done.done
    stale = judge(chunk, Result(session="s", seq=1, status="stale"), follower, branches)
    assert stale.stale and stale.committed == []


# -- the device loop on crafted scenarios ------------------------------------------------------------

VOCAB = 12


def run(draft_logits, target_logits, settings, options, delay, eos_ids=frozenset()):
    edge = InProcessEdge(TableTarget(target_logits, VOCAB, eos_ids), delay=delay)
    device = CoInference(TableDraft(draft_logits, eos_ids), edge)
    stats = GenerationStats()
    tokens = [t for chunk in device.generate(b"image", "question", settings, options, stats) for t in chunk]
    return tokens, stats


def test_a_perfect_draft_keeps_every_pipelined_chunk():
    target = random_table(0, VOCAB)
    options = DraftingOptions(lead="device", policy="fixed", draft_len=4, pipeline=True, max_in_flight=3, branches=0)
    tokens, stats = run(target, target, GenerationSettings(max_new_tokens=30), options, delay=12)
    assert tokens == greedy_sequence(target, 30)
    assert stats.stale == 0 and stats.pipelined_misses == 0
    assert stats.deepest_in_flight == 3 and stats.pipelined_hits >= 4
    assert sum(stats.accepted) == stats.drafted > 0            # every drafted token was accepted


def test_a_pipelined_chunk_ends_when_the_verdict_arrives():
    """The verdict on the oldest chunk is applied as soon as it arrives, not after the
    pipelined chunk under way is finished (the edge would idle meanwhile): that chunk ends
    where it is and is still sent, and still used when the verdict confirms it."""
    target = random_table(0, VOCAB)
    options = DraftingOptions(lead="device", policy="fixed", draft_len=6, pipeline=True, max_in_flight=2, branches=0)
    events = []
    edge = InProcessEdge(TableTarget(target, VOCAB), delay=3)
    device = CoInference(TableDraft(target), edge)
    stats = GenerationStats()
    tokens = [t for chunk in device.generate(b"image", "question", GenerationSettings(max_new_tokens=30), options,
                                             stats, events.append) for t in chunk]
    assert tokens == greedy_sequence(target, 30)
    pipelined = [e for e in events if e["event"] == "chunk" and e.get("assumed", -1) != -1]
    assert pipelined and all(1 <= e["len"] < 6 for e in pipelined)
    assert stats.pipelined_hits >= 1 and stats.stale == 0


def test_a_wrong_bonus_guess_drops_the_pipelined_chunks():
    target = random_table(1, VOCAB)
    expected = greedy_sequence(target, 20)
    # Chunks of 4 from position 1: the first verdict's bonus is position 5; the draft guesses it wrong.
    draft = swap_top_two(target, at={tuple(expected[:5])})
    options = DraftingOptions(lead="device", policy="fixed", draft_len=4, pipeline=True, max_in_flight=2, branches=0)
    tokens, stats = run(draft, target, GenerationSettings(max_new_tokens=20), options, delay=3)
    assert tokens == expected
    assert stats.pipelined_misses >= 1 and stats.accepted[0] == 4


def test_a_rejection_with_the_second_choice_hits_a_branch():
    target = random_table(2, VOCAB)
    expected = greedy_sequence(target, 16)
    # The draft's first choice at position 3 is wrong; its second choice is the target's.
    draft = swap_top_two(target, at={tuple(expected[:3])})
    options = DraftingOptions(lead="device", policy="fixed", draft_len=4, pipeline=False, branches=2)
    tokens, stats = run(draft, target, GenerationSettings(max_new_tokens=16), options, delay=50)
    assert tokens == expected
    assert stats.accepted[0] == 2                              # positions 1 and 2 kept, 3 corrected
    assert stats.branch_hits >= 1 and stats.branches_drafted >= stats.branch_hits


def test_a_branch_the_verdict_cuts_short_is_kept():
    """A verdict arriving while a branch is drafted ends the branch where it is; it is
    kept, never dropped. Dropping it would keep only branches that ended early (on EOS,
    or where the policy stopped on their confidences): branches chosen by their tokens,
    a bias under sampling."""
    target = random_table(2, VOCAB)
    options = DraftingOptions(lead="device", policy="fixed", draft_len=2, pipeline=False, branches=1)
    events = []
    edge = InProcessEdge(TableTarget(target, VOCAB), delay=2)      # ready after the branch's first token
    device = CoInference(TableDraft(target), edge)
    stats = GenerationStats()
    tokens = [t for chunk in device.generate(b"image", "question", GenerationSettings(max_new_tokens=16), options,
                                             stats, events.append) for t in chunk]
    assert tokens == greedy_sequence(target, 16)
    assert stats.branch_hits >= 1           # a branch after the full acceptance and its bonus, cut and then used
    cut = [e for e in events if e["event"] == "branch" and e["cut"]]
    assert cut and all(e["len"] >= 1 for e in cut)


def test_no_wait_means_no_speculation():
    target = random_table(3, VOCAB)
    options = DraftingOptions(lead="device", policy="fixed", draft_len=4, pipeline=True, branches=2)
    tokens, stats = run(target, target, GenerationSettings(max_new_tokens=20), options, delay=1)
    assert tokens == greedy_sequence(target, 20)
    assert stats.deepest_in_flight == 1 and stats.branches_drafted == 0


def exact_distribution(target, settings, eos_ids) -> dict[tuple[int, ...], float]:
    """P(answer) under the target alone: every sequence up to max_new_tokens or EOS."""
    sequences = {(): 1.0}
    finished: dict[tuple[int, ...], float] = {}
    while sequences:
        prefix, probability = sequences.popitem()
        p = target_probs(target(prefix), settings.temperature, settings.top_k, settings.top_p)
        for token in np.nonzero(p)[0]:
            sequence = prefix + (int(token),)
            mass = probability * p[token]
            if int(token) in eos_ids or len(sequence) == settings.max_new_tokens:
                finished[sequence] = finished.get(sequence, 0.0) + mass
            else:
                sequences[sequence] = mass
    return finished


@pytest.mark.parametrize("options", [
    DraftingOptions(lead="device", policy="fixed", draft_len=2, pipeline=True, max_in_flight=3, branches=2, q_top_k=2),
    DraftingOptions(lead="device", policy="adaptive", max_draft_len=3, pipeline=True, branches=2, wire="dense"),
], ids=["fixed-pipeline-branches-compact", "adaptive-pipeline-branches-dense"])
def test_sampling_with_pipelining_and_branches_follows_the_target(options):
    """The whole answer (5 tokens or up to EOS) follows the target's distribution while
    pipelined chunks and branches are drafted, used and dropped.

    What is drafted while waiting depends on measured timings (the adaptive policy's), so
    the path each seed takes varies from run to run: a fixed seed set would be one fixed
    sample judged through varying paths, and an unlucky set sits near the threshold for
    good. Each run draws fresh seeds instead (printed on failure): the test then fails by
    chance in 1 run of 1,000, as its threshold says."""
    vocab, eos, runs = 3, frozenset({2}), 6000
    target, draft = random_table(10, vocab, scale=1.0), random_table(11, vocab, scale=1.0)
    edge = InProcessEdge(TableTarget(target, vocab, eos), delay=3)
    device = CoInference(TableDraft(draft, eos), edge)
    counts, totals = Counter(), Counter()
    base = secrets.randbelow(2 ** 48)
    for seed in range(base, base + runs):
        settings = GenerationSettings(max_new_tokens=5, temperature=1.0, seed=seed)
        stats = GenerationStats()
        counts[tuple(t for chunk in device.generate(b"image", "q", settings, options, stats) for t in chunk)] += 1
        totals.update(pipelined=stats.pipelined_hits, misses=stats.pipelined_misses, branches=stats.branch_hits,
                      drafted=stats.drafted)
    assert totals["pipelined"] > 0 and totals["misses"] > 0 and totals["branches"] > 0 and totals["drafted"] > 0
    expected = exact_distribution(target, GenerationSettings(max_new_tokens=5, temperature=1.0), eos)
    assert answers_pvalue(counts, expected, runs) > 1e-3, f"seeds {base}..{base + runs - 1}"


def answers_pvalue(counts: Counter, expected: dict[tuple[int, ...], float], runs: int) -> float:
    """Chi-square p-value of ``runs`` observed answers against their exact probabilities
    (answers expected fewer than 5 times are pooled into one cell); asserts that no
    answer the target cannot produce was seen."""
    assert set(counts) <= set(expected), "an answer the target cannot produce"
    cells = sorted(expected, key=expected.get, reverse=True)
    common = [c for c in cells if expected[c] * runs >= 5]         # pool the rare answers into one cell
    observed = [counts[c] for c in common] + [runs - sum(counts[c] for c in common)]
    wanted = [expected[c] * runs for c in common] + [runs - sum(expected[c] * runs for c in common)]
    return chisquare(observed, wanted).pvalue
