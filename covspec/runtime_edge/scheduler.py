"""What one iteration of the model thread runs: a pure function of the waiting requests,
the sessions' states and the budgets (``ARCHITECTURE.md, "The edge inside"``).

``schedule(waiting, prefilling, streaming, budget)`` returns a ``Plan``; it touches no
model, no session and no clock, so it is tested on fake sessions without a model
(``tests/test_scheduler.py``). The model thread (``model_thread.py``) executes plans.

An iteration runs at most two kinds of forward: the *heads* (a new session's image and
everything before the image's last token, which must run in one piece with the vision
tower; sessions of equal shapes share one forward) and then *the* forward, one cached
extension of many sessions at once: verify rounds, edge steps and prefill *chunks* (the
text after a head, a reopen's committed tokens, or the rest of a prompt after a cached
prefix: ``prefill_after``'s tokens, cut into pieces). The contract:

- **Requests in arrival order.** Every waiting request is either handled now
  (``Plan.handle``, in order) or deferred, keeping its place. A session's requests keep
  their order: after one is deferred, the session's later ones are too, and so are the
  requests of a session still prefilling (its open is not answered yet). Closes cost
  no forward and are handled when their session's order allows. Opens are admitted (they become prefilling sessions, whose heads run
  from the next iteration on) while fewer than ``max_batch`` sessions are prefilling.
- **Rounds first, prefill in the room left.** Verify rounds and edge steps fill the
  forward up to ``max_batch`` sessions and ``max_tokens`` input tokens; prefill pieces
  (heads, and chunks of at most ``prefill_chunk`` tokens) follow, oldest prefilling
  session first, up to ``prefill_tokens`` prefill tokens an iteration and the room
  left. A chunk is no wider than the forward's widest round (the forward pads every row
  to its widest), unless the forward holds no round. So decoding never waits behind a
  whole prompt, only behind a bounded piece.
- **No starvation.** When the oldest prefilling session got nothing last iteration
  (``Prefilling.skipped``), its seat in the forward is kept before any round and its
  piece runs whatever the budgets; so a prefill advances at least every other
  iteration, whatever the load, and a round waits one iteration at most. A head larger
  than the budgets still runs, alone among the prefills.
- **Edge steps** (``Streaming``): target-only sessions step whenever they fit; edge-led
  ones as ``edge_steps`` says (``auto``: while the rounds fill less than half of
  ``max_batch`` and of ``max_tokens``). Streaming sessions come in the caller's order
  (the model thread moves the stepped ones to the back: round robin).
- With ``max_batch`` 1 every forward holds one session: rounds and prefill chunks take
  turns (a chunk is due after one iteration without).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

OPEN, VERIFY, CLOSE = "open", "verify", "close"


@dataclass(frozen=True)
class Budget:
    """The limits of one iteration (``ServerConfig``'s ``max_batch``, ``max_batch_tokens``,
    ``prefill_chunk``, ``prefill_tokens`` and ``edge_steps``)."""

    max_batch: int = 64          # sessions in the forward
    max_tokens: int = 2048       # input tokens in the forward
    prefill_chunk: int = 32      # most tokens one session's chunk runs in one forward
    prefill_tokens: int = 256    # most prefill tokens (heads and chunks) an iteration
    edge_steps: str = "auto"


@dataclass(frozen=True)
class Waiting:
    """A waiting request: its session, its kind (``open``, ``verify``, ``close``) and, for a
    verify, the input tokens its round would run (the pending token and the chunk)."""

    session: str
    kind: str
    tokens: int = 0


@dataclass(frozen=True)
class Prefilling:
    """A session whose prefill is under way: ``head`` tokens still to run in one piece with
    the image (0 once run, or when it starts from a cached prefix), then ``rest`` tokens as
    chunks; ``skipped`` when it was due last iteration and got nothing."""

    session: str
    head: int
    rest: int
    skipped: bool = False


@dataclass(frozen=True)
class Streaming:
    """A session the edge steps by itself: ``target_only`` or ``edge_led``."""

    session: str
    mode: str


@dataclass
class Plan:
    """What one iteration runs: the waiting requests to handle now (indices, in arrival order;
    the others stay waiting), the heads to run (sessions), the prefill chunks of the forward
    ((session, tokens)), and the streaming sessions to step in it."""

    handle: list[int] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    chunks: list[tuple[str, int]] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)

    @property
    def prefill_sessions(self) -> set[str]:
        return set(self.heads) | {session for session, _ in self.chunks}


def schedule(waiting: Sequence[Waiting], prefilling: Sequence[Prefilling], streaming: Sequence[Streaming],
             budget: Budget) -> Plan:
    """The plan of one iteration (the module's contract)."""
    due = bool(prefilling) and prefilling[0].skipped
    plan = _Builder(budget, {p.session for p in prefilling}, reserved=int(due))   # a due piece keeps its seat
    plan.requests(waiting, len(prefilling))
    rounds, round_tokens = plan.sessions, plan.tokens
    for session in streaming:
        if session.mode == "target_only" or _steps_allowed(budget, rounds, round_tokens):
            plan.step(session)
    plan.reserved = 0
    for at, session in enumerate(prefilling):
        plan.prefill(session, due=due and at == 0)
    return plan.plan


def _steps_allowed(budget: Budget, rounds: int, tokens: int) -> bool:
    """Whether edge-led sessions step by themselves this iteration (``edge_steps``)."""
    if budget.edge_steps != "auto":
        return budget.edge_steps == "always"
    return rounds < budget.max_batch / 2 and tokens < budget.max_tokens / 2


class _Builder:
    """A plan being filled, with what its forward and its prefills hold so far."""

    def __init__(self, budget: Budget, prefilling: set[str], reserved: int):
        self.budget, self.plan, self.reserved = budget, Plan(), reserved
        self.busy = set(prefilling)          # sessions with a piece, a round, or a deferred request
        self.sessions = self.tokens = 0      # in the forward
        self.width = 0                       # its widest round or step (input tokens)
        self.prefilled = 0                   # prefill tokens this iteration (heads and chunks)

    def fits(self, tokens: int) -> bool:
        return self.sessions + self.reserved < self.budget.max_batch and \
            (self.sessions == 0 or self.tokens + tokens <= self.budget.max_tokens)

    def add(self, tokens: int) -> None:
        self.sessions, self.tokens, self.width = self.sessions + 1, self.tokens + tokens, max(self.width, tokens)

    def requests(self, waiting: Sequence[Waiting], prefilling: int) -> None:
        held: set[str] = set()
        for index, request in enumerate(waiting):
            if request.session in held or request.session in self.busy:
                held.add(request.session)
            elif request.kind == CLOSE:
                self.plan.handle.append(index)
                held.add(request.session)
            elif request.kind == OPEN:
                if prefilling < self.budget.max_batch:
                    prefilling += 1
                    self.plan.handle.append(index)
                held.add(request.session)         # its later requests wait for the open's answer
            elif self.fits(request.tokens):
                self.plan.handle.append(index)
                self.busy.add(request.session)
                self.add(request.tokens)
            else:
                held.add(request.session)
        self.busy |= held

    def step(self, session: Streaming) -> None:
        if session.session not in self.busy and self.fits(1):
            self.plan.steps.append(session.session)
            self.busy.add(session.session)
            self.add(1)

    def prefill(self, session: Prefilling, due: bool) -> None:
        """The next pieces of ``session``'s prefill (its head, then a chunk) where they fit. The
        iteration's first head always fits; a ``due`` session's chunk too (its seat was kept).
        A chunk never widens a forward beyond its widest round (its rows are padded to it)."""
        room = self.budget.prefill_tokens - self.prefilled
        if session.head:
            if self.prefilled and session.head > room:
                return
            self.plan.heads.append(session.session)
            self.prefilled += session.head
            room -= session.head
        size = min(session.rest, self.budget.prefill_chunk, self.width or self.budget.prefill_chunk)
        if not due:
            size = min(size, room, self.budget.max_tokens - self.tokens) if self.sessions else size
            if self.sessions >= self.budget.max_batch:
                return
        if size < 1:
            return
        self.plan.chunks.append((session.session, size))
        self.prefilled += size
        self.add(size)
