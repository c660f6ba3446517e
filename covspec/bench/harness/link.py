"""Network link emulation between device and edge, as a ZeroMQ forwarder.

Devices connect (DEALER) to the link's ROUTER at ``listen``; for each device the
link opens its own DEALER to the edge at ``upstream``, so the edge sees one peer per
device, as without the link. Each message is delayed, in order and per direction,
by its transmission time (bytes over bandwidth, queued behind earlier messages in
the same direction) plus half the round-trip time. Works on any machine; loopback
adds nothing.

A faulty link (``Faults``, one per direction, seeded; the defaults fault nothing):
each message may be dropped, duplicated (the copy lands up to ``reorder_ms`` later,
possibly after messages sent behind it), held back by up to ``jitter_ms`` (so later
messages may overtake it), or held back ``reorder_ms`` so that later messages overtake
it (``reorder``). ``LinkEmulator.partition(seconds, direction)`` cuts the link one way
or both: every message that way sent, or due to land, while it lasts is lost. ``LinkEmulator.counts`` says per
direction how many messages were sent, delivered, dropped, duplicated, reordered and
lost to partitions.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from collections import Counter
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


@dataclass(frozen=True)
class Faults:
    """What goes wrong with each message in one direction (probabilities per message)."""

    drop: float = 0.0            # lost
    duplicate: float = 0.0       # delivered twice, the copy up to ``reorder_ms`` after the original
    reorder: float = 0.0         # held back ``reorder_ms``, so that later messages overtake it
    reorder_ms: float = 30.0
    jitter_ms: float = 0.0       # extra delay, uniform in [0, jitter_ms]

    def __post_init__(self):
        for name in ("drop", "duplicate", "reorder"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Faults.{name} is a probability, got {getattr(self, name)}")
        if self.reorder_ms < 0 or self.jitter_ms < 0:
            raise ValueError("Faults.reorder_ms and jitter_ms are >= 0")


NO_FAULTS = Faults()
COUNTS = ("sent", "delivered", "dropped", "duplicated", "reordered", "partitioned")


class _Direction:
    """One direction of the link: a queue of messages with their delivery times."""

    def __init__(self, profile: LinkProfile, faults: Faults = NO_FAULTS, seed: int = 0):
        self.profile, self.faults = profile, faults
        self.rng = random.Random(seed)
        self.busy_until = 0.0
        self.queue: list[tuple[float, int, object, list[bytes]]] = []
        self.order = itertools.count()
        self.counts: Counter[str] = Counter(dict.fromkeys(COUNTS, 0))    # every key there: read from other threads

    def push(self, now: float, peer: object, frames: list[bytes], cut: bool = False) -> None:
        """Queue one message (``cut``: the link is partitioned, the message is lost)."""
        self.counts["sent"] += 1
        faults, rng = self.faults, self.rng
        if cut or (faults.drop and rng.random() < faults.drop):
            self.counts["partitioned" if cut else "dropped"] += 1
            return
        size = sum(len(f) for f in frames)
        sent = max(now, self.busy_until) + self.profile.transmit_s(size)
        self.busy_until = sent
        lands = sent + self.profile.rtt_ms / 2000 + rng.uniform(0, faults.jitter_ms) / 1000
        if faults.reorder and rng.random() < faults.reorder:
            self.counts["reordered"] += 1
            lands += faults.reorder_ms / 1000
        heapq.heappush(self.queue, (lands, next(self.order), peer, frames))
        if faults.duplicate and rng.random() < faults.duplicate:
            self.counts["duplicated"] += 1
            heapq.heappush(self.queue, (lands + rng.uniform(0, faults.reorder_ms) / 1000, next(self.order), peer,
                                        list(frames)))

    def due(self, now: float, cut: bool = False):
        while self.queue and self.queue[0][0] <= now:
            _, _, peer, frames = heapq.heappop(self.queue)
            if cut:
                self.counts["partitioned"] += 1
                continue
            self.counts["delivered"] += 1
            yield peer, frames

    def next_time(self) -> float | None:
        return self.queue[0][0] if self.queue else None


class LinkEmulator:
    """``start()`` runs the forwarder in a thread; ``stop()`` ends it. ``address`` is
    where devices connect (useful with a ``tcp://127.0.0.1:0``-style random port);
    ``up`` faults what devices send, ``down`` what the edge sends, each direction with its
    own random stream drawn from ``seed``."""

    def __init__(self, listen: str, upstream: str, profile: LinkProfile, context: zmq.Context | None = None, *,
                 up: Faults = NO_FAULTS, down: Faults = NO_FAULTS, seed: int = 0):
        self.upstream = upstream
        self.profile = profile
        self._up, self._down = _Direction(profile, up, seed * 2), _Direction(profile, down, seed * 2 + 1)
        self._cut_until = {"up": 0.0, "down": 0.0}
        self.partitions = 0
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

    def partition(self, seconds: float, direction: str = "both") -> None:
        """Cut the link for ``seconds`` from now (``up``, ``down`` or ``both`` ways): every
        message that way is lost meanwhile."""
        if direction not in ("up", "down", "both"):
            raise ValueError(f"direction is up, down or both, not {direction!r}")
        for way in ("up", "down") if direction == "both" else (direction,):
            self._cut_until[way] = max(self._cut_until[way], time.monotonic() + seconds)
        self.partitions += 1

    def partitioned(self, now: float | None = None, direction: str = "up") -> bool:
        return (time.monotonic() if now is None else now) < self._cut_until[direction]

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Messages per direction: sent, delivered, dropped, duplicated, reordered, partitioned."""
        return {"up": dict(self._up.counts), "down": dict(self._down.counts)}

    def _run(self) -> None:
        up, down = self._up, self._down
        backends: dict[bytes, zmq.Socket] = {}
        identity_of: dict[zmq.Socket, bytes] = {}
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for backend, frames in up.due(now, self.partitioned(now, "up")):
                    backend.send_multipart(frames)
                for identity, frames in down.due(now, self.partitioned(now, "down")):
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
                        up.push(now, backends[identity], frames, self.partitioned(now, "up"))
                    else:
                        down.push(now, identity_of[socket], frames, self.partitioned(now, "down"))
        finally:
            for backend in backends.values():
                backend.close(linger=0)
            self.frontend.close(linger=0)
