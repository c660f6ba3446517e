"""The model thread: the one thread that touches the target and the sessions.

``ModelThread.run`` takes decoded requests (``Request``) from a queue filled by the
server's I/O thread and schedules them. Each iteration it handles the waiting requests
in arrival order (a session's own requests keep their order; different sessions' may
pass each other): opens (a prefill each, through the edge's ``PrefixCache``; at most one
per iteration so a burst of opens does not stall everyone's decoding; admitted while the
live sessions fit ``max_sessions`` and ``kv_budget``, else ``busy``), closes, and
verifies, whose prepared rounds it gathers together with one step of every streaming
session (target-only, and edge-led ones without a chunk this iteration, as
``edge_steps`` allows), up to ``max_batch`` sessions and ``max_batch_tokens`` input
tokens. Then one target forward runs them all (``rounds.run_rounds``) and each session
gets its reply; a request that did not fit waits for the next iteration. With ``max_batch`` 1 every round runs alone.

A failure that concerns one message ends nothing but that message. A refused request
(``EdgeError``) becomes an ``error`` reply (not remembered as the round's reply) and
changes no session: no state, no counters (the reply is charged to a session only when
its owner sent the request), no slot. Any other failure is answered ``internal``; it
drops the session only when the session's owner sent the request (the failure was in
that session's own model work), never a session named by someone else's message. A batch
that fails is retried session by session, so one broken session never takes the
others down. Idle sessions expire here too. Every reply is encoded in the protocol
version of the device's request.
"""

from __future__ import annotations

import collections
import hmac
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass

import zmq

from covspec.protocol import errors
from covspec.protocol import verification as spec
from covspec.protocol.errors import EdgeError
from covspec.protocol.messages import Close, Error, Message, Open, Result, Verify, encode
from covspec.protocol.ownership import new_owner
from covspec.runtime_edge.config import ServerConfig
from covspec.runtime_edge.admission import check_kv_budget, make_room
from covspec.runtime_edge.heap import HeapTrimmer
from covspec.runtime_edge.prefix_cache import PrefixCache
from covspec.runtime_edge.rounds import pick_verifier, run_rounds
from covspec.runtime_edge.session import Round, Session
from covspec.runtime_edge.target import TargetModel, decode_image

log = logging.getLogger("covspec.edge")

POLL_S = 0.1         # longest wait for a request when nothing else is due


@dataclass
class Request:
    """A decoded request waiting for the model thread."""

    identity: bytes
    message: Message
    nbytes: int
    peer_key: str = ""        # the device's CurveZMQ public key (Z85) when keys are on


@dataclass
class _Work:
    """A prepared round in this iteration's batch, and the request it answers (None: a target-only step)."""

    session: Session
    round: Round
    request: Request | None


