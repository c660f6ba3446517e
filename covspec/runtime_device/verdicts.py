"""Applying a verdict to what the device has in flight: a pure decision.

The edge judges the oldest chunk in flight. ``judge`` says what that verdict means for
the device: the tokens it commits, whether the pipelined chunks behind it stay valid
(only if the chunk was fully accepted and the bonus is the one the next chunk
assumed; otherwise the edge answers them ``stale``), and which drafted branch, if any,
continues from it (only when nothing pipelined stays valid and generation goes on).
``record`` adds the verdict to the generation's statistics. Neither touches the
drafter, the policy or a socket.
"""

from __future__ import annotations

from dataclasses import dataclass

from covspec.protocol.messages import Result
from covspec.protocol.verification import NO_TOKEN
from covspec.runtime_device.proposer import Chunk
from covspec.runtime_device.stats import GenerationStats


@dataclass(frozen=True)
class Judgement:
    """What a verdict on ``chunk`` means. ``committed`` lists the tokens it commits (none
    when ``stale``); ``done`` when generation ended; ``followers_valid`` when the
    pipelined chunks in flight behind it remain valid; ``branch`` the drafted branch to
    send next, if one matches."""

    chunk: Chunk
    stale: bool
    committed: list[int]
    done: bool
    followers_valid: bool
    branch: Chunk | None


def judge(chunk: Chunk, result: Result, follower: Chunk | None,
          branches: dict[tuple[int, int], Chunk]) -> Judgement:
    """The meaning of ``result`` for ``chunk``, given the next chunk in flight (``follower``,
    None if none) and the branches drafted for ``chunk``'s verdicts, keyed (accepted, token)."""
    if result.status == "stale":
        return Judgement(chunk, True, [], False, False, None)
    committed = chunk.tokens[: result.accepted] + ([] if result.token == NO_TOKEN else [result.token])
    followers_valid = (follower is not None and not result.done and result.accepted == len(chunk.tokens)
                       and result.token == follower.assumed)
    branch = None if followers_valid or result.done else branches.get((result.accepted, result.token))
    return Judgement(chunk, False, committed, result.done, followers_valid, branch)


def record(stats: GenerationStats, judgement: Judgement, result: Result, followers: list[Chunk]) -> None:
    """Count ``judgement`` (on ``result``; ``followers`` were in flight behind its chunk)."""
    if judgement.stale:
        stats.stale += 1
        return
    stats.rounds += 1
    stats.accepted.append(result.accepted)
    stats.edge_verify_ms += result.verify_ms
    if judgement.followers_valid:
        stats.pipelined_hits += 1
        stats.hidden_draft_s += followers[0].draft_s
    else:
        stats.pipelined_misses += len(followers)
    if judgement.branch is not None:
        stats.branch_hits += 1
        stats.hidden_draft_s += judgement.branch.draft_s
