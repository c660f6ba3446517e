"""Edge-led generation on the device: the target never waits; drafts jump it ahead.

``EdgeLed`` is the strategy of the device loop (``loop.Generation``) for ``edge_led``
sessions; the loop prefills the draft in a thread meanwhile (the first token and a
short answer come as fast as the edge alone) and abandons a prefill still under way
when the answer is complete.

The session is opened in ``edge_led`` mode. From ``opened`` on, the edge generates by
itself and streams every token (results with the open's ``seq``); the device drafts
from the latest tokens it has seen and sends chunks. The edge verifies a
chunk when it arrives: the tokens the target generated meanwhile must equal the
chunk's tokens at those positions, and the rest is verified in one forward, the
verdict naming the position ``start`` where verification began. So the answer comes
at least as fast as the target alone (less the cost of the verify forwards), and
faster whenever a chunk arrives before the target reached its end.

Greedy (``continuous``): the draft runs ahead. It extends its own continuation of the
committed tokens one token at a time without waiting for verdicts, and sends it from
the committed end about twice per edge forward, each chunk a superset of the last; the
edge verifies the newest chunk waiting when its forward under way ends (answering the
older ones ``stale`` unrun) and steps by itself only when no chunk waits. A
continuation the committed tokens contradict is dropped and drafted again from them,
and drafting pauses once the continuation is unlikely to survive (the agreement so far
over its unverified length, ``LeadPlanner.min_survival``). Neither the draft nor the
edge waits for the other, which is what a slow link needs most: over a 60 ms round
trip the draft keeps drafting while its chunks travel. Running ahead turns many of the
edge's steps into verify forwards of chunks the overlap has mostly used up, so it is
chosen only where a verify forward costs about a step (``LeadPlanner.verify_costs_a_step``,
as measured so far) and a chunk is likely to agree with all the edge commits while it
travels (``LeadPlanner.reachable``); elsewhere greedy keeps one chunk in flight, as
sampling does, and drafts it only when worth it.

Sampling: one chunk in flight, long enough to cover what the target generates while it
drafts and travels (``lead_planner.LeadPlanner``: the edge's token interval, the round
trip and the draft's step time, measured as the generation runs) plus ``draft_len``
tokens to verify. A chunk that a streamed token contradicts is given up at once and a
fresh one drafted (the edge would answer it ``stale``). Pipelining and branches are not
used in either: the edge's own steps take their place.

Hand-over (``lead="auto"``, greedy). Edge-led suits the start of an answer, while the
draft still prefills, and a draft no faster than the target; once the draft is ready
and the device's own rounds would commit tokens faster than the target steps alone
(``LeadPlanner.device_leads_better``: measured edge step, draft step, round trip and
agreement), the next chunk carries ``device_leads``: the overlap and one token, so that
the edge stops stepping as soon as it can, while the first round's chunk is drafted
behind it (``_draft_ahead``). The edge verifies it as an
edge-led chunk, stops stepping by itself, and the generation goes on device-led
(``successor``: ``device_led.DeviceLed``, continuing this session and its tokens). A short
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

import time
from collections.abc import Callable

from covspec.protocol.errors import BUSY, REPLAYED, UNKNOWN_SESSION
from covspec.protocol.messages import Error, Message, Result
from covspec.protocol.verification import NO_TOKEN
from covspec.runtime_device import waiting
from covspec.runtime_device.client import EdgeError
from covspec.runtime_device.draft_model import draft_rng
from covspec.runtime_device.lead_planner import LeadPlanner
from covspec.runtime_device.loop import Generation, Strategy
from covspec.runtime_device.proposer import Chunk
from covspec.runtime_device.replies import check_streamed, check_verdict

QUIET_S = 0.05             # with no chunk in flight, draft one anyway after this long without a token


class EdgeLed:
    """Edge-led steps with ``planner`` (kept across generations); ``hand_over`` builds the
    strategy that takes the lead once the device leads better (greedy only; None: never)."""

    mode = "edge_led"
    prefill = "background"

    def __init__(self, planner: LeadPlanner, hand_over: Callable[[], Strategy] | None = None):
        self.planner, self.hand_over = planner, hand_over
        self.successor: Strategy | None = None
        self.in_flight: dict[int, Chunk] = {}  # by seq: the chunks sent that can still be used
        self.given_up: dict[int, Chunk] = {}   # by seq: chunks sent that streamed tokens overtook, unanswered
        self.path = Chunk(start=0)            # continuous: the draft's own continuation of the committed tokens
        self.sent_end = 0                     # continuous: where the last chunk sent ended
        self.sent_at = 0.0
        self.ahead: Chunk | None = None       # drafted after the hand-over chunk, for the successor's first round
        self.looked_ahead = False
        self.round_len = planner.draft_len    # the rounds' length the hand-over rule chose (the look-ahead's)
        self.continuous = False               # greedy: the draft runs ahead (set by begin)
        self.heard = True                     # a reply since the hand-over rule was last asked
        self.last_step_at: float | None = None
        self.busy = 0                         # busy replies since the last token
        self.stale = 0                        # stale verdicts since the last token
        self.quiet = False                    # the last step brought nothing and no chunk is in flight

    def begin(self, generation: Generation) -> None:
        self.generation, self.client, self.settings = generation, generation.client, generation.settings
        # Greedy: the draft runs ahead where a verify forward costs about a step. Sampling: one
        # chunk at a time, of a length fixed before drafting, and never a hand-over (device-led
        # sampling would draw other tokens).
        self.continuous = self.settings.greedy and self.planner.verify_costs_a_step()
        if not self.settings.greedy:
            self.hand_over = None
        self.proposer = generation.draft.proposer(generation.codec, self.settings.sampling, self.planner,
                                                  draft_rng(self.settings.seed), alternatives=False)

    def opened(self) -> None:
        self.in_flight, self.ahead, self.looked_ahead, self.last_step_at, self.stale = {}, None, False, None, 0
        self.given_up = {}
        self.heard = True                     # a reply since the hand-over rule was last asked
        self.path, self.sent_end = Chunk(start=0), 0        # followed to the committed end on the next step

    @property
    def chunk(self) -> Chunk | None:
        """The oldest chunk in flight (the only one unless ``continuous``)."""
        return next(iter(self.in_flight.values()), None)

    def step(self) -> list[int]:
        if self.generation.draft_ready():
            handing = next((c for c in self.in_flight.values() if c.device_leads), None)
            if handing is not None:
                if not self.looked_ahead:
                    self.looked_ahead, self.ahead = True, self._draft_ahead(handing)
                return self._absorb()
            verified = self.planner.hand_over_len() if self.hand_over is not None and self.heard else None
            self.heard = False                # the rule's inputs change with what the edge says: asked once per reply
            if verified is not None and (self.continuous or self.chunk is None):
                # the overlap and one token: the sooner the edge stops stepping, the sooner the
                # rounds begin; the first round's chunk (``verified`` long) is drafted meanwhile
                self.round_len = verified
                self._send(self._draft(1), device_leads=True)
                return self._absorb()
            if self.continuous and self.planner.reachable():
                return self._step_continuous()
            if self.chunk is None and (self.quiet or self.planner.worth_drafting()):
                self._send(self._draft())
        new = self._absorb()
        self.quiet = not new and self.chunk is None   # an edge that does not step: draft anyway
        return new

    def _draft(self, verified: int | None = None) -> Chunk:
        """A chunk from the committed tokens: the planner's overlap and ``verified`` tokens past it."""
        committed = self.generation.committed
        start = len(committed)
        return self.proposer.draft(committed, start, self.generation.limit(start, self.planner.chunk_len(verified)),
                                   fixed_length=not self.settings.greedy)

    # -- continuous: the draft runs ahead of the edge -------------------------------------------

    def _step_continuous(self) -> list[int]:
        """Greedy: the draft extends its own continuation of the committed tokens one token
        at a time, without waiting for verdicts, and sends it from the committed end about
        twice per edge forward (each chunk a superset of the last: the edge skips what it
        committed meanwhile and verifies the rest). The edge never idles and neither does
        the draft; a continuation the committed tokens contradict is dropped and drafted
        again from them."""
        self._follow_committed()
        extending = self._can_extend()
        if extending:
            self._extend()
        if self._send_due():
            self._send_path()
        new = self._absorb(wait=not extending)
        self.quiet = not new and not self.in_flight and not extending   # nothing heard: send the path again
        return new

    def _follow_committed(self) -> None:
        """Trim the continuation to what follows the committed tokens; start it again from
        them when they disagree with it (counted as the draft's agreement)."""
        committed, path = self.generation.committed, self.path
        covered = len(committed) - path.start
        seen = min(covered, len(path.tokens))            # the continuation's tokens the committed ones cover
        agreed = next((i for i, (a, b) in enumerate(zip(path.tokens, committed[path.start:])) if a != b), seen)
        if covered > 0:
            self.planner.observe_agreement(agreed, agreed + (agreed < seen))
        if agreed < seen or covered > len(path.tokens):
            self.path = Chunk(start=len(committed))
            self.sent_end = 0
        elif covered > 0:
            del path.tokens[:covered], path.confidences[:covered], path.rows[:covered]
            path.start = len(committed)

    def _can_extend(self) -> bool:
        """Whether drafting one more token is worth it: the continuation survives the edge's
        checks with a fair chance (the agreement so far, over its unverified length), is
        shorter than the longest chunk, and has not reached EOS or ``max_new_tokens``."""
        path = self.path
        if path.tokens and path.tokens[-1] in self.generation.draft.eos_ids:
            return False
        return (len(path.tokens) < self.planner.max_len and path.end < self.settings.max_new_tokens
                and self.planner.survives(len(path.tokens)))

    def _extend(self) -> None:
        path, began = self.path, time.perf_counter()
        token = self.proposer.draft(self.generation.committed[:path.start] + path.tokens, path.end, 1)
        self.planner.observe_draft_step(time.perf_counter() - began)      # one decoder run: the token before, fed
        path.tokens += token.tokens
        path.confidences += token.confidences
        path.rows += token.rows
        self.generation.stats.drafted += 1

    def _send_due(self) -> bool:
        """Whether to send the continuation now: it holds tokens not sent yet, and the last
        chunk was sent half an edge forward ago (or none is in flight). The edge verifies
        the newest chunk waiting when its forward under way ends and answers the older
        ones ``stale`` unrun, so what it verifies is at most half a forward old; sending
        more often would only add messages."""
        if self.quiet and self.path.tokens:
            return True                  # the edge went quiet (a lost token, say): its answer tells where it is
        if self.path.end <= max(self.sent_end, self.path.start):
            return False
        interval = (self.planner.edge_forward_s or self.planner.edge_step_s or 0.0) / 2
        return not self.in_flight or time.perf_counter() - self.sent_at >= interval

    def _send_path(self) -> None:
        path = self.path
        chunk = Chunk(start=path.start, tokens=list(path.tokens), confidences=list(path.confidences),
                      rows=list(path.rows))
        self._send(chunk, drafted=0)                    # its tokens were counted as they were drafted
        self.sent_end, self.sent_at = path.end, chunk.sent_at

    def _draft_ahead(self, chunk: Chunk) -> Chunk | None:
        """While the hand-over chunk is verified, the successor's first chunk: drafted
        assuming ``chunk`` fully accepted and the draft's guess as its bonus (greedy, so
        what is drafted meanwhile never matters to the output), at most a round long and
        ended when a message arrives (the verdict, or a token streamed before the edge
        met the chunk); None when the guess ends the answer. Without it the
        edge, which steps no more, would idle while that chunk is drafted after the verdict."""
        prefix = self.generation.committed[:chunk.start] + chunk.tokens
        bonus, _ = self.proposer.guess_bonus(prefix)
        if waiting.ends_generation(bonus, len(prefix) + 1, self.generation.draft.eos_ids,
                                   self.settings.max_new_tokens):
            return None
        ahead = self.proposer.draft(prefix + [bonus], len(prefix) + 1,
                                    self.generation.limit(len(prefix) + 1, self.round_len), self.client.message_waiting)
        ahead.assumed = bonus
        return ahead

    def _send(self, chunk: Chunk, device_leads: bool = False, drafted: int | None = None) -> None:
        chunk.device_leads = device_leads
        self.generation.send(chunk, drafted)
        self.in_flight[chunk.seq] = chunk

    def _absorb(self, wait: bool = True) -> list[int]:
        """Wait for the next message of the session (not at all unless ``wait``) and apply
        it and any that follow it at once; the tokens they commit. Reopens the session when
        the edge lost it."""
        generation, backoff = self.generation, self.client.backoff
        new: list[int] = []
        timeout = 0.0 if not wait else backoff.timeout_s if self.in_flight else QUIET_S
        reply = self.client.receive_any(generation.session.id, timeout)
        until = time.perf_counter() + backoff.timeout_s      # an endless stream still yields
        while reply is not None:
            self.heard = True
            new += self._apply(reply)
            if generation.done or time.perf_counter() > until:
                return new
            reply = self.client.receive_any(generation.session.id, 0.0) if self.client.message_waiting() else None
        for chunk in list(self.in_flight.values()):
            if not chunk.device_leads and not self._alive(chunk):
                self._judged(chunk)
                del self.in_flight[chunk.seq]     # contradicted or overtaken by streamed tokens: the edge drops it
                self.given_up[chunk.seq] = chunk
            # (a chunk handing over the lead is waited for even so: the edge hands over on any verdict)
        oldest = self.chunk
        if not new and oldest is not None and time.perf_counter() - oldest.sent_at > backoff.timeout_s:
            new = generation.reopen("no reply for a whole timeout")          # the edge is lost
        return new

    def _apply(self, reply: Message) -> list[int]:
        generation = self.generation
        if isinstance(reply, Error):
            if reply.code == REPLAYED:
                return []                     # a late copy of a message this device has moved past: nothing changed
            if reply.code == UNKNOWN_SESSION:
                return generation.reopen("the edge did not know it")
            if reply.code == BUSY and self.busy < self.client.backoff.retries:
                self.busy += 1
                self.in_flight.pop(reply.seq, None)
                return []
            raise EdgeError(reply.code, reply.message)
        if not isinstance(reply, Result):
            return []
        committed = len(generation.committed)
        if reply.seq == generation.opened_seq:                          # a token the target generated
            if reply.start != committed:
                return generation.reopen(f"a streamed token at {reply.start} when {committed} were committed")
            check_streamed(reply, committed, self.settings.max_new_tokens, generation.vocab_size)
            now = time.perf_counter()
            if self.last_step_at is not None:
                self.planner.observe_edge_step(now - self.last_step_at)
            self.last_step_at = now
            if reply.token != NO_TOKEN:
                self.planner.observe_edge_forward(reply.verify_ms / 1000)
            generation.stats.edge_steps += reply.token != NO_TOKEN
            return self._commit([], reply)
        chunk = self.in_flight.pop(reply.seq, None)
        if chunk is None:                     # a chunk given up earlier: its round trip is still a measure
            late = self.given_up.pop(reply.seq, None)   # (on a slow link every chunk may be overtaken)
            if late is not None:
                self._observe_round(late, reply)
            return []
        if chunk.device_leads:                # the edge steps no more: the device leads from this verdict on
            self.successor, generation.session.mode = self.hand_over(), "speculative"
            if self.ahead is not None:
                self.successor.lead_with(self.ahead)
        if reply.status == "stale":               # answered unrun: the round trip alone
            self._observe_round(chunk, reply)
            self._judged(chunk)
            generation.stats.stale += 1
            if any(seq > chunk.seq for seq in self.in_flight):
                return []                     # superseded by a newer chunk waiting with it at the edge
            self.stale += 1                   # an edge that steps streams its tokens before the stale verdict:
            if self.stale > max(self.client.backoff.retries, 1):    # stale again and again, none between: lost
                return generation.reopen(f"{self.stale} chunks in a row answered stale without a token between")
            return []
        if reply.start != committed:
            return generation.reopen(f"a verdict from {reply.start} when {committed} were committed")
        skip = check_verdict(reply, chunk.start, len(chunk.tokens), committed, self.settings.max_new_tokens,
                             generation.vocab_size, edge_led=True)
        round_s = self._observe_round(chunk, reply)
        self.planner.observe_verify(reply.verify_ms / 1000)
        self.last_step_at = None              # a verify forward is not an edge step
        generation.stats.rounds += 1
        generation.stats.accepted.append(reply.accepted)
        generation.stats.edge_verify_ms += reply.verify_ms
        rejected = reply.accepted < len(chunk.tokens) - skip
        self.planner.observe_agreement(skip + reply.accepted, skip + reply.accepted + rejected)
        generation.trace({"event": "verdict", "seq": chunk.seq, "start": reply.start, "skipped": skip,
                          "accepted": reply.accepted, "token": reply.token, "done": reply.done,
                          "round_ms": round(round_s * 1000, 3)})
        return self._commit(chunk.tokens[skip:skip + reply.accepted], reply)

    def _observe_round(self, chunk: Chunk, reply: Result) -> float:
        """``chunk``'s round trip (seconds since it was sent), measured for the planner less the
        edge's forward over it (none for a ``stale`` answer)."""
        round_s = time.perf_counter() - chunk.sent_at
        self.planner.observe_round(round_s, reply.verify_ms / 1000)
        return round_s

    def _commit(self, accepted: list[int], reply: Result) -> list[int]:
        self.generation.session.progress()
        self.busy = self.stale = 0
        return self.generation.commit_verdict(accepted, reply.token, reply.done)

    def _judged(self, chunk: Chunk) -> None:
        """Count how far ``chunk`` agreed with the committed tokens it covers."""
        covered = self.generation.committed[chunk.start:chunk.end]
        agreed = next((i for i, (a, b) in enumerate(zip(chunk.tokens, covered)) if a != b), len(covered))
        self.planner.observe_agreement(agreed, agreed + (agreed < len(covered)))

    def _alive(self, chunk: Chunk) -> bool:
        """Whether the edge can still use ``chunk``: every committed token it covers agrees,
        and it reaches past the committed sequence."""
        committed = self.generation.committed
        covered = len(committed) - chunk.start
        return covered < len(chunk.tokens) and chunk.tokens[:covered] == committed[chunk.start:]
