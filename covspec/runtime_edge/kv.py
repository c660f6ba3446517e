"""Session KV caches the edge can batch and roll back.

``SessionKV`` is one session's cache: per layer, a key and a value buffer
[heads, capacity, head_dim] of which the first ``length`` positions are live. It grows
by doubling, and rolling back is only a smaller ``length`` (the positions past it are
overwritten by the next forward). ``copy(length)`` is a new cache holding a copy of the
first ``length`` positions (no tensor shared), ``nbytes`` what its buffers take.

``forward_cache(sessions, query_len)`` builds, for one target forward over B sessions
with ragged contexts, a transformers ``Cache`` whose layer l holds
[B, heads, L + query_len, head_dim] with session b's past *left-padded* into positions
[L - length_b, L) (L: the longest past) and the new tokens written at [L, L + query_len)
by the model. Left padding keeps the distance between a query and each key equal to
their distance in the session (so sliding-window masks stay right); the caller masks
the padding out (``attention_mask``) and passes every row's true ``position_ids``.
With one session the session's own buffers are used in place: no copy at all; with
several, every session's live past is copied into the batch's buffers once per forward.
``keep_new(sessions, cache, kept)`` then appends the first ``kept[b]`` new positions of
row b to session b (padded queries beyond ``kept[b]`` are dropped).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer


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


class _ForwardLayer(DynamicLayer):
    """One layer of a forward's cache: ``keys``/``values`` [B, H, past + query, D] already
    hold the past; ``update`` writes the new positions after it and returns the whole."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, past: int):
        super().__init__()
        self.keys, self.values, self.past = keys, values, past
        self.is_initialized = True
        self.device = keys.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        query = key_states.shape[-2]
        self.keys[:, :, self.past:self.past + query] = key_states
        self.values[:, :, self.past:self.past + query] = value_states
        return self.keys[:, :, :self.past + query], self.values[:, :, :self.past + query]

    def get_seq_length(self) -> int:
        return self.past

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.past + query_length, 0


def forward_cache(sessions: Sequence[SessionKV], query_len: int) -> tuple[Cache, int]:
    """The cache for one forward of ``query_len`` tokens per row -> (cache, L), L the
    longest past (row b's past sits at [L - length_b, L))."""
    past = max(s.length for s in sessions)
    if len(sessions) == 1:
        only = sessions[0]
        only.reserve(past + query_len)
        layers = [_ForwardLayer(k[None], v[None], past) for k, v in zip(only.keys, only.values)]
        return Cache(layers=layers), past
    layers = []
    for layer in range(len(sessions[0].keys)):
        first = sessions[0].keys[layer]                                              # [H, cap, D]
        shape = (len(sessions), first.shape[0], past + query_len, first.shape[2])
        keys, values = first.new_zeros(shape), first.new_zeros(shape)               # [B, H, L + Q, D]
        for row, session in enumerate(sessions):
            keys[row, :, past - session.length:past] = session.keys[layer][:, :session.length]
            values[row, :, past - session.length:past] = session.values[layer][:, :session.length]
        layers.append(_ForwardLayer(keys, values, past))
    return Cache(layers=layers), past


def keep_new(sessions: Sequence[SessionKV], cache: Cache, past: int, kept: Sequence[int]) -> None:
    """Append row b's first ``kept[b]`` new positions of ``cache`` to ``sessions[b]``."""
    if len(sessions) == 1:                   # written in place by the forward
        sessions[0].length += kept[0]
        return
    for row, (session, count) in enumerate(zip(sessions, kept)):
        session.reserve(session.length + count)
        for store, layers in ((session.keys, [l.keys for l in cache.layers]),
                              (session.values, [l.values for l in cache.layers])):
            for layer, batch in zip(store, layers):
                layer[:, session.length:session.length + count] = batch[row, :, past:past + count]
        session.length += count
