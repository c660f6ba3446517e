"""`covspec bench load`: replay devices stand for real ones, and the quick run through
the CLI checks every answer.

The replay precomputation is tested against a live edge (in this process, the toy
target): a recorded chunk table gives the target's own answer in exactly the rounds
it promises, a real device with the same fixed chunks sends the same chunks and gets
the same verdicts, and a table from a different (noisier) draft still gives the
target's answer, with fewer tokens accepted per round. The table-driven proposer in the
real device sends the real draft's chunks, chunk for chunk. An edge-led replay device
against an edge that steps by itself gets the target's answer too, partly from the
edge's own steps and partly from verified chunks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import torch_on_one_thread
from click.testing import CliRunner

from covspec.bench.capacity.load import (CONFIGURATIONS, EDGE_LED_ALWAYS, EDGE_LED_AUTO, WORKLOADS, capacity_ratios,
                                    phase_figures)
from covspec.bench.capacity.report import markdown, prefix_cache_table
from covspec.bench.harness.devices import greedy_references
from covspec.bench.capacity.replay import ReplayAnswer, replay_answer
from covspec.bench.capacity.replay_table import DEFAULT_CHUNK, build_chunk_table, replay_options
from covspec.bench.harness.workload import toy_questions
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.client import EdgeClient, Backoff
from covspec.runtime_device.drafter import Drafter
from covspec.protocol.messages import Verify
from covspec.runtime_device.draft_model import ArtifactDraft
from covspec.runtime_device.engine import CoInference
from covspec.runtime_device.options import GenerationSettings
from covspec.runtime_edge import EdgeServer, ServerConfig
from covspec.toy.models import bundled_model_dir

SETTINGS = GenerationSettings(max_new_tokens=32)
CHUNK = 6


@pytest.fixture(scope="module")
def artifacts(toy_draft_int8) -> Path:
    return toy_draft_int8


one_torch_thread = pytest.fixture(scope="module", autouse=True)(torch_on_one_thread)


@pytest.fixture(scope="module")
def world(artifacts):
    """Two descriptions and a short answer, the target's answers, the real draft's tables."""
    questions = toy_questions(3, describe_share=2 / 3)
    answers = greedy_references(bundled_model_dir("target"), questions, SETTINGS.max_new_tokens)
    artifact = DraftArtifact.load(artifacts, threads=1)
    draft = ArtifactDraft(artifact)
    tables = [build_chunk_table(draft, q, a, chunk=CHUNK, settings=SETTINGS) for q, a in zip(questions, answers)]
    return {"artifact": artifact, "questions": questions, "answers": answers, "tables": tables}


def edge_client(**config):
    with EdgeServer(bundled_model_dir("target"), ServerConfig(bind="tcp://127.0.0.1:*", **config)) as server:
        edge = EdgeClient(server.address, Backoff(timeout_s=10))
        yield edge
        edge.close()


@pytest.fixture(scope="module")
def client():
    yield from edge_client()


@pytest.fixture(scope="module")
def stepping_client():
    """An edge whose target steps every edge-led session by itself, whatever the load."""
    yield from edge_client(edge_steps="always")


def test_a_replayed_table_gives_the_target_answer_in_the_rounds_it_promises(world, client):
    for which, table in enumerate(world["tables"]):
        assert table.answer == tuple(world["answers"][which])
        assert len(table.chunks) == len(table.answer) - 1
        assert all(1 <= len(c.tokens) <= CHUNK and c.start == k + 1 for k, c in enumerate(table.chunks))
        answer = replay_answer(client, table, SETTINGS, question=which)
        assert answer.correct, answer.error
        rounds, mean_accepted = table.expected_rounds()
        assert len(answer.accepted) == len(answer.round_s) == rounds
        assert np.mean(answer.accepted) == pytest.approx(mean_accepted)
        assert sum(n for _, n in answer.commits) == answer.tokens == len(table.answer)
        path = np.cumsum([1] + [a + 1 for a in answer.accepted])[:-1]          # the prefix length of each round
        assert answer.latency_s >= table.prefill_s + sum(table.chunks[k - 1].draft_s for k in path)   # paced
        assert answer.cpu_s < 0.5 * answer.latency_s
        baseline = replay_answer(client, table, SETTINGS, mode="target_only")
        assert baseline.correct and len(baseline.round_s) == len(table.answer) - 1, baseline.error


def test_the_table_holds_the_chunks_a_real_device_sends(world, client):
    """A real device drafting fixed chunks of the same length (onnxruntime, its own
    cache history) sends chunks of the same lengths and gets the same verdicts."""
    engine = CoInference(world["artifact"], client)
    for question, table in zip(world["questions"], world["tables"]):
        events: list[dict] = []
        tokens = [t for chunk in engine.generate(question.image_png, question.question, SETTINGS,
                                                 replay_options(CHUNK), trace=events.append) for t in chunk]
        assert tuple(tokens) == table.answer
        real = list(zip([e["len"] for e in events if e["event"] == "chunk"],
                        [e["accepted"] for e in events if e["event"] == "verdict"]))
        k, replayed = 1, []
        while k < len(table.answer):
            chunk = table.chunks[k - 1].tokens
            accepted = next((i for i, t in enumerate(chunk) if k + i >= len(table.answer) or t != table.answer[k + i]),
                            len(chunk))
            replayed.append((len(chunk), accepted))
            k += accepted + 1
        assert real == replayed


class RecordingClient(EdgeClient):
    """An edge client that keeps every ``verify`` it sends."""

    def __init__(self, address: str):
        super().__init__(address, Backoff(timeout_s=10))
        self.verifies: list[Verify] = []

    def send(self, message) -> None:
        if isinstance(message, Verify):
            self.verifies.append(message)
        super().send(message)

    def chunks(self) -> list[dict]:
        """What each chunk carried, the session's names and round numbers aside."""
        return [{name: value.tolist() if isinstance(value, np.ndarray) else value
                 for name, value in vars(verify).items() if name not in ("session", "seq", "owner")}
                for verify in self.verifies]


