"""A crafted world for the device loop: table-driven draft and target, an in-process edge.

Logits are functions of the generated prefix (``Table``), so a test decides exactly
where the draft agrees with the target and where it does not. The edge side is the
real one: ``covspec.runtime_edge.session.Session`` (prepare -> ``run_rounds`` -> commit, the
protocol's verification math) over a ``TableTarget``, and every message goes through
the real encoder and decoder. Only the socket is replaced: ``InProcessEdge`` answers
at once, and a verdict becomes *ready* only after ``delay`` polls of
``reply_ready``, so a test decides how much speculation fits in each wait.
"""

from __future__ import annotations

import contextlib

from collections.abc import Callable

import numpy as np

from covspec.protocol.errors import EdgeError
from covspec.protocol.messages import Close, Error, Message, Open, Opened, Result, Verify, decode, encode
from covspec.runtime_device.client import Backoff
from covspec.runtime_device.draft_model import DecoderDraft
from covspec.runtime_device.prefill import DraftPrefill
from covspec.runtime_edge.rounds import run_rounds, verify_one
from covspec.runtime_edge.session import Session
from covspec.runtime_edge.target import Context

Logits = Callable[[tuple[int, ...]], np.ndarray]


def random_table(seed: int, vocab: int, scale: float = 3.0) -> Logits:
    """Logits [V] for the next token after each generated prefix, fixed by ``seed``."""
    def logits(prefix: tuple[int, ...]) -> np.ndarray:
        return np.random.default_rng([seed, len(prefix), *prefix]).normal(size=vocab) * scale
    return logits


def greedy_sequence(logits: Logits, length: int) -> list[int]:
    sequence: list[int] = []
    for _ in range(length):
        sequence.append(int(np.argmax(logits(tuple(sequence)))))
    return sequence


def swap_top_two(logits: Logits, at: set[tuple[int, ...]]) -> Logits:
    """``logits`` except after the prefixes in ``at``, where its top two tokens trade places."""
    def swapped(prefix: tuple[int, ...]) -> np.ndarray:
        row = logits(prefix).copy()
        if prefix in at:
            first, second = np.argsort(-row)[:2]
            row[first], row[second] = row[second], row[first]
        return row
    return swapped


class TableDrafter:
    """The drafter interface the device loop uses, over a logits table."""

    def __init__(self, logits: Logits):
        self.logits = logits
        self.fed: list[int] = []

    @property
    def generated(self) -> int:
        return len(self.fed)

    def feed(self, tokens: list[int]) -> np.ndarray:
        rows = []
        for token in tokens:
            self.fed.append(int(token))
            rows.append(self.logits(tuple(self.fed)))
        return np.stack(rows)

    def extend_to(self, sequence: list[int]) -> np.ndarray:
        self.fed = [int(t) for t in sequence]
        return self.logits(tuple(self.fed))

    def snapshot(self) -> tuple[int, ...]:
        return tuple(self.fed)

    def restore(self, state: tuple[int, ...]) -> None:
        self.fed = list(state)

    def truncate(self, generated: int) -> None:
        del self.fed[generated:]


class TableDraft(DecoderDraft):
    """A ``DraftModel`` over a logits table (no image: its prefill keeps nothing)."""

    vocab_hash = "table"

    def __init__(self, logits: Logits, eos_ids=frozenset()):
        self.drafter = TableDrafter(logits)
        self.eos_ids = eos_ids
        self.vocab_size = len(logits(()))

    def prefill(self, image_bytes, question, options, seed, trace, history=()) -> DraftPrefill:
        self.drafter.fed = []
        return DraftPrefill(kept=np.zeros(0, np.int64), visual_tokens=0, selection="none")

    def interrupted(self):
        return contextlib.nullcontext()


class TableTarget:
    """The ``TargetModel`` interface ``Session`` uses, over a logits table; the cache is
    the list of generated tokens it holds."""

    vocab_hash = "table"

    def __init__(self, logits: Logits, vocab: int, eos_ids=frozenset()):
        self.logits, self.vocab_size, self.eos_ids = logits, vocab, eos_ids

    def context(self, question, image, keep=None, template=None) -> Context:
        return Context(inputs={}, length=0)

    def prefill(self, context: Context, committed=()) -> tuple[list[int], np.ndarray]:
        cache = [int(t) for t in committed]
        return cache, self.logits(tuple(cache))

    def extend_batch(self, caches: list[list[int]], inputs: list[list[int]]):
        """Logits [sum of lengths, V] as a torch tensor, like ``TargetModel.extend_batch``."""
        import torch

        rows = []
        for cache, tokens in zip(caches, inputs):
            for token in tokens:
                cache.append(int(token))
                rows.append(self.logits(tuple(cache)))
        return torch.from_numpy(np.stack(rows))

    @staticmethod
    def rollback(cache: list[int], length: int) -> None:
        del cache[length:]

    @staticmethod
    def bound(cache: list[int], positions: int) -> None:
        """A list grows as it needs: nothing to bound."""


