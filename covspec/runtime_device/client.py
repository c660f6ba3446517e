"""The device's connection to the edge: a ZeroMQ DEALER with timeouts and retries.

``EdgeClient.request`` sends one message and waits for the reply with the same
session and seq, resending the identical message (the edge answers a repeated seq
idempotently) with exponential backoff. It raises ``EdgeUnreachable`` when no reply
comes after every retry and ``EdgeError`` when the edge answers with an error.
Replies to older rounds (duplicates from retries) are dropped. Sends time out too (a
DEALER whose connection never completes would block forever), and a handshake the
edge refused (socket monitor events) turns into a clear ``EdgeUnreachable``: the edge
refused this device's key, or the two sides disagree on encryption. Replies are
bounded (``REPLY_LIMITS``; the socket's ``MAXMSGSIZE`` disconnects an edge that sends a
bigger message); replies that do not decode and replies to other sessions or rounds
are dropped and counted, and an ``EdgeUnreachable`` says how many came meanwhile, so a
misbehaving edge is told apart from a silent one. ``Backoff.patience_s`` is the
longest one request waits. Every byte sent
and received on the socket is counted
(frame payloads; ZeroMQ adds a few bytes of framing per frame), in total and per
message type.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import zmq
import zmq.utils.monitor

from covspec.protocol.errors import BUSY, EdgeError
from covspec.protocol.messages import Error, Limits, Message, ProtocolError, decode, encode

BUSY_WAIT_S = 1.0                # the longest pause before asking a busy edge again
REPLY_LIMITS = Limits(max_array_bytes=8 * 1024 * 1024, max_message_bytes=8 * 1024 * 1024)   # p_dense of 4M ids

__all__ = ["Backoff", "CurveKeys", "EdgeClient", "EdgeError", "EdgeUnreachable"]


class EdgeUnreachable(ConnectionError):
    """No reply from the edge after every retry."""


@dataclass(frozen=True)
class Backoff:
    """Per-attempt receive timeout, number of resends, and backoff between them."""

    timeout_s: float = 5.0
    retries: int = 3
    backoff_s: float = 0.2

    @property
    def patience_s(self) -> float:
        """The longest one request waits for its reply before ``EdgeUnreachable``: every
        attempt's timeout and the backoff after it."""
        return sum(self.timeout_s + self.backoff_s * 2 ** attempt for attempt in range(self.retries + 1))


