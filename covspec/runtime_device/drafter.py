"""The draft decoder over onnxruntime with a numpy KV cache.

The cache holds the draft's context (prompt with its kept visual tokens) followed by
generated tokens. Positions of generated tokens continue from the *full* context
length (as if no visual token was pruned), so the draft sees the same position ids
as the target would. Everything after the context is addressed by generated
position (0 = first generated token), the protocol's unit: ``truncate(m)`` keeps the
KV of the first ``m`` generated tokens. The drafter remembers which tokens it fed
(``fed``), so ``extend_to(sequence)`` reuses the longest valid prefix of its cache
and feeds only the rest. ``snapshot``/``restore`` fork the cache for branches:
onnxruntime returns fresh arrays and truncation only slices, so a snapshot is a
list of references, not a copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from covspec.runtime_device.artifact import DraftArtifact


@dataclass(frozen=True)
class DrafterState:
    """A fork point: the cache arrays and the generated tokens they hold."""

    cache: tuple
    fed: tuple


class Drafter:
    def __init__(self, artifact: DraftArtifact):
        self.artifact = artifact
        spec = artifact.manifest.decoder
        self.past_names: list[str] = spec["past_input_names"]
        self.present_names: list[str] = spec["present_output_names"]
        self.kv_shape = (1, spec["num_kv_heads"], 0, spec["head_dim"])
        self.cache: list[np.ndarray] = []
        self.context_len = 0           # cache entries of the context
        self.full_context_len = 0      # context length had no visual token been pruned
        self.fed: list[int] = []       # generated tokens whose KV is in the cache
        self.step_seconds: list[float] = []

    @property
    def generated(self) -> int:
        return len(self.fed)

    def prefill(self, embeds: np.ndarray, positions: np.ndarray, full_context_len: int) -> np.ndarray:
        """Run the context. embeds: [S, D], positions: [S] -> logits [V] after the context."""
        self.cache = [np.zeros(self.kv_shape, np.float32) for _ in self.past_names]
        self.context_len = 0
        logits = self._run(embeds, positions)
        self.context_len = embeds.shape[0]
        self.full_context_len = full_context_len
        self.fed = []
        return logits[-1]

    def feed(self, tokens: list[int]) -> np.ndarray:
        """Append generated tokens (at positions ``generated``...). Returns logits [n, V]."""
        start = self.full_context_len + self.generated
        positions = np.arange(start, start + len(tokens), dtype=np.int64)
        logits = self._run(self.artifact.embed(tokens), positions)
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
        return DrafterState(tuple(self.cache), tuple(self.fed))

    def restore(self, state: DrafterState) -> None:
        self.cache = list(state.cache)
        self.fed = list(state.fed)

    def truncate(self, generated: int) -> None:
        """Forget the KV of generated tokens at positions >= ``generated``."""
        if generated > self.generated:
            raise ValueError(f"cannot keep {generated} generated tokens; the cache has {self.generated}")
        keep = self.context_len + generated
        self.cache = [kv[:, :, :keep] for kv in self.cache]
        del self.fed[generated:]

    def _run(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        past_len = self.cache[0].shape[2]
        feeds = {
            "inputs_embeds": np.ascontiguousarray(embeds[None], dtype=np.float32),
            "attention_mask": np.ones((1, past_len + embeds.shape[0]), dtype=np.int64),
            "position_ids": np.asarray(positions, dtype=np.int64)[None],
        }
        for name, kv in zip(self.past_names, self.cache):
            feeds[name] = np.ascontiguousarray(kv)
        began = time.perf_counter()
        outputs = self.artifact.decoder.run(["logits"] + self.present_names, feeds)
        self.step_seconds.append(time.perf_counter() - began)
        self.cache = outputs[1:]
        return outputs[0][0]                                                   # [S, V]
