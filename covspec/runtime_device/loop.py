"""The one device generation loop: a session's lifecycle, written once; a strategy leads it.

``Generation.tokens`` is every generation of the device, whoever leads it. It owns what
all of them share, in numbered phases:

1. open the session (``session.DeviceSession``, in the strategy's ``mode``), and
   meanwhile prefill the draft, in the foreground or in a thread (``Strategy.prefill``;
   a pruned target needs the kept visual tokens first, so it opens afterwards);
2. commit the edge's first token (``opened``, checked by ``replies``) and hand the
   lead to the strategy (``Strategy.begin``);
3. take the strategy's steps until the edge says ``done``, yielding what each commits;
   a strategy that hands the lead over (``Strategy.successor``, the edge-led hand-over)
   is replaced by its successor on the same session and committed tokens;
4. close: a draft prefill still under way is abandoned, the session closed (a
   conversation's is kept for its next question: ``session.Turn``), and the statistics
   (tokens, wall time, bytes) completed.

The loop also owns what strategies do alike: a reopen after a lost session (every
committed token sent again; ``reopen``), sending a chunk (``send``: the round's seq,
the drafted count, the ``chunk`` trace event), committing (``commit``) and a chunk's
length limit (``limit``). The committed tokens are the edge's: the loop and its
strategies only ever append what a checked reply says.

A strategy (``Strategy``) decides what each step sends and how it reads the replies:
``device_led.DeviceLed``, ``edge_led.EdgeLed`` and ``target_only.TargetOnly``. It
drafts through the draft's ``ChunkProposer`` (``draft_model.DraftModel.proposer``):
the draft model's, or a replay device's recorded table.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Literal, Protocol

from covspec.protocol.messages import Open, Opened
from covspec.protocol.verification import NO_TOKEN
from covspec.runtime_device.client import EdgeClient
from covspec.runtime_device.draft_model import DraftModel
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.proposer import Chunk
from covspec.runtime_device.replies import check_opened
from covspec.runtime_device.session import DeviceSession, Turn
from covspec.runtime_device.stats import GenerationStats


class Strategy(Protocol):
    """Who leads a generation. ``mode`` is the session's mode on the edge; ``prefill``
    when the draft prefills (``foreground``: before the first token is awaited;
    ``background``: in a thread while tokens stream in; None: no draft);
    ``successor``, once set, takes the lead over at the next step."""

    mode: str
    prefill: Literal["foreground", "background"] | None
    successor: "Strategy | None"

    def begin(self, generation: "Generation") -> None:
        """Take the lead of ``generation`` (its first token is committed)."""

    def opened(self) -> None:
        """The session was opened again: forget what was in flight."""

    def step(self) -> list[int]:
        """One step of the generation; the tokens it commits (maybe none)."""


def yield_the_cpu() -> None:
    """Give the calling thread the lowest CPU priority (Linux: per-thread niceness; a no-op
    elsewhere): the draft's speculative work must not delay the answer streaming in."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass                        # not permitted here: the prefill runs at normal priority


