"""The batched torch verifier equals the numpy reference, session by session."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from covspec.protocol.verification import target_probs, verify_greedy, verify_sampling  # noqa: E402
from covspec.runtime_edge.verify_batch import target_probs_batch, verify_batch  # noqa: E402


class Replay:
    """An rng whose ``random()`` returns given values in order, then ``tail`` forever."""

    def __init__(self, values, tail):
        self.values, self.tail, self.calls = list(values), tail, 0

    def random(self):
        self.calls += 1
        return self.values.pop(0) if self.values else self.tail


def reference(draft, q, logits, settings, accept_u, sample_u):
    """(accepted, token) per session from the numpy reference, fed the same uniforms.

    verify_sampling draws u_0 .. u_j (first rejection or all n) and then the sample: a
    first pass counts the calls, a second feeds exactly u[:calls - 1] + [sample]."""
    out, start = [], 0
    for b, (n, (temperature, top_k, top_p)) in enumerate(zip(settings["lengths"], settings["per_session"])):
        d = draft[start:start + n]
        rows = logits[start + b:start + b + n + 1]
        if temperature == 0:
            out.append(verify_greedy(d, rows))
        else:
            p = target_probs(rows, temperature, top_k, top_p)
            u = list(accept_u[start:start + n])
            probe = Replay(u, sample_u[b])
            verify_sampling(d, q[start:start + n], p, probe)
            out.append(verify_sampling(d, q[start:start + n], p, Replay(u[:probe.calls - 1] + [sample_u[b]], 2.0)))
        start += n
    return out


def run_batch(draft, q, logits, settings, accept_u, sample_u, dtype):
    lengths = settings["lengths"]
    per = settings["per_session"]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    accepted, token = verify_batch(
        torch.from_numpy(draft), offsets, torch.from_numpy(logits).to(dtype),
        None if q is None else torch.from_numpy(q),
        torch.tensor([s[0] for s in per], dtype=torch.float64), torch.tensor([s[1] for s in per]),
        torch.tensor([s[2] for s in per], dtype=torch.float64),
        None if accept_u is None else torch.from_numpy(accept_u),
        None if sample_u is None else torch.from_numpy(sample_u))
    assert accepted.dtype == token.dtype == torch.int64
    return list(zip(accepted.tolist(), token.tolist()))


def random_case(rng, lengths, per_session, vocab, dtype=np.float64, scale=3.0):
    """Random logits; q near the target's p, drafts drawn from q (or the argmax, sometimes)."""
    total, sessions = sum(lengths), len(lengths)
    logits = (rng.normal(size=(total + sessions, vocab)) * scale).astype(dtype)
    q = np.zeros((total, vocab))
    draft = np.zeros(total, dtype=np.int64)
    start = 0
    for b, n in enumerate(lengths):
        for i in range(n):
            row = logits[start + b + i].astype(np.float64) + rng.normal(size=vocab) * rng.choice([0.1, 1.0, 3.0])
            e = np.exp(row - row.max())
            if rng.random() < 0.3:                              # a sparse q, as the compact wire sends
                e[np.argsort(-e)[rng.integers(1, 6):]] = 0
            q[start + i] = e / e.sum()
            draft[start + i] = rng.choice(vocab, p=q[start + i]) if rng.random() < 0.8 else int(np.argmax(q[start + i]))
        start += n
    settings = {"lengths": lengths, "per_session": per_session}
    return draft, q, logits, settings, rng.random(total), rng.random(sessions)


SETTINGS = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.5, 3, 0.8), (2.0, 50, 0.95),
            (1.0, 1, 1.0), (0.9, 0, 0.3)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", range(6))
def test_random_batches_equal_reference(seed, dtype):
    rng = np.random.default_rng(seed)
    sessions = int(rng.integers(1, 12))
    lengths = [int(n) for n in rng.integers(0, 9, size=sessions)]
    lengths[0] = 0                                               # always one target-only step
    per = [SETTINGS[int(i)] for i in rng.integers(0, len(SETTINGS), size=sessions)]
    vocab = int(rng.choice([7, 64, 500]))
    draft, q, logits, settings, au, su = random_case(rng, lengths, per, vocab, dtype, scale=float(rng.choice([0.5, 3.0])))
    want = reference(draft, q, logits, settings, au, su)
    got = run_batch(draft, q, logits, settings, au, su, torch.float64 if dtype == np.float64 else torch.float32)
    assert got == want


def test_many_seeds_cover_every_outcome():
    """Across many small batches: rejections at every position, corrections and bonuses."""
    seen = set()
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        lengths = [int(n) for n in rng.integers(0, 6, size=5)]
        per = [SETTINGS[int(i)] for i in rng.integers(1, len(SETTINGS), size=5)]
        draft, q, logits, settings, au, su = random_case(rng, lengths, per, 20, scale=1.0)
        want = reference(draft, q, logits, settings, au, su)
        assert run_batch(draft, q, logits, settings, au, su, torch.float64) == want
        seen |= {(a, a == n) for (a, _), n in zip(want, lengths)}
    assert {(a, False) for a in range(4)} | {(a, True) for a in range(5)} <= seen


