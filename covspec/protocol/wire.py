"""One codec per wire format: the draft's proposals in, the verdict's extras out.

A wire format decides what travels beside the drafted token ids, and therefore what
the draft must sample from (the edge verifies against exactly what it receives):

- ``compact`` (protocol v1, the default): greedy sends ids only; sampling sends the
  draft's top-k proposal per position (``q_ids``, ``q_probs`` [n, k]; the draft samples
  from exactly that truncated distribution, ``verification.sparse_q``). The verdict is
  the accepted count and the correction/bonus token.
- ``dense`` (the conventional baseline): the draft's full distribution per drafted
  position as float16 (``q_dense`` [n, V]; the draft samples from it), and the verdict
  carries the target's full distribution ``p_dense`` [V] where the correction or bonus
  was drawn, beside the sampled token.

Each codec has the same four jobs, used by the device, the edge and the benchmarks:

- ``propose(q, greedy, rng) -> (token, row)``: on the device, one drafted position:
  the token and the row that travels for it (``None`` when nothing does);
- ``encode(rows) -> dict``: the ``Verify`` fields of a chunk's rows;
- ``decode(message, tokens, vocab_size, greedy) -> q [n, V] | None``: on the edge, the
  dense q to verify against (``None`` in greedy mode), validated before anything
  changes (``EdgeError`` with a code otherwise);
- ``verdict_fields(p_row) -> dict``: the ``Result`` fields the edge adds beside the
  verdict, given the target distribution where the token was drawn.

Numpy only; the device imports this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from covspec.protocol import verification as spec
from covspec.protocol.errors import BAD_FIELD, BAD_TOKEN, MISSING_FIELD, EdgeError

if TYPE_CHECKING:   # messages validates ``wire`` against CODECS, so it imports this module
    from covspec.protocol.messages import Verify


@dataclass(frozen=True)
class CompactCodec:
    """Ids only (greedy); ids + the draft's sparse top-k proposal (sampling)."""

    q_top_k: int = 8           # at most this many proposed ids per position,
    q_mass: float = 0.999      # fewer once they hold this much of the draft's mass
    name = "compact"

    @classmethod
    def configured(cls, *, q_top_k: int, q_mass: float) -> "CompactCodec":
        return cls(q_top_k, q_mass)

    def propose(self, q: np.ndarray, greedy: bool, rng: np.random.Generator) -> tuple[int, tuple | None]:
        if greedy:
            return int(np.argmax(q)), None
        ids, probs = spec.sparse_proposal(q, self.q_top_k, self.q_mass)
        return int(ids[spec.sample(spec.sparse_q(probs), rng)]), (ids, probs)

    def encode(self, rows: list) -> dict:
        if not rows or rows[0] is None:
            return {}
        ids, probs = spec.trim_proposals(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))
        return {"q_ids": ids, "q_probs": probs}

    def decode(self, message: Verify, tokens: np.ndarray, vocab_size: int, greedy: bool) -> np.ndarray | None:
        if greedy:
            return None
        if message.q_ids is None:
            raise EdgeError(MISSING_FIELD, "this session samples (temperature > 0), so verify needs "
                                           "q_ids and q_probs: the draft's sparse proposal per position.")
        check_tokens(message.q_ids, vocab_size, "q_ids")
        n = len(tokens)
        ids, weights = message.q_ids[:n], np.asarray(message.q_probs[:n], dtype=np.float64)   # [n, k]
        _check_mass(weights, "q_probs")
        for i, row in enumerate(ids):
            if len(np.unique(row)) != len(row):
                raise EdgeError(BAD_FIELD, f"q_ids row {i} repeats an id; send each proposed id once.")
        q = spec.dense_q(ids, weights, vocab_size)                                         # [n, V]
        _check_covers(q, tokens)
        return q

    def verdict_fields(self, p_row: Callable[[], np.ndarray]) -> dict:
        return {}


@dataclass(frozen=True)
class DenseCodec:
    """The draft's full q per drafted position; the target's full p back (baseline)."""

    name = "dense"

    @classmethod
    def configured(cls, **_proposal_settings) -> "DenseCodec":
        return cls()          # the full q travels: nothing to truncate

    def propose(self, q: np.ndarray, greedy: bool, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        q16 = q.astype(np.float16)
        token = int(np.argmax(q)) if greedy else spec.sample(q16.astype(np.float64), rng)
        return token, q16

    def encode(self, rows: list) -> dict:
        return {"q_dense": np.stack(rows)} if rows else {}

    def decode(self, message: Verify, tokens: np.ndarray, vocab_size: int, greedy: bool) -> np.ndarray | None:
        if message.q_dense is None:
            raise EdgeError(MISSING_FIELD, "this session uses the dense wire, so verify needs q_dense: the "
                                           "draft's full distribution per drafted position.")
        if message.q_dense.shape[1] > vocab_size:
            raise EdgeError(BAD_FIELD, f"q_dense has {message.q_dense.shape[1]} columns, more than the target "
                                       f"vocabulary ({vocab_size}).")
        weights = np.asarray(message.q_dense[: len(tokens)], dtype=np.float64)               # [n, V_draft]
        _check_mass(weights, "q_dense")                  # also when greedy: a q without mass is meaningless
        if greedy:
            return None
        q = np.zeros((weights.shape[0], vocab_size))                                        # padded to [n, V]
        q[:, : weights.shape[1]] = weights / weights.sum(axis=-1, keepdims=True)
        _check_covers(q, tokens)
        return q

    def verdict_fields(self, p_row: Callable[[], np.ndarray]) -> dict:
        return {"p_dense": p_row().astype(np.float16)}


Codec = CompactCodec | DenseCodec
CODECS: dict[str, type] = {codec.name: codec for codec in (CompactCodec, DenseCodec)}


def codec_named(name: str, *, q_top_k: int = 8, q_mass: float = 0.999) -> Codec:
    """The codec of wire format ``name``; ``q_top_k``/``q_mass`` bound a sparse proposal
    (the device's settings; a codec that sends the full q ignores them)."""
    if name not in CODECS:
        raise ValueError(f"wire must be one of {', '.join(CODECS)}, got {name!r}")
    return CODECS[name].configured(q_top_k=q_top_k, q_mass=q_mass)


def check_tokens(tokens, vocab_size: int, name: str) -> None:
    """``EdgeError`` ``bad_token`` if any id in ``tokens`` is outside [0, vocab_size)."""
    array = np.asarray(tokens)
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        bad = int(array[(array < 0) | (array >= vocab_size)].flat[0])
        raise EdgeError(BAD_TOKEN, f"{name} holds token id {bad}, outside the target vocabulary "
                                   f"[0, {vocab_size}); check that device and edge use the same tokenizer.")


def _check_mass(weights: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or np.any(weights.sum(axis=-1) <= 0):
        raise EdgeError(BAD_FIELD, f"{name} must be finite, non-negative, with positive mass in every row.")


def _check_covers(q: np.ndarray, tokens: np.ndarray) -> None:
    zero = np.nonzero(q[np.arange(len(tokens)), tokens] <= 0)[0]
    if zero.size:
        i = int(zero[0])
        raise EdgeError(BAD_FIELD, f"draft token {int(tokens[i])} at chunk position {i} has zero probability in "
                                   "its q; the draft must sample from exactly the q it sends.")
