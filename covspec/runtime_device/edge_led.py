"""Edge-led generation on the device: the target never waits; drafts jump it ahead.

The session is opened in ``edge_led`` mode. From ``opened`` on, the edge generates by
itself and streams every token (results with the open's ``seq``); the device drafts
from the latest tokens it has seen and keeps one chunk in flight. The edge verifies a
chunk when it arrives: the tokens the target generated meanwhile must equal the
chunk's tokens at those positions, and the rest is verified in one forward, the
verdict naming the position ``start`` where verification began. So the answer comes
at least as fast as the target alone (less the cost of the verify forwards), and
faster whenever a chunk arrives before the target reached its end.

A chunk is long enough to cover what the target generates while it drafts and
travels (``LeadPlanner``: the edge's token interval, the round trip and the draft's
step time, measured as the generation runs) plus ``draft_len`` tokens to verify.
A chunk that a streamed token contradicts is given up at once and a fresh one drafted
(the edge would answer it ``stale``). Pipelining and branches are not used here: the
edge's own steps take their place.

Hand-over (``lead="auto"``, greedy). Edge-led suits the start of an answer, while the
draft still prefills, and a draft no faster than the target; once the draft is ready
and the device's own rounds would commit tokens faster than the target steps alone
(``LeadPlanner.device_leads_better``: measured edge step, draft step, round trip and
agreement), the next chunk carries ``device_leads``. The edge verifies it as an
edge-led chunk, stops stepping by itself, and the generation goes on device-led
(``hand_over``: the device-led loop, continuing this session and its tokens). A short
answer is over before the draft is ready and never pays for the draft; a long one gets
the device-led rounds' speed.

Exactness. Greedy: every committed token is the target's argmax, by its own step or
by verification. Sampling: a drafted token at a position L is tested against the q it
was drawn from, and the rule commits p exactly, *provided the decision to test it at L
depends only on what precedes L*. The edge's L is its committed length when the chunk
arrives; the arrival time depends on when drafting began (decided from tokens before
the chunk) and on how long the chunk took to draft and send. So in sampling mode every
chunk is drafted to a length fixed before drafting (``fixed_length``: not cut at EOS or
by confidence), which makes its drafting time independent of its own tokens; the
edge's overlap test looks only at tokens before L. PROTOCOL.md has the argument;
tests/test_edge_led.py tests it, with a negative control that breaks the rule.

Every reply is checked (``replies``) before it is applied (a ``replayed`` refusal answers a
late copy of a message the device has moved past, duplicated on the way, and changes
nothing); messages are taken for at
most one timeout per wait, a ``busy`` edge is asked again at most ``retries`` times in
a row, and a session lost again and again is given up (``DeviceSession.reopen``), so a
hostile edge ends the generation with a clear error within the device's patience.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from covspec.protocol.errors import BUSY, REPLAYED, UNKNOWN_SESSION
from covspec.protocol.messages import Error, Result
from covspec.protocol.verification import NO_TOKEN
from covspec.regime import plan
from covspec.runtime_device.client import EdgeError
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.proposer import Chunk, Proposer
from covspec.runtime_device.replies import check_opened, check_streamed, check_verdict
from covspec.runtime_device.session import DeviceSession, Turn
from covspec.runtime_device.stats import GenerationStats

MAX_LEAD_LEN = 32          # the longest chunk (overlap included)
VERIFIED_LEN = 8           # tokens past the overlap with the adaptive policy (the toy pair accepts ~4.5 a round)
EXPLORE_EVERY = 16         # a chunk "not worth drafting" is drafted anyway after this many asks
QUIET_S = 0.05             # with no chunk in flight, draft one anyway after this long without a token


class LeadPlanner:
    """How long an edge-led chunk is, and whether one is worth drafting now.

    A chunk is ``ceil((rtt / T + draft_len) / (1 - d / T))`` tokens long, where T is the
    edge's token interval, d the draft's step time and rtt the round trip: the first
    ``overlap`` tokens cover what the edge generates while the chunk is drafted and
    travels, the last ``draft_len`` are there to be verified (``draft_len`` alone until
    the edge's pace is known). The chunk is of use only if the draft agrees with the
    target over the whole overlap, which happens with probability about
    ``agreement ** overlap`` (agreement: the share of the draft's tokens that equalled
    the target's, counted as chunks are judged); below ``min_survival`` the device
    drafts nothing and lets the edge generate (on a slow link with a fast target,
    drafting would only spend the device's power), except now and then to keep the
    estimates current. Kept across generations
    (``CoInference.lead_planner_for``), so what it learns carries over."""

    def __init__(self, draft_len: int, max_len: int = MAX_LEAD_LEN, min_survival: float = 0.1):
        self.draft_len, self.max_len, self.min_survival = draft_len, max_len, min_survival
        self.edge_step_s: float | None = None
        self.rtt_s: float | None = None
        self.draft_step_s: float | None = None
        self.verify_s: float | None = None                  # the edge's verify forwards (chunks)
        self.edge_forward_s: float | None = None            # the edge's forwards for its own steps
        self.agreed, self.compared = 7.0, 10.0              # a prior of 0.7 worth ten tokens
        self.skipped = 0                                    # asks answered "not worth it" in a row

    def overlap(self) -> float:
        """The tokens the edge is expected to generate before a chunk drafted now arrives."""
        if self.edge_step_s is None:
            return 0.0
        step = max(self.edge_step_s, 1e-6)
        return ((self.rtt_s or 0.0) + self.draft_len * (self.draft_step_s or 0.0)) / step / \
            max(1.0 - (self.draft_step_s or 0.0) / step, 0.25)

    def chunk_len(self) -> int:
        return int(min(self.max_len, math.ceil(self.overlap() + self.draft_len)))

    def worth_drafting(self) -> bool:
        """Whether to draft a chunk now; below ``min_survival`` still once every
        ``EXPLORE_EVERY`` asks, so that the estimates it rests on stay current."""
        if (self.agreed / self.compared) ** self.overlap() >= self.min_survival or self.skipped >= EXPLORE_EVERY:
            self.skipped = 0
            return True
        self.skipped += 1
        return False

    def device_leads_better(self) -> bool:
        """Whether device-led rounds would commit ``HAND_OVER_GAIN`` times the tokens per
        second of the target stepping alone (``plan.round_rate``, the plan's own formula): a
        round of k drafted tokens commits ``1 + a + ... + a**k`` tokens (a: the agreement
        so far) in ``k d + rtt + F``
        (draft steps, the round trip, one target forward over the chunk: the edge's
        step T, or the verify forwards measured so far when they took longer), at the
        best k. T is the edge's own forward time for a step (what its streamed tokens
        report), not their spacing on arrival, which bunches while the device drafts;
        the round trip measured edge-led includes waiting for the step under way, half
        a step on average, which a device-led round does not. False until the edge's
        step, the draft's step and the round trip have been measured."""
        if self.edge_forward_s is None or self.draft_step_s is None or self.rtt_s is None:
            return False
        step = max(self.edge_forward_s, 1e-6)
        costs = plan.Costs(target_step_s=step, target_prefill_s=0.0, verify_s=(max(step, self.verify_s or 0.0),),
                           draft_step_s=self.draft_step_s, draft_prefill_s=0.0,
                           rtt_s=max(self.rtt_s - step / 2, 0.0), upload_s=0.0)
        agreement = [self.agreed / self.compared]
        best = max(plan.round_rate(costs, agreement, k) for k in range(1, self.max_len + 1))
        return best * step > plan.HAND_OVER_GAIN

    def observe_agreement(self, agreed: int, compared: int) -> None:
        self.agreed, self.compared = self.agreed + agreed, self.compared + compared

    # the Proposer's drafting-policy interface: chunks end only at their length
    def continue_chunk(self, confidences: list[float]) -> bool:
        return True

    def observe_draft_step(self, seconds: float) -> None:
        self.draft_step_s = _ema(self.draft_step_s, seconds)

    def observe_edge_step(self, seconds: float) -> None:
        self.edge_step_s = _ema(self.edge_step_s, seconds)

    def observe_round(self, seconds: float, verify_s: float) -> None:
        self.rtt_s = _ema(self.rtt_s, max(seconds - verify_s, 0.0))

    def observe_verify(self, verify_s: float) -> None:
        self.verify_s = _ema(self.verify_s, verify_s)

    def observe_edge_forward(self, seconds: float) -> None:
        self.edge_forward_s = _ema(self.edge_forward_s, seconds)


def yield_the_cpu() -> None:
    """Give the calling thread the lowest CPU priority (Linux: per-thread niceness; a no-op
    elsewhere): the draft's speculative work must not delay the answer streaming in."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass                        # not permitted here: the prefill runs at normal priority


def _ema(old: float | None, new: float, weight: float = 0.2) -> float:
    return new if old is None else (1 - weight) * old + weight * new


class EdgeLedGeneration:
    """One edge-led generation; ``tokens()`` yields what each message commits."""

    def __init__(self, draft, client, planner: LeadPlanner, image_bytes: bytes, question: str,
                 settings: GenerationSettings, options: DraftingOptions, stats: GenerationStats,
                 trace: Callable[[dict], None], rng: np.random.Generator,
                 hand_over: Callable[["EdgeLedGeneration"], Iterator[list[int]]] | None = None,
                 turn: Turn | None = None):
        self.draft, self.client, self.planner = draft, client, planner
        self.hand_over = hand_over if settings.greedy else None     # device-led from the hand-over on
        self.handed_over = False
        self.image_bytes, self.question = image_bytes, question
        self.settings, self.options, self.stats, self.trace = settings, options, stats, trace
        codec = options.codec()
        self.proposer = Proposer(draft.drafter, codec, settings.sampling, planner, rng, draft.eos_ids,
                                 alternatives=False)
        self.session = DeviceSession(client, codec, settings, question, image_bytes, draft.vocab_hash, trace,
                                     mode="edge_led", turn=turn)
        self.committed: list[int] = []
        self.done = False
        self.stream_seq = -1                  # the seq of the open whose steps the edge streams
        self.chunk: Chunk | None = None       # the chunk in flight, while it can still be used
        self.last_step_at: float | None = None
        self.busy = 0                         # busy replies since the last token
        self.stale = 0                        # stale verdicts since the last token

    def tokens(self) -> Iterator[list[int]]:
        """The committed tokens as they come; ``stats.wall_s`` is the time to the complete
        answer (not counting the abandoned draft prefill's clean-up after it)."""
        began, answered_s = time.perf_counter(), None
        up0, down0 = self.client.bytes_up, self.client.bytes_down
        try:
            opening = self.session.open_message([], None)
            self.client.send(opening)
            # The draft prefills in a thread (onnxruntime releases the GIL) while the edge's
            # tokens stream in: the first token and a short answer come as fast as the edge
            # alone; drafting starts once the draft is ready. The answer never waits for the
            # draft: a prefill still under way when it is complete is interrupted.
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-prefill")
            prefill = pool.submit(self._prefill)
            try:
                first = self._opened(self.session.await_opened(opening))
                self.stats.ttft_s = time.perf_counter() - began
                yield first
                quiet = False
                while not self.done and not self.handed_over:
                    ready = prefill.done() and prefill.result() is None      # re-raises a failed prefill
                    if ready and self.chunk is None:
                        if self.hand_over is not None and self.planner.device_leads_better():
                            self._send(self._draft(), device_leads=True)
                        elif quiet or self.planner.worth_drafting():
                            self._send(self._draft())
                    new = self._absorb()
                    quiet = not new and self.chunk is None   # an edge that does not step: draft anyway
                    if self.done:                 # the answer is complete: its time, before any cleanup
                        answered_s = time.perf_counter() - began
                    if new:
                        yield new
            finally:
                self._abandon(prefill)
                pool.shutdown(wait=True)
            if self.handed_over and not self.done:
                self.trace({"event": "hand_over", "committed": len(self.committed)})
                yield from self.hand_over(self)
        finally:
            self.session.close()
            self.stats.tokens = len(self.committed)
            self.stats.wall_s = answered_s if answered_s is not None else time.perf_counter() - began
            self.stats.bytes_up += self.client.bytes_up - up0
            self.stats.bytes_down += self.client.bytes_down - down0

    def _abandon(self, prefill) -> None:
        """End a draft prefill still under way (its runs and padding stop at once, raising
        in its thread): nothing the device does for itself delays a complete answer."""
        if prefill.done():
            return
        with self.draft.interrupted():
            wait([prefill])
        self.stats.prefill_abandoned = True

    def _prefill(self) -> None:
        yield_the_cpu()                 # the edge's tokens stream in meanwhile: receiving them comes first
        started = time.perf_counter()
        prefill = self.draft.prefill(self.image_bytes, self.question, self.options, self.settings.seed, self.trace,
                                     self.session.history)
        self.stats.device_prefill_s = time.perf_counter() - started
        self.stats.kept_visual_tokens = int(len(prefill.kept))

    def _opened(self, opened) -> list[int]:
        check_opened(opened, len(self.committed), self.settings.max_new_tokens, self.draft.vocab_size)
        self.stream_seq, self.done = opened.seq, opened.done
        self.stats.edge_prefill_ms += opened.prefill_ms
        self.chunk, self.last_step_at, self.stale = None, None, 0
        new = [] if opened.token == NO_TOKEN else [opened.token]
        self.committed += new
        return new

    def _draft(self) -> Chunk:
        start = len(self.committed)
        limit = max(min(self.planner.chunk_len(), self.settings.max_new_tokens - start), 1)
        return self.proposer.draft(self.committed, start, limit, fixed_length=not self.settings.sampling.greedy)

    def _send(self, chunk: Chunk, device_leads: bool = False) -> None:
        chunk.device_leads = device_leads
        self.session.send(chunk)
        self.chunk = chunk
        self.stats.drafted += len(chunk.tokens)
        self.trace({"event": "chunk", "seq": chunk.seq, "start": chunk.start, "len": len(chunk.tokens)})

    def _absorb(self) -> list[int]:
        """Wait for the next message of the session and apply it and any that follow it
        at once; the tokens they commit. Reopens the session when the edge lost it."""
        new: list[int] = []
        timeout = self.client.backoff.timeout_s if self.chunk is not None else QUIET_S
        reply = self.client.receive_any(self.session.id, timeout)
        until = time.perf_counter() + self.client.backoff.timeout_s      # an endless stream still yields
        while reply is not None:
            new += self._apply(reply)
            if self.done or time.perf_counter() > until:
                return new
            reply = self.client.receive_any(self.session.id, 0.0)
        if self.chunk is not None and not self.chunk.device_leads and not self._alive(self.chunk):
            self._judged(self.chunk)
            self.chunk = None                 # contradicted by a streamed token: the edge drops it
            # (a chunk handing over the lead is waited for even so: the edge hands over on any verdict)
        if not new and self.chunk is not None and time.perf_counter() - self.chunk.sent_at > \
                self.client.backoff.timeout_s:
            new = self._reopen("no reply for a whole timeout")          # the edge is lost
        return new

    def _apply(self, reply) -> list[int]:
        if isinstance(reply, Error):
            if reply.code == REPLAYED:
                return []                     # a late copy of a message this device has moved past: nothing changed
            if reply.code == UNKNOWN_SESSION:
                return self._reopen("the edge did not know it")
            if reply.code == BUSY and self.busy < self.client.backoff.retries:
                self.busy += 1
                self.chunk = None
                return []
            raise EdgeError(reply.code, reply.message)
        if not isinstance(reply, Result):
            return []
        if reply.seq == self.stream_seq:                               # a token the target generated
            if reply.start != len(self.committed):
                return self._reopen(f"a streamed token at {reply.start} when {len(self.committed)} were committed")
            check_streamed(reply, len(self.committed), self.settings.max_new_tokens, self.draft.vocab_size)
            now = time.perf_counter()
            if self.last_step_at is not None:
                self.planner.observe_edge_step(now - self.last_step_at)
            self.last_step_at = now
            if reply.token != NO_TOKEN:
                self.planner.observe_edge_forward(reply.verify_ms / 1000)
            self.stats.edge_steps += reply.token != NO_TOKEN
            return self._commit([], reply)
        chunk = self.chunk
        if chunk is None or reply.seq != chunk.seq:
            return []                                                  # a chunk given up earlier
        self.chunk = None
        if chunk.device_leads:                # the edge steps no more: the device leads from this verdict on
            self.handed_over, self.session.mode = True, "speculative"
        if reply.status == "stale":
            self._judged(chunk)
            self.stats.stale += 1
            self.stale += 1                   # an edge that steps streams its tokens before the stale verdict:
            if self.stale > max(self.client.backoff.retries, 1):    # stale again and again, none between: lost
                return self._reopen(f"{self.stale} chunks in a row answered stale without a token between")
            return []
        if reply.start != len(self.committed):
            return self._reopen(f"a verdict from {reply.start} when {len(self.committed)} were committed")
        skip = check_verdict(reply, chunk.start, len(chunk.tokens), len(self.committed),
                             self.settings.max_new_tokens, self.draft.vocab_size, edge_led=True)
        self.planner.observe_round(time.perf_counter() - chunk.sent_at, reply.verify_ms / 1000)
        self.planner.observe_verify(reply.verify_ms / 1000)
        self.last_step_at = None              # a verify forward is not an edge step
        self.stats.rounds += 1
        self.stats.accepted.append(reply.accepted)
        self.stats.edge_verify_ms += reply.verify_ms
        rejected = reply.accepted < len(chunk.tokens) - skip
        self.planner.observe_agreement(skip + reply.accepted, skip + reply.accepted + rejected)
        self.trace({"event": "verdict", "seq": chunk.seq, "start": reply.start, "skipped": skip,
                    "accepted": reply.accepted, "token": reply.token, "done": reply.done})
        return self._commit(chunk.tokens[skip:skip + reply.accepted], reply)

    def _commit(self, accepted: list[int], reply: Result) -> list[int]:
        self.session.progress()
        self.busy = self.stale = 0
        new = list(accepted) + ([] if reply.token == NO_TOKEN else [reply.token])
        self.committed += new
        self.done = reply.done
        return new

    def _judged(self, chunk: Chunk) -> None:
        """Count how far ``chunk`` agreed with the committed tokens it covers."""
        covered = self.committed[chunk.start:chunk.end]
        agreed = next((i for i, (a, b) in enumerate(zip(chunk.tokens, covered)) if a != b), len(covered))
        self.planner.observe_agreement(agreed, agreed + (agreed < len(covered)))

    def _alive(self, chunk: Chunk) -> bool:
        """Whether the edge can still use ``chunk``: every committed token it covers agrees,
        and it reaches past the committed sequence."""
        covered = len(self.committed) - chunk.start
        return covered < len(chunk.tokens) and chunk.tokens[:covered] == self.committed[chunk.start:]

    def _reopen(self, why: str) -> list[int]:
        def attempt(number: int) -> None:
            self.stats.reopens += 1
            self.trace({"event": "reopen", "committed": len(self.committed), "attempt": number})

        opened = self.session.reopen(self.committed, None, self.options.reopen_attempts, attempt, why)
        return self._opened(opened)
