"""Session KV caches the edge can batch and roll back.

``SessionKV`` is one session's cache: per layer, a key and a value buffer
[heads, capacity, head_dim] of which the first ``length`` positions are live. It grows
by doubling, and rolling back is only a smaller ``length`` (the positions past it are
overwritten by the next forward). ``copy(length)`` is a new cache holding a copy of the
first ``length`` positions (no tensor shared), ``nbytes`` what its buffers take.

A batched forward reads and extends these buffers in place (``attention.py``): per
step only the new tokens are written; nothing of the past is copied.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SessionKV:
    """One session's KV cache; build it with ``SessionKV.from_cache`` after a prefill."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int):
        self.keys, self.values, self.length = keys, values, length       # per layer [H, capacity, D]
        self.limit = 0            # the most positions the session can need (0: unknown); growth stops there

    @classmethod
    def from_cache(cls, cache: Cache, row: int = 0) -> "SessionKV":
        """Copy row ``row`` of a prefilled transformers cache (every layer [B, H, L, D])."""
        keys, values = [], []
        for layer in cache.layers:
            if not layer.is_initialized or layer.keys is None or layer.keys.shape[0] <= row:
                raise ValueError("the prefilled cache has a layer without keys for every row; this model's cache "
                                 "layout (KV sharing, linear attention) is not supported by the edge")
            keys.append(layer.keys[row].clone())
            values.append(layer.values[row].clone())
        return cls(keys, values, int(keys[0].shape[1]))

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the key and value buffers (their whole capacity, live or not)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def copy(self, length: int, capacity: int = 0) -> "SessionKV":
        """A new cache of the first ``length`` positions (at most the live ones), with buffers of
        its own, room for ``capacity`` positions (at least ``length``)."""
        length = min(length, self.length)
        capacity = max(capacity, length)
        return SessionKV([_moved(k, length, capacity) for k in self.keys],
                         [_moved(v, length, capacity) for v in self.values], length)

    def reserve(self, positions: int) -> None:
        """Make room for ``positions`` positions in all (the live ones are kept)."""
        if positions <= self.capacity:
            return
        capacity = max(positions, 2 * self.capacity)
        if self.limit:
            capacity = max(positions, min(capacity, self.limit))     # doubling never passes what it can need
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                store[i] = _moved(old, self.length, capacity)

    def rollback(self, length: int) -> None:
        """Keep only the first ``length`` positions (no-op if it holds no more)."""
        self.length = min(self.length, length)


def _moved(buffer: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    """A new buffer [H, capacity, D] holding the first ``length`` positions of ``buffer``."""
    moved = buffer.new_empty((buffer.shape[0], capacity, buffer.shape[2]))
    moved[:, :length] = buffer[:, :length]
    return moved
