"""One session with the edge, seen from the device: the messages and their replies.

``DeviceSession`` owns the session id and the round numbers (``seq``), builds the
``open`` (carrying every committed token, so a restarted edge rebuilds the exact
state) and each chunk's ``verify`` (through the wire codec), and waits for replies
with the client's timeouts: a lost verdict is asked for again by resending every
chunk in flight (the edge answers a repeated ``seq`` idempotently), a lost session
is reopened with backoff. A session lost more than ``attempts`` times in a row, with
no verdict between (``progress``), is given up (``EdgeUnreachable``): an edge that
keeps losing it will not serve it. The session id is derived from the device's owner
secret (``covspec.protocol.ownership``), so only this device can reopen it, even on an
edge that restarted. It never drafts and never decides what a verdict means.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from covspec.protocol.errors import BUSY, EXPIRED, REPLAYED, UNKNOWN_SESSION
from covspec.protocol.history import arrays as history_arrays
from covspec.protocol.messages import Close, Error, Open, Opened, Result, Verify
from covspec.protocol.ownership import new_owner, session_id_for
from covspec.runtime_device.client import Backoff, EdgeClient, EdgeError, EdgeUnreachable
from covspec.runtime_device.options import GenerationSettings
from covspec.runtime_device.proposer import Chunk


def patience_s(backoff: Backoff, attempts: int) -> float:
    """The longest a generation waits on an edge that verifies nothing before it ends with an
    error: the open (twice the timeout, then a whole request), then ``attempts`` + 1 losses
    in a row (``DeviceSession.reopen``), each the wait for a verdict and a reopen. The
    draft's own prefill comes on top."""
    return 2 * backoff.timeout_s + backoff.patience_s + (attempts + 1) * 2 * backoff.patience_s


@dataclass
class Turn:
    """A question's place in a conversation (``conversation.py``): the earlier turns, and once
    the conversation has opened its session on the edge, that session's owner secret and its
    last ``seq``, so the next question continues it (``DeviceSession`` keeps them up to date
    and never closes a conversation's session: the conversation does)."""

    history: tuple[tuple[str, str], ...] = ()
    owner: str | None = None
    seq: int = 0


