"""Co-inference on the device: draft chunks, have the edge verify them, commit.

``CoInference.generate`` is one generator with numbered phases; it yields the list of
tokens each verdict commits, so a caller can stream text as it is committed. It knows
nothing about text or terminals. The parts it drives, one job each:

- ``prefill.prefill_draft``: vision -> kept visual tokens -> the draft's context;
- ``proposer.Proposer``: drafts a chunk (tokens, confidences, wire rows);
- ``waiting``: what the wait for a verdict is best spent on (pure functions);
- ``verdicts.judge``: what a verdict means for the chunks in flight and the branches;
- ``session.DeviceSession``: the messages and replies of the session;
- ``replies``: whether a reply can be true; one that cannot ends the generation
  (``EdgeMisbehaved``) before anything of it is committed.

When ``DraftingOptions.edge_led`` says so (greedy by default) the generation is
edge-led instead (``edge_led.EdgeLedGeneration``): the edge generates by itself and
the device's chunks jump it ahead. The device-led loop here serves the rest, and the
rounds of an edge-led generation that handed the lead to the device
(``_Generation.continuing``: same session, same committed tokens).

The committed sequence is owned by the edge (it verifies, corrects and stops); the
device only ever appends what a verdict says. Everything else the device does is
speculation that can only save time, never change the output (``DraftingOptions``):
pruning, the drafting policy, pipelining (chunks drafted assuming the ones before
them fully accepted and their bonus the draft's guess, ``assumed``; the edge answers
``stale`` when an assumption fails), branching (continuations after the likeliest
verdicts, drafted while waiting, sent at once when one comes true), the wire format.
The one opt-in exception, labelled NOT exact, is ``GenerationSettings.prune_target``.

When the edge restarts or stops answering, the device reopens the session with every
committed token, so no committed token is lost; if the edge stays away it raises
``EdgeUnreachable`` after the committed tokens were yielded.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np

from covspec.families.chat import History
from covspec.protocol.verification import NO_TOKEN
from covspec.runtime_device import waiting
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.client import EdgeClient
from covspec.runtime_device.drafter import Drafter
from covspec.runtime_device.edge_led import VERIFIED_LEN, EdgeLedGeneration, LeadPlanner
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.policy import DraftPolicy
from covspec.runtime_device.prefill import DraftPrefill, SeenImage, prefill_draft
from covspec.runtime_device.preprocess import load_image
from covspec.runtime_device.proposer import Chunk, Proposer
from covspec.runtime_device.replies import check_opened, check_verdict
from covspec.runtime_device.session import DeviceSession, Turn
from covspec.runtime_device.stats import GenerationStats
from covspec.runtime_device.verdicts import judge, record

DRAFT_STREAM = 0x6472616674  # "draft": keys the device's random stream apart from the edge's


def draft_rng(seed: int) -> np.random.Generator:
    """The draft's random stream. It must be independent of the edge's (seeded with the
    same user seed), or the joint output is biased: a separate stream is derived."""
    return np.random.default_rng([seed, DRAFT_STREAM])


class DraftModel(Protocol):
    """What a generation needs of the draft: a drafter, its stop ids, vocabulary size
    and hash, and a prefill that readies the drafter for one image and question."""

    drafter: Drafter
    eos_ids: Collection[int]
    vocab_size: int
    vocab_hash: str

    def prefill(self, image_bytes: bytes, question: str, options: DraftingOptions, seed: int,
                trace: Callable[[dict], None], history: History = ()) -> DraftPrefill:
        """Prefill the drafter for ``question`` after a conversation's ``history`` (earlier
        (question, answer) turns); which visual tokens it kept."""

    def interrupted(self) -> AbstractContextManager:
        """A context within which the draft's work (a prefill under way in another thread)
        ends at once, raising there; the drafter is prefilled afresh afterwards."""


class ArtifactDraft:
    """The draft of an exported artifact, run with onnxruntime."""

    def __init__(self, artifact: DraftArtifact):
        self.artifact = artifact
        self.drafter = Drafter.from_artifact(artifact)
        self.eos_ids = artifact.eos_ids
        self.vocab_size = int(artifact.manifest.tokenizer["vocab_size"])
        self.vocab_hash = artifact.vocab_hash
        self.seen: tuple[bytes, SeenImage] | None = None     # the last image, for a conversation's follow-up

    def prefill(self, image_bytes: bytes, question: str, options: DraftingOptions, seed: int,
                trace: Callable[[dict], None], history: History = ()) -> DraftPrefill:
        """A first question runs the vision graph; a follow-up (``history``) about the image the
        draft saw last reuses its visual tokens and the draft's cache (``prefill_draft``)."""
        template = self.artifact.conversation_template(history) if history else None
        seen = self.seen[1] if history and self.seen is not None and self.seen[0] == image_bytes else None
        prefill = prefill_draft(self.artifact, self.drafter, None if seen else load_image(image_bytes), question,
                                options, seed, trace, template=template, seen=seen)
        self.seen = (image_bytes, prefill.seen)
        return prefill

    def interrupted(self) -> AbstractContextManager:
        return self.artifact.interrupted()


