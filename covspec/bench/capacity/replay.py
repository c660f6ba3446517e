"""Replay devices: the real draft's chunks, precomputed, sent at negligible CPU cost.

An edge-capacity benchmark needs many devices; on a small machine N devices that
really draft measure their own CPU contention, not the edge. A *replay device*
sends exactly what a real device would, without running a model:

1. ``build_chunk_table`` runs the real draft (``CoInference``'s ``ArtifactDraft``,
   its real prefill with the device's pruning, the real ``Proposer`` with the fixed
   drafting policy and the wire codec) along the target's own greedy answer to one
   question, and records the chunk the draft proposes after every prefix length k of
   that answer: its tokens, the draft's confidence in each and the wire rows (the q
   the compact wire carries; none when greedy), at most ``chunk`` tokens and never
   past ``max_new_tokens``, exactly as a real device drafts it (``replay_options``),
   and how long the draft took: the prefill and each chunk (``draft_s``).
2. ``replay_answer`` opens a real session (``DeviceSession`` over an ``EdgeClient``:
   a ZeroMQ DEALER, the real messages and retries), and each round sends the table's
   chunk for its committed prefix, commits the verdict, and repeats until the edge
   says done. Per round it only looks a chunk up and encodes one message: no
   onnxruntime. At ``pace`` p > 0 it stands for a device with a CPU of its own: it
   waits p times the recorded draft time before each chunk (and the prefill's
   before its first), sleeping, so it takes the real device's time without its
   CPU; at pace 0 it drafts instantly. Its ``target_only`` mode is the baseline:
   a ``target_only`` session (``generate_target_only``) whose streamed tokens it
   reads. Its ``edge_led`` mode (``covspec.bench.capacity.replay_edge_led``) sends the same
   table's chunks to an edge that generates by itself meanwhile.

A ``ReplayDevice`` (a thread; ``run_replay`` starts N of them) answers questions
back to back until ``stop``, and every answer is recorded (``ReplayAnswer``):
whether it equals the target's own, each round's latency and accepted count, and
when each token was committed. Greedy only: the table is a function of the
committed prefix only when nothing is sampled. A device never raises; a failed
answer is recorded with its error and is not correct.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from covspec.bench.harness.devices import run_for
from covspec.bench.harness.workload import Question
from covspec.protocol.verification import NO_TOKEN
from covspec.protocol.wire import codec_named
from covspec.runtime_device.client import EdgeClient, EdgeUnreachable, Backoff
from covspec.runtime_device.engine import DRAFT_STREAM, DraftModel
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.proposer import Chunk, Proposer
from covspec.runtime_device.session import DeviceSession
from covspec.runtime_device.target_only import generate_target_only

DEFAULT_CHUNK = 8
REPLAY_BACKOFF = Backoff(timeout_s=30.0, retries=2, backoff_s=0.2)


def replay_options(chunk: int = DEFAULT_CHUNK, base: DraftingOptions = DraftingOptions()) -> DraftingOptions:
    """How a device drafts when its rounds can be replayed: fixed chunks of ``chunk``
    tokens, one chunk in flight, no branches, the device leading (a ``speculative``
    session; pruning and wire as in ``base``). A real ``DeviceLoop`` with these options
    sends the same chunks as the replay device."""
    return dataclasses.replace(base, lead="device", policy="fixed", draft_len=chunk, pipeline=False, branches=0)


@dataclass(frozen=True)
class ChunkTable:
    """The chunks a draft proposes along the target's own answer to one question.

    ``answer`` is the target's greedy answer (generated token ids; its first token
    comes from the edge's prefill, so rounds start at k = 1); ``chunks[k - 1]`` is the
    chunk drafted after ``answer[:k]`` (``start`` = k), for k = 1 .. len(answer) - 1,
    with the seconds the draft took for it (``draft_s``); ``prefill_s`` is the draft's
    prefill (image to context) and ``build_s`` the whole build.
    """

    question: Question
    answer: tuple[int, ...]
    chunk: int
    max_new_tokens: int
    vocab_hash: str
    wire: str
    chunks: tuple[Chunk, ...]
    prefill_s: float = 0.0
    build_s: float = 0.0

    def chunk_for(self, committed: Sequence[int]) -> Chunk:
        """A fresh copy (``seq``/``sent_at`` unset) of the chunk after ``committed``. If
        ``committed`` left the answer (the edge diverged, so the answer will be wrong),
        a one-token chunk that the edge corrects, so the session still ends."""
        k = len(committed)
        if 1 <= k <= len(self.chunks) and tuple(committed) == self.answer[:k]:
            return dataclasses.replace(self.chunks[k - 1])
        return Chunk(start=k, tokens=[int(committed[-1]) if committed else 0], confidences=[0.0], rows=[None])

    def expected_rounds(self, chunk: int | None = None) -> tuple[int, float]:
        """Rounds a replay of this table takes against an exact greedy edge and their mean
        accepted tokens, with chunks cut to ``chunk`` tokens (None: as drafted). Greedy
        drafting is deterministic, so a shorter fixed chunk is a prefix of a longer one."""
        k, rounds, accepted = 1, 0, []
        while k < len(self.answer):
            tokens = self.chunks[k - 1].tokens[:chunk]
            a = next((i for i, t in enumerate(tokens) if k + i >= len(self.answer) or t != self.answer[k + i]),
                     len(tokens))
            rounds += 1
            accepted.append(a)
            k += a + 1
        return rounds, float(np.mean(accepted)) if accepted else 0.0


def build_chunk_table(draft: DraftModel, question: Question, answer: Sequence[int], *, chunk: int = DEFAULT_CHUNK,
                      settings: GenerationSettings = GenerationSettings(),
                      options: DraftingOptions | None = None) -> ChunkTable:
    """Run ``draft`` (prefill on the question's image, then the real proposer) along
    ``answer`` and record the chunk it proposes after every prefix. ``options`` default
    to ``replay_options(chunk)``; their policy must be the fixed one of length ``chunk``."""
    assert settings.greedy, "replayed chunks depend on the committed prefix only when greedy"
    options = options or replay_options(chunk)
    assert options.policy == "fixed" and options.draft_len == chunk, "a replayed chunk has a fixed length"
    began = time.perf_counter()
    draft.prefill(question.image_png, question.question, options, settings.seed, lambda event: None)
    prefill_s = time.perf_counter() - began
    proposer = Proposer(draft.drafter, options.codec(), settings.sampling, options.make_policy(),
                        np.random.default_rng([settings.seed, DRAFT_STREAM]), draft.eos_ids, alternatives=False)
    answer = [int(t) for t in answer]
    chunks = []
    for k in range(1, len(answer)):
        drafted = proposer.draft(answer[:k], start=k, limit=max(min(chunk, settings.max_new_tokens - k), 1))
        chunks.append(dataclasses.replace(drafted, state=None))
    return ChunkTable(question, tuple(answer), chunk, settings.max_new_tokens, draft.vocab_hash, options.wire,
                      tuple(chunks), prefill_s, time.perf_counter() - began)


@dataclass
class ReplayAnswer:
    """One answer of one device. ``commits`` lists (time.monotonic(), tokens) per
    commit (the opened token included); ``round_s`` and ``accepted`` one entry per
    verify round (target-only: per streamed token after the first, ``accepted`` 0;
    edge-led: per verdict); ``cpu_s`` is the CPU time the device's thread spent on the
    answer; ``edge_steps`` the tokens the edge generated by itself after the opened one
    (edge-led only; None in the other modes)."""

    device: int
    question: int
    qtype: str
    correct: bool
    tokens: int
    began: float
    finished_at: float
    commits: list[tuple[float, int]] = field(default_factory=list)
    round_s: list[float] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    cpu_s: float = 0.0
    error: str = ""
    edge_steps: int | None = None

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.began


def replay_answer(client: EdgeClient, table: ChunkTable, settings: GenerationSettings, *,
                  mode: str = "speculative", pace: float = 1.0, device: int = 0, question: int = 0) -> ReplayAnswer:
    """One answer to ``table``'s question over ``client``: ``speculative`` replays the
    table's chunks (taking ``pace`` times the real draft's time), ``target_only`` reads
    the edge's stream, ``edge_led`` does both. Never raises: a failure is the answer's ``error`` (and the
    answer is not correct)."""
    record = ReplayAnswer(device, question, table.question.qtype, False, 0, time.monotonic(), 0.0)
    committed: list[int] = []
    cpu = time.thread_time()
    try:
        rounds_for(mode)(client, table, settings, record, committed, pace)
    except Exception as exc:  # noqa: BLE001 - a failed answer is recorded, never raised
        record.error = f"{type(exc).__name__}: {exc}"
    record.finished_at = time.monotonic()
    record.cpu_s = time.thread_time() - cpu
    record.tokens = len(committed)
    record.correct = not record.error and tuple(committed) == table.answer
    return record


def speculative_rounds(client: EdgeClient, table: ChunkTable, settings: GenerationSettings, record: ReplayAnswer,
                       committed: list[int], pace: float = 1.0) -> None:
    """A CoVSpec session whose every chunk is looked up in ``table``."""
    session = DeviceSession(client, codec_named(table.wire), settings, table.question.question,
                            table.question.image_png, table.vocab_hash, lambda event: None)
    try:
        # 1. Open the session; the edge prefills and commits the first token while the
        #    device prefills its draft.
        opening = session.open_message([], None)
        client.send(opening)
        device_time(table.prefill_s * pace)
        opened = session.await_opened(opening)
        done = opened.done
        record_commit(record, committed, [] if opened.token == NO_TOKEN else [opened.token])
        while not done:
            # 2. Send the chunk the real draft proposes after the committed prefix.
            chunk = table.chunk_for(committed)
            device_time(chunk.draft_s * pace)
            session.send(chunk)
            # 3. The verdict: commit the accepted tokens and the correction or bonus.
            result = session.await_verdict([chunk])
            if result is None:
                raise EdgeUnreachable(f"the edge at {client.address} lost the session")
            if result.status != "ok":
                raise RuntimeError(f"the edge answered {result.status} to a chunk at {chunk.start}")
            record.round_s.append(time.perf_counter() - chunk.sent_at)
            record.accepted.append(result.accepted)
            done = result.done
            record_commit(record, committed, chunk.tokens[: result.accepted]
                    + ([] if result.token == NO_TOKEN else [result.token]))
    finally:
        session.close()


def target_only_rounds(client: EdgeClient, table: ChunkTable, settings: GenerationSettings, record: ReplayAnswer,
                       committed: list[int], pace: float = 1.0) -> None:
    """The baseline: a ``target_only`` session; the edge streams every token (a round
    is the gap between two streamed tokens)."""
    question = table.question
    last = None
    for tokens in generate_target_only(client, question.image_png, question.question, settings):
        now = time.perf_counter()
        if last is not None:
            record.round_s.append(now - last)
            record.accepted.append(0)
        last = now
        record_commit(record, committed, tokens)


def record_commit(record: ReplayAnswer, committed: list[int], tokens: list[int]) -> None:
    """Commit ``tokens`` and note when (one entry of ``record.commits``)."""
    committed += tokens
    record.commits.append((time.monotonic(), len(tokens)))


ROUNDS = {"speculative": speculative_rounds, "target_only": target_only_rounds}
MODES = (*ROUNDS, "edge_led")


def rounds_for(mode: str) -> Callable:
    """The loop of a replay device in ``mode``; edge-led's is in its own module, built on this one."""
    if mode == "edge_led":
        from covspec.bench.capacity.replay_edge_led import edge_led_rounds

        return edge_led_rounds
    return ROUNDS[mode]