def test_the_replay_proposer_equals_a_real_device_chunk_for_chunk(world, client):
    """The same device (``CoInference``) with the real draft and with the table-driven
    proposer sends the same chunks, field for field, and gets the same answer."""
    for which, (question, table) in enumerate(zip(world["questions"], world["tables"])):
        real, replayed = RecordingClient(client.address), RecordingClient(client.address)
        try:
            tokens = [t for chunk in CoInference(world["artifact"], real).generate(
                question.image_png, question.question, SETTINGS, replay_options(CHUNK)) for t in chunk]
            answer = replay_answer(replayed, table, SETTINGS, pace=0.0, question=which)
        finally:
            real.close()
            replayed.close()
        assert answer.correct and tuple(tokens) == table.answer, answer.error
        assert len(real.chunks()) == len(answer.accepted) > 0
        assert replayed.chunks() == real.chunks()


class NoisyDecoder:
    """The real draft decoder with seeded Gumbel noise on its logits: another, weaker draft."""

    def __init__(self, decoder, scale: float, seed: int = 0):
        self.decoder, self.scale = decoder, scale
        self.rng = np.random.default_rng(seed)

    def get_inputs(self):
        return self.decoder.get_inputs()

    def run(self, names, feeds):
        logits, *rest = self.decoder.run(names, feeds)
        return [logits + self.scale * self.rng.gumbel(size=logits.shape).astype(logits.dtype), *rest]


@pytest.fixture(scope="module")
def noisy_tables(world):
    """The tables of a weaker draft (the real one with noise) along the same answers."""
    artifact = world["artifact"]
    noisy = ArtifactDraft(artifact)
    noisy.drafter = Drafter(NoisyDecoder(artifact.decoder, scale=4.0), artifact.manifest.decoder, artifact.embed)
    return [build_chunk_table(noisy, question, answer, chunk=CHUNK, settings=SETTINGS)
            for question, answer in zip(world["questions"], world["answers"])]


def test_a_table_from_a_different_draft_still_gives_the_target_answer(world, noisy_tables, client):
    own, other = [], []
    for which, table in enumerate(noisy_tables):
        answer = replay_answer(client, table, SETTINGS)
        assert answer.correct, answer.error
        assert len(answer.accepted) == table.expected_rounds()[0]
        other += answer.accepted
        own += replay_answer(client, world["tables"][which], SETTINGS).accepted
    assert np.mean(other) < np.mean(own)
    assert len(other) > len(own)


