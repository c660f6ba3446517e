"""The device process's memory: what it holds now, its peak, and giving freed memory back.

- ``rss_mb``: resident memory now (``/proc/self/statm``), MiB;
- ``peak_rss_mb``: the process's peak resident memory (``VmHWM``; ``ru_maxrss`` where
  ``/proc`` has none, which on Linux carries a parent's high-water mark over fork and
  exec), MiB;
- ``release_heap``: return the heap's free pages to the system (glibc's
  ``malloc_trim``). onnxruntime parses a graph file into buffers it frees once the
  session is built, and frees a closed session's weights, but glibc keeps most of
  those pages mapped: at 0.5B int4 that is about 160 MB per opened decoder. A no-op
  where the C library has no ``malloc_trim`` (macOS, Android's bionic).

Standard library only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys


def rss_mb() -> float:
    """Resident memory of this process now, MiB (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
    except OSError:
        return 0.0
    return pages * resource.getpagesize() / 2 ** 20


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MiB."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024    # bytes on macOS, KiB elsewhere


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):
        return None


def release_heap() -> None:
    """Give the heap's free pages back to the system, where the C library can."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
