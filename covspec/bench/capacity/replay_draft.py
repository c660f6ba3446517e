"""The table-driven proposer: a draft that proposes recorded chunks instead of drafting.

``ReplayDraft`` is a ``DraftModel`` (``covspec.runtime_device.draft_model``) over the
chunk tables of its questions (``replay_table``), so a replay device is the real device
(``CoInference``: the one device loop, its strategies, session, retries and reopens)
with the draft model replaced by a table lookup. Its ``prefill`` picks the table of the
question asked and takes the recorded prefill time; its proposer (``TableProposer``)
answers ``draft`` with the table's chunk after the committed tokens, taking the
recorded drafting time. At ``pace`` p > 0 it stands for a device with a CPU of its own:
it waits p times the recorded time, sleeping, so it takes the real device's time
without its CPU; at pace 0 it drafts instantly. A prefill the loop abandons ends at once.

A table holds one chunk per committed prefix of the target's greedy answer, so it
serves greedy generations drafting fixed chunks with one in flight and no branches
(``replay_table.replay_options``), device-led or edge-led; it guesses no bonus and
keeps no drafter state (asked for either, it raises).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from covspec.bench.capacity.replay_table import ChunkTable
from covspec.runtime_device.options import DraftingOptions
from covspec.runtime_device.policy import DraftPolicy
from covspec.runtime_device.prefill import DraftPrefill
from covspec.runtime_device.proposer import Chunk


def device_time(seconds: float) -> None:
    """Stand for ``seconds`` of the device's own computing: the replay device's CPU
    is not this machine's, so it waits without using this machine's CPU."""
    if seconds > 0:
        time.sleep(seconds)


class ReplayDraft:
    """A draft whose chunks are recorded in ``tables`` (one per question), taken at ``pace``."""

    def __init__(self, tables: Sequence[ChunkTable], pace: float = 1.0):
        self.tables = {(t.question.question, t.question.image_png): t for t in tables}
        self.vocab_size, self.vocab_hash, self.eos_ids = tables[0].vocab_size, tables[0].vocab_hash, tables[0].eos_ids
        self.pace = pace
        self.table: ChunkTable | None = None          # the table of the question being answered
        self._interrupt = threading.Event()

    def prefill(self, image_bytes: bytes, question: str, options: DraftingOptions, seed: int,
                trace: Callable[[dict], None], history=()) -> DraftPrefill:
        if history:
            raise ValueError("a replay table records single questions; a conversation's follow-up has none")
        self.table = self.tables[(question, image_bytes)]
        if self._interrupt.wait(self.table.prefill_s * self.pace):
            raise InterruptedError("the replayed draft prefill was abandoned")
        return DraftPrefill(kept=np.zeros(0, np.int64), visual_tokens=0, selection="none")

    @contextlib.contextmanager
    def interrupted(self) -> Iterator[None]:
        self._interrupt.set()
        try:
            yield
        finally:
            self._interrupt.clear()

    def proposer(self, codec, sampling, policy: DraftPolicy, rng, alternatives: bool) -> "TableProposer":
        return TableProposer(self, policy)


class TableProposer:
    """Proposes the recorded chunk after the committed tokens (a ``ChunkProposer``); the
    recorded drafting time is taken, and told to ``policy`` as the real proposer would."""

    def __init__(self, draft: ReplayDraft, policy: DraftPolicy):
        self.replay, self.policy = draft, policy

    def draft(self, prefix: list[int], start: int, limit: int,
              interrupt: Callable[[], bool] | None = None, *, fixed_length: bool = False) -> Chunk:
        assert start == len(prefix), "a table holds chunks after committed prefixes only (no pipelining)"
        chunk = self.replay.table.chunk_for(prefix)
        seconds = chunk.draft_s * self.replay.pace
        device_time(seconds)
        for _ in chunk.tokens[1:]:
            self.policy.observe_draft_step(seconds / len(chunk.tokens))
        return chunk

    def guess_bonus(self, prefix: list[int]) -> tuple[int, float]:
        raise _unrecorded()

    def snapshot(self) -> None:
        raise _unrecorded()

    def restore(self, state) -> None:
        raise _unrecorded()


def _unrecorded() -> NotImplementedError:
    return NotImplementedError("a chunk table records no bonus guesses and no branches: replay with "
                               "replay_options (no pipelining, no branches)")
