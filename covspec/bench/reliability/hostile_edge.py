"""A hostile edge against the real device (``covspec bench reliability --hostile-edge``).

``HostileEdge`` is a fake edge on a real ZeroMQ ROUTER: it decodes what the device sends
and answers the way its ``Case`` says, honestly (an ``opened`` with an ordinary token)
up to the point the case is about, then malformed or hostile:

- ``wrong seq``: verdicts for a round the device never sent;
- ``accepted beyond the chunk``: a verdict accepting more tokens than the chunk has;
- ``token outside the vocabulary``: in a verdict, or in ``opened``;
- ``start beyond the committed end``: a verdict (device-led) or a streamed token
  (edge-led) five positions ahead;
- ``wrong dtypes``: a ``p_dense`` declared float32, a ``token`` of 5.0;
- ``huge frames``: a 9 MiB frame beside the verdict, beyond the device's limit;
- ``silence``: nothing at all, not even ``opened``;
- ``endless stream``: tokens streamed every millisecond that never end the generation;
- ``verdict for another session``: the right round, another session's id;
- ``stale for ever``: every chunk answered ``stale`` and nothing streamed (an edge that
  lost track of the committed sequence, e.g. after a late copy of an old ``open``).

``run_case`` drives one generation of the real device (``CoInference`` with the toy
draft, device-led or edge-led) against one case and records how it ended: which error,
after how long against the device's patience (``session.patience_s``), what was
yielded, and whether any yielded token lay outside the vocabulary. A generation must
end with ``EdgeError`` (``bad_reply`` for a reply that cannot be true) or
``EdgeUnreachable``, never another exception; ``promises`` lists what was broken.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import zmq

from covspec.protocol.messages import Message, Open, Opened, ProtocolError, Result, Verify, decode, encode
from covspec.protocol.ownership import session_id_for
from covspec.runtime_device.client import EdgeClient, EdgeError, EdgeUnreachable, Backoff
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.draft_model import ArtifactDraft, DraftModel
from covspec.runtime_device.engine import CoInference
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.session import patience_s

HUGE_FRAME = 9 * 1024 * 1024           # beyond the device's reply limit (client.REPLY_LIMITS, 8 MiB)
SLACK_S = 2.0                          # the draft's prefill and a busy CPU, on top of the patience
Frames = list[bytes]


@dataclass(frozen=True)
class Case:
    """A hostile behaviour: ``open``/``verify`` map a request to the frames sent back
    (None: the honest reply), ``stream`` sends frames every millisecond once a session
    is open (the open's seq, the next position)."""

    name: str
    open: Callable[["HostileEdge", Open], list[Frames] | None] = lambda edge, message: None
    verify: Callable[["HostileEdge", Verify], list[Frames]] = lambda edge, message: []
    stream: Callable[["HostileEdge", Open, int], list[Frames]] | None = None


def verdict(message: Verify, token: int, **fields) -> Result:
    """A verdict on ``message``, all accepted, ``token`` after; ``fields`` override."""
    values = {"session": message.session, "seq": message.seq, "start": message.start,
              "accepted": len(message.tokens), "token": token, **fields}
    return Result(**values)


def _raw(message: Message, **header_changes) -> Frames:
    """``message``'s frames with its header changed (what ``encode`` would never write)."""
    frames = encode(message)
    header = json.loads(frames[0])
    header.update(header_changes)
    return [json.dumps(header).encode()] + frames[1:]


def _ahead(edge: "HostileEdge", message: Open, position: int) -> list[Frames]:
    return [encode(Result(session=message.session, seq=message.seq, start=position + 5, token=edge.token))]


def _endless(edge: "HostileEdge", message: Open, position: int) -> list[Frames]:
    return [encode(Result(session=message.session, seq=message.seq, start=position, token=edge.token))]


CASES = [
    Case("wrong seq", verify=lambda e, m: [encode(verdict(m, e.token, seq=m.seq + 1000))]),
    Case("accepted beyond the chunk", verify=lambda e, m: [encode(verdict(m, e.token, accepted=len(m.tokens) + 3))]),
    Case("token outside the vocabulary (verdict)", verify=lambda e, m: [encode(verdict(m, e.vocab_size + 7))]),
    Case("token outside the vocabulary (opened)", open=lambda e, m: [encode(e.opened(m, token=e.vocab_size + 7))]),
    Case("start beyond the committed end", verify=lambda e, m: [encode(verdict(m, e.token, start=m.start + 5))],
         stream=_ahead),
    Case("wrong dtypes", verify=lambda e, m: [
        _raw(verdict(m, e.token, p_dense=np.zeros(4, np.float16)),
             arrays=[{"name": "p_dense", "dtype": "float32", "shape": [2]}]),
        _raw(verdict(m, e.token), token=float(e.token))]),
    Case("huge frames", verify=lambda e, m: [encode(verdict(m, e.token)) + [b"\0" * HUGE_FRAME]]),
    Case("silence", open=lambda e, m: []),
    Case("endless stream", stream=_endless),
    Case("verdict for another session", verify=lambda e, m: [
        encode(verdict(m, e.token, session=session_id_for("someone-else-entirely")))]),
    Case("stale for ever", verify=lambda e, m: [
        encode(Result(session=m.session, seq=m.seq, start=m.start, status="stale"))]),
]


class HostileEdge:
    """A fake edge on ``tcp://127.0.0.1:*`` playing ``case`` until ``close``."""

    def __init__(self, case: Case, vocab_size: int, token: int):
        self.case, self.vocab_size, self.token = case, vocab_size, token
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind("tcp://127.0.0.1:*")
        self.address = self.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.received = 0
        self._streams: dict[bytes, tuple[Open, int]] = {}     # peer -> (its open, the next position)
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="hostile-edge", daemon=True)
        self._thread.start()

    def opened(self, message: Open, **fields) -> Opened:
        values = {"session": message.session, "seq": message.seq, "owner": message.owner, "token": self.token,
                  "position": len(message.committed), "version": message.version, **fields}
        return Opened(**values)

    def _serve(self) -> None:
        try:
            while not self._halt.is_set():
                if self.socket.poll(1):
                    frames = self.socket.recv_multipart()
                    self.received += 1
                    self._answer(frames[0], frames[1:])
                for peer, (message, position) in list(self._streams.items()):
                    for reply in self.case.stream(self, message, position):
                        self._send(peer, reply)
                    self._streams[peer] = (message, position + 1)
        finally:
            self.socket.close(linger=0)

    def _answer(self, peer: bytes, frames: Frames) -> None:
        try:
            message = decode(frames)
        except ProtocolError:
            return
        if isinstance(message, Open):
            replies = self.case.open(self, message)
            if replies is None:
                replies = [encode(self.opened(message))]
                if self.case.stream is not None:
                    self._streams[peer] = (message, len(message.committed) + 1)
        elif isinstance(message, Verify):
            replies = self.case.verify(self, message)
        else:
            replies = []
        for reply in replies:
            self._send(peer, reply)

    def _send(self, peer: bytes, frames: Frames) -> None:
        try:
            self.socket.send_multipart([peer] + frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass                          # a peer that is gone or full: the stream goes on regardless

    def close(self) -> None:
        self._halt.set()
        self._thread.join(5)


@dataclass
class Outcome:
    case: str
    lead: str
    ended: str                 # the exception's class and code, "finished", or "crash: ..."
    seconds: float
    patience_s: float
    tokens: int
    outside_vocab: int
    message: str

    @property
    def broken(self) -> list[str]:
        problems = []
        if self.ended.startswith("crash") or self.ended == "finished":
            problems.append(f"{self.case} ({self.lead}): {self.ended}")
        if self.outside_vocab:
            problems.append(f"{self.case} ({self.lead}): {self.outside_vocab} token(s) outside the vocabulary")
        if self.seconds > self.patience_s + SLACK_S:
            problems.append(f"{self.case} ({self.lead}): ended after {self.seconds:.1f} s, "
                            f"beyond its patience of {self.patience_s:.1f} s")
        return problems


def run_case(case: Case, draft: DraftModel, image_png: bytes, question: str, lead: str, backoff: Backoff,
             reopen_attempts: int, max_new_tokens: int = 16) -> Outcome:
    """One generation of the real device (``draft``, e.g. ``ArtifactDraft``) against ``case``."""
    vocab_size = draft.vocab_size
    token = next(t for t in range(3, vocab_size) if t not in set(draft.eos_ids))     # an ordinary token
    edge = HostileEdge(case, vocab_size, token)
    client = EdgeClient(edge.address, backoff, context=zmq.Context.instance())
    options = DraftingOptions(lead=lead, reopen_attempts=reopen_attempts)
    yielded: list[int] = []
    began = time.perf_counter()
    try:
        for chunk in CoInference(draft, client).generate(image_png, question, GenerationSettings(
                max_new_tokens=max_new_tokens), options):
            yielded += chunk
        ended, text = "finished", ""
    except (EdgeError, EdgeUnreachable) as exc:
        ended = type(exc).__name__ + (f" {exc.code}" if isinstance(exc, EdgeError) else "")
        text = str(exc)
    except Exception as exc:  # noqa: BLE001 - a crash is what this bench looks for
        ended, text = f"crash: {type(exc).__name__}", traceback.format_exc()
    seconds = time.perf_counter() - began
    client.close()
    edge.close()
    return Outcome(case.name, lead, ended, round(seconds, 2), round(patience_s(backoff, reopen_attempts), 2),
                   len(yielded), sum(not 0 <= t < vocab_size for t in yielded), text)


def run_hostile_edge(artifact: DraftArtifact, image_png: bytes, question: str, leads=("device", "edge"),
                     backoff: Backoff = Backoff(timeout_s=0.5, retries=1, backoff_s=0.05),
                     reopen_attempts: int = 2, tick: Callable[[str], None] = lambda line: None) -> list[Outcome]:
    """Every case, once per lead; the outcomes in order."""
    draft = ArtifactDraft(artifact)
    outcomes = []
    for case in CASES:
        for lead in leads:
            outcomes.append(run_case(case, draft, image_png, question, lead, backoff, reopen_attempts))
            tick(f"{case.name} ({lead}): {outcomes[-1].ended} after {outcomes[-1].seconds} s")
    return outcomes


def summary(outcomes: list[Outcome], backoff: Backoff, reopen_attempts: int) -> dict:
    return {"policy": asdict(backoff), "reopen_attempts": reopen_attempts, "slack_s": SLACK_S,
            "outcomes": [asdict(o) for o in outcomes], "broken": [p for o in outcomes for p in o.broken]}


def report(summary: dict) -> str:
    """The Markdown of a ``summary``: what was run, the table, the verdict."""
    policy = summary["policy"]
    outcomes = summary["outcomes"]
    rows = ["| case | lead | ended with | seconds | patience (s) | tokens yielded | outside the vocabulary |",
            "|---|---|---|---:|---:|---:|---:|"]
    for o in outcomes:
        rows.append(f"| {o['case']} | {o['lead']} | {o['ended']} | {o['seconds']:.2f} | {o['patience_s']:.2f} | "
                    f"{o['tokens']} | {o['outside_vocab']} |")
    crashes = sum(o["ended"].startswith("crash") for o in outcomes)
    head = (f"A fake edge (a real ZeroMQ ROUTER) answers the real device (`CoInference`, toy int8 draft, greedy, "
            f"max 16 new tokens) honestly up to the point of each case, then with malformed or hostile replies; "
            f"each case once device-led and once edge-led. Device: timeout {policy['timeout_s']} s, "
            f"{policy['retries']} resend, backoff {policy['backoff_s']} s, {summary['reopen_attempts']} reopens "
            f"in a row at most; its patience (`runtime_device.session.patience_s`) is the longest it waits on an "
            f"edge that verifies nothing (plus {summary['slack_s']:g} s for the draft's prefill). "
            f"`EdgeMisbehaved bad_reply`: a reply that cannot be true, refused before anything of it was "
            f"committed; `EdgeUnreachable`: no usable reply within the patience (its message counts the replies "
            f"that did not decode or named other rounds). Tokens yielded: the honest ones before the hostility.")
    verdict = (f"{len(outcomes)} generations: {crashes} crashes, "
               f"{sum(o['outside_vocab'] for o in outcomes)} tokens outside the vocabulary, "
               f"{sum(o['ended'] == 'finished' for o in outcomes)} finished without an error, "
               f"{sum(o['seconds'] > o['patience_s'] + summary['slack_s'] for o in outcomes)} beyond their patience; "
               f"slowest {max(o['seconds'] for o in outcomes):.2f} s. Broken promises: "
               f"{'; '.join(summary['broken']) or 'none'}.")
    return "\n\n".join([head, "\n".join(rows), verdict])
