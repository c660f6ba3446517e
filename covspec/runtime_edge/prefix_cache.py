"""The edge's prefix cache: the KV of recent contexts, reused by sessions that start the same way.

Many sessions ask about one picture: follow-up questions, or many devices looking at
the same scene. Their contexts share a start (the template, the image's tokens) whose
KV, vision tower included, is the same for all of them. ``PrefixCache`` keeps the KV of
recent contexts and lets a new session start from it.

The contract:

- An *entry* is the KV of one context (a copy of a session's cache right after its
  fresh prefill, nothing generated), keyed by the SHA-256 of the image's bytes and the
  context's token ids. The cache owns its entries; nothing else ever holds their tensors.
- ``prefill(target, context, image, committed)`` answers what
  ``TargetModel.prefill(context, committed)`` answers. A *hit* is an entry of the same
  image bytes whose token ids agree with the context's for at least the family's
  ``shortest_reused_prefix`` (every token whose KV depends on the image, or on a later
  token, lies inside the shared part). The session's cache then starts as a *copy* of
  the entry's shared positions (a session writes into its cache; entries are never
  shared mutable state) and only the rest of the context, and a reopen's committed
  tokens, run: one cached forward through ``TargetModel.prefill_after``, the machinery
  verification uses, so M-RoPE offsets, sliding windows and bidirectional image
  attention stay right. The context's last token always runs, so the first token comes
  from a forward. The logits equal a fresh prefill's up to float rounding (greedy
  answers equal; ``tests/test_prefix_cache.py``). A hit runs no vision tower: its
  output lives in the shared KV. The processor still runs (the token ids depend on the
  image's size and the question).
- A *miss* prefills fresh and stores a copy of the context's KV as a new entry; a hit
  stores nothing (the entry it used serves the image's later sessions as well).
- The same two steps serve a prefill in pieces (``prefill.py``, the model thread's):
  ``start`` looks the context up (a hit's prefix, or a miss's key), ``store`` keeps a
  miss's KV once the context is prefilled.
- Never reused, prefilled fresh and not counted: everything while the cache is off
  (``max_bytes`` 0), a pruned target's context (``keep``: its KV depends on the kept
  set), a family whose ``shortest_reused_prefix`` is None.
- Bounded by ``max_bytes`` of entry buffers: the least recently used entries (a hit
  uses one) are evicted; an entry larger than the bound is not stored.
- ``hits``, ``misses``, ``evictions`` count since start; ``nbytes`` is what the entries
  hold now (the edge's ``pong`` reports them).

One thread only (the edge's model thread).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np

from covspec.runtime_edge.kv import SessionKV
from covspec.runtime_edge.target import Context, TargetCache, TargetModel


class PrefixCache:
    """Recent contexts' KV, at most ``max_bytes`` of it (0: off)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: collections.OrderedDict[tuple[bytes, tuple[int, ...]], SessionKV] = collections.OrderedDict()
        self.hits = self.misses = self.evictions = self.nbytes = 0

    def prefill(self, target: TargetModel, context: Context, image: bytes,
                committed: Sequence[int] = ()) -> tuple[TargetCache, np.ndarray, int]:
        """(cache, logits [V], reused): ``target.prefill(context, committed)``'s answer, starting
        from a cached prefix where one fits; ``reused`` counts the context tokens taken from it.
        (The edge's model thread runs the same steps in pieces: ``prefill.py``.)"""
        prefix, shared, key = self.start(target, context, image)
        ids = context.inputs["input_ids"][0].tolist()
        if prefix is not None:
            rest = ids[shared:] + [int(t) for t in committed]
            return *target.prefill_after(context, prefix.copy(shared, capacity=shared + len(rest)), rest), shared
        cache, logits = target.prefill(context, committed)
        if key is not None:
            self.store(key, cache.kv)
        return cache, logits, 0

    def start(self, target: TargetModel, context: Context, image: bytes) -> tuple[SessionKV | None, int, tuple | None]:
        """Look ``context`` up -> (prefix, shared, key). A hit: ``prefix`` is the entry whose first
        ``shared`` tokens the context continues (never handed out: continue a ``copy``), ``key``
        None. A miss: prefix None, shared 0, and ``key`` the entry to ``store`` once the context
        is prefilled, or None when it is never cached (the module's contract)."""
        floor = None if self.max_bytes == 0 or context.keep is not None else \
            target.family.shortest_reused_prefix(context)
        if floor is None:
            return None, 0, None
        digest = hashlib.sha256(image).digest()
        ids = tuple(int(i) for i in context.inputs["input_ids"][0].tolist())
        key, shared = self._longest(digest, ids)
        shared = min(shared, len(ids) - 1)                 # the last context token runs: its logits are needed
        if key is not None and shared >= floor:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key], shared, None
        self.misses += 1
        return None, 0, (digest, ids)

    def store(self, key: tuple[bytes, tuple[int, ...]], kv: SessionKV) -> None:
        """Keep a copy of the context's KV (the first ``len(key[1])`` positions of ``kv``)."""
        self._store(key, kv.copy(len(key[1])))

    def _longest(self, digest: bytes, ids: tuple[int, ...]) -> tuple[tuple | None, int]:
        """The entry of this image sharing the longest start with ``ids``, and how many ids it shares."""
        best, shared = None, 0
        for key in self.entries:
            if key[0] == digest:
                length = common_length(key[1], ids)
                if best is None or length > shared:
                    best, shared = key, length
        return best, shared

    def _store(self, key: tuple[bytes, tuple[int, ...]], kv: SessionKV) -> None:
        if kv.nbytes > self.max_bytes or key in self.entries:
            return
        self.entries[key] = kv
        self.nbytes += kv.nbytes
        while self.nbytes > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
            self.evictions += 1


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n
