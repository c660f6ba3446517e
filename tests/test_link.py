"""The link emulator delays messages as its profile says (within 10%), and, when told
to, drops, duplicates, reorders and partitions them."""

import statistics
import threading
import time

import pytest
import zmq

from covspec.bench.harness.link import Faults, LinkEmulator, LinkProfile, profile_named


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


# --- a faulty link (issue 30): each fault alone, seeded, through real sockets -------------------


def dealer(address):
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    return socket


def received(socket, seconds):
    """Everything that arrives on ``socket`` within ``seconds``."""
    got, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if socket.poll(int(left * 1000) + 1):
            got.append(socket.recv())
    return got


def through(echo_edge, count, seconds=0.6, **faults):
    link = LinkEmulator("tcp://127.0.0.1:0", echo_edge, profile_named("loopback"), seed=7, **faults).start()
    socket = dealer(link.address)
    try:
        for i in range(count):
            socket.send(b"%d" % i)
        return received(socket, seconds), link.counts
    finally:
        socket.close(linger=0)
        link.stop()


def test_the_default_link_faults_nothing(echo_edge):
    got, counts = through(echo_edge, 50)
    assert got == [b"%d" % i for i in range(50)]
    assert counts["up"]["delivered"] == counts["down"]["delivered"] == 50
    assert not any(counts[d][k] for d in counts for k in ("dropped", "duplicated", "reordered", "partitioned"))


def test_drops_lose_messages_and_are_seeded(echo_edge):
    got, counts = through(echo_edge, 200, up=Faults(drop=0.3))
    again, _ = through(echo_edge, 200, up=Faults(drop=0.3))
    assert got == again                                        # the same seed loses the same messages
    assert 30 <= counts["up"]["dropped"] <= 90 and len(got) == 200 - counts["up"]["dropped"]
    assert got == sorted(got, key=int)                         # what arrives keeps its order
    nothing, counts = through(echo_edge, 20, down=Faults(drop=1.0))
    assert nothing == [] and counts["down"]["dropped"] == 20 and counts["up"]["delivered"] == 20


def test_duplicates_arrive_twice(echo_edge):
    got, counts = through(echo_edge, 30, up=Faults(duplicate=1.0), down=Faults(duplicate=1.0))
    assert counts["up"]["duplicated"] == 30 and counts["down"]["duplicated"] == 60
    assert sorted(got, key=int) == [b"%d" % i for i in range(30) for _ in range(4)]


def test_reordering_lets_later_messages_overtake(echo_edge):
    got, counts = through(echo_edge, 100, up=Faults(reorder=0.3, reorder_ms=40))
    assert sorted(got, key=int) == [b"%d" % i for i in range(100)]         # nothing lost
    assert got != sorted(got, key=int) and 10 <= counts["up"]["reordered"] <= 50
    jittered, _ = through(echo_edge, 100, down=Faults(jitter_ms=20))
    assert sorted(jittered, key=int) == [b"%d" % i for i in range(100)] and jittered != sorted(jittered, key=int)


def test_a_partition_loses_everything_while_it_lasts(echo_edge):
    link = LinkEmulator("tcp://127.0.0.1:0", echo_edge, profile_named("lan")).start()
    socket = dealer(link.address)
    try:
        socket.send(b"before")
        assert received(socket, 0.2) == [b"before"]
        link.partition(0.5)
        assert link.partitioned()
        socket.send(b"during")
        assert received(socket, 0.3) == []
        time.sleep(0.25)
        assert not link.partitioned()
        socket.send(b"after")
        assert received(socket, 0.2) == [b"after"]
        assert link.counts["up"]["partitioned"] == 1 and link.partitions == 1
        link.partition(0.5, "down")                      # one way: the message gets there, its echo is lost
        assert link.partitioned(direction="down") and not link.partitioned(direction="up")
        socket.send(b"one way")
        assert received(socket, 0.3) == []
        assert link.counts["up"]["delivered"] == 3 and link.counts["down"]["partitioned"] == 1
        with pytest.raises(ValueError, match="direction"):
            link.partition(1.0, "sideways")
    finally:
        socket.close(linger=0)
        link.stop()


def test_faults_must_be_probabilities():
    with pytest.raises(ValueError, match="probability"):
        Faults(drop=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        Faults(jitter_ms=-1)
