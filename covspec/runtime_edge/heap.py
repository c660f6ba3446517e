"""The edge's heap, trimmed now and then: a flat resident size over long runs.

A long-running edge allocates and frees tensors of many sizes (KV buffers that grow and
go with their sessions, each forward's activations). glibc keeps what they free, so the
process's resident memory creeps up though nothing leaks. ``HeapTrimmer.maybe_trim(now)``
gives the free pages back (``covspec.protocol.heap.release_heap``) at most once per
``interval_s``; the model thread calls it between iterations.
"""

from __future__ import annotations

import time

from covspec.protocol.heap import release_heap

TRIM_INTERVAL_S = 10.0


class HeapTrimmer:
    def __init__(self, interval_s: float = TRIM_INTERVAL_S):
        self.interval_s = interval_s
        self.next_at = time.monotonic() + interval_s
        self.trims = 0

    def maybe_trim(self, now: float) -> None:
        """Trim if ``interval_s`` passed since the last time (``now``: ``time.monotonic()``)."""
        if now < self.next_at:
            return
        release_heap()
        self.trims += 1
        self.next_at = now + self.interval_s
