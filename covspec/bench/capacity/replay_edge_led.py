"""Edge-led replay devices: the table's chunks sent to an edge that generates by itself.

``edge_led_rounds`` is the ``edge_led`` mode of ``covspec.bench.capacity.replay``: what the
real edge-led device (``covspec.runtime_device.edge_led``) does, with the draft
replaced by a ``ChunkTable`` lookup, so N of them cost this machine's CPU almost
nothing. One session over the device's ``EdgeClient`` (one DEALER socket):

1. Open the session in ``edge_led`` mode and wait the draft's prefill time (``pace``).
   From ``opened`` on the edge generates by itself, as its ``edge_steps`` allows, and
   streams each token as a result carrying the open's seq.
2. With no chunk in flight, take the table's chunk for the committed prefix, wait its
   drafting time and send it: at most one chunk in flight (greedy, so the chunk
   depends on the prefix only).
3. Absorb the session's messages in arrival order: a streamed token is committed (an
   *edge step*); a verdict commits ``chunk.tokens[start - chunk.start :][:accepted]``
   then its token, ``start`` being where verification began (the edge skipped the
   tokens it generated meanwhile, which equal the chunk's). A chunk that a streamed
   token contradicts, or that the committed tokens cover entirely, is given up: the
   edge answers it ``stale`` (ignored) and the next chunk is the table's for the new
   prefix.

Unlike the real device it never declines to draft (no ``LeadPlanner``) and never
reopens: a lost session is the answer's error. Each verdict is one round
(``round_s``: chunk sent to verdict; ``accepted``: tokens accepted after ``start``);
``edge_steps`` counts the streamed tokens.
"""

from __future__ import annotations

import time

from covspec.bench.capacity.replay import ChunkTable, ReplayAnswer, device_time, record_commit
from covspec.protocol.errors import BUSY
from covspec.protocol.messages import Error, Message, Result
from covspec.protocol.verification import NO_TOKEN
from covspec.protocol.wire import codec_named
from covspec.runtime_device.client import EdgeClient, EdgeError, EdgeUnreachable
from covspec.runtime_device.options import GenerationSettings
from covspec.runtime_device.proposer import Chunk
from covspec.runtime_device.session import DeviceSession


class _EdgeLedReplay:
    """The state of one edge-led answer: the committed tokens, the chunk in flight."""

    def __init__(self, client: EdgeClient, table: ChunkTable, settings: GenerationSettings, record: ReplayAnswer,
                 committed: list[int], pace: float):
        self.client, self.table, self.record, self.committed, self.pace = client, table, record, committed, pace
        self.session = DeviceSession(client, codec_named(table.wire), settings, table.question.question,
                                     table.question.image_png, table.vocab_hash, lambda event: None,
                                     mode="edge_led")
        self.stream_seq = -1                  # the open's seq: the edge's own steps carry it
        self.chunk: Chunk | None = None       # the chunk in flight, while the edge can still use it
        self.done = False
        record.edge_steps = 0

    def run(self) -> None:
        try:
            # 1. Open; the edge prefills and commits the first token while the device prefills.
            opening = self.session.open_message([], None)
            self.client.send(opening)
            device_time(self.table.prefill_s * self.pace)
            opened = self.session.await_opened(opening)
            self.stream_seq, self.done = opened.seq, opened.done
            record_commit(self.record, self.committed, [] if opened.token == NO_TOKEN else [opened.token])
            while not self.done:
                # 2. One chunk in flight: the table's for the prefix committed now.
                if self.chunk is None:
                    chunk = self.table.chunk_for(self.committed)
                    device_time(chunk.draft_s * self.pace)
                    self.session.send(chunk)
                    self.chunk = chunk
                # 3. Streamed tokens and verdicts, in arrival order.
                self._absorb()
        finally:
            self.session.close()

    def _absorb(self) -> None:
        """Apply the session's next message and every one already waiting after it."""
        timeout = self.client.backoff.timeout_s
        reply = self.client.receive_any(self.session.id, timeout)
        if reply is None:
            raise EdgeUnreachable(f"nothing from the edge at {self.client.address} for {timeout:g} s")
        while reply is not None and not self.done:
            self._apply(reply)
            reply = self.client.receive_any(self.session.id, 0.0)
        if self.chunk is not None and not self._alive(self.chunk):
            self.chunk = None                 # the edge will answer it stale

    def _apply(self, reply: Message) -> None:
        if isinstance(reply, Error):
            if reply.code != BUSY:
                raise EdgeError(reply.code, reply.message)
            if self.chunk is not None and reply.seq == self.chunk.seq:
                self.chunk = None             # refused for now: the next chunk asks again
            return
        if not isinstance(reply, Result):
            return
        if reply.seq == self.stream_seq:                              # a token the edge generated by itself
            self._expect(reply.start, "a streamed token")
            self.record.edge_steps += reply.token != NO_TOKEN
            self._commit([], reply)
            return
        chunk = self.chunk
        if chunk is None or reply.seq != chunk.seq:
            return                                                    # a chunk given up earlier: stale
        self.chunk = None
        if reply.status == "stale":
            return                            # overtaken by streamed tokens read in the same batch
        self._expect(reply.start, "a verdict")
        self.record.round_s.append(time.perf_counter() - chunk.sent_at)
        self.record.accepted.append(reply.accepted)
        skip = reply.start - chunk.start
        self._commit(chunk.tokens[skip:skip + reply.accepted], reply)

    def _expect(self, start: int, what: str) -> None:
        if start != len(self.committed):
            raise RuntimeError(f"{what} at {start} does not follow the {len(self.committed)} committed tokens")

    def _commit(self, accepted: list[int], reply: Result) -> None:
        record_commit(self.record, self.committed, list(accepted) + ([] if reply.token == NO_TOKEN else [reply.token]))
        self.done = reply.done

    def _alive(self, chunk: Chunk) -> bool:
        """Whether the edge can still use ``chunk``: every committed token it covers agrees,
        and it reaches past the committed sequence."""
        covered = len(self.committed) - chunk.start
        return covered < len(chunk.tokens) and chunk.tokens[:covered] == self.committed[chunk.start:]


def edge_led_rounds(client: EdgeClient, table: ChunkTable, settings: GenerationSettings, record: ReplayAnswer,
                    committed: list[int], pace: float = 1.0) -> None:
    """An ``edge_led`` session whose every chunk is looked up in ``table``."""
    _EdgeLedReplay(client, table, settings, record, committed, pace).run()