class DeviceSession:
    def __init__(self, client: EdgeClient, codec, settings: GenerationSettings, question: str,
                 image_bytes: bytes, vocab_hash: str, trace: Callable[[dict], None], mode: str = "speculative",
                 turn: Turn | None = None):
        self.client, self.codec, self.settings, self.mode = client, codec, settings, mode
        self.question, self.image_bytes, self.vocab_hash = question, image_bytes, vocab_hash
        self.trace = trace
        self.turn = turn
        continuing = turn is not None and turn.owner is not None
        self.owner = turn.owner if continuing else new_owner()   # proves on every message that this device opened it
        self.id = session_id_for(self.owner)    # self-certifying: only this owner can (re)open it
        self.seq = turn.seq if continuing else 0
        self.image_held = continuing            # the edge holds the image: the first open leaves it out
        self.history = turn.history if turn is not None else ()
        self.lost = 0                           # reopens since the last verdict

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    # -- open ----------------------------------------------------------------------------------

    def open_message(self, committed: list[int], target_keep: np.ndarray | None) -> Open:
        """An ``open`` (or reopen) carrying every committed token, and in a conversation the
        earlier turns; the image bytes unless this is a follow-up's first open (the edge
        holds the image; if it no longer does it answers ``expired``, see ``await_opened``)."""
        s = self.settings
        image = b"" if self.image_held else self.image_bytes
        self.image_held = False
        return Open(session=self.id, seq=self._next_seq(), prompt=self.question,
                    image=np.frombuffer(image, np.uint8), max_new_tokens=s.max_new_tokens,
                    vocab_hash=self.vocab_hash, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                    seed=s.seed, wire=self.codec.name, owner=self.owner, mode=self.mode,
                    committed=np.asarray(committed, np.int32),
                    target_keep=None if target_keep is None else target_keep.astype(np.int32),
                    conversation=self.turn is not None, **history_arrays(self.history))

    def await_opened(self, message: Open) -> Opened:
        """The reply to an ``open`` already sent (sent again if it does not come). A follow-up
        whose conversation the edge no longer holds (``expired``) is opened again with the image."""
        try:
            reply = self.client.receive(message.session, message.seq, self.client.backoff.timeout_s * 2, Opened)
            if reply is None or (isinstance(reply, Error) and reply.code == BUSY):
                reply = self.client.request(message, expect=Opened)     # resends, and waits out a busy edge
            if isinstance(reply, Error):
                raise EdgeError(reply.code, reply.message)
            return reply
        except EdgeError as exc:
            if exc.code != EXPIRED or message.image.size:
                raise
        self.trace({"event": "expired", "seq": message.seq})
        return self.client.request(self.open_message(list(message.committed), message.target_keep), expect=Opened)

    def reopen(self, committed: list[int], target_keep: np.ndarray | None, attempts: int,
               on_attempt: Callable[[int], None], why: str = "the edge lost it") -> Opened:
        """Open the session again with every committed token (``why``: the edge restarted,
        forgot it, or its replies lost track of it)."""
        self.lost += 1
        if self.lost > attempts:
            raise EdgeUnreachable(self.client.explain(
                f"the edge at {self.client.address} lost session {self.id} {attempts} time(s) in a row without a "
                f"verdict between (the last time: {why}); giving up"))
        last: Exception | None = None
        for attempt in range(attempts):
            on_attempt(attempt)
            try:
                return self.client.request(self.open_message(committed, target_keep), expect=Opened)
            except EdgeUnreachable as exc:
                last = exc
                time.sleep(self.client.backoff.backoff_s * (2 ** attempt))
        raise EdgeUnreachable(f"the edge at {self.client.address} stayed unreachable: {last}")

    def progress(self) -> None:
        """A verdict arrived: the session works again (``reopen`` counts losses in a row)."""
        self.lost = 0

    # -- rounds --------------------------------------------------------------------------------

    def send(self, chunk: Chunk) -> None:
        """Send ``chunk`` as a new round (its ``seq`` and ``sent_at`` are set here)."""
        chunk.seq = self._next_seq()
        chunk.sent_at = time.perf_counter()
        self.client.send(self._verify(chunk))

    def verdict_ready(self, chunk: Chunk) -> bool:
        """Whether the verdict on ``chunk`` has arrived (never blocks)."""
        return self.client.reply_ready(self.id, chunk.seq)

    def await_verdict(self, in_flight: Iterable[Chunk]) -> Result | None:
        """The verdict on the oldest chunk in flight, resending every chunk in flight on
        timeout; None when the session is lost (unknown to the edge, no reply after every
        retry, or the verdict lost after the edge answered a later chunk: the edge repeats
        only its last reply and refuses older rounds ``replayed``). A ``busy`` edge is asked
        again; any other error raises ``EdgeError``."""
        chunks = list(in_flight)
        backoff = self.client.backoff
        for attempt in range(backoff.retries + 1):
            reply = self.client.receive(self.id, chunks[0].seq, backoff.timeout_s)
            if isinstance(reply, Result):
                return reply
            if isinstance(reply, Error) and reply.code in (UNKNOWN_SESSION, REPLAYED):
                return None                         # gone, or its verdict lost behind a later round's: reopen
            if isinstance(reply, Error) and reply.code != BUSY:
                raise EdgeError(reply.code, reply.message)
            for chunk in chunks:                    # no reply, or a busy edge: ask again
                self.client.send(self._verify(chunk))
            time.sleep(backoff.backoff_s * (2 ** attempt))
        return None

    def close(self) -> None:
        """End the session on the edge; a conversation's is kept for its next question (``Turn``)."""
        if self.turn is not None:
            self.turn.owner, self.turn.seq = self.owner, self.seq
            return
        self.client.send(Close(session=self.id, seq=self._next_seq(), owner=self.owner))

    def _verify(self, chunk: Chunk) -> Verify:
        return Verify(session=self.id, seq=chunk.seq, owner=self.owner, start=chunk.start, assumed=chunk.assumed,
                      tokens=np.asarray(chunk.tokens, np.int32), device_leads=chunk.device_leads,
                      **self.codec.encode(chunk.rows))