def test_an_edge_led_replay_device_commits_edge_steps_and_verified_chunks(world, noisy_tables, stepping_client):
    """Against an edge that always steps: the target's own answer, some tokens streamed
    by the edge's steps and some from verdicts on the table's chunks (whose ``start``
    may lie past the chunk's). A weaker draft's chunks, often contradicted by streamed
    tokens and given up, still give the target's answer."""
    steps = verified = 0
    for which, table in enumerate(world["tables"]):
        answer = replay_answer(stepping_client, table, SETTINGS, mode="edge_led", question=which)
        assert answer.correct, answer.error
        assert sum(n for _, n in answer.commits) == answer.tokens == len(table.answer)
        assert len(answer.round_s) == len(answer.accepted)                     # one round per verdict
        assert answer.cpu_s < 0.5 * answer.latency_s
        steps += answer.edge_steps
        verified += answer.tokens - 1 - answer.edge_steps                      # the opened token aside
    assert steps > 0 and verified > 0
    for which, table in enumerate(noisy_tables):
        answer = replay_answer(stepping_client, table, SETTINGS, mode="edge_led", question=which)
        assert answer.correct, answer.error
    baseline = replay_answer(stepping_client, world["tables"][0], SETTINGS)    # the other modes have no edge steps
    assert baseline.correct and baseline.edge_steps is None


def test_a_prefix_off_the_answer_gets_a_one_token_chunk(world):
    table = world["tables"][0]
    assert table.chunk_for(list(table.answer[:3])).tokens == table.chunks[2].tokens
    assert table.chunk_for(list(table.answer[:3])) is not table.chunks[2]          # a fresh copy each round
    wrong = [table.answer[0], (table.answer[1] + 1) % 50]
    fallback = table.chunk_for(wrong)
    assert fallback.start == 2 and fallback.tokens == [wrong[-1]]


def test_phase_figures_count_the_window_and_every_answer():
    began = 100.0

    def answer(device, commits, correct=True, rounds=(0.01, 0.03)):
        return ReplayAnswer(device, 0, "describe", correct, sum(n for _, n in commits), began, commits[-1][0],
                            commits=commits, round_s=list(rounds), accepted=[3] * len(rounds))

    answers = [answer(0, [(100.5, 1), (101.0, 4), (102.5, 5)]), answer(1, [(101.5, 1), (101.9, 3)]),
               answer(1, [(102.2, 2), (103.0, 2)], correct=False)]
    figures = phase_figures(answers, began, seconds=2.0, wall_s=3.0, devices=3)
    assert figures["edge_step_share"] is None and figures["edge_steps"] is None       # no edge-led answer
    answers[0].edge_steps, answers[1].edge_steps = 5, 1                      # edge-led: 6 of their 14 tokens
    assert phase_figures(answers[:2], began, 2.0, 3.0, 3)["edge_step_share"] == round(6 / 14, 3)
    assert figures["tokens_in_window"] == 9 and figures["tokens_per_s"] == 4.5
    assert figures["device_tokens_per_s_p50"] == 2.0           # devices: 5, 4, 0 tokens in the window
    assert figures["tokens"] == 18 and figures["tokens_per_s_wall"] == 6.0
    assert figures["answers"] == 3 and figures["correct"] == 2 and not figures["all_correct"]
    assert figures["round_ms_p50"] == 20.0 and figures["mean_accepted"] == 3.0


def test_ratios_and_report_on_a_crafted_run():
    rates = {"target-only batched": 100.0, "covspec batched": 250.0, "covspec unbatched": 50.0,
             EDGE_LED_AUTO.name: 200.0, EDGE_LED_ALWAYS.name: 150.0}
    phases = [{"configuration": c.name, "devices": n, "workload": w, "tokens_per_s": rates[c.name] * n,
               "device_tokens_per_s_p50": rates[c.name], "round_ms_p50": 5.0, "round_ms_p99": 9.0,
               "mean_accepted": 4.0, "forwards_per_token": 0.3, "edge_peak_mib": 500.0, "correct": 3, "answers": 3,
               "all_correct": True, "edge_step_share": 0.25 if c.mode == "edge_led" else None}
              for c in CONFIGURATIONS for n in (4, 16) for w in WORKLOADS]
    ratios = capacity_ratios([{**p, "tokens_per_s": np.float64(p["tokens_per_s"])} for p in phases])
    json.dumps(ratios)                                                  # plain Python numbers, even from numpy ones
    assert [g["value"] for g in ratios["goals"]] == [5.0, 2.5] and all(g["met"] for g in ratios["goals"])
    assert {(r["edge_led_over_target_only"], r["edge_led_over_batched"]) for r in ratios["by_level"]} == {(2.0, 0.8)}
    summary = {"plan": {"questions": 2, "describe_share": 0.5, "max_new_tokens": 24, "seconds": 1.0, "chunk": 8},
               "tables": {"descriptions": {"expected_mean_accepted": 4.0}}, "phases": phases, "ratios": ratios,
               "agreement": [], "all_correct": True}
    text = markdown(summary)
    assert text.count("| covspec batched |") == 4 and "2.50x" in text and "NOT met" not in text
    assert "| 16 | mixed | 2.50x | 5.00x | 2.00x | 0.80x |" in text
    assert "| covspec edge-led (always) | 16 | mixed | 2400 | 150.0 | 5.0 / 9.0 | 4.00 | 0.300 | 25% |" in text
    assert "auto 4: 25% edge steps, 0.300; 16: 25% edge steps, 0.300;" in text


