"""The model owner: the one thread that touches the target and the sessions.

``ModelOwner.run`` takes decoded requests (``Request``) from a queue filled by the
server's I/O thread and alternates between them and one-token steps of target-only
sessions, so a long target-only generation never blocks other sessions. A request is
opened, verified (the session's prepare -> forward -> commit) or closed; each reply
goes back over the inproc PUSH socket with the peer's identity. An ``EdgeError``
becomes an ``error`` reply (not remembered as the round's reply); any other failure
drops the session with an ``internal`` error. Idle sessions expire here too.
"""

from __future__ import annotations

import collections
import hmac
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass

import zmq

from covspec.protocol import errors
from covspec.protocol.errors import EdgeError
from covspec.protocol.messages import Close, Error, Message, Open, Verify, encode
from covspec.runtime_edge.config import ServerConfig
from covspec.runtime_edge.session import Session
from covspec.runtime_edge.target import TargetModel, decode_image

log = logging.getLogger("covspec.edge")

POLL_S = 0.1         # longest wait for a request when nothing else is due


@dataclass
class Request:
    """A decoded request waiting for the model owner."""

    identity: bytes
    message: Message
    nbytes: int
    peer_key: str = ""        # the device's CurveZMQ public key (Z85) when keys are on


@dataclass
class _Step:
    """One target-only token to generate for ``session`` (skipped if it was closed or replaced)."""

    session: Session
    seq: int


class ModelOwner:
    """The sessions of one target, served from one thread."""

    def __init__(self, target: TargetModel, config: ServerConfig, stopping: threading.Event):
        self.target, self.config, self.stopping = target, config, stopping
        self.requests: queue.Queue = queue.Queue(maxsize=config.max_queue)
        self.sessions: dict[str, Session] = {}
        self._steps: collections.deque[_Step] = collections.deque()
        self._push: zmq.Socket | None = None

    def run(self, push: zmq.Socket) -> None:
        """Serve until ``stopping`` is set; replies go out through ``push`` (closed at the end)."""
        import torch

        self._push = push
        check_every = min(1.0, self.config.idle_timeout_s / 4, self.config.finished_timeout_s / 4)
        next_check = time.monotonic() + check_every
        try:
            with torch.inference_mode():
                while not self.stopping.is_set():
                    work_done = False
                    try:
                        self._handle(self.requests.get(block=not self._steps, timeout=POLL_S))
                        work_done = True
                    except queue.Empty:
                        pass
                    if self._steps:                      # alternate: one request, one target-only token
                        self._run_step(self._steps.popleft())
                        work_done = True
                    now = time.monotonic()
                    if now >= next_check or not work_done:
                        self._expire(now)
                        next_check = now + check_every
        finally:
            push.close(linger=0)

    def _handle(self, request: Request) -> None:
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
                self._verify(request, session)
        except EdgeError as exc:
            self._reply(request, Error(session=message.session, seq=message.seq, code=exc.code, message=exc.message),
                        self.sessions.get(message.session), remember=False)
        except Exception as exc:  # noqa: BLE001 - the server must survive anything a request triggers
            log.exception("session %s: request %s failed", message.session, message.TYPE)
            broken = self.sessions.get(message.session)
            if broken is not None:
                self.end(broken, "dropped after an internal error")
            self._reply(request, Error(
                session=message.session, seq=message.seq, code=errors.INTERNAL,
                message=f"the edge failed on this request ({type(exc).__name__}: {exc}); the session was dropped, "
                        "reopen it with your committed tokens."), None, remember=False)

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
            self.end(old, "reopened by its owner")
        if len(self.sessions) >= self.config.max_sessions:
            self._expire(time.monotonic())
            finished = [s for s in self.sessions.values() if s.done]
            if len(self.sessions) >= self.config.max_sessions and finished:
                self.end(min(finished, key=lambda s: s.last_active), "finished; its slot was needed")
            if len(self.sessions) >= self.config.max_sessions:
                raise EdgeError(errors.BUSY, f"the edge already serves {self.config.max_sessions} sessions; "
                                             "retry later or ask the operator to raise --max-sessions.")
        image = decode_image(message.image.tobytes(), self.config.max_image_pixels, self.config.max_image_aspect)
        session, opened = Session.open(target, message, image, max_context=self.config.max_context,
                                       owner=message.owner or secrets.token_urlsafe(12), peer_key=request.peer_key)
        session.identity = request.identity
        session.stats.bytes_in += request.nbytes
        self.sessions[session.id] = session
        self._reply(request, opened, session)
        if session.mode == "target_only" and not session.done:
            self._steps.append(_Step(session, message.seq))

    def _verify(self, request: Request, session: Session | None) -> None:
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
            return
        if message.seq < session.last_seq:
            raise EdgeError(errors.REPLAYED, f"seq {message.seq} is older than this session's last round "
                                             f"({session.last_seq}); use a new, higher seq for each round.")
        if session.mode == "target_only":
            raise EdgeError(errors.WRONG_MODE, "this session is target_only: the edge streams its tokens; "
                                               "open a speculative session to verify drafts.")
        self._reply(request, session.verify(self.target, message), session)

    def _run_step(self, step: _Step) -> None:
        session = step.session
        if self.sessions.get(session.id) is not session or session.done:
            return
        try:
            result = session.step(self.target, step.seq)
        except Exception as exc:  # noqa: BLE001
            log.exception("session %s: target-only step failed", session.id)
            self.end(session, "dropped after an internal error")
            self._send_frames(session.identity, encode(Error(
                session=session.id, seq=step.seq, code=errors.INTERNAL,
                message=f"the edge failed while generating ({type(exc).__name__}: {exc}); reopen the session.")), None)
            return
        session.last_active = time.monotonic()
        self._send_frames(session.identity, encode(result), session)
        if not session.done:
            self._steps.append(step)

    def _expire(self, now: float) -> None:
        """End sessions idle too long: ``finished_timeout_s`` once done, else ``idle_timeout_s``."""
        for session in list(self.sessions.values()):
            limit = self.config.finished_timeout_s if session.done else self.config.idle_timeout_s
            if now - session.last_active > limit:
                self.end(session, f"{'finished' if session.done else 'expired'} after {limit:g} s idle")

    def end(self, session: Session, reason: str) -> None:
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
        session.free()
        log.info("%s", session.log_line(reason))

    def _reply(self, request: Request, message: Message, session: Session | None, *, remember: bool = True) -> None:
        """Send ``message``; with ``remember`` it becomes the session's idempotent answer to its seq."""
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




def _check_owner(session: Session, request: Request) -> None:
    """Refuse a message about ``session`` from anyone but the device that opened it: the
    owner secret issued in ``opened`` must match, and the CurveZMQ key when keys are on.
    Nothing about the session changes before this passes."""
    message = request.message
    if not hmac.compare_digest(session.owner.encode(), message.owner.encode()) or \
            session.peer_key != request.peer_key:
        raise EdgeError(errors.NOT_OWNER, f"session {message.session!r} belongs to another device; send the owner "
                                          "secret this edge issued in `opened` (or open a session of your own).")
