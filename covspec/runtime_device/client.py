"""The device's connection to the edge: a ZeroMQ DEALER with timeouts and retries.

``EdgeClient.request`` sends one message and waits for the reply with the same
session and seq, resending the identical message (the edge answers a repeated seq
idempotently) with exponential backoff. It raises ``EdgeUnreachable`` when no reply
comes after every retry and ``EdgeError`` when the edge answers with an error.
Replies to older rounds (duplicates from retries) are dropped. Every byte sent and
received on the socket is counted
(frame payloads; ZeroMQ adds a few bytes of framing per frame), in total and per
message type.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import zmq

from covspec.protocol.errors import EdgeError
from covspec.protocol.messages import Error, Limits, Message, ProtocolError, decode, encode


__all__ = ["CurveKeys", "EdgeClient", "EdgeError", "EdgeUnreachable", "RetryPolicy"]


class EdgeUnreachable(ConnectionError):
    """No reply from the edge after every retry."""


@dataclass(frozen=True)
class RetryPolicy:
    """Per-attempt receive timeout, number of resends, and backoff between them."""

    timeout_s: float = 5.0
    retries: int = 3
    backoff_s: float = 0.2


@dataclass
class CurveKeys:
    """CurveZMQ keys of the device (its pair) and of the edge (its public key)."""

    public: bytes
    secret: bytes
    server_public: bytes


class EdgeClient:
    def __init__(self, address: str, policy: RetryPolicy = RetryPolicy(), curve: CurveKeys | None = None,
                 context: zmq.Context | None = None):
        self.address = address
        self.policy = policy
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            self.socket.curve_publickey = curve.public
            self.socket.curve_secretkey = curve.secret
            self.socket.curve_serverkey = curve.server_public
        self.socket.connect(address)
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_by_type: Counter[str] = Counter()     # e.g. "up:verify", "down:result"
        self._held: Message | None = None                # an awaited reply seen by reply_ready

    def send(self, message: Message) -> None:
        frames = encode(message)
        size = sum(len(f) for f in frames)
        self.bytes_up += size
        self.bytes_by_type[f"up:{message.TYPE}"] += size
        self.socket.send_multipart(frames)

    def _read(self) -> Message | None:
        """One waiting message off the socket (counted), or None if it does not decode."""
        frames = self.socket.recv_multipart()
        size = sum(len(f) for f in frames)
        self.bytes_down += size
        try:
            reply = decode(frames, Limits())
        except ProtocolError:
            return None                            # garbage on the wire: not our reply
        self.bytes_by_type[f"down:{reply.TYPE}"] += size
        return reply

    def _take_held(self, session: str, seq: int) -> Message | None:
        held, self._held = self._held, None
        return held if held is not None and held.session == session and held.seq == seq else None

    def receive(self, session: str, seq: int, timeout_s: float) -> Message | None:
        """The reply to (session, seq), or None after ``timeout_s``."""
        if (held := self._take_held(session, seq)) is not None:
            return held
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self.socket.poll(int(left * 1000) + 1):
                return None
            reply = self._read()
            if reply is not None and reply.session == session and reply.seq == seq:
                return reply
        return None

    def reply_ready(self, session: str, seq: int) -> bool:
        """Whether the reply to (session, seq) has arrived (never blocks). Other replies
        read on the way (to chunks already given up, answered ``stale``) are dropped, so
        they do not cut speculation short; the awaited one is kept for ``receive``."""
        while self._held is None and self.socket.poll(0):
            reply = self._read()
            if reply is not None and reply.session == session and reply.seq == seq:
                self._held = reply
        return self._held is not None

    def request(self, message: Message, timeout_s: float | None = None) -> Message:
        """Send ``message`` and return its reply, resending on timeout."""
        timeout = timeout_s or self.policy.timeout_s
        for attempt in range(self.policy.retries + 1):
            self.send(message)
            reply = self.receive(message.session, message.seq, timeout)
            if reply is not None:
                if isinstance(reply, Error):
                    raise EdgeError(reply.code, reply.message)
                return reply
            time.sleep(self.policy.backoff_s * (2 ** attempt))
        raise EdgeUnreachable(f"no reply from the edge at {self.address} after "
                              f"{self.policy.retries + 1} attempts of {timeout:.1f} s")

    def close(self) -> None:
        self.socket.close(linger=0)
