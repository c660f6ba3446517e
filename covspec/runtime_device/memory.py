"""The device process's memory: what it holds now, its peak, and giving freed memory back.

- ``rss_mb``: resident memory now (``/proc/self/statm``), MiB;
- ``peak_rss_mb``: the process's peak resident memory (``VmHWM``; ``ru_maxrss`` where
  ``/proc`` has none, which on Linux carries a parent's high-water mark over fork and
  exec), MiB;

Giving freed memory back is ``covspec.protocol.heap.release_heap``: onnxruntime parses a
graph file into buffers it frees once the session is built, and frees a closed
session's weights, but glibc keeps most of those pages mapped (at 0.5B int4 about
160 MB per opened decoder).

Standard library only.
"""

from __future__ import annotations

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
