"""Edge-led speculation: the target steps by itself, the device's chunks jump it ahead.

Crafted tables first (``crafted.SteppingEdge``: the real edge ``Session`` with its
overlap test, one target step per poll, chunks verified some steps after they were
sent): greedy answers equal the target's whatever the link delay, a draft that never
agrees stays exact, and sampled answers follow the target's distribution exactly
(chi-square over whole answers) while chunks are verified past tokens the target
generated meanwhile. The negative control breaks the rule that the edge's choice of
where to verify may depend only on earlier tokens, and the same test catches it.
Then the live edge: greedy exactness on the toy set with the edge stepping, its
``--edge-steps`` settings, and an older (v1) device served as the protocol promises.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import zmq
from crafted import SteppingEdge, TableDraft, TableTarget, greedy_sequence, random_table
from test_waiting import answers_pvalue, exact_distribution

from covspec.protocol.messages import Error, Open, Opened, Verify, decode, encode
from covspec.runtime_device.lead_planner import LeadPlanner
from covspec.runtime_device.engine import CoInference
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.stats import GenerationStats

VOCAB = 12
EDGE_LED = DraftingOptions(lead="edge")


class TickPlanner(LeadPlanner):
    """The lead planner in the crafted world, where time is counted in edge steps: the
    edge takes ``delay`` steps while a chunk travels (plus the one it takes per poll)."""

    def __init__(self, delay: int):
        super().__init__(draft_len=3, min_survival=0.0)          # always draft: these tests are about verdicts
        self.delay = delay

    def overlap(self, verified: int | None = None) -> float:
        return self.delay + 1


def device_for(draft, edge: SteppingEdge, eos_ids=frozenset()) -> CoInference:
    device = CoInference(TableDraft(draft, eos_ids), edge)
    device._lead_planners[EDGE_LED] = TickPlanner(edge.delay)
    return device


def run(draft, target, settings, delay, eos_ids=frozenset(), device=None, edge=None):
    edge = edge or SteppingEdge(TableTarget(target, VOCAB, eos_ids), delay=delay)
    device = device or device_for(draft, edge, eos_ids)
    stats = GenerationStats()
    tokens = [t for chunk in device.generate(b"image", "question", settings, EDGE_LED, stats) for t in chunk]
    return tokens, stats


@pytest.mark.parametrize("delay", [0, 1, 3, 6])
def test_greedy_equals_the_target_whatever_the_delay(delay):
    target = random_table(20, VOCAB)
    draft = random_table(21, VOCAB, scale=0.5)
    mixed = lambda prefix: target(prefix) if len(prefix) % 13 else draft(prefix)   # noqa: E731 - agrees often
    tokens, stats = run(mixed, target, GenerationSettings(max_new_tokens=40), delay)
    assert tokens == greedy_sequence(target, 40)
    assert stats.rounds > 0 and sum(stats.accepted) > 0
    assert (stats.edge_steps > 0) == (delay > 0)     # with no delay the draft is always ahead: every forward verifies


def test_the_lead_planner_covers_the_overlap_and_keeps_exploring():
    planner = LeadPlanner(draft_len=4)
    assert planner.chunk_len() == 4 and planner.worth_drafting()           # nothing measured yet
    planner.observe_edge_step(0.002)
    planner.observe_round(0.012, 0.002)                                   # a 10 ms round trip: 5 edge steps
    planner.observe_draft_step(0.0)
    assert planner.chunk_len() == 9 and planner.worth_drafting()           # 0.7 ** 5 = 0.17
    assert planner.reach() == pytest.approx(5.0) and planner.reachable()  # a chunk drafted already: no more
    planner.observe_agreement(0, 200)                                     # the draft never agrees
    assert not planner.reachable()                                        # nothing worth running ahead
    asks = [planner.worth_drafting() for _ in range(40)]
    assert asks.count(True) == 2 and not any(asks[:16])                  # still drafts once every 17 asks


def test_the_round_trip_is_measured_when_every_chunk_is_overtaken():
    """On a slow link streamed tokens overtake every short chunk before its reply comes; the
    reply (stale) still measures the round trip, without which the chunks stay too short."""
    target = random_table(24, VOCAB)
    edge = SteppingEdge(TableTarget(target, VOCAB, frozenset()), delay=6)
    device = CoInference(TableDraft(target), edge)
    planner = device._lead_planners[EDGE_LED] = LeadPlanner(draft_len=1, max_len=1, min_survival=0.0)
    settings = GenerationSettings(max_new_tokens=30, temperature=1.0, seed=3)     # one chunk at a time
    stats = GenerationStats()
    tokens = [t for chunk in device.generate(b"image", "question", settings, EDGE_LED, stats) for t in chunk]
    assert len(tokens) == 30 and stats.drafted > 0 and sum(stats.accepted) == 0     # nothing reached the edge in time
    assert planner.rtt_s is not None


def most_chunks_in_flight(verify_s: float, forward_s: float) -> int:
    """A perfect draft, greedy, the edge 3 steps away, with the planner's measured verify
    and step forwards preset: the most chunks ever sent and not yet answered."""
    target = random_table(23, VOCAB)
    edge = SteppingEdge(TableTarget(target, VOCAB, frozenset()), delay=3)
    device = device_for(target, edge)
    planner = device._lead_planners[EDGE_LED]
    planner.observe_verify(verify_s)
    planner.observe_edge_forward(forward_s)
    events = []
    tokens = [t for chunk in device.generate(b"image", "question", GenerationSettings(max_new_tokens=40), EDGE_LED,
                                             GenerationStats(), events.append) for t in chunk]
    assert tokens == greedy_sequence(target, 40)
    waiting, most = set(), 0
    for event in events:
        if event["event"] == "chunk":
            waiting.add(event["seq"])
        elif event["event"] == "verdict":
            waiting = {seq for seq in waiting if seq > event["seq"]}     # an older one was superseded
        most = max(most, len(waiting))
    return most


def test_the_draft_runs_ahead_only_where_a_verify_costs_about_a_step():
    planner = LeadPlanner(draft_len=4)
    assert planner.verify_costs_a_step()                                  # nothing measured: run ahead
    planner.observe_edge_forward(0.025)
    planner.observe_verify(0.0265)                                        # a GPU target: memory-bound
    assert planner.verify_costs_a_step()
    planner.verify_s = 0.033                                              # a small target on a CPU
    assert not planner.verify_costs_a_step()
    assert most_chunks_in_flight(verify_s=0.0265, forward_s=0.025) > 1   # continuous: chunks behind chunks
    assert most_chunks_in_flight(verify_s=0.033, forward_s=0.025) == 1   # one chunk at a time


def test_a_draft_that_never_agrees_stays_exact():
    target = random_table(22, VOCAB)

    def contrary(prefix):                  # the target's least likely token, always
        return -target(prefix)

    tokens, stats = run(contrary, target, GenerationSettings(max_new_tokens=30), delay=2)
    assert tokens == greedy_sequence(target, 30)
    assert sum(stats.accepted) == 0 and stats.drafted > 0 and stats.edge_steps > 0


def sample_answers(biased_token: int | None, runs: int):
    vocab, eos = 3, frozenset({2})
    target, draft = random_table(10, vocab, scale=1.0), random_table(11, vocab, scale=1.0)
    counts, totals = Counter(), Counter()
    for seed in range(runs):
        edge = SteppingEdge(TableTarget(target, vocab, eos), delay=seed % 3, biased_token=biased_token)
        device = device_for(draft, edge, eos)
        settings = GenerationSettings(max_new_tokens=6, temperature=1.0, seed=seed)
        tokens, stats = run(None, None, settings, 0, device=device, edge=edge)
        counts[tuple(tokens)] += 1
        totals.update(rounds=stats.rounds, accepted=sum(stats.accepted), steps=stats.edge_steps)
    expected = exact_distribution(target, GenerationSettings(max_new_tokens=6, temperature=1.0), eos)
    return answers_pvalue(counts, expected, runs), totals


def test_sampling_with_the_edge_stepping_follows_the_target():
    pvalue, totals = sample_answers(None, runs=6000)
    assert totals["rounds"] > 1000 and totals["accepted"] > 1000 and totals["steps"] > 1000
    assert pvalue > 1e-3


def test_negative_control_a_choice_that_looks_at_the_verified_token_is_caught():
    pvalue, totals = sample_answers(biased_token=2, runs=6000)     # favour EOS
    assert totals["rounds"] > 300
    assert pvalue < 1e-6


def test_the_device_takes_the_lead_only_where_its_rounds_pay():
    """A phone-class draft (6.4 ms a token) with a 7B target: hand over on a 27 ms
    transformers-class step (rounds of 4 commit 1.7x its tokens per second), and on a
    13 ms vLLM-class one (1.25x) only while its verify forwards cost one step; not over
    a 60 ms 4G round trip, nor with a draft that rarely agrees; nothing is decided
    before every timing was measured."""
    def planner(edge_step_s, draft_step_s, rtt_s, agreement=0.8, verify_s=None):
        p = LeadPlanner(draft_len=8)
        p.agreed, p.compared = agreement * 100, 100.0
        p.edge_forward_s, p.draft_step_s, p.rtt_s, p.verify_s = edge_step_s, draft_step_s, rtt_s, verify_s
        return p

    assert planner(0.027, 0.0064, 0.0).device_leads_better()
    assert planner(0.040, 0.0064, 0.010).device_leads_better()
    assert planner(0.0134, 0.0064, 0.0).device_leads_better()
    assert not planner(0.0134, 0.0064, 0.0, verify_s=0.020).device_leads_better()
    assert not planner(0.027, 0.0064, 0.060).device_leads_better()
    assert not planner(0.027, 0.0064, 0.0, agreement=0.2).device_leads_better()
    assert not planner(0.027, None, 0.0).device_leads_better()
    assert planner(0.027, 0.0064, 0.0, agreement=1.0).device_leads_better()
    # The rounds after the hand-over are the best round's length, shorter than an edge-led
    # chunk's 8 past its overlap; the chunk that hands over is its overlap and one token.
    handing = planner(0.027, 0.0064, 0.0)
    handing.observe_edge_step(0.027)
    rounds = handing.hand_over_len()
    assert 2 <= rounds < handing.draft_len and handing.chunk_len(1) < handing.chunk_len(rounds)
    assert planner(0.027, 0.0064, 0.060).hand_over_len() is None


# -- the live edge ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy(toy_draft_fp32, toy_set):
    """The session's fp32 toy draft, the 50 held-out questions and the target's greedy answers
    cut to 48 new tokens."""
    from covspec.runtime_device.artifact import DraftArtifact
    from covspec.toy.models import bundled_model_dir

    return {"artifact": DraftArtifact.load(toy_draft_fp32, threads=1), "questions": toy_set["questions"],
            "target": bundled_model_dir("target"),
            "references": [reference[:48] for reference in toy_set["references"]]}


def serve(toy, edge_steps: str):
    from covspec.runtime_edge import EdgeServer, ServerConfig

    return EdgeServer(toy["target"], ServerConfig(bind="tcp://127.0.0.1:*", edge_steps=edge_steps, threads=1))


def test_greedy_on_the_toy_set_with_the_edge_stepping(toy):
    from covspec.runtime_device.client import EdgeClient

    settings = GenerationSettings(max_new_tokens=48)
    steps = verified = 0
    with serve(toy, "always") as server:
        client = EdgeClient(server.address)
        device = CoInference(toy["artifact"], client)
        for question, reference in zip(toy["questions"], toy["references"]):
            stats = GenerationStats()
            answer = [t for c in device.generate(question.image_png, question.question, settings, EDGE_LED, stats)
                      for t in c]
            assert answer == reference, question.question
            steps, verified = steps + stats.edge_steps, verified + sum(stats.accepted)
        client.close()
    assert steps > 0 and verified > 0


@pytest.mark.parametrize("edge_steps", ["never", "auto"])
def test_every_edge_steps_setting_is_exact(toy, edge_steps):
    from covspec.runtime_device.client import EdgeClient

    settings = GenerationSettings(max_new_tokens=48)
    with serve(toy, edge_steps) as server:
        client = EdgeClient(server.address)
        device = CoInference(toy["artifact"], client)
        steps = 0
        for question, reference in list(zip(toy["questions"], toy["references"]))[:6]:
            stats = GenerationStats()
            assert [t for c in device.generate(question.image_png, question.question, settings, EDGE_LED, stats)
                    for t in c] == reference
            steps += stats.edge_steps
        client.close()
    assert (steps == 0) == (edge_steps == "never")


def test_a_v1_device_is_served_in_v1_and_refused_edge_led(toy):
    """A device that speaks protocol v1 opens and verifies as before, and every reply
    comes back as v1; asking for edge_led in v1 is refused with a reason."""
    question = toy["questions"][0]
    image = np.frombuffer(question.image_png, np.uint8)
    with serve(toy, "always") as server:
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.RCVTIMEO, 20000)
        socket.connect(server.address)
        try:
            from covspec.runtime_edge.target import TargetModel

            vocab_hash = TargetModel.load(toy["target"]).vocab_hash
            socket.send_multipart(encode(Open(session="old", seq=0, prompt=question.question, image=image,
                                              vocab_hash=vocab_hash, committed=np.zeros(0, np.int32),
                                              max_new_tokens=8, version=1)))
            frames = socket.recv_multipart()
            opened = decode(frames)
            assert isinstance(opened, Opened) and opened.version == 1 and b'"v":1' in frames[0]
            socket.send_multipart(encode(Verify(session="old", seq=1, owner=opened.owner, start=1,
                                                tokens=np.array([3], np.int32), version=1)))
            result = decode(socket.recv_multipart())
            assert result.version == 1 and result.status == "ok" and result.start == 1
            socket.send_multipart(_v1_edge_led_open(question.question, image, vocab_hash))
            refused = decode(socket.recv_multipart())
            assert isinstance(refused, Error) and refused.code == "bad_field" and "v2" in refused.message
        finally:
            socket.close(linger=0)


def _v1_edge_led_open(prompt: str, image: np.ndarray, vocab_hash: str) -> list[bytes]:
    """The frames of a v1 open asking for edge_led (which ``encode`` itself refuses to build)."""
    import json

    frames = encode(Open(session="old-led", seq=0, prompt=prompt, image=image, vocab_hash=vocab_hash,
                         committed=np.zeros(0, np.int32), mode="edge_led", version=2))
    header = json.loads(frames[0])
    header["v"] = 1
    return [json.dumps(header).encode()] + frames[1:]


def raw_device(address: str):
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.RCVTIMEO, 20000)
    socket.connect(address)
    return socket


def open_edge_led(socket, toy, question, owner: str, session: str, streamed: int) -> list[int]:
    """Open an edge-led session from a raw device; the first ``streamed`` tokens it commits."""
    from covspec.runtime_edge.target import TargetModel

    socket.send_multipart(encode(Open(
        session=session, seq=1, owner=owner, prompt=question.question, mode="edge_led",
        image=np.frombuffer(question.image_png, np.uint8), max_new_tokens=48,
        vocab_hash=TargetModel.load(toy["target"]).vocab_hash, committed=np.zeros(0, np.int32))))
    return [decode(socket.recv_multipart()).token for _ in range(streamed)]


def test_the_edge_stops_stepping_once_the_device_leads(toy):
    """A raw device: the edge streams its own tokens until a verify with ``device_leads``;
    it verifies that chunk as an edge-led one, streams nothing after its verdict, and
    verifies the next chunk as a speculative session would."""
    from covspec.protocol.ownership import new_owner, session_id_for

    question, reference = toy["questions"][0], toy["references"][0]
    owner = new_owner()
    session = session_id_for(owner)
    with serve(toy, "always") as server:
        socket = raw_device(server.address)
        try:
            committed = open_edge_led(socket, toy, question, owner, session, streamed=3)   # the edge's own steps
            chunk = reference[len(committed) - 1:len(committed) + 12]   # covers what it may step meanwhile
            socket.send_multipart(encode(Verify(session=session, seq=2, owner=owner, start=len(committed) - 1,
                                                tokens=np.asarray(chunk, np.int32), device_leads=True)))
            while True:
                reply = decode(socket.recv_multipart())
                if reply.seq == 2:
                    break
                committed.append(reply.token)                           # streamed before the verdict
            assert reply.status == "ok" and reply.start == len(committed) and reply.accepted > 0
            start = reply.start + reply.accepted + 1
            assert committed == reference[:reply.start] and reply.token == reference[start - 1]
            assert socket.poll(300) == 0                                # no step of the edge's own any more
            socket.send_multipart(encode(Verify(session=session, seq=3, owner=owner, start=start,
                                                tokens=np.asarray(reference[start:start + 4], np.int32))))
            verdict = decode(socket.recv_multipart())
            assert verdict.seq == 3 and verdict.status == "ok" and verdict.start == start and verdict.accepted == 4
            assert verdict.token == reference[start + 4]
        finally:
            socket.close(linger=0)


def test_a_newer_chunk_waiting_at_the_edge_supersedes_an_older_one(toy):
    """A draft that runs ahead sends its continuation again and again from its committed
    end; two such chunks of a greedy edge-led session waiting together at the edge (they
    arrive while it steps, 27 ms a step): the older is answered ``stale`` unrun and the
    newer, holding its tokens and more, verified in one forward."""
    from covspec.protocol.ownership import new_owner, session_id_for
    from covspec.runtime_edge import EdgeServer, ServerConfig

    question, reference = toy["questions"][0], toy["references"][0]
    owner = new_owner()
    session = session_id_for(owner)
    config = ServerConfig(bind="tcp://127.0.0.1:*", edge_steps="always", threads=1, regime="phone-135m@7b-a100-hf")
    with EdgeServer(toy["target"], config) as server:
        socket = raw_device(server.address)
        try:
            committed = open_edge_led(socket, toy, question, owner, session, streamed=3)   # the next step has begun
            start = len(committed)
            for seq, length in ((2, 6), (3, 10)):
                socket.send_multipart(encode(Verify(session=session, seq=seq, owner=owner, start=start,
                                                    tokens=np.asarray(reference[start:start + length], np.int32))))
            replies = {}
            while 3 not in replies:
                reply = decode(socket.recv_multipart())
                if reply.seq == 1:
                    committed.append(reply.token)      # the step under way when the chunks arrived
                else:
                    replies[reply.seq] = reply
            assert replies[2].status == "stale"
            verdict = replies[3]
            assert verdict.status == "ok" and verdict.start == len(committed)
            assert verdict.accepted == start + 10 - len(committed)                  # the rest of the newer chunk
            assert committed == reference[:len(committed)] and verdict.token == reference[start + 10]
        finally:
            socket.close(linger=0)


def test_greedy_on_the_toy_set_with_the_lead_handed_over(toy):
    """The default (``lead="auto"``) against an edge paced like a 7B target on an A100
    (27 ms a step; the toy draft is unpaced, 100x faster): edge-led while the draft
    prefills, then the planner hands the lead to the device and device-led rounds go
    on in the same session (their first chunk drafted while the hand-over chunk was
    verified); every answer is the target's own."""
    from covspec.runtime_device.client import EdgeClient
    from covspec.runtime_edge import EdgeServer, ServerConfig

    settings = GenerationSettings(max_new_tokens=48)
    handed_over = rounds_after = looked_ahead = 0
    config = ServerConfig(bind="tcp://127.0.0.1:*", edge_steps="always", threads=1, regime="phone-135m@7b-a100-hf")
    with EdgeServer(toy["target"], config) as server:
        client = EdgeClient(server.address)
        device = CoInference(toy["artifact"], client)
        for question, reference in list(zip(toy["questions"], toy["references"]))[:8]:
            events = []
            answer = [t for c in device.generate(question.image_png, question.question, settings,
                                                 DraftingOptions(), trace=events.append) for t in c]
            assert answer == reference, question.question
            names = [e["event"] for e in events]
            if "hand_over" in names:
                handed_over += 1
                rounds_after += names[names.index("hand_over"):].count("verdict")
                looked_ahead += sum(1 for e in events if e["event"] == "ahead" and e["len"] >= 1)
        client.close()
    assert handed_over >= 4 and rounds_after > 0
    assert looked_ahead >= 1        # the first round's chunk drafted while the hand-over chunk was verified