@dataclass
class CurveKeys:
    """CurveZMQ keys of the device (its pair) and of the edge (its public key)."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, secret_file, edge_public_file) -> "CurveKeys":
        """From ``covspec keys new`` files: the device's ``NAME.key_secret`` and the edge's ``.key``."""
        import zmq.auth

        public, secret = zmq.auth.load_certificate(str(secret_file))
        if secret is None:
            raise ValueError(f"{secret_file} holds no secret key; pass the NAME.key_secret file.")
        return cls(public, secret, zmq.auth.load_certificate(str(edge_public_file))[0])


# Why a handshake failed, by the monitor event that says so.
HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the edge refused this device's key (CurveZMQ authentication failed); "
                                     "ask its operator to add the device's public key to --allow-keys",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the handshake with the edge failed: device and edge disagree on "
                                         "encryption (check --edge-key, and whether the edge runs with --secret-key)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the handshake with the edge failed (wrong --edge-key, or the edge "
                                          "expects encryption this device does not use)",
}


class EdgeClient:
    def __init__(self, address: str, backoff: Backoff = Backoff(), curve: CurveKeys | None = None,
                 context: zmq.Context | None = None):
        self.address = address
        self.backoff = backoff
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            self.socket.curve_publickey = curve.public
            self.socket.curve_secretkey = curve.secret
            self.socket.curve_serverkey = curve.server_public
        self.socket.setsockopt(zmq.SNDTIMEO, max(int(backoff.timeout_s * 1000), 1))
        self.socket.setsockopt(zmq.MAXMSGSIZE, REPLY_LIMITS.max_message_bytes)
        self._monitor = self.socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | sum(HANDSHAKE_FAILURES))
        self._handshake_failure: str | None = None
        self.socket.connect(address)
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_by_type: Counter[str] = Counter()     # e.g. "up:verify", "down:result"
        self._held: Message | None = None                # an awaited reply seen by reply_ready
        self.dropped: Counter[str] = Counter()           # replies dropped since the last awaited one, by why
        self._last_undecodable = ""

    def send(self, message: Message) -> None:
        frames = encode(message)
        size = sum(len(f) for f in frames)
        self.bytes_up += size
        self.bytes_by_type[f"up:{message.TYPE}"] += size
        try:
            self.socket.send_multipart(frames)
        except zmq.Again:
            raise EdgeUnreachable(self.explain(f"could not send to the edge at {self.address} within "
                                               f"{self.backoff.timeout_s:g} s")) from None

    def explain(self, problem: str) -> str:
        """``problem``, with the reason the handshake failed when the socket monitor saw one."""
        while self._monitor.poll(0):
            event = zmq.utils.monitor.recv_monitor_message(self._monitor)["event"]
            self._handshake_failure = HANDSHAKE_FAILURES.get(event)
        if self._handshake_failure:
            return f"{problem}: {self._handshake_failure}"
        if self.dropped:
            problem += (f" (meanwhile {self.dropped['undecodable']} replies did not decode"
                        f"{f', the last: {self._last_undecodable}' if self._last_undecodable else ''}; "
                        f"{self.dropped['unmatched']} answered other sessions or rounds)")
        return problem

    def _read(self) -> Message | None:
        """One waiting message off the socket (counted), or None if it does not decode."""
        frames = self.socket.recv_multipart()
        size = sum(len(f) for f in frames)
        self.bytes_down += size
        try:
            reply = decode(frames, REPLY_LIMITS)
        except ProtocolError as exc:
            self.dropped["undecodable"] += 1
            self._last_undecodable = str(exc)[:200]
            return None                            # garbage on the wire: not our reply
        self.bytes_by_type[f"down:{reply.TYPE}"] += size
        return reply

    def _take_held(self, session: str, seq: int, expect: type | None) -> Message | None:
        held, self._held = self._held, None
        return held if held is not None and held.session == session and held.seq == seq and \
            (expect is None or isinstance(held, (expect, Error))) else None

    def receive(self, session: str, seq: int, timeout_s: float, expect: type | None = None) -> Message | None:
        """The reply to (session, seq), or None after ``timeout_s``; with ``expect``, only a
        reply of that type or an error (the ``opened`` of an open, not the tokens an
        edge-led or target-only session streams with the open's seq)."""
        if (held := self._take_held(session, seq, expect)) is not None:
            return held
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self.socket.poll(int(left * 1000) + 1):
                return None
            reply = self._read()
            if self._matches(reply, session, seq, expect):
                return reply
        return None

    def _matches(self, reply: Message | None, session: str, seq: int | None = None, expect: type | None = None) -> bool:
        """Whether ``reply`` is the one awaited (then the dropped count starts over)."""
        if reply is None:
            return False
        if reply.session != session or (seq is not None and reply.seq != seq) or \
                (expect is not None and not isinstance(reply, (expect, Error))):
            self.dropped["unmatched"] += 1
            return False
        self.dropped.clear()
        self._last_undecodable = ""
        return True

    def receive_any(self, session: str, timeout_s: float) -> Message | None:
        """The next message about ``session`` whatever its seq (edge-led sessions get
        streamed tokens and verdicts interleaved), or None after ``timeout_s``."""
        held, self._held = self._held, None
        if held is not None and held.session == session:
            return held
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.socket.poll(max(int((deadline - time.monotonic()) * 1000), 0)):
                return None
            reply = self._read()
            if self._matches(reply, session):
                return reply

    def message_waiting(self) -> bool:
        """Whether a message waits to be read (never blocks, reads nothing)."""
        return self._held is not None or bool(self.socket.poll(0))

    def reply_ready(self, session: str, seq: int) -> bool:
        """Whether the reply to (session, seq) has arrived (never blocks). Other replies
        read on the way (to chunks already given up, answered ``stale``) are dropped, so
        they do not cut speculation short; the awaited one is kept for ``receive``."""
        while self._held is None and self.socket.poll(0):
            reply = self._read()
            if reply is not None and reply.session == session and reply.seq == seq:
                self._held = reply
        return self._held is not None

    def request(self, message: Message, timeout_s: float | None = None, expect: type | None = None) -> Message:
        """Send ``message`` and return its reply (of type ``expect``, when given: see
        ``receive``), resending on timeout. A ``busy`` edge is asked again with backoff for
        as long as the attempts would have waited in all; then its error is raised."""
        timeout = timeout_s or self.backoff.timeout_s
        deadline = time.monotonic() + timeout * (self.backoff.retries + 1)
        attempt = busy = 0
        while attempt <= self.backoff.retries:
            self.send(message)
            reply = self.receive(message.session, message.seq, timeout, expect)
            if isinstance(reply, Error) and reply.code == BUSY and time.monotonic() < deadline:
                time.sleep(min(self.backoff.backoff_s * (2 ** busy), BUSY_WAIT_S, max(deadline - time.monotonic(), 0)))
                busy += 1
                continue
            if reply is not None:
                if isinstance(reply, Error):
                    raise EdgeError(reply.code, reply.message)
                return reply
            time.sleep(self.backoff.backoff_s * (2 ** attempt))
            attempt += 1
        raise EdgeUnreachable(self.explain(f"no reply from the edge at {self.address} after "
                                           f"{self.backoff.retries + 1} attempts of {timeout:.1f} s"))

    def close(self) -> None:
        self.socket.disable_monitor()
        self._monitor.close(linger=0)
        self.socket.close(linger=0)
