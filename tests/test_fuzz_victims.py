"""Issue 30: the fuzzer learns the lesson. Hostile string fields (lone surrogates, empty,
huge, wrong types) in every string field of every message, each naming a live victim
session (its id, its owner mostly wrong); after every batch each victim must still commit
the target's own tokens. A real edge (the bundled toy target, in this process), real sockets.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from conftest import torch_on_one_thread

from covspec.bench.harness.devices import greedy_references
from covspec.bench.harness.workload import toy_questions
from covspec.bench.reliability.fuzz import Fuzzer
from covspec.bench.reliability.fuzz_run import BATCH, run_fuzz
from covspec.bench.reliability.fuzz_strings import HUGE_LENGTHS, STRING_FIELDS, string_field_case
from covspec.bench.reliability.hostile import INVALID_UNICODE, TargetFacts, VictimSession, WorkerState
from covspec.protocol import errors
from covspec.runtime_edge import EdgeServer, ServerConfig
from covspec.runtime_edge.target import TargetModel
from covspec.toy.models import bundled_model_dir

MAX_NEW = 24
one_torch_thread = pytest.fixture(scope="module", autouse=True)(torch_on_one_thread)


@pytest.fixture(scope="module")
def target():
    return TargetModel.load(bundled_model_dir("target"))


@pytest.fixture(scope="module")
def facts(target):
    question = next(q for q in toy_questions(2) if q.qtype == "describe")      # a long answer: many rounds
    answer = greedy_references(bundled_model_dir("target"), [question], MAX_NEW)[0]
    return TargetFacts(target.vocab_size, target.vocab_hash, question.image_png, 1024 * 1024,
                       victim_prompt=question.question, victim_answer=tuple(answer))


def kind_of(value) -> str:
    if not isinstance(value, str):
        return "wrong_type"
    if value == "":
        return "empty"
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        return "unicode"
    return "huge" if len(value) >= min(HUGE_LENGTHS) else "other"


def test_every_string_field_of_every_message_gets_every_hostile_value(facts):
    """Drawn from a seed: each (message, field) gets invalid Unicode, empty, huge and wrong-type
    values, every message names the victim, and the owner is the victim's own only with a
    value refused at decode."""
    victim = VictimSession("v" * 32, "victim-owner-secret-0123")
    fuzzer, state = Fuzzer(5, facts), WorkerState(0, {}, {1: victim})
    seen = defaultdict(set)
    for _ in range(3000):
        case = string_field_case(fuzzer, state)
        header = json.loads(case.frames[0])
        hostile = [(name, header[name]) for name in STRING_FIELDS[header["type"]]
                   if kind_of(header[name]) != "other" and not (name == "session" and header[name] == victim.id)
                   and not (name == "owner" and header[name] == victim.owner)]
        if header["type"] == "open" and not hostile:
            continue                            # an open's own fields, valid, with the hostile one an owner or id
        name, value = hostile[0] if hostile else ("owner", header["owner"])
        seen[(header["type"], name)].add(kind_of(value))
        if name != "session":
            assert header["session"] == victim.id
        if header.get("owner") == victim.owner:
            assert kind_of(value) in ("unicode", "wrong_type")
    assert set(seen) == {(kind, name) for kind, names in STRING_FIELDS.items() for name in names}
    for key, kinds in seen.items():
        assert kinds >= {"unicode", "wrong_type", "empty", "huge"}, (key, kinds)
    assert any(s == "\ud800" * 16 for s in INVALID_UNICODE)          # the string of the issue


def test_hundreds_of_hostile_messages_end_no_victim(target, facts):
    config = ServerConfig(bind="tcp://127.0.0.1:*", max_message_bytes=1024 * 1024, idle_timeout_s=20.0)
    with EdgeServer(target, config) as server:
        tally = run_fuzz(server.address, facts, 600, sockets=3, seed=30)
    result = tally.as_dict()
    assert result["sent_by_class"].get("string_fields", 0) > 15
    assert not result["unanswered"], result["examples"]
    assert not result["unexpected"], result["examples"]
    assert result["misaddressed"] == 0, {k: v for k, v in result["examples"].items() if "misaddressed" in k}
    assert errors.INTERNAL not in result["replies"]
    assert result["victims_ended_by_others"] == 0, result["victim_examples"]
    assert result["victim_wrong"] == result["victim_unanswered"] == 0, result["victim_examples"]
    assert result["victim_checks"] >= 600 // BATCH and result["victim_rounds_right"] >= 600 // BATCH - 3


def test_the_report_shows_victims_and_a_victim_ended_is_a_broken_promise():
    from covspec.bench.reliability.report import fuzz_tables, verdict

    device = {"answers": 1, "correct": 1, "errors": []}
    fuzz = {"sent": 10, "sockets": 1, "replies": {"bad_field": 10}, "unanswered": {}, "no_reply_by_design": {},
            "unexpected": {}, "misaddressed": 0, "edge_crashes": 0, "edge_log_failures": {}, "sent_by_class": {},
            "replies_by_class": {}, "memory": {"rss_before_mib": 1, "rss_peak_mib": 1, "rss_after_mib": 1},
            "device": device, "victim_checks": 4, "victim_rounds_right": 4, "victims_ended_by_others": 0,
            "victim_wrong": 0, "victim_unanswered": 0, "victim_examples": []}
    assert "victims ended by others" in fuzz_tables(fuzz) and verdict({"fuzz": fuzz}) == []
    broken = verdict({"fuzz": {**fuzz, "victims_ended_by_others": 1, "victim_examples": ["ended: at 3"]}})
    assert len(broken) == 1 and "1 ended by messages their owner did not send" in broken[0]
