"""The model thread: the one thread that touches the target and the sessions.

``ModelThread.run`` takes decoded requests (``Request``) from a queue filled by the
server's I/O thread; each iteration executes the plan of the pure scheduler
(``scheduler.schedule``): the waiting requests it admits, in arrival order (opens: the
context is built and the prefill planned, ``Session.begin``, after the session's own KV
on a conversation's follow-up; admitted while the live sessions fit ``max_sessions`` and
``kv_budget``, ``admission.py``, else ``busy``; closes; verifies,
prepared into rounds), the heads of opening sessions (``prefill.run_heads``), then one
forward (``rounds.run_forward``) of the rounds, the edge steps of streaming sessions
and the prefill chunks; an open is answered once its last piece ran. With ``max_batch`` 1
every forward holds one session.

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
from covspec.runtime_edge.prefill import run_heads
from covspec.runtime_edge.supersede import split_superseded
from covspec.runtime_edge.rounds import pick_verifier, run_forward
from covspec.runtime_edge.scheduler import CLOSE, OPEN, VERIFY, Budget, Prefilling, Streaming, Waiting, schedule
from covspec.runtime_edge.session import Round, Session
from covspec.runtime_edge.target import TargetModel, decode_image
from covspec.runtime_edge.turns import turn_image

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
    """A piece of this iteration's forward: a prepared round and the request it answers (None:
    an edge step), or (``round`` None) ``chunk`` tokens of an opening session's prefill and its open."""

    session: Session
    round: Round | None
    request: Request | None
    chunk: int = 0


_KINDS = {Open: OPEN, Verify: VERIFY, Close: CLOSE}


