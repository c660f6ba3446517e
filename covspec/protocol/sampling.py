"""The user's sampling settings, defined once for device, messages and edge.

``SamplingParams`` is what decides the target distribution p at every position:
``temperature`` 0 means greedy (argmax, no randomness), otherwise it lies in
[``MIN_TEMPERATURE``, ``MAX_TEMPERATURE``] (beyond, logits / temperature overflows
or p is uniform: meaningless); ``top_k`` 0 and ``top_p`` 1.0 mean no truncation. ``problems()`` lists what is wrong in one sentence each, so
the device (``ValueError``), the wire (``ProtocolError``) and the edge all refuse the
same values with the same words. Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from covspec.protocol.verification import target_probs

MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e3


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def problems(self) -> list[str]:
        """One sentence per unusable value (empty when usable)."""
        found = []
        if not (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            found.append(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
        if not self.top_k >= 0:
            found.append("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            found.append("top_p must be in (0, 1]")
        return found

    def check(self) -> "SamplingParams":
        """Self if usable, else ``ValueError`` naming the first problem."""
        found = self.problems()
        if found:
            raise ValueError(found[0])
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def p(self, logits: np.ndarray) -> np.ndarray:
        """Target distribution(s) from logits [..., V] (sampling mode only)."""
        return target_probs(logits, self.temperature, self.top_k, self.top_p)
