"""The resident memory of a process a bench watches (an edge child): ``RssSampler``."""

from __future__ import annotations

import threading


class RssSampler(threading.Thread):
    """Resident memory of process ``pid`` every ``every_s``: ``before``, ``peak``, ``after``
    (bytes); ``died`` when the process ended (or became a zombie) while watched."""

    def __init__(self, pid: int, every_s: float = 0.1):
        import psutil

        super().__init__(name="rss", daemon=True)
        self.process = psutil.Process(pid)
        self.every_s = every_s
        self.before = self.peak = self.after = self.process.memory_info().rss
        self.died = False
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            self._sample()

    def _sample(self) -> None:
        import psutil

        try:
            if self.process.status() == psutil.STATUS_ZOMBIE:
                raise psutil.NoSuchProcess(self.process.pid)
            self.after = self.process.memory_info().rss
            self.peak = max(self.peak, self.after)
        except psutil.NoSuchProcess:
            self.died = True
            self._halt.set()

    def finish(self) -> dict:
        """Stop watching; the figures in MiB."""
        self._halt.set()
        self.join()
        if not self.died:
            self._sample()
        mib = 1024 * 1024
        return {"rss_before_mib": round(self.before / mib, 1), "rss_peak_mib": round(self.peak / mib, 1),
                "rss_after_mib": round(self.after / mib, 1), "died": self.died}