class ModelThread:
    """The sessions of one target, served from one thread."""

    def __init__(self, target: TargetModel, config: ServerConfig, stopping: threading.Event):
        self.target, self.config, self.stopping = target, config, stopping
        self.requests: queue.Queue = queue.Queue(maxsize=config.max_queue)
        self.sessions: dict[str, Session] = {}
        self._waiting: collections.deque[Request] = collections.deque()    # taken from the queue, not yet handled
        self._streaming: collections.deque[tuple[Session, int]] = collections.deque()  # target-only, with open's seq
        self._prefilling: collections.deque[tuple[Session, Request]] = collections.deque()  # opening, oldest first
        self._starved: str | None = None      # the oldest opening session, if it got no piece last iteration
        self._budget = Budget(config.max_batch, config.max_batch_tokens, config.prefill_chunk, config.prefill_tokens,
                              config.edge_steps)
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
                    self._take(block=not self._waiting and not self._streaming and not self._prefilling)
                    busy = self._iterate()
                    self.kv_bytes = sum(session.kv_bytes() for session in self.sessions.values())
                    now = time.monotonic()
                    if now >= next_check or not busy:
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

    def _iterate(self) -> bool:
        """One iteration: plan it (``scheduler.schedule``), handle the requests it admits, run
        the heads, then one forward of rounds, edge steps and prefill chunks. Whether any ran."""
        live = lambda session: self.sessions.get(session.id) is session   # noqa: E731
        self._prefilling = collections.deque((s, r) for s, r in self._prefilling if live(s) and s.prefill)
        self._streaming = collections.deque((s, q) for s, q in self._streaming
                                            if live(s) and not s.done and s.mode != "speculative")
        waiting = self._supersede(list(self._waiting))
        oldest = self._prefilling[0][0].id if self._prefilling else None
        plan = schedule([Waiting(r.message.session, _KINDS[type(r.message)], len(getattr(r.message, "tokens", ())) + 1)
                         for r in waiting],
                        [Prefilling(s.id, s.prefill.head, len(s.prefill.rest), skipped=s.id == self._starved)
                         for s, _ in self._prefilling],
                        [Streaming(s.id, s.mode) for s, _ in self._streaming], self._budget)
        handled = set(plan.handle)
        self._waiting = collections.deque(r for i, r in enumerate(waiting) if i not in handled)
        batch = [work for work in map(self._handle, (waiting[i] for i in plan.handle)) if work is not None]
        stepping = set(plan.steps)
        for session, seq in [pair for pair in self._streaming if pair[0].id in stepping]:
            if live(session) and not session.done and all(w.session is not session for w in batch):
                batch.append(_Work(session, session.prepare_step(seq), None))
            self._streaming.remove((session, seq))
            self._streaming.append((session, seq))                      # round robin
        pieces = plan.prefill_sessions
        opening = {s.id: (s, r) for s, r in self._prefilling if s.id in pieces and live(s) and s.prefill}
        self._heads([opening[i] for i in plan.heads if i in opening])
        for session_id, count in plan.chunks:
            session, request = opening.get(session_id, (None, None))
            if session is not None and live(session) and session.prefill and not session.prefill.head:
                batch.append(_Work(session, None, request, count))
        self._starved = oldest if oldest is not None and oldest not in pieces else None
        if batch:
            self._run(batch)
        return bool(batch or plan.handle or plan.heads)

    def _supersede(self, waiting: list[Request]) -> list[Request]:
        """``waiting`` less the chunks a newer one supersedes (``supersede.superseded``),
        each answered ``stale`` unrun."""
        kept, superseded = split_superseded(waiting, self.sessions)
        for request, session in superseded:
            session.stats.stale, session.stats.bytes_in = session.stats.stale + 1, session.stats.bytes_in + request.nbytes
            self._reply(request, Result(session=session.id, seq=request.message.seq, start=request.message.start,
                                        status="stale"), session)
        return kept

    def _heads(self, opening: list[tuple[Session, Request]]) -> None:
        """Run the heads of these opening sessions (``prefill.run_heads``), then charge each its KV."""
        if not opening:
            return
        began = time.perf_counter()
        try:
            self.forwards += run_heads(self.target, [s.prefill for s, _ in opening], self.config.max_batch)
        except Exception:  # noqa: BLE001 - retried one by one, where the failure is attributed
            if len(opening) == 1:
                return self._fail(_Work(opening[0][0], None, opening[0][1]))
            log.warning("the heads of %d opens failed together; retrying them one by one", len(opening),
                        exc_info=True)
            for pair in opening:
                self._heads([pair])
            return
        self.prefill_s += time.perf_counter() - began
        for session, request in opening:
            try:
                check_kv_budget([s for s in self.sessions.values() if s is not session], self.config.kv_budget,
                                session.kv_bytes())
            except EdgeError as exc:
                self.end(session, "over the KV budget")
                self._reply(request, Error(session=session.id, seq=request.message.seq, code=exc.code,
                                           message=exc.message), None, remember=False)
                continue
            if session.prefill.done:
                self._opened(session, request)

    def _opened(self, session: Session, request: Request) -> None:
        """``session``'s prefill is done: its first token, the reply, and its streaming."""
        opened = session.opened(self.target, request.message.seq)
        self.committed += 1
        self._reply(request, opened, session)
        if session.mode in ("target_only", "edge_led") and not session.done:
            self._streaming.append((session, request.message.seq))

    def _run(self, batch: list[_Work]) -> None:
        """One forward for the whole batch; on failure, each piece alone."""
        caches = [work.session.cache if work.round else work.session.prefill.cache for work in batch]
        lengths = [cache.kv.length for cache in caches]
        rounds = [work for work in batch if work.round]
        chunks = [work for work in batch if not work.round]
        began = time.perf_counter()
        try:
            results, _ = run_forward(self.target, [(work.session, work.round) for work in rounds],
                                     [(work.session.prefill, work.chunk) for work in chunks], self._verifier)
            self.rounds_s += time.perf_counter() - began
        except Exception:  # noqa: BLE001 - retried one by one below, where the failure is attributed
            if len(batch) == 1:
                return self._fail(batch[0])
            log.warning("a batched forward of %d sessions failed; retrying them one by one", len(batch),
                        exc_info=True)
            for work, cache, length in zip(batch, caches, lengths):
                if work.session.cache is not None or work.session.prefill is not None:
                    self.target.rollback(cache, length)
                self._run([work])
            return
        self.forwards += 1
        for work, result in zip(rounds, results):
            self.committed += result.accepted + (result.token != spec.NO_TOKEN)
            if work.request is None:
                result.version = work.session.version
                self._send_frames(work.session.identity, encode(result), work.session)
                work.session.last_active = time.monotonic()
            else:
                self._reply(work.request, result, work.session)
        for work in chunks:
            if work.session.prefill.done:
                self._opened(work.session, work.request)

    def _fail(self, work: _Work) -> None:
        session = work.session
        what = "a target-only step" if work.request is None else "verify" if work.round else "the prefill"
        log.exception("session %s: %s failed", session.id, what)
        self.end(session, "dropped after an internal error")
        exc = sys.exc_info()[1]
        seq = work.round.seq if work.round else work.request.message.seq
        self._send_frames(session.identity if work.request is None else work.request.identity, encode(Error(
            session=session.id, seq=seq, code=errors.INTERNAL, version=session.version,
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
                    session.check_owner(request.message, request.peer_key)
                    session.stats.bytes_in += request.nbytes
                    self.end(session, "closed")
            else:
                return self._verify(request, session)
        except EdgeError as exc:        # refused: nothing changed; only the owner's own session pays for the reply
            owned = self.sessions.get(message.session)
            self._reply(request, Error(session=message.session, seq=message.seq, code=exc.code, message=exc.message),
                        owned if owned and owned.owned_by(request.message, request.peer_key) else None, remember=False)
        except Exception as exc:  # noqa: BLE001 - the server must survive anything a request triggers
            log.exception("session %s: request %s failed", message.session, message.TYPE)
            broken = self.sessions.get(message.session)
            dropped = bool(broken and broken.owned_by(request.message, request.peer_key))          # the owner's own model work failed; nobody else's can
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
            old.check_owner(request.message, request.peer_key)
            if message.seq == old.last_seq and old.last_reply is not None:   # the same open again (a resend or a
                old.identity, old.last_active = request.identity, time.monotonic()   # duplicate): its reply again
                self._send_frames(request.identity, old.last_reply, old)
                return
            if message.seq < old.last_seq:                                   # a late copy must not reset the session
                raise EdgeError(errors.REPLAYED, f"seq {message.seq} is older than this session's last round "
                                                 f"({old.last_seq}); reopen with a new, higher seq.")
        began = time.perf_counter()
        image_bytes, image = turn_image(message, old, lambda data: decode_image(
            data, self.config.max_image_pixels, self.config.max_image_aspect))
        previous = old if message.history is not None else None    # a follow-up turn continues its cache
        if old is not None and previous is None:
            self.end(old, "reopened by its owner")
        make_room(self.sessions.values(), self.config, keep=previous, end=self.end)
        session, opened = Session.begin(target, message, image, max_context=self.config.max_context,
                                        owner=message.owner or new_owner(), peer_key=request.peer_key,
                                        prefix_cache=self.prefix_cache, chunk=self.config.prefill_chunk,
                                        image_bytes=image_bytes, previous=previous)
        if previous is not None:
            self.turns_continued += session.stats.continued > 0
            self.end(previous, "continued by its next turn")
        self.prefill_s += time.perf_counter() - began
        check_kv_budget(self.sessions.values(), self.config.kv_budget, session.kv_bytes())  # a prefix's copy, at once
        session.identity = request.identity
        session.stats.bytes_in += request.nbytes
        self.sessions[session.id] = session
        if opened is not None:                                  # a reopen that had already ended
            self._reply(request, opened, session)
        else:                                                   # the scheduler runs its prefill in pieces
            self._prefilling.append((session, request))

    def _verify(self, request: Request, session: Session | None) -> _Work | None:
        message: Verify = request.message
        if session is None:
            raise EdgeError(errors.UNKNOWN_SESSION, f"no session {message.session!r} on this edge (never opened, "
                                                    "closed, expired after being idle, or the edge restarted); "
                                                    "reopen it with Open carrying your committed tokens.")
        session.check_owner(request.message, request.peer_key)
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
