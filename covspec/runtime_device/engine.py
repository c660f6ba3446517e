"""Co-inference on the device: draft chunks, have the edge verify them, commit.

``CoInference.generate`` is one generator with numbered phases; it yields the list
of tokens each verdict commits, so a caller can stream text as it is committed. It
knows nothing about text or terminals.

The committed sequence is owned by the edge (it verifies, corrects and stops); the
device only ever appends what a verdict says. Everything else the device does is
speculation that can only save time, never change the output:

- *pruning*: the draft sees only the kept visual tokens (the target sees all);
- *drafting policy*: fixed chunk length, or adaptive (``policy.py``);
- *pipelining*: further chunks, each drafted assuming the ones before it are fully
  accepted and each bonus equals the draft's own guess (``assumed``), are sent before
  the first verdict (as many as the policy says the wait hides); the edge answers
  ``stale`` if an assumption fails and the device drafts afresh;
- *branching*: while waiting, the device drafts continuations after the most likely
  verdicts (rejection at a position with the draft's second choice as correction;
  full acceptance when nothing is pipelined) and sends the matching one at once; each
  step of the wait goes to a pipelined chunk or a branch, whichever is worth more
  (probability of use times the time it saves);
- *prune_target* (opt-in, labelled NOT exact): the target also keeps only the draft's
  kept visual tokens, trading accuracy for edge prefill time;
- *wire*: ``compact`` sends ids (+ sparse q when sampling), ``dense`` the full q per
  drafted position and gets the full p back (the conventional baseline).

When the edge restarts or stops answering, the device reopens the session with every
committed token, so no committed token is lost and the output is unchanged (greedy);
if the edge stays away it raises ``EdgeUnreachable`` after the committed tokens were
yielded.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from covspec.protocol.messages import Close, Error, Open, Opened, Result, Verify
from covspec.protocol.speculative import NO_TOKEN, sample, sparse_proposal, sparse_q, target_probs, trim_proposals
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.client import EdgeClient, EdgeError, EdgeUnreachable
from covspec.runtime_device.drafter import Drafter, DrafterState
from covspec.runtime_device.policy import AdaptivePolicy, FixedPolicy
from covspec.runtime_device.preprocess import load_image, pixel_values
from covspec.runtime_device.pruning import METHODS, TokenScores, keep_count, select

DRAFT_STREAM = 0x6472616674  # "draft": keys the device's random stream apart from the edge's


@dataclass(frozen=True)
class GenerationSettings:
    """What the user asked for (these decide the output). ``temperature`` 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class DraftingOptions:
    """How the device drafts (these decide only the speed, never the output)."""

    policy: str = "adaptive"
    draft_len: int = 4                     # the chunk length of the fixed policy
    max_draft_len: int = 12                # the adaptive policy's hard maximum
    pipeline: bool = True
    max_in_flight: int = 4                 # with pipelining: chunks awaiting a verdict at most
    branches: int = 2
    wire: str = "compact"
    keep_ratio: float | None = None       # None: the artifact's default
    keep_tokens: int | None = None
    selection: str = "covspec"
    positions: str = "original"            # kept visual tokens keep their original positions
    prune_target: bool = False             # opt-in, NOT exact: the target keeps only those tokens too
    q_top_k: int = 8                       # sampling: at most this many proposed ids per position,
    q_mass: float = 0.999                  # fewer once they hold this much of the draft's mass
    reopen_attempts: int = 5

    def __post_init__(self) -> None:
        if self.policy not in ("fixed", "adaptive"):
            raise ValueError("policy must be 'fixed' or 'adaptive'")
        if self.draft_len < 1 or self.max_draft_len < 1:
            raise ValueError("draft lengths must be >= 1")
        if self.branches < 0:
            raise ValueError("branches must be >= 0")
        if self.max_in_flight < 2:
            raise ValueError("max_in_flight must be >= 2 (one chunk and one pipelined)")
        if self.q_top_k < 1 or not 0 < self.q_mass <= 1:
            raise ValueError("q_top_k must be >= 1 and q_mass in (0, 1]")
        if self.wire not in ("compact", "dense"):
            raise ValueError("wire must be 'compact' or 'dense'")
        if self.selection not in METHODS:
            raise ValueError(f"selection must be one of {', '.join(METHODS)}")
        if self.positions not in ("original", "contiguous"):
            raise ValueError("positions must be 'original' or 'contiguous'")

    def make_policy(self):
        if self.policy == "adaptive":
            return AdaptivePolicy(max_len=self.max_draft_len, pipeline=self.pipeline,
                                  max_in_flight=self.max_in_flight)
        return FixedPolicy(self.draft_len, pipeline=self.pipeline, max_in_flight=self.max_in_flight)


