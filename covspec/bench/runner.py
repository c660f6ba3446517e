"""Run benchmark scenarios over emulated links, on the same questions, in one process.

Layout on the machine (documented for two cores): the edge server runs in a child
process pinned to the last core with one torch thread; the device (this process,
onnxruntime with one thread) and the link emulator thread are pinned to the first
core, so device and edge never fight for a core. On one core everything shares it.

Each (link, scenario, question) run yields one ``Record``; runs are interleaved
question by question so slow drifts of a shared machine hit every scenario alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from covspec.bench.link import LinkEmulator, LinkProfile
from covspec.bench.scenarios import Scenario
from covspec.bench.workload import Question
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.client import EdgeClient, RetryPolicy
from covspec.runtime_device.engine import CoInference
from covspec.runtime_device.options import GenerationSettings
from covspec.runtime_device.stats import GenerationStats
from covspec.runtime_device.target_only import generate_target_only


@dataclass
class Record:
    link: str
    scenario: str
    scene: int
    qtype: str
    answer: str
    token_ids: list[int]
    correct: bool
    description_f1: float | None
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_s: float
    mean_accepted: float
    rounds: int
    bytes_up: int
    bytes_down: int
    edge_ms: float
    device_prefill_s: float
    branch_hits: int
    pipelined_hits: int


def pin_to_cores(pid: int, cores: set[int]) -> None:
    """CPU affinity of ``pid`` (0 = this process) on Linux; a no-op elsewhere."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(pid, cores)


def core_split() -> tuple[set[int], set[int]]:
    """(device cores, edge cores): one core each when there are two or more."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    if len(cores) < 2:
        return set(cores), set(cores)
    return {cores[0]}, {cores[-1]}


class Bench:
    """Owns the edge process and the device's artifact for one benchmark run."""

    def __init__(self, artifacts: Path, target_dir: Path, settings: GenerationSettings, edge_log: Path):
        from covspec.runtime_edge import EdgeProcess, ServerConfig

        self.settings = settings
        self.device_cores, self.edge_cores = core_split()
        self.edge = EdgeProcess(target_dir, ServerConfig(bind="tcp://127.0.0.1:*", threads=1),
                                log_path=edge_log).start()
        pin_to_cores(self.edge.pid, self.edge_cores)
        pin_to_cores(0, self.device_cores)
        self.artifact = DraftArtifact.load(artifacts, threads=1)

    def close(self) -> None:
        self.edge.stop()

    def run(self, profiles: Iterable[LinkProfile], scenarios: list[Scenario], questions: list[Question],
            tick: Callable[[], None] = lambda: None) -> list[Record]:
        records: list[Record] = []
        for profile in profiles:
            link = LinkEmulator("tcp://127.0.0.1:0", self.edge.address, profile).start()
            client = EdgeClient(link.address, RetryPolicy(timeout_s=30.0))
            engine = CoInference(self.artifact, client)
            try:
                self._warm_up(engine, client, scenarios, questions[0])
                for question in questions:
                    for scenario in scenarios:
                        if scenario.kind != "assisted":
                            records.append(self._one(profile, scenario, question, engine, client))
                        tick()
            finally:
                client.close()
                link.stop()
        return records

    def _warm_up(self, engine, client, scenarios, question) -> None:
        for scenario in scenarios:
            if scenario.kind == "speculative":
                list(engine.generate(question.image_png, question.question, scenario.settings(self.settings),
                                     scenario.options))
            elif scenario.kind == "target_only":
                list(generate_target_only(client, question.image_png, question.question, self.settings))

    def _one(self, profile: LinkProfile, scenario: Scenario, question: Question, engine, client) -> Record:
        stats = GenerationStats()
        if scenario.kind == "target_only":
            stream = generate_target_only(client, question.image_png, question.question, self.settings, stats)
        else:
            stream = engine.generate(question.image_png, question.question, scenario.settings(self.settings),
                                     scenario.options, stats)
        token_ids = [t for chunk in stream for t in chunk]
        return make_record(profile.name, scenario.name, question, token_ids,
                           self.artifact.decode_text(token_ids), stats)


def make_record(link: str, scenario: str, question: Question, token_ids: list[int], answer: str,
                stats: GenerationStats) -> Record:
    from covspec.toy import shapes

    return Record(
        link=link, scenario=scenario, scene=question.scene, qtype=question.qtype, answer=answer,
        token_ids=token_ids, correct=shapes.is_correct(answer, question.answer),
        description_f1=shapes.description_f1(answer, question.answer) if question.qtype == "describe" else None,
        tokens=stats.tokens, wall_s=stats.wall_s, tokens_per_s=stats.tokens_per_s, ttft_s=stats.ttft_s,
        mean_accepted=stats.mean_accepted, rounds=stats.rounds, bytes_up=stats.bytes_up,
        bytes_down=stats.bytes_down, edge_ms=stats.edge_verify_ms + stats.edge_prefill_ms,
        device_prefill_s=stats.device_prefill_s, branch_hits=stats.branch_hits,
        pipelined_hits=stats.pipelined_hits)


def run_assisted(draft_dir: Path, target_dir: Path, questions: list[Question], settings: GenerationSettings,
                 tick: Callable[[], None] = lambda: None) -> list[Record]:
    """transformers' assisted generation (same draft and target, PyTorch, one machine)."""
    import io

    import torch
    from PIL import Image

    from covspec.families import family_for_folder

    torch.set_num_threads(2)
    target_family = family_for_folder(target_dir)
    target, processor = target_family.load(target_dir)
    draft, _ = family_for_folder(draft_dir).load(draft_dir)
    prompting = target_family.target(target, processor)
    records = []
    for warm, question in [(True, questions[0])] + [(False, q) for q in questions]:
        inputs = prompting.context(question.question, Image.open(io.BytesIO(question.image_png))).inputs
        began = time.perf_counter()
        with torch.no_grad():
            output = target.generate(**inputs, assistant_model=draft, do_sample=False,
                                     max_new_tokens=settings.max_new_tokens)
        wall = time.perf_counter() - began
        if warm:
            continue
        token_ids = output[0, inputs["input_ids"].shape[1]:].tolist()
        stats = GenerationStats(tokens=len(token_ids), wall_s=wall)
        records.append(make_record("local", "assisted", question, token_ids,
                                   processor.tokenizer.decode(token_ids, skip_special_tokens=True), stats))
        tick()
    return records


def records_to_json(records: list[Record]) -> list[dict]:
    return [asdict(r) for r in records]
