"""Issue 30: the soak, with a few seconds and 2 devices (``covspec.bench.reliability.soak``).

A real edge (the bundled toy target, in this process, whose memory is watched), two real
devices (toy int8 draft on onnxruntime; one device-led, one edge-led) and bursts of
hostile messages with a victim session. Every answer is the target's own, the hostile
messages get their replies and end no victim, and the report has its memory figures and
latency percentiles per bucket.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import torch_on_one_thread

import covspec
from covspec.bench.harness.devices import greedy_references
from covspec.bench.harness.workload import toy_questions
from covspec.bench.reliability.hostile import TargetFacts
from covspec.bench.reliability.soak import SoakPlan, soak_phase, soak_problems, soak_table
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.options import GenerationSettings
from covspec.runtime_edge import EdgeServer, ServerConfig
from covspec.runtime_edge.target import TargetModel
from covspec.toy.artifacts import ensure_toy_artifacts
from covspec.toy.models import bundled_model_dir

ARTIFACTS = Path(covspec.__file__).parents[1] / "artifacts" / "toy-draft-int8"
SETTINGS = GenerationSettings(max_new_tokens=24)

one_torch_thread = pytest.fixture(scope="module", autouse=True)(torch_on_one_thread)


def test_a_short_soak_keeps_every_promise():
    questions = toy_questions(4)
    references = greedy_references(bundled_model_dir("target"), questions, SETTINGS.max_new_tokens)
    target = TargetModel.load(bundled_model_dir("target"))
    victim = max(range(len(questions)), key=lambda i: len(references[i]))
    facts = TargetFacts(target.vocab_size, target.vocab_hash, questions[victim].image_png, 1024 * 1024,
                        victim_prompt=questions[victim].question, victim_answer=tuple(references[victim]))
    world = {"artifact": DraftArtifact.load(ensure_toy_artifacts(ARTIFACTS, lambda line: None), threads=1),
             "questions": questions, "references": references, "settings": SETTINGS}
    plan = SoakPlan(seconds=5.0, devices=2, warmup_s=1.0, hostile_every_s=1.0, hostile_burst=40, bucket_s=2.0,
                    max_rss_growth_pct=50.0)
    config = ServerConfig(bind="tcp://127.0.0.1:*", max_message_bytes=1024 * 1024, idle_timeout_s=20.0)
    with EdgeServer(target, config) as server:
        result = soak_phase(os.getpid(), server.address, facts, world, plan)
    assert soak_problems(result) == [], (result, soak_table(result))
    assert result["answers"] >= 4 and result["correct"] == result["answers"]
    assert result["hostile"]["bursts"] >= 2 and result["hostile"]["sent"] == 40 * result["hostile"]["bursts"]
    assert result["hostile"]["victim_checks"] >= result["hostile"]["bursts"]
    assert result["rss_warm_mib"] > 0 and result["rss_end_mib"] > 0
    assert len(result["buckets"]) >= 3 and sum(b["answers"] for b in result["buckets"]) == result["answers"]
    assert all(b["p50_s"] <= b["p95_s"] <= b["p99_s"] for b in result["buckets"])
    table = soak_table(result)
    assert "growth after warm-up" in table and "| from (s) |" in table


def test_the_plan_refuses_what_cannot_run():
    with pytest.raises(ValueError, match="warm-up"):
        SoakPlan(seconds=10, warmup_s=10)
    with pytest.raises(ValueError, match="devices"):
        SoakPlan(devices=0)


def test_a_growing_edge_is_a_broken_promise():
    result = {"plan": {"max_rss_growth_pct": 5.0}, "correct": 3, "wrong": 0, "diverged": 0, "failed": 0,
              "errors": [], "edge_died": False, "rss_growth_pct": 7.5,
              "hostile": {"unexpected": 0, "unanswered": 0, "misaddressed": 0, "victims_ended_by_others": 0,
                          "victim_wrong": 0}}
    assert soak_problems(result) == ["edge RSS grew 7.5% after the warm-up (goal < 5%)"]
    assert soak_problems({**result, "rss_growth_pct": 1.0}) == []
