"""Hostile messages against a live edge, with a well-behaved device alongside.

``run_fuzz(address, facts, messages, sockets, seed)`` drives ``sockets`` fuzzing
workers, each a ZeroMQ DEALER with a ``reliability.fuzz.Fuzzer`` of its own seed, in
lock-step: send one case, wait for its reply (``timeout_s``), judge it. A case whose
reply never comes is *unanswered* (and its socket is replaced, so a late reply cannot
be taken for the next one's); ``close`` cases are not waited for (the protocol answers
a close only when it refuses it; such refusals are matched by session and seq when
they arrive) and ``socket_drop`` cases go out on a throw-away socket (the socket
drops the peer, nothing comes back). The result, ``FuzzTally``, counts messages per
class, replies by label, labels outside what the case allows (``unexpected``, with
examples), unanswered messages, the replies that by design do not come, and replies
naming another session or seq than the request's (``misaddressed``). With
``TargetFacts.victim_answer``, each worker also keeps a victim session
(``reliability.victim``) that hostile string fields name, and runs its next round after
every ``BATCH`` messages: it must still commit the target's tokens (``victims_ended_by_others``
counts the victims the edge no longer knew: the goal is 0). An error reply is never
acceptable as ``internal``.

Nothing here starts or stops an edge or watches its memory; ``reliability.phases`` does.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from covspec.bench.reliability.fuzz import Fuzzer
from covspec.bench.reliability.hostile import ANY_ERROR, NO_REPLY, Case, OwnSession, TargetFacts, WorkerState
from covspec.bench.reliability.victim import Victim, VictimTally
from covspec.protocol.errors import INTERNAL
from covspec.protocol.messages import Close, Error, Message, Opened, ProtocolError, decode, encode

EXAMPLES = 5                      # examples kept per (class, label) of something unexpected
REPLY_TIMEOUT_S = 10.0            # how long a fuzzing socket waits for each reply
BATCH = 50                        # messages a worker sends between two rounds of its victim


@dataclass
class FuzzTally:
    sent: Counter = field(default_factory=Counter)                 # class -> messages
    replies: Counter = field(default_factory=Counter)              # label -> replies
    by_class: dict = field(default_factory=lambda: defaultdict(Counter))   # class -> label -> replies
    unexpected: Counter = field(default_factory=Counter)           # "class: label" -> count
    unanswered: Counter = field(default_factory=Counter)           # class -> messages that got no reply
    by_design: Counter = field(default_factory=Counter)            # "close" / "socket_drop" -> no reply, as designed
    misaddressed: int = 0
    strays: int = 0                # sessions a hostile open created after all (closed again at once)
    victims: VictimTally = field(default_factory=VictimTally)
    examples: dict = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, case: Case, reply: Message | None, detail: str = "") -> None:
        """Count the reply to ``case`` (None: none came) and judge it against ``case.expect``."""
        with self.lock:
            if reply is None:
                if NO_REPLY in case.expect:
                    self.by_design[case.kind] += 1
                else:
                    self.unanswered[case.kind] += 1
                    self._example(f"{case.kind}: no reply", case, detail)
                return
            label = label_of(reply)
            self.replies[label] += 1
            self.by_class[case.kind][label] += 1
            if not (label in case.expect or (ANY_ERROR in case.expect and isinstance(reply, Error)
                                             and reply.code != INTERNAL)):
                self.unexpected[f"{case.kind}: {label}"] += 1
                self._example(f"{case.kind}: {label}", case, getattr(reply, "message", "") or detail)
            if case.address is not None and (reply.session, reply.seq) != case.address:
                self.misaddressed += 1
                self._example(f"{case.kind}: misaddressed", case, f"{(reply.session, reply.seq)} != {case.address}")

    def _example(self, key: str, case: Case, detail: str) -> None:
        if len(self.examples[key]) < EXAMPLES:
            self.examples[key].append({"header": case.frames[0][:300].decode("utf-8", "replace") if case.frames
                                       else "", "frames": len(case.frames), "detail": detail[:300]})

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def as_dict(self) -> dict:
        return {"sent": sum(self.sent.values()), "sent_by_class": dict(self.sent), "replies": dict(self.replies),
                "replies_by_class": {k: dict(v) for k, v in self.by_class.items()},
                "unexpected": dict(self.unexpected), "unanswered": dict(self.unanswered),
                "no_reply_by_design": dict(self.by_design), "misaddressed": self.misaddressed,
                "strays": self.strays, "examples": dict(self.examples), **self.victims.as_dict()}


def label_of(reply: Message) -> str:
    """An error reply's code, or any other reply's type."""
    return reply.code if isinstance(reply, Error) else reply.TYPE


def _dealer(address: str) -> zmq.Socket:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDTIMEO, 10_000)
    socket.connect(address)
    return socket


class _Worker:
    """One fuzzing socket: sends its cases in lock-step and keeps its own session."""

    def __init__(self, index: int, address: str, facts: TargetFacts, seed: int, registry: dict,
                 tally: FuzzTally, timeout_s: float, victims: dict):
        self.address, self.tally, self.timeout_s = address, tally, timeout_s
        self.fuzzer = Fuzzer(seed, facts)
        self.state = WorkerState(index, registry, victims)
        self.victim = Victim(index, address, facts, victims, tally.victims, timeout_s) if facts.victim_answer \
            else None
        self.socket = _dealer(address)
        self.closes: dict[tuple, Case] = {}           # close cases whose refusal may still arrive

    def run(self, quota: int, tick: Callable[[], None]) -> None:
        try:
            if self.victim is not None:
                self.victim.open()
            for sent in range(1, quota + 1):
                self.one(self.fuzzer.case(self.state))
                tick()
                if self.victim is not None and (sent % BATCH == 0 or sent == quota):
                    self.victim.check()          # after each batch: the victim still answers right
            self._drain(0.5)
        finally:
            self.socket.close(linger=0)
            self.state.adopt(None)
            if self.victim is not None:
                self.victim.finish()

    def one(self, case: Case) -> None:
        with self.tally.lock:
            self.tally.sent[case.kind] += 1
        if case.fresh_socket:
            self._send_alone(case)
            return
        self.socket.send_multipart(case.frames, copy=False)
        if NO_REPLY in case.expect:
            self.closes[case.address] = case
            if case.role == "close":
                self.state.adopt(None)
            return
        reply = self._await(case)
        self.tally.note(case, reply)
        if reply is None:                             # a late reply must not be taken for the next case's
            self.socket.close(linger=0)
            self.socket = _dealer(self.address)
            self._forget_closes()
            return
        self._follow(case, reply)

    def _await(self, case: Case) -> Message | None:
        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self.socket.poll(int(left * 1000) + 1):
                return None
            frames = self.socket.recv_multipart()
            try:
                reply = decode(frames)
            except ProtocolError as exc:
                return Error(session="", seq=0, code="undecodable_reply", message=str(exc))
            key = (reply.session, reply.seq)
            if key in self.closes and key != case.address:
                self.tally.note(self.closes.pop(key), reply)
                continue
            return reply
        return None

    def _follow(self, case: Case, reply: Message) -> None:
        """Keep the worker's own session as the edge holds it; close sessions opened by accident."""
        own = self.state.own
        if case.role == "open" and isinstance(reply, Opened):
            session: OwnSession = case.session
            session.owner, session.last_seq, session.done = reply.owner, reply.seq, reply.done
            session.committed, session.last_token = (1, reply.token) if reply.token >= 0 else (0, -1)
            self.state.adopt(session)
        elif isinstance(reply, Opened) and not (own is not None and reply.session == own.id):   # not a repeat
            with self.tally.lock:
                self.tally.strays += 1
            self.socket.send_multipart(encode(Close(session=reply.session, seq=reply.seq + 1, owner=reply.owner)))
        elif own is not None and case.address is not None and case.address[0] == own.id:
            if not own.observe(case, reply):
                self.state.adopt(None)

    def _send_alone(self, case: Case) -> None:
        socket = _dealer(self.address)
        try:
            socket.send_multipart(case.frames, copy=False)
            reply = decode(socket.recv_multipart()) if socket.poll(300) else None
        finally:
            socket.close(linger=0)
        self.tally.note(case, reply)

    def _drain(self, seconds: float) -> None:
        """Refusals of closes still on their way; the closes left were answered by silence."""
        deadline = time.monotonic() + seconds
        while self.closes and (left := deadline - time.monotonic()) > 0:
            if not self.socket.poll(int(left * 1000) + 1):
                break
            try:
                reply = decode(self.socket.recv_multipart())
            except ProtocolError:
                continue
            case = self.closes.pop((reply.session, reply.seq), None)
            if case is not None:
                self.tally.note(case, reply)
        self._forget_closes()

    def _forget_closes(self) -> None:
        for case in self.closes.values():
            self.tally.note(case, None)
        self.closes.clear()


def run_fuzz(address: str, facts: TargetFacts, messages: int, sockets: int = 8, seed: int = 0,
             timeout_s: float = REPLY_TIMEOUT_S, tick: Callable[[], None] = lambda: None) -> FuzzTally:
    """Send ``messages`` generated cases to the edge at ``address`` from ``sockets`` workers."""
    tally, registry = FuzzTally(), {}
    victims = dict.fromkeys(range(sockets))         # every key there before the threads read it
    quotas = [messages // sockets + (1 if i < messages % sockets else 0) for i in range(sockets)]
    workers = [_Worker(i, address, facts, seed * 1000 + i, registry, tally, timeout_s, victims)
               for i in range(sockets)]
    threads = [threading.Thread(target=w.run, args=(q, tick), name=f"fuzz-{i}", daemon=True)
               for i, (w, q) in enumerate(zip(workers, quotas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally
