"""Run the edge server in a child process (for the demo, the benchmarks and end-to-end tests).

    from covspec.runtime_edge import EdgeProcess, ServerConfig

    with EdgeProcess("covspec/toy/models/target", ServerConfig(bind="tcp://127.0.0.1:*")) as edge:
        edge.address    # the bound endpoint, read from the child's ready line

``start()`` launches ``python -m covspec.runtime_edge MODEL_DIR`` with ``serve_args(config)``
(the edge runtime's own entry point, the serving loop of ``covspec edge serve``) and returns once it prints its ready line (or raises
``RuntimeError`` with the child's output); ``stop()`` sends SIGTERM, waits for the
clean shutdown and kills the child only if it hangs. The child's log goes to
``log_path`` if given, else to this process's stderr.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from pathlib import Path

from covspec.runtime_edge.config import ServerConfig, serve_args
from covspec.runtime_edge.serve import READY_PREFIX

__all__ = ["READY_PREFIX", "EdgeProcess"]


class EdgeProcess:
    """The edge server as a child process; ``address`` once started."""

    def __init__(self, model_dir: str | Path, config: ServerConfig = ServerConfig(), *,
                 startup_timeout: float = 120.0, log_path: str | Path | None = None):
        self.model_dir = model_dir
        self.config = config.validate()
        self.startup_timeout = startup_timeout
        self.log_path = log_path
        self.address: str | None = None
        self._child: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()

    def start(self) -> "EdgeProcess":
        log = open(self.log_path, "ab") if self.log_path else None
        self._child = subprocess.Popen([sys.executable, "-m", "covspec.runtime_edge", str(self.model_dir),
                                        *serve_args(self.config)],
                                       stdout=subprocess.PIPE, stderr=log, text=True)
        if log is not None:
            log.close()
        threading.Thread(target=self._read, daemon=True).start()
        seen = []
        while True:
            try:
                line = self._lines.get(timeout=self.startup_timeout)
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"the edge did not start within {self.startup_timeout:g} s") from None
            if line is None:
                code = self._child.wait()
                raise RuntimeError(f"the edge exited with status {code} before serving: {''.join(seen)}")
            seen.append(line)
            if line.startswith(READY_PREFIX):
                self.address = line[len(READY_PREFIX):].strip()
                return self

    def _read(self) -> None:
        for line in self._child.stdout:
            self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int | None:
        """The child's process id once started (e.g. to pin it to a core)."""
        return None if self._child is None else self._child.pid

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait for the clean shutdown (kill after ``timeout``); the exit status."""
        if self._child is None:
            return None
        if self._child.poll() is None:
            self._child.terminate()
            try:
                self._child.wait(timeout)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
        return self._child.returncode

    def __enter__(self) -> "EdgeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
