"""Padding real calls to the regime's times; overruns counted, never hidden.

``Pacer.pad(seconds)`` is a context manager around one real call: when the call took
less than ``seconds`` it sleeps the rest, so the call takes the emulated time (plus the
sleep's wake-up latency, well under a millisecond); when it took more, it adds nothing
and counts an overrun (the real compute exceeded what the named hardware would take).
Padding only ever adds time. Counters are thread-safe (the device prefills its draft
in a thread) and cumulative; ``counts()`` reads them. ``interrupt()`` ends the padding
under way at once and pads nothing until ``resume()``: a generation whose answer is
complete does not wait for its draft's emulated work.

``DevicePacing`` and ``EdgePacing`` bind a pacer to a profile and the call shapes of
each side (``roofline``). ``NO_PACING`` has the same methods and pads nothing: the toy
regime, the default.
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext

from covspec.regime import roofline
from covspec.regime.profiles import DeviceProfile, TargetProfile


class Pacer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.overruns = 0
        self.overrun_s = 0.0      # real time beyond the emulated time, summed over overruns
        self.padded_s = 0.0       # time added by padding
        self._interrupted = threading.Event()

    @contextmanager
    def pad(self, seconds: float):
        began = time.perf_counter()
        yield
        spent = time.perf_counter() - began
        with self._lock:
            self.calls += 1
            if spent > seconds:
                self.overruns += 1
                self.overrun_s += spent - seconds
            else:
                self.padded_s += seconds - spent
        if spent < seconds:
            self._interrupted.wait(seconds - spent)

    def interrupt(self) -> None:
        self._interrupted.set()

    def resume(self) -> None:
        self._interrupted.clear()

    def counts(self) -> dict:
        with self._lock:
            return {"calls": self.calls, "overruns": self.overruns, "overrun_ms": round(self.overrun_s * 1000, 1),
                    "padded_ms": round(self.padded_s * 1000, 1)}


class DevicePacing:
    """The draft's runs padded to the device profile."""

    def __init__(self, profile: DeviceProfile):
        self.profile, self.pacer = profile, Pacer()

    def vision(self, frames: int) -> AbstractContextManager:
        return self.pacer.pad(roofline.vision_s(self.profile, frames))

    def decoder(self, rows: int, prefill: bool) -> AbstractContextManager:
        return self.pacer.pad(roofline.decoder_s(self.profile, rows, prefill))


class EdgePacing:
    """The target's forwards padded to the target profile's roofline."""

    def __init__(self, profile: TargetProfile):
        self.profile, self.pacer = profile, Pacer()

    def prefill(self, tokens: int, images: int = 1) -> AbstractContextManager:
        return self.pacer.pad(roofline.prefill_s(self.profile, tokens, images))

    def forward(self, past: list[int], new: list[int]) -> AbstractContextManager:
        return self.pacer.pad(roofline.forward_s(self.profile, past, new))


class _NoPacing:
    """Pads nothing and counts nothing: the toy regime."""

    pacer = Pacer()

    def vision(self, frames: int) -> AbstractContextManager:
        return nullcontext()

    def decoder(self, rows: int, prefill: bool) -> AbstractContextManager:
        return nullcontext()

    def prefill(self, tokens: int, images: int = 1) -> AbstractContextManager:
        return nullcontext()

    def forward(self, past: list[int], new: list[int]) -> AbstractContextManager:
        return nullcontext()


NO_PACING = _NoPacing()
