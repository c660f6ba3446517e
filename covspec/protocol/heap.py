"""Give the heap's free pages back to the operating system (glibc's ``malloc_trim``).

A process that frees much memory keeps most of it mapped under glibc: freed blocks stay
for reuse, and the holes between live blocks are never returned, so resident memory
creeps up though nothing leaks. ``release_heap()`` returns every free page (inside the
heap too). Both runtimes use it: the device once onnxruntime has freed a parsed graph
file's buffers, the edge now and then between forwards. A no-op where the C library
has no ``malloc_trim`` (macOS, Android's bionic). Standard library only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):
        return None


def can_release() -> bool:
    """Whether ``release_heap`` does anything here."""
    return _malloc_trim() is not None


def release_heap() -> None:
    """Return the heap's free pages to the system, where the C library can."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
