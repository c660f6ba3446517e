"""The link emulator delays messages as its profile says (within 10%)."""

import statistics
import threading
import time

import pytest
import zmq

from covspec.bench.harness.link import LinkEmulator, LinkProfile, profile_named


@pytest.fixture
def echo_edge():
    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if router.poll(20):
                router.send_multipart(router.recv_multipart())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{port}"
    stop.set()
    thread.join()
    router.close(linger=0)


def round_trips(address, size, count):
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    payload = b"x" * size
    times = []
    try:
        for _ in range(count):
            began = time.perf_counter()
            socket.send(payload)
            assert socket.poll(5000), "no echo through the link"
            assert socket.recv() == payload
            times.append(time.perf_counter() - began)
    finally:
        socket.close(linger=0)
    return statistics.median(times)


@pytest.mark.parametrize("profile,size", [(profile_named("5g"), 64),
                                          (LinkProfile("custom", 20.0, 10.0), 100_000)])
def test_round_trip_matches_profile(echo_edge, profile, size):
    """The delay the link adds (over the same path on loopback) is the profile's."""
    baseline = LinkEmulator("tcp://127.0.0.1:0", echo_edge, profile_named("loopback")).start()
    link = LinkEmulator("tcp://127.0.0.1:0", echo_edge, profile).start()
    try:
        base = round_trips(baseline.address, size, count=15)
        measured = round_trips(link.address, size, count=15)
    finally:
        link.stop()
        baseline.stop()
    expected = 2 * profile.one_way_s(size)
    assert abs((measured - base) - expected) <= 0.1 * expected, (measured, base, expected)


def test_messages_queue_behind_each_other(echo_edge):
    """Two messages sent together: the second waits for the first's transmission."""
    profile = LinkProfile("custom", 0.0, 8.0)                  # 1 MB/s: 50 KB takes 50 ms
    link = LinkEmulator("tcp://127.0.0.1:0", echo_edge, profile).start()
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(link.address)
    try:
        began = time.perf_counter()
        socket.send(b"a" * 50_000)
        socket.send(b"b" * 50_000)
        arrivals = []
        for _ in range(2):
            assert socket.poll(5000)
            socket.recv()
            arrivals.append(time.perf_counter() - began)
    finally:
        socket.close(linger=0)
        link.stop()
    # Up: a lands at 50 ms, b at 100 ms. Down: a leaves at 50 ms and lands at 100 ms;
    # b must wait for it, leaves at 100 ms and lands at 150 ms.
    assert arrivals[0] == pytest.approx(0.10, rel=0.1)
    assert arrivals[1] == pytest.approx(0.15, rel=0.1)


def test_unknown_profile_is_refused():
    with pytest.raises(ValueError, match="unknown link profile"):
        profile_named("carrier-pigeon")
    with pytest.raises(ValueError, match="custom link needs"):
        profile_named("custom", rtt_ms=5)
