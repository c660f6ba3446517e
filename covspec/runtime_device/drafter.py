"""The draft decoder over onnxruntime with its KV cache (``kv_cache``).

The cache holds the draft's context (a ``DraftContext``: prompt with its kept visual
tokens, built by the artifact's family) followed by generated tokens. Generated
tokens are plain token embeddings (even one equal to the image token id) at
positions continuing from ``context.next_position`` (for original positions: the
full context length, as if no visual token was pruned, so the draft sees the same
position ids as the target would; on every position axis when the context has
several). Everything after the context is addressed by generated position
(0 = first generated token), the protocol's unit: ``truncate(m)`` keeps the KV of
the first ``m`` generated tokens. The drafter remembers which tokens it fed
(``fed``), so ``extend_to(sequence)`` reuses the longest valid prefix of its cache
and feeds only the rest. ``snapshot``/``restore`` fork the cache for branches.

A ``"shared-buffer"`` decoder (the manifest's ``decoder.kv_cache``) runs with IO
binding on preallocated buffers (``kv_cache.SharedBufferCache``): no step copies the
cache, truncation is free, forks copy only the rows a later step overwrites. Its
prefill runs in chunks of ``prefill_chunk`` rows (attention scores of one chunk at a
time) and asks the graph for the logits of the last row only (``num_logits``) where
only that row is returned. Any other decoder (or a session without IO binding) feeds
the past as arrays and keeps the presents (``kv_cache.CopyingCache``).

A decoder graph with an ``image_groups`` input (a family whose image tokens attend to
each other bidirectionally, e.g. Gemma 3) is fed the context's
``DraftContext.image_groups`` (all 0 when the context has none) and 0 for every
generated token; other decoder graphs never see it.

The drafter needs only a decoder session, the decoder's cache layout (the
manifest's ``decoder`` section) and an embedding lookup, so the exporter runs its
parity checks through this same class before any manifest exists.

Under a deployment regime, ``pacing`` (``covspec.regime.DevicePacing``) pads every
decoder run to what the regime's phone would take for its rows (a prefill chunk by
rows, a decode run by its first and further rows); by default nothing is padded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from covspec.families import DraftContext
from covspec.runtime_device.artifact import DraftArtifact
from covspec.regime.pacing import NO_PACING
from covspec.runtime_device.kv_cache import SharedBufferCache, cache_for


PREFILL_CHUNK = 256        # context rows per decoder run in a chunked prefill


@dataclass(frozen=True)
class DrafterState:
    """A fork point: the cache's snapshot, the generated tokens it holds and the context it follows."""

    cache: object
    fed: tuple
    context: tuple = ()


