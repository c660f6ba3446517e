"""Issue 30: real devices through a faulty link (``covspec.bench.reliability.faulty_link``).

A real edge (the bundled toy target, in this process) behind a ``LinkEmulator`` that
drops, duplicates, reorders or partitions; real devices (``CoInference``, the toy int8
draft on onnxruntime), one device-led and one edge-led, answering for a few seconds.
Every answer is the target's own or ends with a clear error within its patience, and
the tokens a device committed are always a prefix of the target's answer: a duplicated
message never commits twice.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import torch_on_one_thread

import covspec
from covspec.bench.harness.devices import greedy_references
from covspec.bench.harness.edge import ask
from covspec.bench.harness.workload import toy_questions
from covspec.bench.reliability.faulty_link import (FaultyLinkPlan, faulty_link_phase, faulty_link_problems,
                                                   faulty_link_table)
from covspec.protocol import errors
from covspec.protocol.messages import Error, Open, Opened, Result, Verify
from covspec.protocol.ownership import new_owner, session_id_for
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.options import GenerationSettings
from covspec.runtime_edge import EdgeServer, ServerConfig
from covspec.runtime_edge.target import TargetModel
from covspec.toy.artifacts import ensure_toy_artifacts
from covspec.toy.models import bundled_model_dir

ARTIFACTS = Path(covspec.__file__).parents[1] / "artifacts" / "toy-draft-int8"
SETTINGS = GenerationSettings(max_new_tokens=24)
QUIET = FaultyLinkPlan(devices=2, seconds=3.0, link="loopback", drop=0.0, duplicate=0.0, reorder=0.0, jitter_ms=0.0,
                       partitions=0, timeout_s=0.5, retries=3, reopen_attempts=6)

one_torch_thread = pytest.fixture(scope="module", autouse=True)(torch_on_one_thread)


@pytest.fixture(scope="module")
def edge_and_world():
    questions = toy_questions(3)
    world = {"artifact": DraftArtifact.load(ensure_toy_artifacts(ARTIFACTS, lambda line: None), threads=1),
             "questions": questions, "settings": SETTINGS,
             "references": greedy_references(bundled_model_dir("target"), questions, SETTINGS.max_new_tokens)}
    config = ServerConfig(bind="tcp://127.0.0.1:*", idle_timeout_s=20.0)
    with EdgeServer(TargetModel.load(bundled_model_dir("target")), config) as server:
        yield server.address, world


def run(edge_and_world, **faults) -> dict:
    address, world = edge_and_world
    result = faulty_link_phase(address, world, replace(QUIET, **faults))
    assert faulty_link_problems(result) == [], (result, faulty_link_table(result))
    assert result["diverged"] == result["wrong"] == 0
    assert all(r["correct"] for r in result["by_lead"].values()), result["by_lead"]   # both leads got through
    return result


def test_drops(edge_and_world):
    result = run(edge_and_world, drop=0.1)
    assert result["link"]["up"]["dropped"] + result["link"]["down"]["dropped"] > 0
    assert result["failed"] == 0, result["errors"]     # a lost message costs a resend or a reopen, nothing more


def test_a_duplicated_message_never_commits_twice(edge_and_world):
    result = run(edge_and_world, duplicate=1.0, reorder_ms=30.0)
    assert result["link"]["up"]["duplicated"] > 20 and result["link"]["down"]["duplicated"] > 20
    assert result["correct"] == result["answers"], result["errors"]       # a duplicate alone costs nothing


def test_reordering_and_jitter(edge_and_world):
    result = run(edge_and_world, reorder=0.2, reorder_ms=20.0, jitter_ms=5.0)
    assert result["link"]["up"]["reordered"] + result["link"]["down"]["reordered"] > 0


@pytest.mark.parametrize("way", ["both", "down"])
def test_a_short_partition(edge_and_world, way):
    result = run(edge_and_world, seconds=4.0, partitions=1, partition_s=1.0, partition_way=way)
    assert result["partitions"] == 1
    # the partition cut what crossed it (both ways: also the devices' verifies, once they lead)
    assert result["link"]["down"]["partitioned"] + (result["link"]["up"]["partitioned"] if way == "both" else 0) > 0
    assert result["failed"] == 0, result["errors"]      # a second's partition is well within the devices' patience


def test_the_table_names_the_faults(edge_and_world):
    result = run(edge_and_world, drop=0.05, duplicate=0.1, seconds=2.0)
    table = faulty_link_table(result)
    assert "device-led" in table and "edge-led" in table and "Committed twice or wrong: 0" in table


def test_a_late_copy_of_an_open_never_resets_its_session(edge_and_world):
    """What a duplicated open needs of the edge: the same open again gets the same reply
    (nothing is prefilled again), and a copy arriving after later rounds is refused
    ``replayed`` without touching the session."""
    address, world = edge_and_world
    question, answer = world["questions"][0], world["references"][0]
    owner = new_owner()
    session = session_id_for(owner)
    opening = Open(session=session, seq=1, owner=owner, prompt=question.question, max_new_tokens=24,
                   image=np.frombuffer(question.image_png, np.uint8), vocab_hash=world["artifact"].vocab_hash,
                   committed=np.zeros(0, np.int32))
    opened = ask(address, opening, timeout_s=30)
    assert isinstance(opened, Opened) and opened.token == answer[0]
    again = ask(address, opening, timeout_s=30)
    assert isinstance(again, Opened) and (again.token, again.position) == (opened.token, opened.position)
    verdict = ask(address, Verify(session=session, seq=2, owner=owner, start=1, tokens=np.asarray(answer[1:4], np.int32)))
    assert isinstance(verdict, Result) and (verdict.accepted, verdict.token) == (3, answer[4])
    late = ask(address, opening, timeout_s=30)
    assert isinstance(late, Error) and late.code == errors.REPLAYED
    after = ask(address, Verify(session=session, seq=3, owner=owner, start=5, tokens=np.asarray(answer[5:7], np.int32)))
    assert isinstance(after, Result) and after.status == "ok" and after.start == 5 and after.accepted == 2


@pytest.mark.parametrize("faults,says", [("drop=2", "probability"), ("dorp=0.1", "FIELD=VALUE"),
                                         ("partitions=x", "is not a int"), ("seconds=0", "seconds > 0")])
def test_the_command_refuses_faults_it_cannot_apply(faults, says):
    from click.testing import CliRunner

    from covspec.cli.main import cli

    result = CliRunner().invoke(cli, ["bench", "reliability", "--faulty-link", "--faults", faults])
    assert result.exit_code == 2 and says in result.output, result.output