class InProcessEdge:
    """The client interface of the device loop, served by real edge sessions in-process."""

    address = "in-process"

    def __init__(self, target: TableTarget, delay: int = 1):
        self.target, self.delay = target, delay
        self.backoff = Backoff(timeout_s=1.0, retries=0, backoff_s=0.0)
        self.sessions: dict[str, Session] = {}
        self.replies: dict[tuple[str, int], list] = {}       # (session, seq) -> [reply, polls left]
        self.bytes_up = self.bytes_down = 0

    def send(self, message: Message) -> None:
        frames = encode(message)
        self.bytes_up += sum(len(f) for f in frames)
        message = decode(frames)
        try:
            reply = self._serve(message)
        except EdgeError as exc:
            reply = Error(session=message.session, seq=message.seq, code=exc.code, message=exc.message)
        if reply is not None:
            self.bytes_down += sum(len(f) for f in encode(reply))
            self.replies[(message.session, message.seq)] = [reply, self.delay]

    def _serve(self, message: Message) -> Message | None:
        if isinstance(message, Open):
            session, opened = Session.open(self.target, message, None, max_context=1 << 20)
            self.sessions[session.id] = session
            return opened
        if isinstance(message, Close):
            self.sessions.pop(message.session, None)
            return None
        return verify_one(self.target, self.sessions[message.session], message)

    def reply_ready(self, session: str, seq: int) -> bool:
        entry = self.replies.get((session, seq))
        if entry is None:
            return False
        entry[1] -= 1
        return entry[1] <= 0

    def receive(self, session: str, seq: int, timeout_s: float, expect: type | None = None) -> Message | None:
        entry = self.replies.pop((session, seq), None)
        return None if entry is None else entry[0]

    def request(self, message: Message, timeout_s: float | None = None, expect: type | None = None) -> Opened:
        self.send(message)
        reply = self.receive(message.session, message.seq, 0.0)
        if isinstance(reply, Error):
            raise EdgeError(reply.code, reply.message)
        return reply


class SteppingEdge:
    """An in-process edge-led edge: the target takes one step of its own per poll of
    the device (``receive_any``), and a chunk is verified ``delay`` steps after it was
    sent (its trip over the link), in the order chunks were sent, with the real
    ``Session.prepare`` (overlap test) and ``run_rounds``.

    ``biased_token`` is the negative control: when a chunk falls due, the edge uses it
    only if its token at the edge's position is ``biased_token``, and otherwise drops it
    and steps; whether the chunk is used at a position then depends on its own token
    there, which the acceptance test does not allow for."""

    address = "in-process"

    def __init__(self, target: TableTarget, delay: int, biased_token: int | None = None):
        self.target, self.delay, self.biased_token = target, delay, biased_token
        self.backoff = Backoff(timeout_s=1.0, retries=0, backoff_s=0.0)
        self.session: Session | None = None
        self.outbox: list[Message] = []
        self.chunks: list[list] = []                        # [verify, steps until due]
        self.bytes_up = self.bytes_down = 0

    def send(self, message: Message) -> None:
        message = decode(encode(message))
        if isinstance(message, Open):
            self.session, opened = Session.open(self.target, message, None, max_context=1 << 20)
            self.open_seq = message.seq
            self.outbox.append(opened)
        elif isinstance(message, Verify):
            self.chunks.append([message, self.delay])

    def receive(self, session: str, seq: int, timeout_s: float, expect: type | None = None) -> Message | None:
        return self.outbox.pop(0) if self.outbox else None

    def message_waiting(self) -> bool:
        return bool(self.outbox)

    def receive_any(self, session: str, timeout_s: float) -> Message | None:
        if not self.outbox and self.session is not None and not self.session.done:
            self._tick()
        return self.outbox.pop(0) if self.outbox else None

    def _tick(self) -> None:
        """Verify the chunk that fell due (in sending order), else take one step."""
        due = self.chunks[0] if self.chunks and self.chunks[0][1] <= 0 else None
        if due is not None and self.biased_token is not None:
            skip = len(self.session.committed) - due[0].start
            if 0 <= skip < len(due[0].tokens) and int(due[0].tokens[skip]) != self.biased_token:
                self.chunks.pop(0)                           # not the favoured token: dropped unused
                due = None
        if due is not None:
            self.chunks.pop(0)
            work = self.session.prepare(self.target, due[0])
            self.outbox.append(work if isinstance(work, Result) else
                               run_rounds(self.target, [(self.session, work)])[0])
            return
        for chunk in self.chunks:
            chunk[1] -= 1
        step = run_rounds(self.target, [(self.session, self.session.prepare_step(self.open_seq))])[0]
        self.outbox.append(step)
