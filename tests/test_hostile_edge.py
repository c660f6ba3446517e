"""Issue 30: a hostile edge against the real device.

``covspec.bench.reliability.hostile_edge.HostileEdge`` is a fake edge on a real ZeroMQ ROUTER; the
device is the real one (``CoInference`` with the toy int8 draft on onnxruntime). For
every case, device-led and edge-led, the generation must end with ``EdgeError`` or
``EdgeUnreachable`` (never another exception), never yield a token outside the
vocabulary, and end within its patience. The replies that cannot be true are refused
as such (``bad_reply``) at once; the others (undecodable, for other rounds or
sessions, silence) end in ``EdgeUnreachable`` saying what came meanwhile.
"""

from __future__ import annotations

import re

import pytest

from covspec.bench.reliability.hostile_edge import CASES, SLACK_S, run_case
from covspec.bench.harness.workload import toy_questions
from covspec.protocol.errors import BAD_REPLY
from covspec.protocol.messages import Result
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.client import Backoff
from covspec.runtime_device.draft_model import ArtifactDraft
from covspec.runtime_device.replies import EdgeMisbehaved, check_verdict

POLICY = Backoff(timeout_s=0.3, retries=1, backoff_s=0.02)
ATTEMPTS = 1
# How each case must end: refused at once as a reply that cannot be true, or given up on.
REFUSED = "EdgeMisbehaved bad_reply"
EXPECTED = {
    ("wrong seq", "device"): "EdgeUnreachable", ("wrong seq", "edge"): "EdgeUnreachable",
    ("accepted beyond the chunk", "device"): REFUSED, ("accepted beyond the chunk", "edge"): REFUSED,
    ("token outside the vocabulary (verdict)", "device"): REFUSED,
    ("token outside the vocabulary (verdict)", "edge"): REFUSED,
    ("token outside the vocabulary (opened)", "device"): REFUSED,
    ("token outside the vocabulary (opened)", "edge"): REFUSED,
    ("start beyond the committed end", "device"): REFUSED,
    ("start beyond the committed end", "edge"): "EdgeUnreachable",   # a gap in the stream: reopened, in vain
    ("wrong dtypes", "device"): "EdgeUnreachable", ("wrong dtypes", "edge"): "EdgeUnreachable",
    ("huge frames", "device"): "EdgeUnreachable", ("huge frames", "edge"): "EdgeUnreachable",
    ("silence", "device"): "EdgeUnreachable", ("silence", "edge"): "EdgeUnreachable",
    ("endless stream", "device"): "EdgeUnreachable",
    ("endless stream", "edge"): REFUSED,                            # reaches max_new_tokens without ending
    ("verdict for another session", "device"): "EdgeUnreachable",
    ("verdict for another session", "edge"): "EdgeUnreachable",
    ("stale for ever", "device"): "EdgeUnreachable",                # never stale on an honest edge: reopened
    ("stale for ever", "edge"): "EdgeUnreachable",                  # stale again and again, no token between
}
# What the error says, where it says more than "no reply".
SAYS = {"wrong dtypes": "did not decode", "endless stream": "max_new_tokens|answered other",
        "accepted beyond the chunk": "accepts 4", "token outside the vocabulary": "outside the vocabulary",
        "start beyond the committed end": "starts at|streamed token at", "verdict for another session": "lost session",
        "stale for ever": "lost session"}


@pytest.fixture(scope="module")
def draft(toy_draft_int8):
    return ArtifactDraft(DraftArtifact.load(toy_draft_int8, threads=1))


@pytest.fixture(scope="module")
def question():
    return toy_questions(1)[0]


def test_every_case_is_covered():
    assert {case.name for case in CASES} == {name for name, _ in EXPECTED}


@pytest.mark.parametrize("lead", ["device", "edge"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name.replace(" ", "-"))
def test_the_device_ends_every_generation_with_a_clear_error_within_its_patience(case, lead, draft, question):
    outcome = run_case(case, draft, question.image_png, question.question, lead, POLICY, ATTEMPTS)
    assert outcome.ended == EXPECTED[(case.name, lead)], outcome.message
    assert outcome.outside_vocab == 0
    assert outcome.seconds <= outcome.patience_s + SLACK_S, outcome
    assert not outcome.broken
    assert len(outcome.message) > 30 and "Traceback" not in outcome.message
    says = next((pattern for name, pattern in SAYS.items() if case.name.startswith(name)), None)
    if says is not None:
        assert re.search(says, outcome.message), outcome.message


def test_a_verdict_that_cannot_be_true_is_refused_before_anything_is_committed():
    def result(**fields):
        return Result(**{"session": "s", "seq": 3, "start": 4, "accepted": 1, "token": 7, **fields})

    assert check_verdict(result(), 4, 2, 4, 16, 50) == 0
    assert check_verdict(result(start=6), 4, 3, 6, 16, 50, edge_led=True) == 2          # skipped what it stepped
    for bad, code_text in [(result(accepted=3), "accepts 3"), (result(token=50), "outside"),
                           (result(token=-2), "outside"), (result(token=-1), "does not end"),
                           (result(start=5), "starts at 5"), (result(accepted=2, token=9), "beyond max_new_tokens")]:
        with pytest.raises(EdgeMisbehaved, match=code_text) as info:
            check_verdict(bad, 4, 2, 14 if "beyond" in code_text else 4, 16, 50)
        assert info.value.code == BAD_REPLY
    with pytest.raises(EdgeMisbehaved, match="does not end the generation"):
        check_verdict(result(accepted=1, token=9), 4, 2, 14, 16, 50)