class Drafter:
    def __init__(self, decoder, spec: Mapping, embed: Callable[[list[int]], np.ndarray],
                 prefill_chunk: int = PREFILL_CHUNK, kv_cache: str | None = None, pacing=NO_PACING):
        """decoder: an onnxruntime session of ``decoder.onnx``; spec: the manifest's
        ``decoder`` section; embed: token ids [n] -> embeddings [n, D]; kv_cache: the
        layout to assume instead of ``spec["kv_cache"]`` ("concat" forces the copying cache);
        pacing: the regime's ``DevicePacing`` (default: none)."""
        self.decoder = decoder
        self.pacing = pacing
        self.embed = embed
        self.spec, self.kv_cache, self.chunk = spec, kv_cache, prefill_chunk
        self.context_len = 0           # cache entries of the context
        self.next_position = 0         # position of the first generated token
        self.position_axes = 0         # 0: 1-D positions; A: A position axes
        self.fed: list[int] = []       # generated tokens whose KV is in the cache
        self.context: DraftContext | None = None   # the context the cache holds

    # The decoder is first touched here, on first use: an artifact ``Graph`` opens its
    # session then (a lean artifact's decoder after the image is encoded).
    @functools.cached_property
    def cache(self):
        return cache_for(self.decoder, self.spec, self.kv_cache)

    @property
    def shared(self) -> bool:
        return isinstance(self.cache, SharedBufferCache)

    @property
    def prefill_chunk(self) -> int:
        """Context rows per prefill run; 0: one run (a concat graph may not be causal)."""
        return self.chunk if self.shared else 0

    @functools.cached_property
    def takes_image_groups(self) -> bool:
        return any(spec.name == "image_groups" for spec in getattr(self.decoder, "get_inputs", lambda: [])())

    @functools.cached_property
    def takes_num_logits(self) -> bool:
        optional = getattr(self.decoder, "get_overridable_initializers", lambda: [])()
        return any(spec.name == "num_logits" for spec in optional)

    @classmethod
    def from_artifact(cls, artifact: DraftArtifact) -> Drafter:
        return cls(artifact.decoder, artifact.manifest.decoder, artifact.embed, pacing=artifact.pacing)

    @property
    def generated(self) -> int:
        return len(self.fed)

    def prefill(self, context: DraftContext, reuse: bool = False) -> np.ndarray:
        """Run the context (replacing any earlier one) -> logits [V] after it. With ``reuse``
        (a conversation's next question), the rows the cache already holds with the same
        embedding, position and image group (the earlier context and generated tokens) are
        kept and only the rest runs; the last row always runs."""
        return self._prefill(context, (), last_only=True, reuse=self._reusable(context) if reuse else 0)[-1]

    def prefill_rows(self, context: DraftContext, generated: list[int] = ()) -> np.ndarray:
        """Run the context followed by ``generated`` tokens in one pass (replacing any
        earlier cache) -> logits [S + n, V], one row per context entry and token."""
        return self._prefill(context, generated, last_only=False)

    def _reusable(self, context: DraftContext) -> int:
        """How many leading rows of ``context`` the cache holds already (at most all but one)."""
        if self.context is None:
            return 0
        held = self.context
        fed_positions = np.arange(held.next_position, held.next_position + len(self.fed), dtype=np.int64)
        if self.position_axes:
            fed_positions = np.broadcast_to(fed_positions, (self.position_axes, len(self.fed)))
        rows = min(len(held) + len(self.fed), len(context) - 1)
        if rows <= 0 or context.positions.ndim != held.positions.ndim:
            return 0
        embeds = np.concatenate([held.embeds, self.embed(self.fed)]) if self.fed else held.embeds
        positions = np.concatenate([held.positions, fed_positions], axis=-1)
        groups = _groups(held, len(held) + len(self.fed))
        same = (embeds[:rows] == context.embeds[:rows]).all(axis=1) & \
            (positions[..., :rows] == context.positions[..., :rows]).reshape(-1, rows).all(axis=0) & \
            (groups[:rows] == _groups(context, len(context))[:rows])
        return int(np.argmin(same)) if not same.all() else rows

    def _prefill(self, context: DraftContext, generated, last_only: bool, reuse: int = 0) -> np.ndarray:
        if reuse:
            self.cache.truncate(reuse)
        else:
            self.cache.reset()
        self.context = None            # until every row has run: an interrupted prefill leaves nothing to reuse
        self.context_len = 0
        self.position_axes = context.positions.shape[0] if context.positions.ndim == 2 else 0
        self.next_position = context.next_position
        self.fed = []
        embeds, positions = context.embeds, context.positions
        groups = _groups(context, len(context))
        if len(generated):
            embeds = np.concatenate([embeds, self.embed(generated)])
            positions = np.concatenate([positions, self._positions(len(generated))], axis=-1)
            groups = np.concatenate([groups, np.zeros(len(generated), np.int64)])
        total = embeds.shape[0]
        step = self.prefill_chunk or total
        rows = []
        for start in range(reuse, total, step):
            stop = min(total, start + step)
            rows.append(self._run(embeds[start:stop], positions[..., start:stop], groups[start:stop],
                                  last_only=last_only, prefill=True))
        self.context_len, self.context = len(context), context
        self.fed = [int(t) for t in generated]
        return rows[-1] if last_only else np.concatenate(rows)

    def feed(self, tokens: list[int]) -> np.ndarray:
        """Append generated tokens (at positions ``generated``...). Returns logits [n, V]."""
        logits = self._run(self.embed(tokens), self._positions(len(tokens)))
        self.fed += [int(t) for t in tokens]
        return logits

    def extend_to(self, sequence: list[int]) -> np.ndarray:
        """Make the cache hold ``sequence`` (generated tokens) and return the logits [V]
        after its last token, reusing the longest cached prefix."""
        common = 0
        for cached, wanted in zip(self.fed, sequence):
            if cached != wanted:
                break
            common += 1
        keep = min(common, len(sequence) - 1)
        self.truncate(keep)
        return self.feed(sequence[keep:])[-1]

    def snapshot(self) -> DrafterState:
        return DrafterState(self.cache.snapshot(), tuple(self.fed),
                            (self.context_len, self.next_position, self.position_axes))

    def restore(self, state: DrafterState) -> None:
        self.cache.restore(state.cache)
        self.fed = list(state.fed)
        if state.context:
            self.context_len, self.next_position, self.position_axes = state.context

    def truncate(self, generated: int) -> None:
        """Forget the KV of generated tokens at positions >= ``generated``."""
        if generated > self.generated:
            raise ValueError(f"cannot keep {generated} generated tokens; the cache has {self.generated}")
        self.cache.truncate(self.context_len + generated)
        del self.fed[generated:]

    def _positions(self, count: int) -> np.ndarray:
        """Positions [n] (or [A, n]) of the next ``count`` generated tokens."""
        start = self.next_position + self.generated
        positions = np.arange(start, start + count, dtype=np.int64)
        return np.broadcast_to(positions, (self.position_axes, count)) if self.position_axes else positions

    def _run(self, embeds: np.ndarray, positions: np.ndarray, groups: np.ndarray | None = None,
             last_only: bool = False, prefill: bool = False) -> np.ndarray:
        """embeds [S, D], positions [S] or [A, S], image groups [S] (None: text) -> logits
        [S, V] (or [1, V] with ``last_only`` on a graph that takes ``num_logits``); the cache
        grows by S. ``prefill``: a run of the prefill (paced by rows), else a decode run."""
        feeds = {
            "inputs_embeds": np.ascontiguousarray(embeds[None], dtype=np.float32),
            "position_ids": np.ascontiguousarray(np.expand_dims(positions, -2), dtype=np.int64),  # [1, S] / [A, 1, S]
        }
        if self.takes_image_groups:
            groups = np.zeros(embeds.shape[0], np.int64) if groups is None else groups
            feeds["image_groups"] = np.ascontiguousarray(groups[None], dtype=np.int64)          # [1, S]
        rows_out = None
        if last_only and self.takes_num_logits:
            feeds["num_logits"], rows_out = np.array(1, np.int64), 1
        if not self.shared:
            feeds["attention_mask"] = np.ones((1, self.cache.rows + embeds.shape[0]), dtype=np.int64)
        with self.pacing.decoder(embeds.shape[0], prefill):
            return self.cache.run(feeds, rows_out)                              # [S, V] or [1, V]


def _groups(context: DraftContext, rows: int) -> np.ndarray:
    """Image groups [rows] of ``context``'s rows and the generated rows after it (text: 0)."""
    groups = np.zeros(rows, np.int64)
    if context.image_groups is not None:
        groups[:len(context)] = context.image_groups
    return groups
