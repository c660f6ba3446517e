"""Give freed heap memory back to the operating system now and then (glibc only).

A long-running edge allocates and frees tensors of many sizes: KV buffers that grow and
go with their sessions, and each forward's activations. glibc keeps freed blocks for
reuse and raises its mmap threshold after large frees, so later large blocks come from
the heap too; the holes between live blocks are never returned, and the process's
resident memory creeps up though nothing leaks. ``HeapTrimmer.maybe_trim()`` calls
``malloc_trim(0)`` (which releases every free page, also inside the heap) at most once
per ``interval_s``; the model thread calls it between iterations. Where the C library
is not glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

TRIM_INTERVAL_S = 10.0


def _malloc_trim():
    """glibc's ``malloc_trim``, or None where there is none."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):
        return None


class HeapTrimmer:
    def __init__(self, interval_s: float = TRIM_INTERVAL_S):
        self.interval_s = interval_s
        self.trim = _malloc_trim()
        self.next_at = time.monotonic() + interval_s
        self.trims = 0

    def maybe_trim(self, now: float) -> None:
        """Trim if ``interval_s`` passed since the last time (``now``: ``time.monotonic()``)."""
        if self.trim is None or now < self.next_at:
            return
        self.trim(0)
        self.trims += 1
        self.next_at = now + self.interval_s
