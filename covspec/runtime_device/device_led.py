"""Device-led rounds (``speculative``): the target waits for the device's chunks.

``DeviceLed`` is the strategy of the device loop (``loop.Generation``) that keeps a
chunk in flight, spends the wait for its verdict, and applies the verdict. Each step:

1. keep a chunk in flight, drafted after the committed tokens (the drafting policy
   decides its length);
2. use the wait (``waiting.next_use``): a pipelined chunk (drafted assuming the ones
   before it fully accepted and their bonus the draft's guess, ``assumed``; the edge
   answers ``stale`` when an assumption fails) or a branch (the continuation after one
   likely verdict on the oldest chunk, sent at once when that verdict comes);
3. the verdict on the oldest chunk in flight (``session.DeviceSession.await_verdict``;
   the session is reopened when the edge lost it), checked (``replies``), judged
   (``verdicts.judge``: what it commits, whether the pipelined chunks stay valid, which
   branch continues) and committed.

Pipelining, branching and the drafting policy change only the speed, never the output
(``DraftingOptions``). A branch the verdict cuts short is kept as far as it got: which
branches survive must not depend on their tokens (``ARCHITECTURE.md, "Invariants"``).
It also leads the rounds of an edge-led generation that handed the lead over
(``edge_led.EdgeLed``'s successor: same session, same committed tokens).
"""

from __future__ import annotations

import time
from collections import deque

from covspec.protocol.messages import Result
from covspec.protocol.verification import NO_TOKEN
from covspec.runtime_device import waiting
from covspec.runtime_device.draft_model import draft_rng
from covspec.runtime_device.loop import Generation, Strategy
from covspec.runtime_device.policy import DraftPolicy
from covspec.runtime_device.proposer import Chunk
from covspec.runtime_device.replies import check_verdict
from covspec.runtime_device.verdicts import judge, record

LOST = "no verdict within the timeouts, or the edge did not know it"