@dataclass
class GenerationStats:
    """What one generation cost; filled in as it runs."""

    tokens: int = 0
    rounds: int = 0
    accepted: list[int] = field(default_factory=list)
    drafted: int = 0
    stale: int = 0
    branch_hits: int = 0
    branches_drafted: int = 0
    hidden_draft_s: float = 0.0            # drafting done while waiting that a hit put to use
    pipelined_hits: int = 0
    pipelined_misses: int = 0
    deepest_in_flight: int = 0             # most chunks awaiting a verdict at once
    reopens: int = 0
    kept_visual_tokens: int = 0
    wall_s: float = 0.0
    ttft_s: float = 0.0
    device_prefill_s: float = 0.0
    edge_verify_ms: float = 0.0
    edge_prefill_ms: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0

    @property
    def mean_accepted(self) -> float:
        return float(np.mean(self.accepted)) if self.accepted else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "wall_s": round(self.wall_s, 4),
                "tokens_per_s": round(self.tokens_per_s, 2), "rounds": self.rounds,
                "mean_accepted": round(self.mean_accepted, 3), "drafted": self.drafted, "stale": self.stale,
                "branch_hits": self.branch_hits, "branches_drafted": self.branches_drafted,
                "hidden_draft_ms": round(self.hidden_draft_s * 1000, 3),
                "pipelined_hits": self.pipelined_hits, "pipelined_misses": self.pipelined_misses,
                "deepest_in_flight": self.deepest_in_flight,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "ttft_s": round(self.ttft_s, 4), "device_prefill_s": round(self.device_prefill_s, 4),
                "kept_visual_tokens": self.kept_visual_tokens,
                "edge_verify_ms": round(self.edge_verify_ms, 2), "edge_prefill_ms": round(self.edge_prefill_ms, 2),
                "reopens": self.reopens}


@dataclass
class Chunk:
    """A drafted chunk: its tokens, what travels with them, and the draft's view of them.

    ``confidences[i]`` is the draft probability of ``tokens[i]``; ``alternatives[i]`` the
    draft's best other token there (the likeliest correction if ``tokens[i]`` is rejected)
    and ``alternative_probs[i]`` its draft probability (both only when branches are drafted);
    ``state`` the drafter fork after drafting (for branches).
    """

    tokens: list[int]
    confidences: list[float]
    alternatives: list[int]
    alternative_probs: list[float] = field(default_factory=list)
    q_ids: list[np.ndarray] = field(default_factory=list)
    q_probs: list[np.ndarray] = field(default_factory=list)
    q_dense: list[np.ndarray] = field(default_factory=list)
    start: int = 0
    assumed: int = -1                      # the bonus this chunk assumes before it (-1: none)
    assumed_confidence: float = 1.0        # the draft's probability of that bonus
    seq: int = -1
    sent_at: float = 0.0
    state: DrafterState | None = None
    draft_s: float = 0.0

    def message(self, session: str) -> Verify:
        q_ids, q_probs = trim_proposals(np.stack(self.q_ids), np.stack(self.q_probs)) if self.q_ids else (None, None)
        return Verify(session=session, seq=self.seq, start=self.start, assumed=self.assumed,
                      tokens=np.asarray(self.tokens, np.int32), q_ids=q_ids, q_probs=q_probs,
                      q_dense=np.stack(self.q_dense) if self.q_dense else None)