class CoInference:
    """One device: a draft (an artifact, or any ``DraftModel``) and a connection to an edge."""

    def __init__(self, draft: DraftArtifact | DraftModel, client: EdgeClient):
        self.draft = ArtifactDraft(draft) if isinstance(draft, DraftArtifact) else draft
        self.client = client
        self._policies: dict[DraftingOptions, DraftPolicy] = {}
        self._lead_planners: dict[DraftingOptions, LeadPlanner] = {}

    def policy_for(self, options: DraftingOptions) -> DraftPolicy:
        """The drafting policy for ``options``, kept across generations so that what it
        learns (acceptance by confidence, draft, link and verify timings) carries over."""
        if options not in self._policies:
            self._policies[options] = options.make_policy()
        return self._policies[options]

    def lead_planner_for(self, options: DraftingOptions) -> LeadPlanner:
        """The edge-led chunk policy for ``options``, kept across generations like ``policy_for``."""
        if options not in self._lead_planners:
            self._lead_planners[options] = LeadPlanner(VERIFIED_LEN if options.policy == "adaptive"
                                                      else options.draft_len)
        return self._lead_planners[options]

    def generate(self, image_bytes: bytes, question: str, settings: GenerationSettings,
                 options: DraftingOptions = DraftingOptions(), stats: GenerationStats | None = None,
                 trace: Callable[[dict], None] | None = None, turn: Turn | None = None) -> Iterator[list[int]]:
        """The tokens each verdict commits, for ``question`` about the image; ``turn``: its place
        in a conversation (``conversation.Conversation``), whose session it continues."""
        stats = stats if stats is not None else GenerationStats()
        trace = trace or (lambda event: None)
        if options.edge_led(settings):
            hand_over = (lambda led: _Generation.continuing(self, led).rounds()) if options.lead == "auto" else None
            return EdgeLedGeneration(self.draft, self.client, self.lead_planner_for(options), image_bytes, question,
                                     settings, options, stats, trace, draft_rng(settings.seed), hand_over,
                                     turn).tokens()
        return _Generation(self, image_bytes, question, settings, options, stats, trace, turn).tokens()


