"""A quick `covspec bench reliability`: thousands of generated hostile messages against
an in-process edge (the bundled toy target) while a real device (CoInference with the
toy draft) answers alongside. Every message that can be attributed to a peer gets its
reply with a code, nothing goes unanswered but what the protocol leaves unanswered by
design, and afterwards the edge still answers a ping and a correct generation.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import torch_on_one_thread

from covspec.bench.harness.devices import greedy_references, run_devices
from covspec.bench.reliability.fuzz import CLASSES, Fuzzer
from covspec.bench.reliability.hostile import HOSTILE_IMAGES, OwnSession, TargetFacts, VictimSession, WorkerState
from covspec.bench.reliability.fuzz_run import run_fuzz
from covspec.bench.harness.workload import toy_questions
from covspec.protocol import errors
from covspec.protocol.messages import Ping, Pong
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.client import EdgeClient, Backoff
from covspec.runtime_device.engine import CoInference
from covspec.runtime_device.options import GenerationSettings
from covspec.runtime_edge import EdgeServer, ServerConfig
from covspec.runtime_edge.target import TargetModel, decode_image
from covspec.toy.models import bundled_model_dir

LIMIT = 1024 * 1024                       # a small message limit keeps the oversized cases cheap
SETTINGS = GenerationSettings(max_new_tokens=32)
ERROR_CODES = {value for name, value in vars(errors).items() if name.isupper() and isinstance(value, str)}


one_torch_thread = pytest.fixture(scope="module", autouse=True)(torch_on_one_thread)


@pytest.fixture(scope="module")
def world(toy_draft_fp32):
    """The toy pair: target loaded once, the session's fp32 toy draft, three questions and
    the target's greedy answers to them."""
    draft = toy_draft_fp32
    questions = toy_questions(3)
    return {"target": TargetModel.load(bundled_model_dir("target")), "artifact": DraftArtifact.load(draft, threads=1),
            "questions": questions,
            "references": greedy_references(bundled_model_dir("target"), questions, SETTINGS.max_new_tokens)}


def facts_of(world: dict) -> TargetFacts:
    """What the fuzzer knows of the toy target."""
    target = world["target"]
    return TargetFacts(target.vocab_size, target.vocab_hash, world["questions"][0].image_png, LIMIT)


def test_the_fuzzer_is_seeded_and_draws_every_class(world):
    def frames(seed: int) -> list[list[bytes]]:
        fuzzer, state = Fuzzer(seed, facts_of(world)), WorkerState(0, {})
        return [fuzzer.case(state).frames for _ in range(300)]

    assert frames(3) == frames(3) and frames(3) != frames(4)
    fuzzer, state = Fuzzer(0, facts_of(world)), WorkerState(0, {}, {1: VictimSession("v" * 32, "o" * 16)})
    state.own = OwnSession("mine", "o" * 16, sampling=True, wire="compact", committed=3, last_token=4, last_seq=5)
    drawn = {fuzzer.case(state).kind for _ in range(20_000)}
    assert {name for name, weight in CLASSES.items() if weight >= 1} - {"own_traffic", "closes"} <= drawn
    assert {"own_verify", "close"} <= drawn


def test_every_hostile_image_is_refused_before_decoding():
    for data in HOSTILE_IMAGES:
        with pytest.raises(errors.EdgeError) as info:
            decode_image(data, 4096 * 4096, 20.0)
        assert info.value.code == errors.BAD_IMAGE


def test_thousands_of_hostile_messages_are_answered_while_a_device_answers_right(world):
    config = ServerConfig(bind="tcp://127.0.0.1:*", max_message_bytes=LIMIT, idle_timeout_s=20.0)
    with EdgeServer(world["target"], config) as server:
        fuzzed = {}

        def attack(stop):
            fuzzed["tally"] = run_fuzz(server.address, facts_of(world), 3000, sockets=3, seed=21)
            stop.set()

        answers, _ = run_devices(1, 0.0, world["artifact"], server.address, world["questions"],
                                 world["references"], during=attack, settings=SETTINGS)
        tally = fuzzed["tally"]
        assert tally.total == 3000
        assert not tally.unanswered, tally.examples
        assert set(tally.by_design) <= {"close", "socket_drop"}
        assert not tally.unexpected, dict(tally.examples)
        assert tally.misaddressed == 0
        assert set(tally.replies) <= ERROR_CODES | {"pong", "result", "opened"}
        assert errors.INTERNAL not in tally.replies
        assert len(tally.sent) >= 20 and sum(tally.replies.values()) > 2500
        assert answers and all(a.correct for a in answers), [a.error for a in answers]

        # Afterwards the edge is as good as new: a ping, and a generation equal to the target's.
        client = EdgeClient(server.address, Backoff(timeout_s=10))
        try:
            assert isinstance(client.request(Ping(session="after", seq=1)), Pong)
            question = world["questions"][1]
            tokens = [t for chunk in CoInference(world["artifact"], client).generate(
                question.image_png, question.question, SETTINGS) for t in chunk]
        finally:
            client.close()
        assert tokens == world["references"][1]
        assert np.all([a.tokens > 0 for a in answers])
