"""The edge's heap trimmer (``runtime_edge/heap.py``): glibc's ``malloc_trim``, at most once
per interval, and a real release of freed memory."""

import sys

import numpy as np
import pytest

from covspec.runtime_edge.heap import HeapTrimmer


def test_trims_at_most_once_per_interval():
    trimmer = HeapTrimmer(interval_s=10.0)
    if trimmer.trim is None:
        pytest.skip("no glibc malloc_trim here")
    start = trimmer.next_at
    trimmer.maybe_trim(start - 1.0)
    assert trimmer.trims == 0
    trimmer.maybe_trim(start)
    trimmer.maybe_trim(start + 5.0)
    assert trimmer.trims == 1 and trimmer.next_at == start + 10.0
    trimmer.maybe_trim(start + 10.0)
    assert trimmer.trims == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_a_trim_returns_freed_heap_pages():
    """Many small blocks (below the mmap threshold: from the heap) freed all but the last
    one, which pins the heap's top: only malloc_trim gives the pages back."""
    trimmer = HeapTrimmer()
    if trimmer.trim is None:
        pytest.skip("no glibc malloc_trim here")

    def rss_pages() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1])

    blocks = [np.ones(8 * 1024, np.uint8) for _ in range(20000)]        # 8 KiB each, about 160 MiB
    pinned = blocks[-1]
    del blocks
    before = rss_pages()
    trimmer.trim(0)
    after = rss_pages()
    assert pinned.sum() == 8 * 1024
    assert before - after > (100 << 20) // 4096                         # more than 100 MiB returned
