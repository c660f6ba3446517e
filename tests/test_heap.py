"""Giving freed memory back (``protocol/heap.py``): a real release of freed heap pages, and
the edge's trimmer (``runtime_edge/heap.py``) at most once per interval."""

import sys

import numpy as np
import pytest

from covspec.protocol.heap import can_release, release_heap
from covspec.runtime_edge.heap import HeapTrimmer


def test_trims_at_most_once_per_interval():
    trimmer = HeapTrimmer(interval_s=10.0)
    start = trimmer.next_at
    trimmer.maybe_trim(start - 1.0)
    assert trimmer.trims == 0
    trimmer.maybe_trim(start)
    trimmer.maybe_trim(start + 5.0)
    assert trimmer.trims == 1 and trimmer.next_at == start + 10.0
    trimmer.maybe_trim(start + 10.0)
    assert trimmer.trims == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_release_returns_freed_heap_pages():
    """Many small blocks (below the mmap threshold: from the heap) freed all but the last
    one, which pins the heap's top: only malloc_trim gives the pages back."""
    if not can_release():
        pytest.skip("no glibc malloc_trim here")

    def rss_pages() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1])

    blocks = [np.ones(8 * 1024, np.uint8) for _ in range(20000)]        # 8 KiB each, about 160 MiB
    pinned = blocks[-1]
    del blocks
    before = rss_pages()
    release_heap()
    after = rss_pages()
    assert pinned.sum() == 8 * 1024
    assert before - after > (100 << 20) // 4096                         # more than 100 MiB returned