class CoInference:
    """One device: a loaded draft artifact and a connection to an edge."""

    def __init__(self, artifact: DraftArtifact, client: EdgeClient):
        self.artifact = artifact
        self.client = client
        self.drafter = Drafter(artifact)
        self._policies: dict[DraftingOptions, FixedPolicy | AdaptivePolicy] = {}

    def policy_for(self, options: DraftingOptions):
        """The drafting policy for ``options``, kept across generations so that what it
        learns (acceptance by confidence, draft, link and verify timings) carries over."""
        if options not in self._policies:
            self._policies[options] = options.make_policy()
        return self._policies[options]

    def generate(self, image_bytes: bytes, question: str, settings: GenerationSettings,
                 options: DraftingOptions = DraftingOptions(), stats: GenerationStats | None = None,
                 trace: Callable[[dict], None] | None = None) -> Iterator[list[int]]:
        run = _Run(self, image_bytes, question, settings, options,
                   stats if stats is not None else GenerationStats(), trace or (lambda event: None))
        return run.tokens()


class _Run:
    """The state of one generation (one session)."""

    def __init__(self, owner: CoInference, image_bytes: bytes, question: str, settings: GenerationSettings,
                 options: DraftingOptions, stats: GenerationStats, trace: Callable[[dict], None]):
        self.artifact, self.client, self.drafter = owner.artifact, owner.client, owner.drafter
        self.image_bytes, self.question = image_bytes, question
        self.settings, self.options, self.stats, self.trace = settings, options, stats, trace
        self.policy = owner.policy_for(options)
        # The draft's randomness must be independent of the edge's (seeded with the
        # same user seed), or the joint output is biased: derive a separate stream.
        self.rng = np.random.default_rng([settings.seed, DRAFT_STREAM])
        self.session = new_session_id()
        self.seq = 0
        self.committed: list[int] = []
        self.done = False
        self.in_flight: deque[Chunk] = deque()
        self.branches: dict[tuple[int, int], Chunk] = {}
        self.kept: np.ndarray | None = None     # visual tokens the draft kept (after prefill)

    # -- the loop ---------------------------------------------------------------------------

    def tokens(self) -> Iterator[list[int]]:
        stats = self.stats
        began = time.perf_counter()
        up0, down0 = self.client.bytes_up, self.client.bytes_down
        image = load_image(self.image_bytes)
        try:
            # 1. Open the session; the edge prefills the target with the full image.
            # 2. Meanwhile, prefill the draft: vision -> scorer -> kept tokens -> decoder.
            #    (A pruned target needs the kept tokens first, so it opens afterwards.)
            opening = None if self.options.prune_target else self._open_message()
            if opening is not None:
                self.client.send(opening)
            prefill_began = time.perf_counter()
            self._prefill(image)
            stats.device_prefill_s = time.perf_counter() - prefill_began
            if opening is None:
                opening = self._open_message()
                self.client.send(opening)
            # 3. The edge's first token (from its prefill logits) is committed.
            first = self._commit_opened(self._await_open(opening))
            stats.ttft_s = time.perf_counter() - began
            yield first
            while not self.done:
                # 4a. Keep a chunk in flight.
                if not self.in_flight:
                    self._send(self._draft_after(self.committed, start=len(self.committed)))
                # 4b. Use the wait: pipeline the next chunk, or draft branches.
                self._speculate()
                # 4c. The verdict on the oldest chunk in flight (reopen if the edge is lost).
                result = self._await_verdict()
                if result is None:
                    opened = self._reopen()
                    new = self._commit_opened(opened)
                    if new:
                        yield new
                    continue
                # 4d. Commit, keep what stays valid, and send a ready branch at once.
                new = self._apply(result)
                if new:
                    yield new
        finally:
            self.client.send(Close(session=self.session, seq=self._next_seq()))
            stats.tokens = len(self.committed)
            stats.wall_s = time.perf_counter() - began
            stats.bytes_up += self.client.bytes_up - up0
            stats.bytes_down += self.client.bytes_down - down0

    # -- session ----------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _open_message(self) -> Open:
        """Open (or reopen) the session, carrying every committed token."""
        s = self.settings
        return Open(session=self.session, seq=self._next_seq(), prompt=self.question,
                    image=np.frombuffer(self.image_bytes, np.uint8), max_new_tokens=s.max_new_tokens,
                    vocab_hash=self.artifact.vocab_hash, temperature=s.temperature, top_k=s.top_k,
                    top_p=s.top_p, seed=s.seed, wire=self.options.wire,
                    committed=np.asarray(self.committed, np.int32),
                    target_keep=self.kept.astype(np.int32) if self.options.prune_target else None)

    def _await_open(self, message: Open) -> Opened:
        reply = self.client.receive(message.session, message.seq, self.client.policy.timeout_s * 2)
        if reply is None:
            reply = self.client.request(message)
        if isinstance(reply, Error):
            raise EdgeError(reply.code, reply.message)
        return reply

    def _commit_opened(self, opened: Opened) -> list[int]:
        self.done = opened.done
        self.stats.edge_prefill_ms += opened.prefill_ms
        if opened.token == NO_TOKEN:
            return []
        self.committed.append(opened.token)
        return [opened.token]

    def _reopen(self) -> Opened:
        """Open the session again with every committed token (the edge restarted)."""
        self.in_flight.clear()
        self.branches.clear()
        last: Exception | None = None
        for attempt in range(self.options.reopen_attempts):
            self.stats.reopens += 1
            self.trace({"event": "reopen", "committed": len(self.committed), "attempt": attempt})
            try:
                return self.client.request(self._open_message())
            except EdgeUnreachable as exc:
                last = exc
                time.sleep(self.client.policy.backoff_s * (2 ** attempt))
        raise EdgeUnreachable(f"the edge at {self.client.address} stayed unreachable: {last}")

    def _send(self, chunk: Chunk) -> None:
        chunk.seq = self._next_seq()
        chunk.sent_at = time.perf_counter()
        self.client.send(chunk.message(self.session))
        self.in_flight.append(chunk)
        self.stats.deepest_in_flight = max(self.stats.deepest_in_flight, len(self.in_flight))
        self.stats.drafted += len(chunk.tokens)
        self.trace({"event": "chunk", "seq": chunk.seq, "start": chunk.start, "assumed": chunk.assumed,
                    "len": len(chunk.tokens), **self.policy.explain(chunk.confidences)})

    def _await_verdict(self) -> Result | None:
        """The reply to the oldest chunk in flight, resending on timeout; None when the
        session is lost (unknown to the edge, or no reply after every retry)."""
        chunk = self.in_flight[0]
        policy = self.client.policy
        for attempt in range(policy.retries + 1):
            reply = self.client.receive(self.session, chunk.seq, policy.timeout_s)
            if isinstance(reply, Error):
                if reply.code == "unknown_session":
                    return None
                raise EdgeError(reply.code, reply.message)
            if reply is not None:
                return reply
            for pending in self.in_flight:          # the edge answers a repeated seq idempotently
                self.client.send(pending.message(self.session))
            time.sleep(policy.backoff_s * (2 ** attempt))
        return None

    # -- verdicts ---------------------------------------------------------------------------

    def _apply(self, result: Result) -> list[int]:
        chunk = self.in_flight.popleft()
        if result.status == "stale":
            self.stats.stale += 1
            self.trace({"event": "stale", "seq": chunk.seq, "start": chunk.start})
            return []
        new = chunk.tokens[: result.accepted] + ([] if result.token == NO_TOKEN else [result.token])
        self.committed += new
        self.done = result.done
        round_s = time.perf_counter() - chunk.sent_at
        self.policy.observe_round(chunk.confidences, result.accepted, round_s, result.verify_ms / 1000)
        self.stats.rounds += 1
        self.stats.accepted.append(result.accepted)
        self.stats.edge_verify_ms += result.verify_ms
        key = (result.accepted, result.token)
        # A pipelined chunk stays valid only if its assumption came true.
        if self.in_flight:
            follower = self.in_flight[0]
            if not self.done and result.accepted == len(chunk.tokens) and result.token == follower.assumed:
                self.stats.pipelined_hits += 1
                self.stats.hidden_draft_s += follower.draft_s
            else:
                self.stats.pipelined_misses += len(self.in_flight)
                self.in_flight.clear()              # the edge answers it stale; the reply is ignored
        hit = None if self.in_flight or self.done else self.branches.get(key)
        self.trace({"event": "verdict", "seq": chunk.seq, "accepted": result.accepted, "token": result.token,
                    "done": result.done, "round_ms": round(round_s * 1000, 3), "verify_ms": round(result.verify_ms, 3),
                    "pipelined": bool(self.in_flight), "branch_hit": hit is not None})
        self.branches.clear()
        if hit is not None:
            # Drafted with its start at len(committed), so it fits max_new_tokens.
            self.stats.branch_hits += 1
            self.stats.hidden_draft_s += hit.draft_s
            self.drafter.restore(hit.state)
            hit.start, hit.assumed = len(self.committed), -1
            self._send(hit)
        return new

    # -- speculation while waiting ------------------------------------------------------------

    def _ends_generation(self, chunk: Chunk) -> bool:
        """Whether no token can follow ``chunk`` if it is fully accepted."""
        end = chunk.start + len(chunk.tokens)                # generated position after the chunk
        return chunk.tokens[-1] in self.artifact.eos_ids or end + 1 >= self.settings.max_new_tokens

    def _speculate(self) -> None:
        """Use the wait for the oldest chunk's verdict, most valuable use first, until the
        verdict arrives: each step either pipelines one more chunk (while the policy
        allows more in flight; used if every chunk in flight is fully accepted and every
        assumed bonus right, and then it saves a round trip: weighed by the policy's
        ``pipeline_weight``) or drafts the next branch (a continuation after one of the
        oldest chunk's likeliest rejections, which saves drafting it; after its full
        acceptance too when no follower can be pipelined)."""
        oldest = self.in_flight[0]
        can_pipeline = self.policy.in_flight() > 1
        outcomes: list[tuple[float, int, int]] = []
        if self.options.branches:
            full = not can_pipeline and not self._ends_generation(oldest)
            outcomes = self._branch_outcomes(oldest, all_accepted=full)[: self.options.branches]
        while not self._verdict_ready():
            pipeline = can_pipeline and len(self.in_flight) < self.policy.in_flight() \
                and not self._ends_generation(self.in_flight[-1])
            if pipeline and (not outcomes or self._all_accepted_probability() * self.policy.pipeline_weight()
                             >= outcomes[0][0]):
                can_pipeline = self._pipeline()
            elif outcomes:
                _, accepted, token = outcomes.pop(0)
                if not self._draft_branch(oldest, accepted, token):
                    break
            else:
                break

    def _all_accepted_probability(self) -> float:
        """P(every chunk in flight is fully accepted and every assumed bonus is right)."""
        probability = 1.0
        for chunk in self.in_flight:
            probability *= float(np.prod([self.policy.acceptance(c) for c in chunk.confidences]))
            if chunk.assumed != -1:
                probability *= self.policy.acceptance(chunk.assumed_confidence)
        return probability

    def _pipeline(self) -> bool:
        """Send one more chunk, drafted assuming every chunk in flight is fully accepted and
        the bonus after them is the draft's own guess; False when that guess ends the answer."""
        last = self.in_flight[-1]
        began = time.perf_counter()
        prefix = self._assumed_prefix()
        bonus, confidence = self._guess_bonus(prefix)
        if bonus in self.artifact.eos_ids:
            return False
        chunk = self._draft_after(prefix + [bonus], start=last.start + len(last.tokens) + 1)
        chunk.assumed, chunk.assumed_confidence = bonus, confidence
        chunk.draft_s = time.perf_counter() - began
        self._send(chunk)
        return True

    def _guess_bonus(self, prefix: list[int]) -> tuple[int, float]:
        """The draft's likeliest token after the generated tokens ``prefix``, and its probability."""
        q = _softmax(self.drafter.extend_to(prefix))
        bonus = int(np.argmax(q))
        return bonus, float(q[bonus])

    def _verdict_ready(self) -> bool:
        """Whether the verdict on the oldest chunk in flight has arrived."""
        return self.client.reply_ready(self.session, self.in_flight[0].seq)

    def _assumed_prefix(self) -> list[int]:
        """Committed tokens plus every in-flight chunk assumed fully accepted."""
        prefix = list(self.committed)
        for chunk in self.in_flight:
            if chunk.assumed != -1:
                prefix.append(chunk.assumed)
            prefix += chunk.tokens
        return prefix

    def _branch_outcomes(self, chunk: Chunk, all_accepted: bool) -> list[tuple[float, int, int]]:
        """The verdicts (probability, accepted, token) worth a branch, likeliest first:
        rejection at j with the draft's second choice as the correction has probability
        ``prod_{i<j} a_i * (1 - a_j) * q(alt_j) / (1 - q(token_j))``, full acceptance with
        the draft's guess as the bonus ``prod a_i * a(bonus)`` (a: the policy's
        acceptance estimate)."""
        acceptance = [self.policy.acceptance(c) for c in chunk.confidences]
        outcomes: list[tuple[float, int, int]] = []
        reach = 1.0
        for j, (a, alt, q_alt, q_token) in enumerate(zip(acceptance, chunk.alternatives, chunk.alternative_probs,
                                                          chunk.confidences)):
            outcomes.append((reach * (1 - a) * min(q_alt / max(1 - q_token, 1e-9), 1.0), j, alt))
            reach *= a
        if all_accepted:
            bonus, confidence = self._guess_bonus(self.committed[: chunk.start] + chunk.tokens)
            outcomes.append((reach * self.policy.acceptance(confidence), len(chunk.tokens), bonus))
        outcomes.sort(key=lambda outcome: -outcome[0])
        return outcomes

    def _draft_branch(self, chunk: Chunk, accepted: int, token: int) -> bool:
        """Draft the continuation after the verdict (accepted, token) on ``chunk``; False
        when the verdict arrived meanwhile (the branch is dropped unfinished)."""
        prefix = self.committed[: chunk.start] + chunk.tokens[:accepted] + [token]
        if token in self.artifact.eos_ids or len(prefix) >= self.settings.max_new_tokens:
            return True
        began = time.perf_counter()
        branch = self._draft_after(prefix, start=len(prefix), interrupt=self._verdict_ready)
        if branch is None:
            return False
        branch.draft_s = time.perf_counter() - began
        branch.state = self.drafter.snapshot()
        self.branches[(accepted, token)] = branch
        self.stats.branches_drafted += 1
        self.trace({"event": "branch", "accepted": accepted, "token": token, "len": len(branch.tokens)})
        return True

    # -- drafting ---------------------------------------------------------------------------

    def _draft_after(self, prefix: list[int], start: int,
                     interrupt: Callable[[], bool] | None = None) -> Chunk | None:
        """Draft a chunk after the generated tokens ``prefix`` (its first token at ``start``).
        With ``interrupt``, returns None as soon as it says so (a reply is waiting)."""
        s, o = self.settings, self.options
        limit = min(o.max_draft_len if o.policy == "adaptive" else o.draft_len,
                    s.max_new_tokens - start)
        limit = max(limit, 1)
        logits = self.drafter.extend_to(prefix)
        chunk = Chunk(tokens=[], confidences=[], alternatives=[], start=start)
        eos = self.artifact.eos_ids
        while True:
            step_began = time.perf_counter()
            q = _softmax(logits) if s.greedy else target_probs(logits, s.temperature, s.top_k, s.top_p)
            if o.wire == "dense":
                q16 = q.astype(np.float16)
                token = int(np.argmax(q)) if s.greedy else sample(q16.astype(np.float64), self.rng)
                chunk.q_dense.append(q16)
            elif s.greedy:
                token = int(np.argmax(q))
            else:
                ids, probs = sparse_proposal(q, o.q_top_k, o.q_mass)
                token = int(ids[sample(sparse_q(probs), self.rng)])
                chunk.q_ids.append(ids)
                chunk.q_probs.append(probs)
            chunk.tokens.append(token)
            chunk.confidences.append(float(q[token]))
            if o.branches:                       # the likeliest correction, for branch drafting
                second = np.argpartition(-q, 1)[:2]
                alternative = int(second[1] if second[0] == token else second[0])
                chunk.alternatives.append(alternative)
                chunk.alternative_probs.append(float(q[alternative]))
            if token in eos or len(chunk.tokens) >= limit or not self.policy.continue_chunk(chunk.confidences):
                return chunk
            if interrupt is not None and interrupt():
                return None
            logits = self.drafter.feed([token])[-1]
            self.policy.observe_draft_step(time.perf_counter() - step_began)

    # -- prefill ----------------------------------------------------------------------------

    def _prefill(self, image) -> None:
        artifact, options = self.artifact, self.options
        features, activity = artifact.vision.run(
            ["image_features", "activity"], {"pixel_values": pixel_values(image, artifact.manifest.image)})
        visual = features[0]                                                     # [N, D]
        n = visual.shape[0]
        ratio = options.keep_ratio if options.keep_ratio is not None else \
            artifact.manifest.pruning.get("keep_ratio", 1.0)
        k = keep_count(n, ratio, options.keep_tokens)
        kept = np.arange(n)
        if k < n:
            question_ids = artifact.tokenizer.encode(self.question.strip(), add_special_tokens=False).ids
            relevance, score = artifact.scorer.run(["relevance", "score"], {
                "image_features": visual, "activity": activity[0],
                "question_embeds": artifact.embed(question_ids or [artifact.manifest.tokenizer["pad_id"]])})
            kept = select(options.selection, visual, TokenScores(relevance, activity[0], score), k,
                          seed=self.settings.seed)
        self.kept = kept
        self.stats.kept_visual_tokens = int(len(kept))
        layout = artifact.prompt_layout(self.question)
        before, after = len(layout.before), len(layout.after)
        embeds = np.concatenate([artifact.embed(layout.before), visual[kept], artifact.embed(layout.after)])
        if options.positions == "original":
            positions = np.concatenate([np.arange(before), before + kept, before + n + np.arange(after)])
            full = before + n + after
        else:
            positions = np.arange(embeds.shape[0])
            full = embeds.shape[0]
        self.drafter.prefill(embeds, positions.astype(np.int64), full)
        self.trace({"event": "prefill", "visual_tokens": n, "kept": int(len(kept)),
                    "selection": options.selection if k < n else "none"})


