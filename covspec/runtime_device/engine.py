"""Co-inference on the device: draft chunks, have the edge verify them, commit.

``CoInference.generate`` is one generator with numbered phases; it yields the list
of tokens each verdict commits, so a caller can stream text as it is committed. It
knows nothing about text or terminals.

The committed sequence is owned by the edge (it verifies, corrects and stops); the
device only ever appends what a verdict says. When the edge restarts or stops
answering, the device reopens the session with every committed token, so no
committed token is lost and the output is unchanged (greedy); if the edge stays
away it raises ``EdgeUnreachable`` after the committed tokens were yielded.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from covspec.protocol.messages import Close, Open, Opened, Result, Verify
from covspec.protocol.speculative import NO_TOKEN, sample, sparse_proposal, sparse_q, target_probs
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.client import EdgeClient, EdgeError, EdgeUnreachable
from covspec.runtime_device.drafter import Drafter
from covspec.runtime_device.preprocess import load_image, pixel_values


DRAFT_STREAM = 0x6472616674  # "draft": keys the device's random stream apart from the edge's


@dataclass(frozen=True)
class GenerationSettings:
    """What the user asked for. ``temperature`` 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    draft_len: int = 4
    q_top_k: int = 16
    reopen_attempts: int = 5

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.draft_len < 1:
            raise ValueError("draft_len must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationStats:
    """What one generation cost; filled in as it runs."""

    tokens: int = 0
    rounds: int = 0
    accepted: list[int] = field(default_factory=list)
    drafted: int = 0
    reopens: int = 0
    wall_s: float = 0.0
    ttft_s: float = 0.0
    device_prefill_s: float = 0.0
    edge_verify_ms: float = 0.0
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
                "mean_accepted": round(self.mean_accepted, 3), "drafted": self.drafted,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "ttft_s": round(self.ttft_s, 4), "device_prefill_s": round(self.device_prefill_s, 4),
                "edge_verify_ms": round(self.edge_verify_ms, 2), "reopens": self.reopens}


