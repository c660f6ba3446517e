"""Network link emulation between device and edge, as a ZeroMQ forwarder.

Devices connect (DEALER) to the link's ROUTER at ``listen``; for each device the
link opens its own DEALER to the edge at ``upstream``, so the edge sees one peer per
device, as without the link. Each message is delayed, in order and per direction,
by its transmission time (bytes over bandwidth, queued behind earlier messages in
the same direction) plus half the round-trip time. Works on any machine; loopback
adds nothing.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass

import zmq


@dataclass(frozen=True)
class LinkProfile:
    """A link: round-trip time in milliseconds and bandwidth in Mbit/s (0 = unlimited)."""

    name: str
    rtt_ms: float
    bandwidth_mbps: float

    def one_way_s(self, size_bytes: int) -> float:
        """Propagation delay plus transmission time of one message, in seconds."""
        return self.rtt_ms / 2000 + self.transmit_s(size_bytes)

    def transmit_s(self, size_bytes: int) -> float:
        return size_bytes * 8 / (self.bandwidth_mbps * 1e6) if self.bandwidth_mbps > 0 else 0.0


PROFILES = {p.name: p for p in (
    LinkProfile("loopback", 0.0, 0.0),
    LinkProfile("lan", 1.0, 1000.0),
    LinkProfile("wifi", 10.0, 100.0),
    LinkProfile("5g", 25.0, 50.0),
    LinkProfile("4g", 60.0, 10.0),
)}


def profile_named(name: str, rtt_ms: float | None = None, bandwidth_mbps: float | None = None) -> LinkProfile:
    """A named profile, or ``custom`` built from ``rtt_ms`` and ``bandwidth_mbps``."""
    if name == "custom":
        if rtt_ms is None or bandwidth_mbps is None:
            raise ValueError("a custom link needs both rtt_ms and bandwidth_mbps")
        return LinkProfile("custom", float(rtt_ms), float(bandwidth_mbps))
    if name not in PROFILES:
        raise ValueError(f"unknown link profile {name!r}; choose one of {', '.join(PROFILES)} or custom")
    return PROFILES[name]


class _Direction:
    """One direction of the link: a queue of messages with their delivery times."""

    def __init__(self, profile: LinkProfile):
        self.profile = profile
        self.busy_until = 0.0
        self.queue: list[tuple[float, int, object, list[bytes]]] = []
        self.order = itertools.count()

    def push(self, now: float, peer: object, frames: list[bytes]) -> None:
        size = sum(len(f) for f in frames)
        sent = max(now, self.busy_until) + self.profile.transmit_s(size)
        self.busy_until = sent
        heapq.heappush(self.queue, (sent + self.profile.rtt_ms / 2000, next(self.order), peer, frames))

    def due(self, now: float):
        while self.queue and self.queue[0][0] <= now:
            _, _, peer, frames = heapq.heappop(self.queue)
            yield peer, frames

    def next_time(self) -> float | None:
        return self.queue[0][0] if self.queue else None


class LinkEmulator:
    """``start()`` runs the forwarder in a thread; ``stop()`` ends it. ``address`` is
    where devices connect (useful with a ``tcp://127.0.0.1:0``-style random port)."""

    def __init__(self, listen: str, upstream: str, profile: LinkProfile, context: zmq.Context | None = None):
        self.upstream = upstream
        self.profile = profile
        self.context = context or zmq.Context.instance()
        self.frontend = self.context.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.LINGER, 0)
        if listen.endswith(":0"):
            port = self.frontend.bind_to_random_port(listen[: listen.rindex(":")])
            self.address = f"{listen[: listen.rindex(':')]}:{port}"
        else:
            self.frontend.bind(listen)
            self.address = listen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="covspec-link", daemon=True)

    def start(self) -> LinkEmulator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        up, down = _Direction(self.profile), _Direction(self.profile)
        backends: dict[bytes, zmq.Socket] = {}
        identity_of: dict[zmq.Socket, bytes] = {}
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for backend, frames in up.due(now):
                    backend.send_multipart(frames)
                for identity, frames in down.due(now):
                    self.frontend.send_multipart([identity] + frames)
                times = [t for t in (up.next_time(), down.next_time()) if t is not None]
                wait_s = 0.05 if not times else min(times) - time.monotonic()
                if wait_s < 0.002:
                    # zmq polls in whole milliseconds and may overshoot by one: sleep the
                    # last stretch precisely instead.
                    time.sleep(max(wait_s, 0.0))
                    wait_s = 0.0
                elif times:
                    wait_s -= 0.002                    # wake early, finish with the precise sleep
                for socket, _ in poller.poll(int(min(wait_s, 0.05) * 1000)):
                    frames = socket.recv_multipart()
                    now = time.monotonic()
                    if socket is self.frontend:
                        identity, frames = frames[0], frames[1:]
                        if identity not in backends:
                            backend = self.context.socket(zmq.DEALER)
                            backend.setsockopt(zmq.LINGER, 0)
                            backend.connect(self.upstream)
                            backends[identity] = backend
                            identity_of[backend] = identity
                            poller.register(backend, zmq.POLLIN)
                        up.push(now, backends[identity], frames)
                    else:
                        down.push(now, identity_of[socket], frames)
        finally:
            for backend in backends.values():
                backend.close(linger=0)
            self.frontend.close(linger=0)
