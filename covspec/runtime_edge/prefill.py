"""A session's prefill in pieces, so that it can share forwards with other sessions' work.

``Prefill.plan`` decides how a context (and a reopen's committed tokens) gets into a new
session's cache, in at most two kinds of piece:

- the *head*: the context's first ``head`` tokens with the image, one forward of the
  model's own (``TargetModel.prefill_heads``; heads of equal shapes share it). It ends
  at the family's ``shortest_reused_prefix`` (every token whose KV depends on the image
  or on a later token), or covers the whole context where there is none (a pruned
  target, a family without the hook) or where the rest of the context is short (at most
  one chunk: then one forward does it all, as a whole prefill). A session that continues a cached prefix (the
  edge's ``PrefixCache``, or any other given prefix KV) has no head;
- the *rest*: the context's remaining ids, then the committed tokens, run as cached
  extensions like a verify round (``TargetModel.extend_batch``), in ``take``-sized chunks
  that join the batched forward of other sessions' rounds.

The logits after the last piece equal one ``TargetModel.prefill(context, committed)``'s
up to float rounding, whatever the cut (``tests/test_chunked_prefill.py``): the head
runs what a full prefill runs for its tokens, and a chunk is a cached extension with
true positions (M-RoPE offsets from ``next_position``; sliding windows from the masks).
Once done, a miss of the prefix cache stores the context's KV (``PrefixCache.store``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from covspec.runtime_edge.kv import SessionKV
from covspec.runtime_edge.prefix_cache import PrefixCache
from covspec.runtime_edge.target import Context, TargetCache, TargetModel


@dataclass
class Prefill:
    """One session's prefill under way: ``head`` context tokens still to run with the image
    (0: ran, or none), then ``rest`` ids as cached chunks; ``cache`` once the head ran (or
    from the start, over a given prefix), ``logits`` [V] after the last input so far."""

    context: Context
    head: int
    rest: list[int]
    cache: TargetCache | None = None
    logits: np.ndarray | None = None
    store: tuple | None = None                # the prefix cache's key for the context's KV, on a miss
    prefix_cache: PrefixCache | None = None
    reused: int = 0                           # context tokens taken from a cached prefix
    limit: int = 0                            # the most positions the cache will need (0: unknown)

    @classmethod
    def plan(cls, target: TargetModel, context: Context, committed: Sequence[int], *,
             prefix_cache: PrefixCache | None = None, image: bytes = b"",
             prefix: SessionKV | None = None, limit: int = 0, chunk: int = 0) -> "Prefill":
        """How ``context`` + ``committed`` gets prefilled: after ``prefix`` (the KV of the
        context's first ``prefix.length`` tokens, taken over) when given, else after the
        longest prefix ``prefix_cache`` holds for ``image``, else head and rest; a head whose
        context goes on for at most ``chunk`` more tokens takes them too (a short prompt
        prefills in one forward). ``limit`` bounds the cache's growth (``TargetModel.bound``)."""
        ids = [int(i) for i in context.inputs["input_ids"][0].tolist()] if context.keep is None else []
        committed = [int(t) for t in committed]
        key = None
        if prefix is None and prefix_cache is not None:
            found, shared, key = prefix_cache.start(target, context, image)
            if found is not None:
                prefix = found.copy(shared, capacity=len(ids) + len(committed))
        if prefix is not None:
            return cls(context, 0, ids[prefix.length:] + committed, target.continuing(context, prefix),
                       reused=prefix.length, limit=limit)
        floor = target.family.shortest_reused_prefix(context) if context.keep is None else None
        head = context.length if floor is None or context.length - floor <= chunk else floor
        return cls(context, head, ids[head:] + committed, store=key, prefix_cache=prefix_cache, limit=limit)

    @property
    def done(self) -> bool:
        return self.head == 0 and not self.rest

    def take(self, count: int) -> list[int]:
        """The next chunk (at most ``count`` ids of the rest), for the batched forward."""
        assert self.head == 0 and self.rest, "a chunk before the head, or after the end"
        return self.rest[:count]

    def advance(self, count: int, logits: np.ndarray) -> None:
        """``count`` ids of the rest ran (the cache holds them); ``logits`` [V] after the last."""
        del self.rest[:count]
        self.logits = logits
        self._stored()

    def _stored(self) -> None:
        if self.done and self.store is not None and self.prefix_cache is not None:
            self.prefix_cache.store(self.store, self.cache.kv)
            self.store = None


def run_heads(target: TargetModel, prefills: Sequence[Prefill], max_batch: int) -> int:
    """Run the heads of ``prefills``: those of equal shapes (``TargetModel.head_shape``) share a forward,
    at most ``max_batch`` in one. Each cache gets room for the rest. -> how many forwards ran."""
    groups: dict[object, list[Prefill]] = defaultdict(list)
    for at, prefill in enumerate(prefills):
        if not prefill.head:
            continue
        shape = target.head_shape(prefill.context, prefill.head)
        groups[at if shape is None else shape].append(prefill)
    forwards = 0
    for group in groups.values():
        for first in range(0, len(group), max_batch):
            forwards += 1
            part = group[first:first + max_batch]
            for prefill, (cache, logits) in zip(part, target.prefill_heads([p.context for p in part],
                                                                             [p.head for p in part])):
                target.bound(cache, prefill.limit)
                cache.kv.reserve(cache.kv.length + len(prefill.rest))
                prefill.cache, prefill.logits, prefill.head = cache, logits, 0
                prefill._stored()
    return forwards
