"""Training-free visual token reduction for the draft (ARCHITECTURE.md, "Visual token reduction").

Pure numpy selection over the scorer's outputs. Given visual tokens V [N, D] and an
importance per token, ``select`` returns the indices of the K tokens the draft
keeps, in ascending order (original order, so original positions are preserved).

Methods (the same K for each, so they compare fairly):

- ``covspec``: low-rank dependency weighted by importance (relevance x activity):
  pivoted Gram-Schmidt, each step keeps the token maximizing
  ``importance_i * ||r_i||`` where r_i is token i's residual after projecting out the
  span of the tokens kept so far. A token already explained by the kept ones has a
  small residual and is passed over, however important.
- ``relevance``: top-K by query relevance (FastV-like).
- ``activity``: top-K by encoder activity (VisionZip-like).
- ``diversity``: farthest-point selection in cosine distance, no importance
  (DivPrune-like max-min diversity).
- ``random``: K uniformly random tokens (seeded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("covspec", "relevance", "activity", "diversity", "random")


def keep_count(num_tokens: int, keep_ratio: float | None = None, keep_tokens: int | None = None) -> int:
    """How many visual tokens to keep: an explicit count wins, else round(ratio * N), at least 1."""
    if keep_tokens is not None:
        return max(1, min(int(keep_tokens), num_tokens))
    ratio = 1.0 if keep_ratio is None else float(keep_ratio)
    if not 0 < ratio <= 1:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
    return max(1, min(num_tokens, int(round(ratio * num_tokens))))


def low_rank_select(tokens: np.ndarray, importance: np.ndarray, k: int) -> np.ndarray:
    """Pivoted Gram-Schmidt weighted by importance. tokens: [N, D], importance: [N] >= 0
    -> k indices in selection order."""
    residual = np.array(tokens, dtype=np.float64)                             # [N, D]
    weight = np.asarray(importance, dtype=np.float64)
    available = np.ones(len(residual), dtype=bool)
    chosen: list[int] = []
    for _ in range(k):
        norms = np.linalg.norm(residual, axis=1)                              # [N]
        gain = np.where(available, weight * norms, -np.inf)
        pick = int(np.argmax(gain))
        chosen.append(pick)
        available[pick] = False
        direction = residual[pick]
        length = np.linalg.norm(direction)
        if length > 1e-12:
            unit = direction / length
            residual -= np.outer(residual @ unit, unit)
    return np.array(chosen, dtype=np.int64)


def farthest_point_select(tokens: np.ndarray, k: int) -> np.ndarray:
    """Max-min diversity in cosine distance, starting from the token with the largest norm."""
    unit = tokens / np.maximum(np.linalg.norm(tokens, axis=1, keepdims=True), 1e-12)
    chosen = [int(np.argmax(np.linalg.norm(tokens, axis=1)))]
    nearest = 1.0 - unit @ unit[chosen[0]]                                     # [N] distance to set
    for _ in range(k - 1):
        nearest[chosen] = -np.inf
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, 1.0 - unit @ unit[pick])
    return np.array(chosen, dtype=np.int64)


@dataclass(frozen=True)
class TokenScores:
    """The scorer's outputs per visual token, each [N] and non-negative: query
    ``relevance``, encoder ``activity`` and their combination ``importance``."""

    relevance: np.ndarray
    activity: np.ndarray
    importance: np.ndarray


def select(method: str, tokens: np.ndarray, scores: TokenScores, k: int, seed: int = 0) -> np.ndarray:
    """Indices [k] (ascending) of the visual tokens to keep.

    tokens: [N, D] visual tokens in the draft LM's embedding space.
    """
    n = tokens.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} visual tokens")
    if k == n:
        return np.arange(n, dtype=np.int64)
    if method == "covspec":
        picked = low_rank_select(tokens, scores.importance, k)
    elif method == "relevance":
        picked = np.argsort(-scores.relevance, kind="stable")[:k]
    elif method == "activity":
        picked = np.argsort(-scores.activity, kind="stable")[:k]
    elif method == "diversity":
        picked = farthest_point_select(tokens, k)
    elif method == "random":
        picked = np.random.default_rng(seed).choice(n, size=k, replace=False)
    else:
        raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(METHODS)}")
    return np.sort(picked).astype(np.int64)

