"""A victim session for the fuzzer: live, named by hostile messages, and checked after each batch.

``Victim`` opens a greedy speculative session on its own DEALER socket (the question and
the target's greedy answer in ``TargetFacts``) and publishes its (id, owner) for every
fuzzing worker to aim at (``WorkerState.victims``). ``check()`` runs its next round: a
chunk of one token, the target's own next one, which the edge must accept and follow with
the target's next token (or end the answer where the target's ends). A session the edge
no longer knows was ended by a message its owner did not send (nothing else touches it:
it is checked far more often than it could idle out). When the answer is complete the
victim closes it and opens a fresh one. Outcomes are counted in ``VictimTally``.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import zmq

from covspec.bench.reliability.hostile import TargetFacts, VictimSession
from covspec.protocol.errors import UNKNOWN_SESSION
from covspec.protocol.messages import Close, Error, Message, Open, Opened, Result, Verify, decode, encode
from covspec.protocol.ownership import new_owner, session_id_for
from covspec.protocol.verification import NO_TOKEN


@dataclass
class VictimTally:
    checks: Counter = field(default_factory=Counter)       # outcome -> count: ok, ended, wrong, no_reply
    examples: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.checks[outcome] += 1
            if outcome != "ok" and len(self.examples) < 5:
                self.examples.append(f"{outcome}: {detail[:200]}")

    def as_dict(self) -> dict:
        return {"victim_checks": sum(self.checks.values()), "victim_rounds_right": self.checks["ok"],
                "victims_ended_by_others": self.checks["ended"], "victim_wrong": self.checks["wrong"],
                "victim_unanswered": self.checks["no_reply"], "victim_examples": list(self.examples)}


class Victim:
    """One live victim session of fuzzing worker ``index``."""

    def __init__(self, index: int, address: str, facts: TargetFacts, victims: dict, tally: VictimTally,
                 timeout_s: float):
        self.index, self.facts, self.victims, self.tally, self.timeout_s = index, facts, victims, tally, timeout_s
        self.answer = list(facts.victim_answer)
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.session: VictimSession | None = None
        self.seq = self.committed = 0

    def _ask(self, message: Message) -> Message | None:
        self.socket.send_multipart(encode(message))
        while self.socket.poll(int(self.timeout_s * 1000)):
            reply = decode(self.socket.recv_multipart())
            if (reply.session, reply.seq) == (message.session, message.seq):
                return reply
        return None

    def open(self) -> None:
        owner = new_owner()
        self.session, self.seq = VictimSession(session_id_for(owner), owner), 1
        reply = self._ask(Open(session=self.session.id, seq=1, owner=owner, prompt=self.facts.victim_prompt,
                               image=np.frombuffer(self.facts.image_png, np.uint8), vocab_hash=self.facts.vocab_hash,
                               max_new_tokens=len(self.answer), committed=np.zeros(0, np.int32)))
        if not (isinstance(reply, Opened) and reply.token == self.answer[0]):
            self.victims[self.index], self.session = None, None
            self.tally.note("no_reply" if reply is None else "wrong", f"open: {reply!r}")
            return
        self.committed = 1
        self.victims[self.index] = self.session

    def check(self) -> None:
        """The victim's next round; a fresh victim when its answer is complete (or it is gone)."""
        if self.session is None or self.committed >= len(self.answer):
            self.close()
            self.open()
            return
        c = self.committed
        self.seq += 1
        reply = self._ask(Verify(session=self.session.id, seq=self.seq, owner=self.session.owner, start=c,
                                 tokens=np.asarray([self.answer[c]], np.int32)))
        last = c + 1 == len(self.answer)
        expected = (1, NO_TOKEN if last else self.answer[c + 1], last)
        if isinstance(reply, Error) and reply.code == UNKNOWN_SESSION:
            self.tally.note("ended", f"session {self.session.id} at {c}: {reply.message}")
            self.victims[self.index], self.session = None, None
        elif not isinstance(reply, Result) or reply.status != "ok" or \
                (reply.accepted, reply.token, reply.done) != expected:
            self.tally.note("no_reply" if reply is None else "wrong", f"at {c}, expected {expected}: {reply!r}")
            self.close()
        else:
            self.tally.note("ok")
            self.committed = c + 1 + (reply.token != NO_TOKEN)

    def close(self) -> None:
        if self.session is not None:
            self.victims[self.index] = None
            self.seq += 1
            self.socket.send_multipart(encode(Close(session=self.session.id, seq=self.seq, owner=self.session.owner)))
            self.session = None

    def finish(self) -> None:
        self.close()
        self.socket.close(linger=0)