class CoInference:
    """One device: a loaded draft artifact and a connection to an edge."""

    def __init__(self, artifact: DraftArtifact, client: EdgeClient):
        self.artifact = artifact
        self.client = client
        self.drafter = Drafter(artifact)

    def generate(self, image_bytes: bytes, question: str, settings: GenerationSettings,
                 stats: GenerationStats | None = None) -> Iterator[list[int]]:
        stats = stats if stats is not None else GenerationStats()
        began = time.perf_counter()
        up0, down0 = self.client.bytes_up, self.client.bytes_down
        # The draft's randomness must be independent of the edge's (seeded with the
        # same user seed), or the joint output is biased: derive a separate stream.
        rng = np.random.default_rng([settings.seed, DRAFT_STREAM])
        session = uuid.uuid4().hex
        seq = 0
        committed: list[int] = []
        image = load_image(image_bytes)

        def open_session(seq: int) -> Opened:
            message = Open(session=session, seq=seq, prompt=question,
                           image=np.frombuffer(image_bytes, np.uint8), max_new_tokens=settings.max_new_tokens,
                           vocab_hash=self.artifact.vocab_hash, temperature=settings.temperature,
                           top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed,
                           committed=np.asarray(committed, np.int32))
            self.client.send(message)
            return message

        try:
            # 1. Open the session; the edge prefills the target with the full image.
            pending_open = open_session(seq)
            # 2. Meanwhile, prefill the draft: vision -> visual tokens -> decoder.
            prefill_began = time.perf_counter()
            logits = self._prefill(image, question)
            stats.device_prefill_s = time.perf_counter() - prefill_began
            # 3. The edge's first token (from its prefill logits) is committed.
            opened = self._await_open(pending_open, settings)
            committed.append(opened.token)
            stats.ttft_s = time.perf_counter() - began
            yield [opened.token]
            done = opened.done
            while not done:
                # 4a. Draft a chunk after the committed tokens.
                seq += 1
                remaining = settings.max_new_tokens - len(committed)
                draft, q_ids, q_probs = self._draft(committed, settings, min(settings.draft_len, remaining), rng)
                stats.drafted += len(draft)
                verify = Verify(session=session, seq=seq, start=len(committed),
                                tokens=np.asarray(draft, np.int32), q_ids=q_ids, q_probs=q_probs)
                # 4b. The edge verifies; on a lost session, reopen with everything committed.
                try:
                    result = self.client.request(verify)
                except (EdgeUnreachable, EdgeError) as exc:
                    if isinstance(exc, EdgeError) and exc.code != "unknown_session":
                        raise
                    seq += 1
                    opened = self._reopen(open_session, seq, settings, stats)
                    new = [] if opened.token == NO_TOKEN else [opened.token]
                    committed.extend(new)
                    done = opened.done
                    self.drafter.truncate(min(self.drafter.generated, len(committed) - len(new)))
                    if new:
                        yield new
                    continue
                assert isinstance(result, Result) and result.status == "ok", result
                # 4c. Commit the verdict and roll the draft cache back to what stays valid.
                new = [int(t) for t in draft[: result.accepted]]
                if result.token != NO_TOKEN:
                    new.append(result.token)
                kept = min(result.accepted, len(draft) - 1)
                self.drafter.truncate(len(committed) + kept)
                committed.extend(new)
                stats.rounds += 1
                stats.accepted.append(result.accepted)
                stats.edge_verify_ms += result.verify_ms
                done = result.done
                yield new
        finally:
            self.client.send(Close(session=session, seq=seq + 1))
            stats.tokens = len(committed)
            stats.wall_s = time.perf_counter() - began
            stats.bytes_up += self.client.bytes_up - up0
            stats.bytes_down += self.client.bytes_down - down0

    # -- phases ---------------------------------------------------------------------------

    def _prefill(self, image, question: str) -> np.ndarray:
        artifact = self.artifact
        features, _activity = artifact.vision.run(
            ["image_features", "activity"], {"pixel_values": pixel_values(image, artifact.manifest.image)})
        visual = features[0]                                                    # [N, D]
        layout = artifact.prompt_layout(question)
        embeds = np.concatenate([artifact.embed(layout.before), visual, artifact.embed(layout.after)])
        full_len = embeds.shape[0]
        positions = np.arange(full_len, dtype=np.int64)
        return self.drafter.prefill(embeds, positions, full_len)

    def _await_open(self, message: Open, settings: GenerationSettings) -> Opened:
        reply = self.client.receive(message.session, message.seq, self.client.policy.timeout_s * 2)
        if reply is None:
            return self.client.request(message)
        if not isinstance(reply, Opened):
            raise EdgeError(getattr(reply, "code", "unexpected"), getattr(reply, "message", repr(reply)))
        return reply

    def _reopen(self, open_session, seq: int, settings: GenerationSettings, stats: GenerationStats) -> Opened:
        last: Exception | None = None
        for attempt in range(settings.reopen_attempts):
            stats.reopens += 1
            try:
                message = open_session(seq)
                return self.client.request(message)
            except EdgeUnreachable as exc:
                last = exc
                time.sleep(self.client.policy.backoff_s * (2 ** attempt))
        raise EdgeUnreachable(f"the edge at {self.client.address} stayed unreachable: {last}")

    def _draft(self, committed: list[int], settings: GenerationSettings, n: int,
               rng: np.random.Generator) -> tuple[list[int], np.ndarray | None, np.ndarray | None]:
        """Draft up to ``n`` tokens after ``committed``; in sampling mode also the sparse q."""
        drafter = self.drafter
        logits = drafter.feed(committed[drafter.generated:])[-1]
        draft: list[int] = []
        ids_rows, prob_rows = [], []
        eos = self.artifact.eos_ids
        for i in range(n):
            if settings.greedy:
                token = int(np.argmax(logits))
            else:
                q = target_probs(logits, settings.temperature, settings.top_k, settings.top_p)
                ids, probs = sparse_proposal(q, settings.q_top_k)
                token = int(ids[sample(sparse_q(probs), rng)])
                ids_rows.append(ids)
                prob_rows.append(probs)
            draft.append(token)
            if token in eos or i == n - 1:
                break
            logits = drafter.feed([token])[-1]
        if settings.greedy:
            return draft, None, None
        return draft, np.stack(ids_rows), np.stack(prob_rows)


def generate_target_only(client: EdgeClient, image_bytes: bytes, question: str, settings: GenerationSettings,
                         stats: GenerationStats | None = None) -> Iterator[list[int]]:
    """The baseline without a draft: the edge generates alone and streams each token.

    Needs no artifact; ``vocab_hash`` is left empty (the device tokenizes nothing).
    """
    stats = stats if stats is not None else GenerationStats()
    began = time.perf_counter()
    up0, down0 = client.bytes_up, client.bytes_down
    message = Open(session=uuid.uuid4().hex, seq=0, prompt=question, image=np.frombuffer(image_bytes, np.uint8),
                   max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                   top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed, mode="target_only",
                   committed=np.zeros(0, np.int32))
    tokens = 0
    try:
        opened = client.request(message, timeout_s=client.policy.timeout_s * 2)
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