class DeviceLed:
    """Device-led rounds with ``policy`` (kept across generations) and up to ``branches``
    branches per wait."""

    mode = "speculative"
    prefill = "foreground"

    def __init__(self, policy: DraftPolicy, branches: int):
        self.policy, self.branches_wanted = policy, branches
        self.successor: Strategy | None = None
        self.in_flight: deque[Chunk] = deque()
        self.branches: dict[tuple[int, int], Chunk] = {}
        self.first: Chunk | None = None       # drafted by the strategy that handed the lead over

    def lead_with(self, chunk: Chunk) -> None:
        """Send ``chunk`` first if the committed tokens are what it assumed (``assumed``
        at ``start - 1`` and everything before it): the hand-over's pipelined chunk."""
        self.first = chunk

    def begin(self, generation: Generation) -> None:
        self.generation = generation
        self.settings, self.eos_ids = generation.settings, generation.draft.eos_ids
        self.proposer = generation.draft.proposer(generation.codec, self.settings.sampling, self.policy,
                                                  draft_rng(self.settings.seed), alternatives=self.branches_wanted > 0)

    def opened(self) -> None:
        self.in_flight.clear()
        self.branches.clear()

    def step(self) -> list[int]:
        generation = self.generation
        # 1. Keep a chunk in flight.
        if not self.in_flight:
            first, self.first = self.first, None
            used = first is not None and first.start == len(generation.committed) \
                and generation.committed[first.start - 1] == first.assumed
            if first is not None:
                generation.trace({"event": "ahead", "len": len(first.tokens), "used": used})
            if used:
                first.assumed = NO_TOKEN                # sent after the verdict that confirmed it
                self._send(first)
            else:
                self._send(self._draft(generation.committed, start=len(generation.committed)))
        # 2. Use the wait: pipeline the next chunk, or draft branches.
        self._speculate()
        # 3. The verdict on the oldest chunk in flight (reopen if the edge is lost).
        result = generation.session.await_verdict(self.in_flight)
        return generation.reopen(LOST) if result is None else self._apply(result)

    def _draft(self, prefix: list[int], start: int, interrupt=None) -> Chunk:
        return self.proposer.draft(prefix, start, self.generation.limit(start, self.policy.max_len), interrupt)

    def _send(self, chunk: Chunk) -> None:
        self.in_flight.append(chunk)
        stats = self.generation.stats
        stats.deepest_in_flight = max(stats.deepest_in_flight, len(self.in_flight))
        self.generation.send(chunk, assumed=chunk.assumed, **self.policy.explain(chunk.confidences))

    def _apply(self, result: Result) -> list[int]:
        """Commit the verdict on the oldest chunk; keep what stays valid; send a ready branch."""
        generation, chunk = self.generation, self.in_flight[0]
        committed = generation.committed
        check_verdict(result, chunk.start, len(chunk.tokens), len(committed), self.settings.max_new_tokens,
                      generation.vocab_size)
        if result.status == "stale" and chunk.start == len(committed) and chunk.assumed == NO_TOKEN:
            return generation.reopen(LOST)  # never stale on an edge that agrees with us: it lost track (a late copy)
        generation.session.progress()
        self.in_flight.popleft()
        followers = list(self.in_flight)
        verdict = judge(chunk, result, followers[0] if followers else None, self.branches)
        record(generation.stats, verdict, result, followers)
        self.branches.clear()
        if verdict.stale:
            generation.trace({"event": "stale", "seq": chunk.seq, "start": chunk.start})
            return []
        generation.commit(verdict.committed, verdict.done)
        round_s = time.perf_counter() - chunk.sent_at
        self.policy.observe_round(chunk.confidences, result.accepted, round_s, result.verify_ms / 1000)
        if not verdict.followers_valid:
            self.in_flight.clear()                  # the edge answers them stale; the replies are ignored
        generation.trace({"event": "verdict", "seq": chunk.seq, "accepted": result.accepted, "token": result.token,
                          "done": result.done, "round_ms": round(round_s * 1000, 3),
                          "verify_ms": round(result.verify_ms, 3), "pipelined": bool(self.in_flight),
                          "branch_hit": verdict.branch is not None})
        if verdict.branch is not None:              # drafted to start at len(committed): fits max_new_tokens
            self.proposer.restore(verdict.branch.state)
            verdict.branch.start, verdict.branch.assumed = len(generation.committed), -1
            self._send(verdict.branch)
        return verdict.committed

    # -- speculation while waiting --------------------------------------------------------------

    def _ends_generation(self, chunk: Chunk) -> bool:
        return waiting.ends_generation(chunk.tokens[-1], chunk.end, self.eos_ids, self.settings.max_new_tokens)

    def _speculate(self) -> None:
        """Until the oldest chunk's verdict arrives, spend each step on its most valuable
        use (``waiting.next_use``): one more pipelined chunk (while the policy allows
        more in flight), or the next branch on the oldest chunk's likeliest verdicts
        (its full acceptance too when nothing can be pipelined behind it)."""
        session, committed, oldest = self.generation.session, self.generation.committed, self.in_flight[0]
        can_pipeline = self.policy.in_flight() > 1
        outcomes: list[waiting.Outcome] = []
        if self.branches_wanted:
            bonus = None
            if not can_pipeline and not self._ends_generation(oldest):
                token, confidence = self.proposer.guess_bonus(committed[: oldest.start] + oldest.tokens)
                bonus = (token, self.policy.acceptance(confidence))
            acceptance = [self.policy.acceptance(c) for c in oldest.confidences]
            outcomes = waiting.branch_outcomes(acceptance, oldest.confidences, oldest.alternatives,
                                               oldest.alternative_probs, bonus)[: self.branches_wanted]
        while not session.verdict_ready(oldest):
            pipeline = (can_pipeline and len(self.in_flight) < self.policy.in_flight()
                        and not self._ends_generation(self.in_flight[-1]))
            all_accepted = waiting.all_accepted_probability(self.in_flight, len(committed), self.policy.acceptance) \
                if pipeline else 0.0
            use = waiting.next_use(pipeline, all_accepted, self.policy.pipeline_weight(), outcomes)
            if use == "pipeline":
                can_pipeline = self._pipeline(oldest)
            elif use == "branch":
                outcome = outcomes.pop(0)
                if not self._draft_branch(oldest, outcome.accepted, outcome.token):
                    break
            else:
                break

    def _pipeline(self, oldest: Chunk) -> bool:
        """Send one more chunk, drafted assuming every chunk in flight is fully accepted and
        the bonus after them is the draft's own guess; False when that guess ends the answer.
        The chunk ends where it is when the verdict on ``oldest`` arrives, so that the
        verdict is applied at once (the edge idles until the device's next chunk); it is
        sent even so (an outside event cut it, never its tokens), and answered ``stale``
        when the verdict disproves what it assumed."""
        session = self.generation.session
        prefix = waiting.assumed_prefix(self.generation.committed, self.in_flight)
        bonus, confidence = self.proposer.guess_bonus(prefix)
        if bonus in self.eos_ids:
            return False
        chunk = self._draft(prefix + [bonus], start=self.in_flight[-1].end + 1,
                            interrupt=lambda: session.verdict_ready(oldest))
        chunk.assumed, chunk.assumed_confidence = bonus, confidence
        self._send(chunk)
        return True

    def _draft_branch(self, chunk: Chunk, accepted: int, token: int) -> bool:
        """Draft the continuation after the verdict (accepted, token) on ``chunk``; False
        when the verdict arrived meanwhile. The branch then ends where it was (kept, not
        dropped: which branches survive must not depend on their tokens)."""
        generation = self.generation
        prefix = generation.committed[: chunk.start] + chunk.tokens[:accepted] + [token]
        if token in self.eos_ids or len(prefix) >= self.settings.max_new_tokens:
            return True
        arrived = False

        def verdict_arrived() -> bool:
            nonlocal arrived
            arrived = arrived or generation.session.verdict_ready(chunk)
            return arrived

        branch = self._draft(prefix, start=len(prefix), interrupt=verdict_arrived)
        branch.state = self.proposer.snapshot()
        self.branches[(accepted, token)] = branch
        generation.stats.branches_drafted += 1
        generation.trace({"event": "branch", "accepted": accepted, "token": token, "len": len(branch.tokens),
                          "cut": arrived})
        return not arrived
