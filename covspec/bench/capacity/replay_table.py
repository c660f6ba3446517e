"""Chunk tables: the real draft's chunks along the target's own answer, recorded once.

``build_chunk_table`` runs the real draft (a ``DraftModel``, e.g. ``ArtifactDraft``: its
real prefill with the device's pruning, and its real proposer with the fixed drafting
policy and the wire codec) along the target's own greedy answer to one question, and
records the chunk the draft proposes after every prefix length k of that answer: its
tokens, the draft's confidence in each and the wire rows (the q the compact wire
carries; none when greedy), at most ``chunk`` tokens and never past
``max_new_tokens``, exactly as a real device drafts it (``replay_options``), and how
long the draft took: the prefill and each chunk (``draft_s``). The replay devices
(``replay``) then propose these chunks (``replay_draft``) instead of drafting. Greedy
only: the table is a function of the committed prefix only when nothing is sampled.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from covspec.bench.harness.workload import Question
from covspec.runtime_device.draft_model import DraftModel, draft_rng
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.proposer import Chunk

DEFAULT_CHUNK = 8


def replay_options(chunk: int = DEFAULT_CHUNK, base: DraftingOptions = DraftingOptions()) -> DraftingOptions:
    """How a device drafts when its rounds can be replayed: fixed chunks of ``chunk``
    tokens, one chunk in flight, no branches, the device leading (a ``speculative``
    session; pruning and wire as in ``base``). A real device with these options sends
    the same chunks as the replay device (``replay_draft.ReplayDraft``)."""
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
    vocab_size: int
    eos_ids: frozenset[int]
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
    proposer = draft.proposer(options.codec(), settings.sampling, options.make_policy(), draft_rng(settings.seed),
                              alternatives=False)
    answer = [int(t) for t in answer]
    chunks = []
    for k in range(1, len(answer)):
        drafted = proposer.draft(answer[:k], start=k, limit=max(min(chunk, settings.max_new_tokens - k), 1))
        chunks.append(dataclasses.replace(drafted, state=None))
    return ChunkTable(question, tuple(answer), chunk, settings.max_new_tokens, draft.vocab_hash, draft.vocab_size,
                      frozenset(draft.eos_ids), options.wire, tuple(chunks), prefill_s, time.perf_counter() - began)
