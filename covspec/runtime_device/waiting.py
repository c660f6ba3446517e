"""What a wait for a verdict is spent on: pure functions over numbers.

While the edge verifies, the device can spend each moment on one of two things:

- a **pipelined chunk**: drafted assuming every chunk in flight is fully accepted and
  each assumed bonus is right; used only then, and then it saves a whole round trip;
- a **branch**: the continuation after one likely verdict on the oldest chunk in
  flight (a rejection at position j with the draft's second choice as correction, or
  full acceptance with the draft's guess as bonus); used if that verdict comes, and
  then it saves drafting that chunk.

Each function takes plain numbers (acceptance estimates come from the drafting policy) and
returns plain numbers, so they are tested on crafted inputs. Nothing here drafts,
sends or sleeps.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Outcome:
    """A verdict worth a branch: ``accepted`` draft tokens then ``token``, with ``probability``."""

    probability: float
    accepted: int
    token: int


def ends_generation(last_token: int, end: int, eos_ids: Collection[int], max_new_tokens: int) -> bool:
    """Whether no token can follow a fully accepted chunk whose last token is ``last_token``
    and which ends at generated position ``end`` (EOS, or the bonus reaches the limit)."""
    return last_token in eos_ids or end + 1 >= max_new_tokens


def all_accepted_probability(chunks: Iterable, committed: int, acceptance: Callable[[float], float]) -> float:
    """P(every chunk is fully accepted and every assumed bonus still open is right).

    ``chunks`` have ``start``, ``confidences`` (draft probability per token), ``assumed``
    (-1: no assumed bonus) and ``assumed_confidence``; ``committed`` is how many tokens
    are committed (an assumed bonus before that is already confirmed); ``acceptance``
    maps a draft confidence to the probability that the token is accepted.
    """
    probability = 1.0
    for chunk in chunks:
        for confidence in chunk.confidences:
            probability *= acceptance(confidence)
        if _assumption_open(chunk, committed):
            probability *= acceptance(chunk.assumed_confidence)
    return probability


def branch_outcomes(acceptance: list[float], confidences: list[float], alternatives: list[int],
                    alternative_probs: list[float], bonus: tuple[int, float] | None = None) -> list[Outcome]:
    """The verdicts on one chunk worth a branch, likeliest first.

    acceptance, confidences, alternatives, alternative_probs: [n] per drafted token (the
    acceptance estimate a_j, the draft's probability of the token, its second choice and
    that choice's probability). Rejection at j with the second choice as correction has
    probability ``prod_{i<j} a_i * (1 - a_j) * q(alt_j) / (1 - q(token_j))`` (the share of
    the rest of the draft's mass, capped at 1); with ``bonus`` = (token, its acceptance
    estimate), full acceptance followed by that token has ``prod a_i * a(bonus)``.
    """
    outcomes: list[Outcome] = []
    reach = 1.0                                      # P(every token before j is accepted)
    for j, (a, q_token, alternative, q_alternative) in enumerate(
            zip(acceptance, confidences, alternatives, alternative_probs)):
        share = min(q_alternative / max(1.0 - q_token, 1e-9), 1.0)
        outcomes.append(Outcome(reach * (1.0 - a) * share, j, alternative))
        reach *= a
    if bonus is not None:
        token, bonus_acceptance = bonus
        outcomes.append(Outcome(reach * bonus_acceptance, len(acceptance), token))
    outcomes.sort(key=lambda outcome: -outcome.probability)
    return outcomes


def next_use(can_pipeline: bool, all_accepted: float, pipeline_weight: float,
             outcomes: list[Outcome]) -> Literal["pipeline", "branch"] | None:
    """The better use of the next moment of the wait.

    A pipelined chunk is worth ``all_accepted * pipeline_weight`` (its chance of use times
    what it saves relative to a branch); the next branch is worth its probability. Ties
    go to pipelining. None when there is nothing left to do.
    """
    if can_pipeline and (not outcomes or all_accepted * pipeline_weight >= outcomes[0].probability):
        return "pipeline"
    return "branch" if outcomes else None


def assumed_prefix(committed: list[int], in_flight: Iterable) -> list[int]:
    """The generated tokens if every chunk in flight is fully accepted with its assumed bonus.

    A pipelined chunk whose assumption a verdict confirmed stays in flight with its
    ``assumed`` set, but that bonus is committed already: it is not counted twice.
    """
    prefix = list(committed)
    for chunk in in_flight:
        if _assumption_open(chunk, len(prefix)):
            prefix.append(chunk.assumed)
        prefix += chunk.tokens
    return prefix


def _assumption_open(chunk, length: int) -> bool:
    """Whether ``chunk``'s assumed bonus lies beyond the first ``length`` generated tokens."""
    return chunk.assumed != -1 and chunk.start > length