class Generation:
    """One generation: the session, the committed tokens, and the strategy leading it.
    ``draft`` is None for a generation without one (target-only; ``vocab_size``, when
    known, bounds the tokens it accepts)."""

    def __init__(self, client: EdgeClient, draft: DraftModel | None, image_bytes: bytes, question: str,
                 settings: GenerationSettings, options: DraftingOptions, stats: GenerationStats,
                 trace: Callable[[dict], None], strategy: Strategy, vocab_size: int | None = None,
                 turn: Turn | None = None):
        self.client, self.draft = client, draft
        self.image_bytes, self.question = image_bytes, question
        self.settings, self.options, self.stats, self.trace = settings, options, stats, trace
        self.codec = options.codec()
        self.vocab_size = draft.vocab_size if draft is not None else vocab_size
        self.session = DeviceSession(client, self.codec, settings, question, image_bytes,
                                     draft.vocab_hash if draft is not None else "", trace, mode=strategy.mode,
                                     turn=turn)
        self.strategy = strategy
        self.committed: list[int] = []
        self.done = False
        self.opened_seq = -1                    # the seq of the last open: streamed tokens carry it
        self.target_keep = None                 # the kept visual tokens, for a pruned target
        self._prefill: Future | None = None     # a prefill in the background

    def tokens(self) -> Iterator[list[int]]:
        """The committed tokens as they come; ``stats.wall_s`` is the time to the complete
        answer (not counting the abandoned draft prefill's clean-up after it)."""
        stats, session = self.stats, self.session
        began, answered_s = time.perf_counter(), None
        up0, down0 = self.client.bytes_up, self.client.bytes_down
        pool = None
        try:
            # 1. Open the session; the edge prefills the target with the full image while
            #    the draft prefills (vision -> scorer -> kept tokens -> decoder).
            opening = None if self.settings.prune_target else self._open()
            if self.strategy.prefill == "background":
                # The answer never waits for the draft: a prefill still under way when it
                # is complete is interrupted (onnxruntime releases the GIL meanwhile).
                pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-prefill")
                self._prefill = pool.submit(self._prefill_draft, True)
            elif self.strategy.prefill == "foreground":
                self._prefill_draft(False)
            if opening is None:
                opening = self._open()
            # 2. The edge's first token (from its prefill logits) is committed.
            first = self._opened(session.await_opened(opening))
            stats.ttft_s = time.perf_counter() - began
            self.strategy.begin(self)
            yield first
            # 3. The strategy's steps until the edge says done.
            while not self.done:
                successor = self.strategy.successor
                if successor is not None:
                    self.trace({"event": "hand_over", "committed": len(self.committed)})
                    self.strategy = successor
                    successor.begin(self)
                new = self.strategy.step()
                if self.done:               # the answer is complete: its time, before any cleanup
                    answered_s = time.perf_counter() - began
                if new:
                    yield new
        finally:
            # 4. Close.
            if pool is not None:
                self._leave_prefill(pool)
            session.close()
            stats.tokens = len(self.committed)
            stats.wall_s = answered_s if answered_s is not None else time.perf_counter() - began
            stats.bytes_up += self.client.bytes_up - up0
            stats.bytes_down += self.client.bytes_down - down0

    def draft_ready(self) -> bool:
        """Whether the draft's prefill is complete (re-raises a prefill that failed)."""
        return self._prefill is None or (self._prefill.done() and self._prefill.result() is None)

    def limit(self, start: int, longest: int) -> int:
        """The most tokens a chunk starting at ``start`` may have: ``longest``, never past
        ``max_new_tokens``, at least one."""
        return max(min(longest, self.settings.max_new_tokens - start), 1)

    def send(self, chunk: Chunk, drafted: int | None = None, **trace) -> None:
        """Send ``chunk`` as a new round of the session (traced with ``trace``'s fields);
        ``drafted``: its tokens not counted as drafted before (default: all)."""
        self.session.send(chunk)
        self.stats.drafted += len(chunk.tokens) if drafted is None else drafted
        self.trace({"event": "chunk", "seq": chunk.seq, "start": chunk.start, "len": len(chunk.tokens), **trace})

    def commit(self, tokens: list[int], done: bool) -> list[int]:
        """Append what a checked reply commits; ``tokens``."""
        self.committed += tokens
        self.done = done
        return tokens

    def commit_verdict(self, accepted: list[int], token: int, done: bool) -> list[int]:
        """Commit what a reply says: ``accepted`` draft tokens, then its ``token`` (the
        correction or bonus, a streamed or the first token; ``NO_TOKEN``: none)."""
        return self.commit(list(accepted) + ([] if token == NO_TOKEN else [token]), done)

    def reopen(self, why: str) -> list[int]:
        """Open the session again with every committed token (``why``: the edge restarted,
        forgot it, or its replies lost track of it); what the edge commits next."""
        def attempt(number: int) -> None:
            self.stats.reopens += 1
            self.trace({"event": "reopen", "committed": len(self.committed), "attempt": number})

        return self._opened(self.session.reopen(self.committed, self.target_keep, self.options.reopen_attempts,
                                                attempt, why))

    # -- phases ---------------------------------------------------------------------------------

    def _open(self) -> Open:
        opening = self.session.open_message([], self.target_keep)
        self.client.send(opening)
        return opening

    def _prefill_draft(self, background: bool) -> None:
        if background:
            yield_the_cpu()             # the edge's tokens stream in meanwhile: receiving them comes first
        turn = self.session.turn
        if turn is not None and turn.pending is not None:     # the last question's prefill, still going on
            wait([turn.pending])
            turn.pending = None
        began = time.perf_counter()
        prefill = self.draft.prefill(self.image_bytes, self.question, self.options, self.settings.seed, self.trace,
                                     self.session.history)
        self.stats.device_prefill_s = time.perf_counter() - began
        self.stats.kept_visual_tokens = int(len(prefill.kept))
        self.target_keep = prefill.kept if self.settings.prune_target else None

    def _opened(self, opened: Opened) -> list[int]:
        check_opened(opened, len(self.committed), self.settings.max_new_tokens, self.vocab_size)
        self.opened_seq = opened.seq
        self.stats.edge_prefill_ms += opened.prefill_ms
        self.strategy.opened()
        return self.commit_verdict([], opened.token, opened.done)

    def _leave_prefill(self, pool: ThreadPoolExecutor) -> None:
        """A background prefill still under way: a conversation's goes on (its next question
        wants the draft ready; ``Turn.pending``), any other is abandoned."""
        turn = self.session.turn
        if turn is not None and not self._prefill.done():
            turn.pending = self._prefill
            pool.shutdown(wait=False)
            return
        self._abandon()
        pool.shutdown(wait=True)

    def _abandon(self) -> None:
        """End a draft prefill still under way (its runs and padding stop at once, raising
        in its thread): nothing the device does for itself delays a complete answer."""
        if self._prefill.done():
            return
        with self.draft.interrupted():
            wait([self._prefill])
        self.stats.prefill_abandoned = True
