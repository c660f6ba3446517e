"""Verification and correction math for speculative decoding (pure numpy functions).

Terms (ARCHITECTURE.md, "Terms"), used the same way everywhere:

- **q**: the draft distribution at a drafted position. On the wire it is sparse:
  the draft's top-k ids and their float16 probabilities, and the draft samples from
  exactly that truncated distribution (``sparse_q``), so verification is exact.
- **p**: the target distribution at a position, after the same temperature /
  top-k / top-p processing the user asked for (``target_probs``, the same steps and
  order as transformers' ``generate``).
- **accepted**: how many draft tokens (a prefix of the chunk) the target keeps.
- **correction**: the token sampled from the residual ``norm(max(0, p - q))`` at
  the first rejection (greedy: the target's argmax there).
- **bonus**: the token sampled from p after a fully accepted chunk.

Nothing here keeps state or touches a socket; randomness comes from the caller's
``np.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

NO_TOKEN = -1


@dataclass(frozen=True)
class Verdict:
    """The outcome of one chunk: ``accepted`` draft tokens, then ``token`` (correction
    or bonus; NO_TOKEN when generation stopped first); ``done`` when it stopped."""

    accepted: int
    token: int
    done: bool

    def committed(self, draft: np.ndarray) -> list[int]:
        """The tokens this verdict commits, in order."""
        tail = [] if self.token == NO_TOKEN else [self.token]
        return [int(t) for t in draft[: self.accepted]] + tail


# --- logits processing --------------------------------------------------------------

def target_probs(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """p from raw logits, as transformers' sampling does: temperature, then top-k, then top-p.

    logits: [..., V] -> p: [..., V] float64 summing to 1 on the last axis.
    ``temperature`` must be > 0 (greedy decoding uses argmax, not this). ``top_k`` 0
    and ``top_p`` 1.0 disable truncation. Ties at the k-th value are kept, and top-p
    keeps the smallest set whose mass exceeds ``top_p`` (at least one token), as in
    ``TopKLogitsWarper`` / ``TopPLogitsWarper``.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0 for sampling; use greedy verification for 0")
    scores = np.asarray(logits, dtype=np.float64) / temperature            # [..., V]
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = np.partition(scores, vocab - top_k, axis=-1)[..., vocab - top_k, None]  # [..., 1]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")                   # ascending
        ascending = np.take_along_axis(scores, order, axis=-1)
        cumulative = np.cumsum(_softmax(ascending), axis=-1)                  # [..., V]
        drop_sorted = cumulative <= (1.0 - top_p)
        drop_sorted[..., -1] = False                                          # keep >= 1 token
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        scores = np.where(drop, -np.inf, scores)
    return _softmax(scores)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - np.max(scores, axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


# --- the draft's sparse proposal ----------------------------------------------------

def sparse_proposal(q: np.ndarray, k: int, mass: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The top-k truncation of a draft distribution, in wire form.

    q: [V] -> (ids [k] int32, probs [k] float16), most likely first. Past the first ids
    that hold ``mass`` of q, probs are 0 (a nucleus within the top k), so trailing
    columns that are 0 in every row of a chunk need not travel (``trim_proposals``).
    The draft must then sample from ``sparse_q(ids, probs)``, never from q itself.
    """
    k = min(k, q.shape[-1])
    ids = np.argpartition(-q, k - 1)[:k]
    ids = ids[np.argsort(-q[ids], kind="stable")]
    probs = q[ids].astype(np.float16)
    if mass < 1.0:
        nucleus = int(np.searchsorted(np.cumsum(q[ids]), mass)) + 1
        probs[nucleus:] = 0
    if probs.astype(np.float64).sum() <= 0:
        probs[0] = np.float16(1.0)
    return ids.astype(np.int32), probs


def trim_proposals(ids: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, k] proposals without the trailing columns that are 0 in every row."""
    columns = np.flatnonzero(probs.any(axis=0))
    width = int(columns[-1]) + 1 if columns.size else 1
    return ids[:, :width], probs[:, :width]


def sparse_q(probs: np.ndarray) -> np.ndarray:
    """The normalized float64 distribution over the k ids of a sparse proposal.

    probs: [..., k] float16 -> [..., k] float64. Both sides compute it from the same
    float16 values, so device sampling and edge verification agree exactly.
    """
    weights = np.asarray(probs, dtype=np.float64)
    return weights / weights.sum(axis=-1, keepdims=True)


def dense_q(ids: np.ndarray, probs: np.ndarray, vocab: int) -> np.ndarray:
    """Scatter a sparse proposal into a full distribution. ids, probs: [n, k] -> [n, V]."""
    q = np.zeros((ids.shape[0], vocab), dtype=np.float64)
    np.put_along_axis(q, ids.astype(np.int64), sparse_q(probs), axis=-1)
    return q


def sample(dist: np.ndarray, rng: np.random.Generator) -> int:
    """One index drawn from ``dist`` [V] (non-negative, any positive total)."""
    cumulative = np.cumsum(dist)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"),
                   len(dist) - 1))


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)): where a correction is drawn after a rejection. [V] -> [V].

    When p == q (no mass left), a rejection has probability 0; p is returned so the
    function is total.
    """
    r = np.maximum(p - q, 0.0)
    total = r.sum()
    return r / total if total > 0 else p


# --- verification -------------------------------------------------------------------

def verify_greedy(draft: np.ndarray, target_logits: np.ndarray) -> tuple[int, int]:
    """Greedy verification. draft: [n] ids; target_logits: [n + 1, V] (row i scores
    position i; row n follows the last draft token) -> (accepted, correction or bonus).
    """
    assert target_logits.shape[0] == draft.shape[0] + 1, "need one logits row per draft token plus one"
    choice = np.argmax(target_logits, axis=-1)                                # [n + 1]
    mismatch = np.nonzero(choice[:-1] != draft)[0]
    accepted = int(mismatch[0]) if mismatch.size else int(draft.shape[0])
    return accepted, int(choice[accepted])


def verify_sampling(draft: np.ndarray, q: np.ndarray, p: np.ndarray,
                    rng: np.random.Generator) -> tuple[int, int]:
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    draft: [n] ids sampled from q; q: [n, V] draft distributions (dense; see
    ``dense_q``); p: [n + 1, V] target distributions -> (accepted, correction or bonus).
    Draft token i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); the first
    rejection draws the correction from ``residual(p_i, q_i)``; if all are accepted
    the bonus is drawn from p_n. The committed tokens are distributed exactly as p.
    """
    n = draft.shape[0]
    assert q.shape[0] == n and p.shape[0] == n + 1, "q: [n, V], p: [n + 1, V]"
    for i in range(n):
        x = int(draft[i])
        qx = q[i, x]
        if qx <= 0:
            raise ValueError(f"draft token {x} at chunk position {i} has zero draft probability")
        if rng.random() * qx < p[i, x]:                                      # u < p/q
            continue
        return i, sample(residual(p[i], q[i]), rng)
    return n, sample(p[n], rng)


def apply_stops(draft: np.ndarray, accepted: int, token: int, eos_ids: Collection[int],
                remaining: int) -> Verdict:
    """Cut a verdict at the first EOS or when ``remaining`` more tokens are allowed.

    draft: [n]; (accepted, token) from a verify function; ``remaining`` >= 1 is how
    many tokens may still be committed. The edge owns stopping: the device never
    commits past what this returns.
    """
    assert remaining >= 1, "nothing may be committed"
    for i in range(accepted):
        if int(draft[i]) in eos_ids or i + 1 == remaining:
            return Verdict(accepted=i + 1, token=NO_TOKEN, done=True)
    done = token in eos_ids or accepted + 1 == remaining
    return Verdict(accepted=accepted, token=token, done=done)