def new_session_id() -> str:
    """64 random bits in hex: unique enough per edge, and short on every message."""
    return uuid.uuid4().hex[:16]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits.astype(np.float64) - logits.max())
    return e / e.sum()


def trace_to_file(path) -> tuple[Callable[[dict], None], Callable[[], None]]:
    """A trace sink writing one JSON line per event, and its closer."""
    handle = open(path, "a", encoding="utf-8")
    began = time.perf_counter()

    def write(event: dict) -> None:
        handle.write(json.dumps({"t_ms": round((time.perf_counter() - began) * 1000, 3), **event}) + "\n")

    return write, handle.close


def generate_target_only(client: EdgeClient, image_bytes: bytes, question: str, settings: GenerationSettings,
                         stats: GenerationStats | None = None) -> Iterator[list[int]]:
    """The baseline without a draft: the edge generates alone and streams each token.

    Needs no artifact; ``vocab_hash`` is left empty (the device tokenizes nothing).
    """
    stats = stats if stats is not None else GenerationStats()
    began = time.perf_counter()
    up0, down0 = client.bytes_up, client.bytes_down
    message = Open(session=new_session_id(), seq=0, prompt=question, image=np.frombuffer(image_bytes, np.uint8),
                   max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                   top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed, mode="target_only",
                   committed=np.zeros(0, np.int32))
    tokens = 0
    try:
        opened = client.request(message, timeout_s=client.policy.timeout_s * 2)
        stats.edge_prefill_ms += opened.prefill_ms
        tokens = 1
        stats.ttft_s = time.perf_counter() - began
        yield [opened.token]
        done = opened.done
        while not done:
            reply = client.receive(message.session, message.seq, client.policy.timeout_s)
            if reply is None:
                raise EdgeUnreachable(f"the edge at {client.address} stopped streaming")
            if not isinstance(reply, Result):
                raise EdgeError(getattr(reply, "code", "unexpected"), getattr(reply, "message", repr(reply)))
            stats.edge_verify_ms += reply.verify_ms
            done = reply.done
            if reply.token != NO_TOKEN:
                tokens += 1
                yield [reply.token]
    finally:
        client.send(Close(session=message.session, seq=1))
        stats.tokens = tokens
        stats.wall_s = time.perf_counter() - began
        stats.bytes_up += client.bytes_up - up0
        stats.bytes_down += client.bytes_down - down0