def test_all_greedy_needs_no_q_or_uniforms():
    V = 6
    lengths = [3, 0, 2, 4]
    choices = [[1, 2, 3, 4], [5], [0, 0, 1], [2, 2, 2, 2, 3]]       # target argmax per row
    logits = np.zeros((sum(lengths) + len(lengths), V))
    rows = [c for session in choices for c in session]
    logits[np.arange(len(rows)), rows] = 4.0
    draft = np.array([1, 2, 3] + [] + [0, 5] + [2, 2, 2, 2], dtype=np.int64)
    settings = {"lengths": lengths, "per_session": [(0.0, 0, 1.0)] * 4}
    got = run_batch(draft, None, logits, settings, None, None, torch.float32)
    assert got == [(3, 4), (0, 5), (1, 0), (4, 3)]
    assert got == reference(draft, None, logits, settings, None, None)


def test_crafted_sampling_outcomes():
    # vocabulary of 5; session 0: q == p at every row -> every u < 1 accepts; bonus from p of the last row.
    # session 1: p gives the draft token 0 -> rejected at 0; correction from the residual.
    # session 2: target-only step: the bonus is a draw from p.
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.2, 0.2]] * 3 + [[1e-300, 0.5, 0.5, 1e-300, 1e-300]] * 2
                             + [[0.05, 0.05, 0.1, 0.1, 0.7]]))
    p0 = target_probs(logits[0], 1.0)
    q = np.array([p0, p0, [1.0, 0, 0, 0, 0]])
    draft = np.array([2, 4, 0], dtype=np.int64)
    settings = {"lengths": [2, 1, 0], "per_session": [(1.0, 0, 1.0)] * 3}
    au, su = np.array([0.999, 0.999, 0.5]), np.array([0.95, 0.3, 0.99])
    got = run_batch(draft, q, logits, settings, au, su, torch.float64)
    assert got == reference(draft, q, logits, settings, au, su)
    assert got == [(2, 4), (0, 1), (0, 4)]


def test_zero_draft_probability_raises_only_where_reached():
    V = 4
    logits = np.zeros((4, V))
    logits[0, 1] = 9.0                                           # p(0) tiny at row 0 -> rejection at 0
    q = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    lengths = [2]
    settings = {"lengths": lengths + [0], "per_session": [(1.0, 0, 1.0)] * 2}
    au, su = np.array([0.9, 0.5]), np.array([0.5, 0.5])
    ok = np.array([0, 2], dtype=np.int64)                        # position 1 has q = 0, never reached
    assert run_batch(ok, q, logits, settings, au, su, torch.float64) == reference(ok, q, logits, settings, au, su)
    bad = np.array([3, 1], dtype=np.int64)                       # position 0 has q = 0
    with pytest.raises(ValueError):
        reference(bad, q, logits, settings, au, su)
    with pytest.raises(ValueError, match="zero draft probability"):
        run_batch(bad, q, logits, settings, au, su, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_probs_equal_target_probs(dtype):
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(24, 300)) * 4
    logits[3, :10] = logits[3].max() + 1.0                             # ties at the k-th value are kept
    logits[4] = np.round(logits[4])                              # many ties for top-p
    settings = [SETTINGS[1 + i % (len(SETTINGS) - 1)] for i in range(24)]
    settings[3] = (1.0, 4, 1.0)
    settings[4] = (0.8, 0, 0.5)
    lt = torch.from_numpy(logits).to(dtype)
    got = target_probs_batch(lt, torch.tensor([s[0] for s in settings]), torch.tensor([s[1] for s in settings]),
                             torch.tensor([s[2] for s in settings])).numpy()
    source = lt.numpy()
    want = np.stack([target_probs(source[i], *settings[i]) for i in range(24)])
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert ((got == 0) == (want == 0)).all()                     # the same support, exactly
    assert (got[3] > 0).sum() == 10


def test_preconditions():
    logits = torch.zeros(3, 4)
    settings = (torch.zeros(1), torch.zeros(1, dtype=torch.int64), torch.ones(1))
    with pytest.raises(AssertionError):                          # offsets do not end at total
        verify_batch(torch.tensor([1, 2]), torch.tensor([0, 1]), logits, None, *settings)
    with pytest.raises(AssertionError):                          # too few logits rows
        verify_batch(torch.tensor([1, 2]), torch.tensor([0, 2]), torch.zeros(2, 4), None, *settings)
    with pytest.raises(AssertionError):                          # sampling without q
        verify_batch(torch.tensor([1, 2]), torch.tensor([0, 2]), logits, None,
                     torch.ones(1), settings[1], settings[2])