def device_time(seconds: float) -> None:
    """Stand for ``seconds`` of the device's own computing: the replay device's CPU
    is not this machine's, so it waits without using this machine's CPU."""
    if seconds > 0:
        time.sleep(seconds)


class ReplayDevice(threading.Thread):
    """A device answering ``tables``' questions back to back (device i starts at
    question i) against ``address`` until ``stop``; the answer in progress is finished."""

    def __init__(self, index: int, address: str, tables: Sequence[ChunkTable], stop: threading.Event, *,
                 mode: str = "speculative", pace: float = 1.0, settings: GenerationSettings = GenerationSettings(),
                 backoff: Backoff = REPLAY_BACKOFF):
        assert mode in MODES, f"mode must be one of {', '.join(MODES)}"
        super().__init__(name=f"replay-{mode}-{index}", daemon=True)
        self.index, self.address, self.tables, self.stop = index, address, tables, stop
        self.mode, self.pace, self.settings, self.backoff = mode, pace, settings, backoff
        self.answers: list[ReplayAnswer] = []

    def run(self) -> None:
        client = EdgeClient(self.address, self.backoff)
        turn = self.index
        try:
            while not self.stop.is_set():
                which = turn % len(self.tables)
                turn += 1
                self.answers.append(replay_answer(client, self.tables[which], self.settings, mode=self.mode,
                                                  pace=self.pace, device=self.index, question=which))
        finally:
            client.close()


def run_replay(count: int, seconds: float, address: str, tables: Sequence[ChunkTable], *, mode: str = "speculative",
               pace: float = 1.0, settings: GenerationSettings = GenerationSettings(),
               backoff: Backoff = REPLAY_BACKOFF,
               during: Callable[[threading.Event], None] | None = None) -> tuple[list[ReplayAnswer], float, float]:
    """``count`` devices (``mode``: ``speculative`` replays chunks at ``pace``,
    ``target_only`` is the baseline, ``edge_led`` replays chunks beside the edge's own
    steps) answering for ``seconds``, then each finishes its
    answer in progress; ``during(stop)`` runs meanwhile in this thread. The answers,
    the monotonic time the devices started, and the wall time to the last answer."""
    stop = threading.Event()
    devices = [ReplayDevice(i, address, tables, stop, mode=mode, pace=pace, settings=settings, backoff=backoff)
               for i in range(count)]
    return run_for(devices, stop, seconds, during)