class _Generation:
    """The state of one generation: committed tokens, chunks in flight, branches."""

    def __init__(self, device: CoInference, image_bytes: bytes, question: str, settings: GenerationSettings,
                 options: DraftingOptions, stats: GenerationStats, trace: Callable[[dict], None],
                 turn: Turn | None = None):
        self.draft, self.drafter = device.draft, device.draft.drafter
        self.image_bytes, self.question = image_bytes, question
        self.settings, self.options, self.stats, self.trace = settings, options, stats, trace
        self.policy = device.policy_for(options)
        codec = options.codec()
        self.proposer = Proposer(self.drafter, codec, settings.sampling, self.policy, draft_rng(settings.seed),
                                 self.draft.eos_ids, alternatives=options.branches > 0)
        self.session = DeviceSession(device.client, codec, settings, question, image_bytes,
                                     self.draft.vocab_hash, trace, turn=turn)
        self.client = device.client
        self.committed: list[int] = []
        self.done = False
        self.in_flight: deque[Chunk] = deque()
        self.branches: dict[tuple[int, int], Chunk] = {}
        self.target_keep: np.ndarray | None = None     # the kept visual tokens, for a pruned target

    @classmethod
    def continuing(cls, device: CoInference, led: EdgeLedGeneration) -> "_Generation":
        """The device-led rounds of an edge-led generation that handed the lead to the device:
        the same session (now ``speculative`` on the edge), committed tokens, stats and trace."""
        generation = cls(device, led.image_bytes, led.question, led.settings, led.options, led.stats, led.trace)
        generation.session, generation.committed = led.session, led.committed
        return generation

    def tokens(self) -> Iterator[list[int]]:
        stats, session = self.stats, self.session
        began = time.perf_counter()
        up0, down0 = self.client.bytes_up, self.client.bytes_down
        try:
            # 1. Open the session; the edge prefills the target with the full image.
            # 2. Meanwhile, prefill the draft: vision -> scorer -> kept tokens -> decoder.
            #    (A pruned target needs the kept tokens first, so it opens afterwards.)
            opening = None if self.settings.prune_target else session.open_message([], None)
            if opening is not None:
                self.client.send(opening)
            self._prefill()
            if opening is None:
                opening = session.open_message([], self.target_keep)
                self.client.send(opening)
            # 3. The edge's first token (from its prefill logits) is committed.
            first = self._commit_opened(session.await_opened(opening))
            stats.ttft_s = time.perf_counter() - began
            yield first
            yield from self.rounds()
        finally:
            session.close()
            stats.tokens = len(self.committed)
            stats.wall_s = time.perf_counter() - began
            stats.bytes_up += self.client.bytes_up - up0
            stats.bytes_down += self.client.bytes_down - down0

    def rounds(self) -> Iterator[list[int]]:
        """Device-led rounds until the answer is done; yields what each verdict commits."""
        while not self.done:
            # 4a. Keep a chunk in flight.
            if not self.in_flight:
                self._send(self._draft(self.committed, start=len(self.committed)))
            # 4b. Use the wait: pipeline the next chunk, or draft branches.
            self._speculate()
            # 4c. The verdict on the oldest chunk in flight (reopen if the edge is lost).
            result = self.session.await_verdict(self.in_flight)
            new = self._reopen() if result is None else self._apply(result)
            # 4d. Stream what was committed.
            if new:
                yield new

    # -- phases ---------------------------------------------------------------------------------

    def _prefill(self) -> None:
        began = time.perf_counter()
        prefill = self.draft.prefill(self.image_bytes, self.question, self.options, self.settings.seed, self.trace,
                                     self.session.history)
        self.stats.device_prefill_s = time.perf_counter() - began
        self.stats.kept_visual_tokens = int(len(prefill.kept))
        self.target_keep = prefill.kept if self.settings.prune_target else None

    def _commit_opened(self, opened) -> list[int]:
        check_opened(opened, len(self.committed), self.settings.max_new_tokens, self.draft.vocab_size)
        self.done = opened.done
        self.stats.edge_prefill_ms += opened.prefill_ms
        new = [] if opened.token == NO_TOKEN else [opened.token]
        self.committed += new
        return new

    def _reopen(self) -> list[int]:
        """Open the session again with every committed token; what the edge commits next."""
        self.in_flight.clear()
        self.branches.clear()

        def attempt(number: int) -> None:
            self.stats.reopens += 1
            self.trace({"event": "reopen", "committed": len(self.committed), "attempt": number})

        return self._commit_opened(self.session.reopen(self.committed, self.target_keep,
                                                       self.options.reopen_attempts, attempt,
                                                       "no verdict within the timeouts, or the edge did not know it"))

    def _draft(self, prefix: list[int], start: int, interrupt=None) -> Chunk:
        limit = max(min(self.policy.max_len, self.settings.max_new_tokens - start), 1)
        return self.proposer.draft(prefix, start, limit, interrupt)

    def _send(self, chunk: Chunk) -> None:
        self.session.send(chunk)
        self.in_flight.append(chunk)
        self.stats.deepest_in_flight = max(self.stats.deepest_in_flight, len(self.in_flight))
        self.stats.drafted += len(chunk.tokens)
        self.trace({"event": "chunk", "seq": chunk.seq, "start": chunk.start, "assumed": chunk.assumed,
                    "len": len(chunk.tokens), **self.policy.explain(chunk.confidences)})

    def _apply(self, result) -> list[int]:
        """Commit the verdict on the oldest chunk; keep what stays valid; send a ready branch."""
        chunk = self.in_flight[0]
        check_verdict(result, chunk.start, len(chunk.tokens), len(self.committed), self.settings.max_new_tokens,
                      self.draft.vocab_size)
        if result.status == "stale" and chunk.start == len(self.committed) and chunk.assumed == NO_TOKEN:
            return self._reopen()     # never stale on an edge that agrees with us: it lost track (a late copy)
        self.session.progress()
        self.in_flight.popleft()
        followers = list(self.in_flight)
        verdict = judge(chunk, result, followers[0] if followers else None, self.branches)
        record(self.stats, verdict, result, followers)
        self.branches.clear()
        if verdict.stale:
            self.trace({"event": "stale", "seq": chunk.seq, "start": chunk.start})
            return []
        self.committed += verdict.committed
        self.done = verdict.done
        round_s = time.perf_counter() - chunk.sent_at
        self.policy.observe_round(chunk.confidences, result.accepted, round_s, result.verify_ms / 1000)
        if not verdict.followers_valid:
            self.in_flight.clear()                  # the edge answers them stale; the replies are ignored
        self.trace({"event": "verdict", "seq": chunk.seq, "accepted": result.accepted, "token": result.token,
                    "done": result.done, "round_ms": round(round_s * 1000, 3),
                    "verify_ms": round(result.verify_ms, 3), "pipelined": bool(self.in_flight),
                    "branch_hit": verdict.branch is not None})
        if verdict.branch is not None:              # drafted to start at len(committed): fits max_new_tokens
            self.drafter.restore(verdict.branch.state)
            verdict.branch.start, verdict.branch.assumed = len(self.committed), -1
            self._send(verdict.branch)
        return verdict.committed

    # -- speculation while waiting --------------------------------------------------------------

    def _ends_generation(self, chunk: Chunk) -> bool:
        return waiting.ends_generation(chunk.tokens[-1], chunk.end, self.draft.eos_ids,
                                           self.settings.max_new_tokens)

    def _speculate(self) -> None:
        """Until the oldest chunk's verdict arrives, spend each step on its most valuable
        use (``waiting.next_use``): one more pipelined chunk (while the policy allows
        more in flight), or the next branch on the oldest chunk's likeliest verdicts
        (its full acceptance too when nothing can be pipelined behind it)."""
        oldest = self.in_flight[0]
        can_pipeline = self.policy.in_flight() > 1
        outcomes: list[waiting.Outcome] = []
        if self.options.branches:
            bonus = None
            if not can_pipeline and not self._ends_generation(oldest):
                token, confidence = self.proposer.guess_bonus(self.committed[: oldest.start] + oldest.tokens)
                bonus = (token, self.policy.acceptance(confidence))
            acceptance = [self.policy.acceptance(c) for c in oldest.confidences]
            outcomes = waiting.branch_outcomes(acceptance, oldest.confidences, oldest.alternatives,
                                                   oldest.alternative_probs, bonus)[: self.options.branches]
        while not self.session.verdict_ready(oldest):
            pipeline = (can_pipeline and len(self.in_flight) < self.policy.in_flight()
                        and not self._ends_generation(self.in_flight[-1]))
            all_accepted = waiting.all_accepted_probability(self.in_flight, len(self.committed),
                                                                      self.policy.acceptance) \
                if pipeline else 0.0
            use = waiting.next_use(pipeline, all_accepted, self.policy.pipeline_weight(), outcomes)
            if use == "pipeline":
                can_pipeline = self._pipeline()
            elif use == "branch":
                outcome = outcomes.pop(0)
                if not self._draft_branch(oldest, outcome.accepted, outcome.token):
                    break
            else:
                break

    def _pipeline(self) -> bool:
        """Send one more chunk, drafted assuming every chunk in flight is fully accepted and
        the bonus after them is the draft's own guess; False when that guess ends the answer."""
        prefix = waiting.assumed_prefix(self.committed, self.in_flight)
        bonus, confidence = self.proposer.guess_bonus(prefix)
        if bonus in self.draft.eos_ids:
            return False
        chunk = self._draft(prefix + [bonus], start=self.in_flight[-1].end + 1)
        chunk.assumed, chunk.assumed_confidence = bonus, confidence
        self._send(chunk)
        return True

    def _draft_branch(self, chunk: Chunk, accepted: int, token: int) -> bool:
        """Draft the continuation after the verdict (accepted, token) on ``chunk``; False
        when the verdict arrived meanwhile. The branch then ends where it was (kept, not
        dropped: which branches survive must not depend on their tokens)."""
        prefix = self.committed[: chunk.start] + chunk.tokens[:accepted] + [token]
        if token in self.draft.eos_ids or len(prefix) >= self.settings.max_new_tokens:
            return True
        arrived = False

        def verdict_arrived() -> bool:
            nonlocal arrived
            arrived = arrived or self.session.verdict_ready(chunk)
            return arrived

        branch = self._draft(prefix, start=len(prefix), interrupt=verdict_arrived)
        branch.state = self.drafter.snapshot()
        self.branches[(accepted, token)] = branch
        self.stats.branches_drafted += 1
        self.trace({"event": "branch", "accepted": accepted, "token": token, "len": len(branch.tokens),
                    "cut": arrived})
        return not arrived