class ModelThread:
    """The sessions of one target, served from one thread."""

    def __init__(self, target: TargetModel, config: ServerConfig, stopping: threading.Event):
        self.target, self.config, self.stopping = target, config, stopping
        self.requests: queue.Queue = queue.Queue(maxsize=config.max_queue)
        self.sessions: dict[str, Session] = {}
        self._waiting: collections.deque[Request] = collections.deque()    # taken from the queue, not yet handled
        self._streaming: collections.deque[tuple[Session, int]] = collections.deque()  # target-only, with open's seq
        self._push: zmq.Socket | None = None
        self._verifier = pick_verifier(target.device)
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes)
        self.forwards = 0         # target forwards since start (prefills included), for Pong
        self.committed = 0        # tokens committed over all sessions since start, for Pong
        self.prefill_s = 0.0      # time spent opening sessions (context + prefill), for Pong
        self.rounds_s = 0.0       # time spent in batched forwards and verdicts, for Pong
        self.turns_continued = 0  # follow-up questions that continued their session's cache, for Pong
        self.kv_bytes = 0         # the live sessions' KV (Session.kv_bytes) after the last iteration, for Pong
        self._heap = HeapTrimmer()   # freed memory back to the OS now and then: a flat RSS over days

    def run(self, push: zmq.Socket) -> None:
        """Serve until ``stopping`` is set; replies go out through ``push`` (closed at the end)."""
        import torch

        self._push = push
        check_every = min(1.0, self.config.idle_timeout_s / 4, self.config.finished_timeout_s / 4)
        next_check = time.monotonic() + check_every
        try:
            with torch.inference_mode():
                while not self.stopping.is_set():
                    self._take(block=not self._waiting and not self._streaming)
                    batch = self._gather()
                    if batch:
                        self._run(batch)
                    self.kv_bytes = sum(session.kv_bytes() for session in self.sessions.values())
                    now = time.monotonic()
                    if now >= next_check or not batch:
                        self._expire(now)
                        self._heap.maybe_trim(now)
                        next_check = now + check_every
        finally:
            push.close(linger=0)

    # --- scheduling -----------------------------------------------------------------------

    def _take(self, block: bool) -> None:
        """Move the queued requests to ``_waiting`` (waiting up to POLL_S for one if ``block``)."""
        try:
            self._waiting.append(self.requests.get(block=block, timeout=POLL_S))
            while True:
                self._waiting.append(self.requests.get_nowait())
        except queue.Empty:
            pass

    def _gather(self) -> list[_Work]:
        """Handle the waiting requests that fit this iteration; the rounds to run."""
        batch: list[_Work] = []
        deferred: collections.deque[Request] = collections.deque()
        held: set[str] = set()              # sessions with a round in the batch or a deferred request
        tokens, opened = 0, False
        while self._waiting:
            request = self._waiting.popleft()
            message = request.message
            size = len(getattr(message, "tokens", ())) + 1
            full = len(batch) >= self.config.max_batch or (batch and tokens + size > self.config.max_batch_tokens)
            if message.session in held or (isinstance(message, Verify) and full) or \
                    (isinstance(message, Open) and opened):
                held.add(message.session)
                deferred.append(request)
                continue
            opened |= isinstance(message, Open)
            work = self._handle(request)
            if work is not None:
                batch.append(work)
                held.add(work.session.id)
                tokens += len(work.round.inputs)
        self._waiting = deferred
        room = self._edge_steps_allowed(len(batch), tokens)
        for _ in range(len(self._streaming)):            # one step of each streaming session that fits
            session, seq = self._streaming[0]
            self._streaming.rotate(-1)
            if self.sessions.get(session.id) is not session or session.done or session.mode == "speculative":
                self._streaming.remove((session, seq))
            elif session.id not in held and len(batch) < self.config.max_batch and \
                    (not batch or tokens + 1 <= self.config.max_batch_tokens) and \
                    (session.mode == "target_only" or room):
                batch.append(_Work(session, session.prepare_step(seq), None))
                held.add(session.id)
                tokens += 1
        return batch

    def _edge_steps_allowed(self, rounds: int, tokens: int) -> bool:
        """Whether edge-led sessions step by themselves this iteration (``edge_steps``)."""
        mode = self.config.edge_steps
        if mode != "auto":
            return mode == "always"
        return rounds < self.config.max_batch / 2 and tokens < self.config.max_batch_tokens / 2

    def _run(self, batch: list[_Work]) -> None:
        """One forward for the whole batch; on failure, each round alone."""
        lengths = [work.session.cache.kv.length for work in batch]
        began = time.perf_counter()
        try:
            results = run_rounds(self.target, [(work.session, work.round) for work in batch], self._verifier)
            self.rounds_s += time.perf_counter() - began
        except Exception:  # noqa: BLE001 - retried one by one below, where the failure is attributed
            if len(batch) == 1:
                return self._fail(batch[0])
            log.warning("a batched forward of %d sessions failed; retrying them one by one", len(batch),
                        exc_info=True)
            for work, length in zip(batch, lengths):
                if work.session.cache is not None:
                    self.target.rollback(work.session.cache, length)
                self._run([work])
            return
        self.forwards += 1
        for work, result in zip(batch, results):
            self.committed += result.accepted + (result.token != spec.NO_TOKEN)
            if work.request is None:
                result.version = work.session.version
                self._send_frames(work.session.identity, encode(result), work.session)
                work.session.last_active = time.monotonic()
            else:
                self._reply(work.request, result, work.session)

    def _fail(self, work: _Work) -> None:
        session = work.session
        log.exception("session %s: %s failed", session.id, "a target-only step" if work.request is None else "verify")
        self.end(session, "dropped after an internal error")
        exc = sys.exc_info()[1]
        self._send_frames(session.identity if work.request is None else work.request.identity, encode(Error(
            session=session.id, seq=work.round.seq, code=errors.INTERNAL, version=session.version,
            message=f"the edge failed on this round ({type(exc).__name__}: {exc}); the session was dropped, "
                    "reopen it with your committed tokens.")), None)

    # --- requests ---------------------------------------------------------------------------

    def _handle(self, request: Request) -> _Work | None:
        """Answer ``request`` now, or return the round it needs run."""
        message = request.message
        session = self.sessions.get(message.session)
        try:
            if isinstance(message, Open):
                self._open(request)
            elif isinstance(message, Close):
                if session is not None:
                    _check_owner(session, request)
                    session.stats.bytes_in += request.nbytes
                    self.end(session, "closed")
            else:
                return self._verify(request, session)
        except EdgeError as exc:        # refused: nothing changed; only the owner's own session pays for the reply
            owned = self.sessions.get(message.session)
            self._reply(request, Error(session=message.session, seq=message.seq, code=exc.code, message=exc.message),
                        owned if _owns(owned, request) else None, remember=False)
        except Exception as exc:  # noqa: BLE001 - the server must survive anything a request triggers
            log.exception("session %s: request %s failed", message.session, message.TYPE)
            broken = self.sessions.get(message.session)
            dropped = _owns(broken, request)          # the owner's own model work failed; nobody else's can
            if dropped:
                self.end(broken, "dropped after an internal error")
            self._reply(request, Error(
                session=message.session, seq=message.seq, code=errors.INTERNAL,
                message=f"the edge failed on this request ({type(exc).__name__}: {exc}); "
                        + ("the session was dropped, reopen it with your committed tokens." if dropped else
                           "no session was changed; report this to the edge's operator.")), None, remember=False)
        return None

    def _open(self, request: Request) -> None:
        message: Open = request.message
        target = self.target
        # A target_only device tokenizes nothing, so it may leave the hash empty.
        hash_needed = not (message.mode == "target_only" and message.vocab_hash == "")
        if hash_needed and message.vocab_hash != target.vocab_hash:
            raise EdgeError(errors.VOCAB_MISMATCH, f"the device's vocabulary hash {message.vocab_hash[:12]!r}... differs "
                                                   f"from the target's {target.vocab_hash[:12]!r}...; device and edge "
                                                   "must use the same tokenizer.")
        old = self.sessions.get(message.session)
        if old is not None:
            _check_owner(old, request)
            if message.seq == old.last_seq and old.last_reply is not None:   # the same open again (a resend or a
                old.identity, old.last_active = request.identity, time.monotonic()   # duplicate): its reply again
                self._send_frames(request.identity, old.last_reply, old)
                return
            if message.seq < old.last_seq:                                   # a late copy must not reset the session
                raise EdgeError(errors.REPLAYED, f"seq {message.seq} is older than this session's last round "
                                                 f"({old.last_seq}); reopen with a new, higher seq.")
        began = time.perf_counter()
        image_bytes = message.image.tobytes() if message.image.size else getattr(old, "image", b"")
        if not image_bytes:
            raise EdgeError(errors.EXPIRED, f"this edge no longer holds the conversation of session {message.session!r} "
                                            "(it expired after being idle, was evicted for memory, or the edge "
                                            "restarted); open it again with the image and the whole history.")
        image = decode_image(image_bytes, self.config.max_image_pixels, self.config.max_image_aspect)
        previous = old if message.history is not None else None    # a follow-up turn continues its cache
        if old is not None and previous is None:
            self.end(old, "reopened by its owner")
        make_room(self.sessions.values(), self.config, keep=previous, end=self.end)
        session, opened = Session.open(target, message, image, max_context=self.config.max_context,
                                       owner=message.owner or new_owner(), peer_key=request.peer_key,
                                       prefix_cache=self.prefix_cache, image_bytes=image_bytes, previous=previous)
        if previous is not None:
            self.turns_continued += session.stats.continued > 0
            self.end(previous, "continued by its next turn")
        self.prefill_s += time.perf_counter() - began
        if opened.token != spec.NO_TOKEN:         # a prefill ran: one forward from a cached prefix or an earlier
            cached = session.stats.reused or session.stats.continued     # turn, else a second for a reopen's tokens
            self.forwards += 1 if cached else 1 + bool(len(message.committed))
        try:
            check_kv_budget(self.sessions.values(), self.config.kv_budget, session.kv_bytes())
        except EdgeError:
            session.free()
            raise
        session.identity = request.identity
        session.stats.bytes_in += request.nbytes
        self.sessions[session.id] = session
        if opened.token != spec.NO_TOKEN:
            self.committed += 1
        self._reply(request, opened, session)
        if session.mode in ("target_only", "edge_led") and not session.done:
            self._streaming.append((session, message.seq))

    def _verify(self, request: Request, session: Session | None) -> _Work | None:
        message: Verify = request.message
        if session is None:
            raise EdgeError(errors.UNKNOWN_SESSION, f"no session {message.session!r} on this edge (never opened, "
                                                    "closed, expired after being idle, or the edge restarted); "
                                                    "reopen it with Open carrying your committed tokens.")
        _check_owner(session, request)
        session.stats.bytes_in += request.nbytes
        session.identity = request.identity
        session.last_active = time.monotonic()
        if message.seq == session.last_seq and session.last_reply is not None:
            self._send_frames(request.identity, session.last_reply, session)   # idempotent repeat
            return None
        if message.seq < session.last_seq:
            raise EdgeError(errors.REPLAYED, f"seq {message.seq} is older than this session's last round "
                                             f"({session.last_seq}); use a new, higher seq for each round.")
        if session.mode == "target_only":
            raise EdgeError(errors.WRONG_MODE, "this session is target_only: the edge streams its tokens; "
                                               "open a speculative session to verify drafts.")
        work = session.prepare(self.target, message)
        if message.device_leads and session.mode == "edge_led":
            session.mode = "speculative"        # the device leads from here: no more steps of the edge's own
        if isinstance(work, Result):
            self._reply(request, work, session)
            return None
        return _Work(session, work, request)

    def _expire(self, now: float) -> None:
        """End sessions idle too long: ``finished_timeout_s`` once done, else ``idle_timeout_s``."""
        for session in list(self.sessions.values()):
            limit = self.config.finished_timeout_s if session.done and not session.conversation \
                else self.config.idle_timeout_s
            if now - session.last_active > limit:
                self.end(session, f"{'finished' if session.done else 'expired'} after {limit:g} s idle")

    def end(self, session: Session, reason: str) -> None:
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
        session.free()
        log.info("%s", session.log_line(reason))

    def _reply(self, request: Request, message: Message, session: Session | None, *, remember: bool = True) -> None:
        """Send ``message``; with ``remember`` it becomes the session's idempotent answer to its seq."""
        message.version = request.message.version
        frames = encode(message)
        if session is not None and remember:
            session.last_seq = message.seq
            session.last_reply = frames
            session.last_active = time.monotonic()
        self._send_frames(request.identity, frames, session)

    def _send_frames(self, identity: bytes, frames: list[bytes], session: Session | None) -> None:
        if session is not None:
            session.stats.bytes_out += sum(len(f) for f in frames)
        self._push.send_multipart([identity] + frames)




def _owns(session: Session | None, request: Request) -> bool:
    """Whether ``request`` comes from the device that opened ``session``: the owner secret
    matches (compared in constant time) and so does the CurveZMQ key when keys are on.
    Never raises (``decode`` guarantees an owner UTF-8 can encode)."""
    owner = getattr(request.message, "owner", "")
    return session is not None and hmac.compare_digest(session.owner.encode(), owner.encode()) and \
        session.peer_key == request.peer_key


def _check_owner(session: Session, request: Request) -> None:
    """Refuse a message about ``session`` from anyone but the device that opened it (``_owns``).
    Nothing about the session changes before this passes."""
    if not _owns(session, request):
        raise EdgeError(errors.NOT_OWNER, f"session {request.message.session!r} belongs to another device; send "
                                          "the owner secret of the session (the one it was opened with, or that "
                                          "this edge issued in `opened`), or open a session of your own.")
