"""Timing of the device benches (standard library and numpy: the probes run torch-free).

- ``timed_s(fn)``: seconds one call of ``fn`` takes;
- ``median_step_ms(step, count)``: the median milliseconds of ``count`` calls of
  ``step`` after ``WARMUP`` untimed ones: how every runtime's per-token decode is
  measured (covspec's ``Drafter``, onnxruntime-genai, llama.cpp), so they compare alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

WARMUP = 2


def timed_s(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def median_step_ms(step: Callable[[], object], count: int) -> float:
    for _ in range(WARMUP):
        step()
    return float(np.median([timed_s(step) for _ in range(count)]) * 1000)