def test_repeated_images_ask_about_one_scene_and_report_the_prefix_cache():
    from covspec.bench.capacity.load import BATCHED, PREFIX_CACHED, CapacityPlan
    from covspec.bench.harness.workload import follow_ups, toy_questions

    first = toy_questions(2, describe_share=0.5)
    assert follow_ups(first, 1, describe_only=False) == first                  # the default: a scene per question
    asked = follow_ups(first, 3, describe_only=False)
    assert [q.scene for q in asked] == [first[0].scene] * 3 + [first[1].scene] * 3
    assert len({q.question for q in asked[:3]}) == 3 and len({q.image_png for q in asked[:3]}) == 1
    described = follow_ups(toy_questions(1, describe_share=1.0), 2, describe_only=True)
    assert described[0] == described[1] and described[0].qtype == "describe"
    assert PREFIX_CACHED not in CapacityPlan().configurations and PREFIX_CACHED in \
        CapacityPlan(repeat_images=2).configurations
    phases = [{"configuration": c.name, "devices": 2, "workload": "mixed", "tokens_per_s": rate,
               "prefill_share": share, "prefix_hits": hits, "prefix_misses": 2}
              for c, rate, share, hits in ((BATCHED, 100.0, 0.5, 0), (PREFIX_CACHED, 125.0, 0.25, 4))]
    assert "| mixed | 2 | 100 / 125 | 1.25x | 50% / 25% | 4 / 2 |" in prefix_cache_table(phases)
    assert prefix_cache_table(phases[:1]) == ""


def test_quick_load_through_the_cli(tmp_path, artifacts):
    from covspec.cli.bench_load_cmd import DEFAULT_CHUNK as CLI_CHUNK, load

    assert CLI_CHUNK == DEFAULT_CHUNK
    out = tmp_path / "bench"
    result = CliRunner().invoke(load, ["--quick", "--no-markdown", "--out", str(out), "--artifacts", str(artifacts),
                                       "--plot", str(tmp_path / "capacity.png")])
    assert result.exit_code == 0, result.output[-3000:]
    summary = json.loads((out / "load-quick.json").read_text())
    assert summary["all_correct"]
    seen = {(p["configuration"], p["workload"]) for p in summary["phases"]}
    assert seen == {(c.name, w) for c in CONFIGURATIONS for w in WORKLOADS}
    for phase in summary["phases"]:
        assert phase["all_correct"] and phase["answers"] > 0 and phase["tokens_per_s"] > 0, phase
        assert phase["forwards_per_token"] > 0 and phase["edge_peak_mib"] > 0, phase
        assert (phase["edge_step_share"] is None) == (not phase["configuration"].startswith("covspec edge-led"))
        if phase["configuration"] == EDGE_LED_ALWAYS.name:
            assert phase["edge_steps"] > 0, phase
    assert [a["devices"] for a in summary["agreement"]] == [2]
    assert summary["agreement"][0]["real_all_correct"] and summary["agreement"][0]["real_tokens_per_s"] > 0
    assert (tmp_path / "capacity.png").stat().st_size > 0
    assert "| covspec unbatched | 2 | mixed |" in result.output
    assert "| covspec edge-led (auto) | 2 | mixed |" in result.output
    assert "edge-led (auto) / target-only" in result.output
