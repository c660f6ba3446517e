"""The edge's capacity: N devices against one edge (``covspec bench load``).

For every level N and every ``Configuration`` (target-only on a batching edge,
CoVSpec on a batching edge, CoVSpec on an edge that runs one session per forward,
``max_batch=1``) a fresh edge child process (``EdgeProcess``, one torch thread; one
per configuration and N, levels outermost so drifts of a shared machine hit every
configuration alike) serves N replay devices (``covspec.bench.replay``: the real int8 draft's chunks, precomputed
along the target's own answers, at negligible device CPU) for ``seconds`` on
descriptions, then for ``seconds`` on a mixed stream (descriptions and short answers).
Replay devices take the real draft's time (``plan.pace`` times it, sleeping: each
stands for a device with a CPU of its own). A phase reports (``phase_figures``):

- aggregate committed tokens/s: tokens committed in the window [start, start +
  seconds] over all devices, divided by ``seconds`` (devices then finish the answer in
  progress, unmeasured but checked); per-device tokens/s (p50 over devices);
- round latency p50/p99 (a verify round trip; target-only: the gap between streamed
  tokens), mean accepted tokens per round, the replay device's CPU per round;
- target forwards per committed token and the edge's peak memory, from the edge's
  ``Pong`` counters before and after the phase (the peak is the edge's since it
  started: descriptions run first on each edge); the resident set sampled during
  the phase beside it;
- every answer checked against the target's own greedy answer.

At the ``agreement_levels`` the CoVSpec batched edge also serves N *real* devices
(``DeviceLoop``: onnxruntime drafting with the same fixed chunks) on descriptions,
and both runs' tokens/s (all answers' tokens over the wall time, the same formula
for both) are compared: replay devices stand for real ones when they agree.

``measure_capacity`` returns one JSON-ready dict; ``capacity_ratios`` computes the
ratios the goals name from it (same run, same machine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from covspec.bench.devices import greedy_references, run_devices
from covspec.bench.load import ask, start_edge
from covspec.bench.reliability import RssSampler
from covspec.bench.replay import DEFAULT_CHUNK, ChunkTable, ReplayAnswer, build_chunk_table, replay_options, run_replay
from covspec.bench.workload import toy_questions
from covspec.protocol.messages import Ping, Pong
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.engine import ArtifactDraft
from covspec.runtime_device.options import GenerationSettings

MIB = 1024 * 1024
WORKLOADS = ("descriptions", "mixed")
GOAL_BATCHING = 3.0           # batched / unbatched CoVSpec, 16 devices
GOAL_SPEEDUP = 2.2            # CoVSpec / target-only, both batched, descriptions, 4 devices


@dataclass(frozen=True)
class Configuration:
    """How devices and the edge run: ``mode`` is the devices' (``speculative`` or
    ``target_only``), ``max_batch`` the edge's (sessions per target forward)."""

    name: str
    mode: str
    max_batch: int


TARGET_ONLY = Configuration("target-only batched", "target_only", 64)
BATCHED = Configuration("covspec batched", "speculative", 64)
UNBATCHED = Configuration("covspec unbatched", "speculative", 1)
CONFIGURATIONS = (TARGET_ONLY, BATCHED, UNBATCHED)


@dataclass(frozen=True)
class CapacityPlan:
    """The sizes of one ``covspec bench load`` run."""

    levels: tuple[int, ...] = (1, 4, 16, 32)
    seconds: float = 20.0              # per phase (configuration x N x workload)
    questions: int = 8                 # per workload
    describe_share: float = 0.5        # of the mixed stream
    max_new_tokens: int = 64
    chunk: int = DEFAULT_CHUNK         # tokens per drafted chunk
    pace: float = 1.0                  # replay devices take this times the real draft's time (0: none)
    agreement_levels: tuple[int, ...] = (1, 4)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.levels or min(self.levels) < 1:
            raise ValueError("levels: give at least one number of devices, each >= 1")
        if not set(self.agreement_levels) <= set(self.levels):
            raise ValueError(f"agreement levels {self.agreement_levels} must be among the levels {self.levels}")
        if self.seconds <= 0 or self.questions < 1 or self.max_new_tokens < 1 or self.chunk < 1:
            raise ValueError("seconds, questions, max_new_tokens and chunk must be positive")
        if self.pace < 0:
            raise ValueError("pace must be >= 0")
        if not 0 <= self.describe_share <= 1:
            raise ValueError("describe_share must be in [0, 1]")

    @classmethod
    def quick(cls) -> "CapacityPlan":
        """A smoke test of every phase: 2 devices, 1 s per phase, 2 questions, short answers."""
        return cls(levels=(2,), seconds=1.0, questions=2, max_new_tokens=24, agreement_levels=(2,))


def prepare_tables(plan: CapacityPlan, artifact: DraftArtifact, target_dir: Path) -> dict[str, list[ChunkTable]]:
    """Per workload, one chunk table per question: the target's greedy answers (computed
    once per distinct question), then the real draft along each of them."""
    workloads = {"descriptions": toy_questions(plan.questions, describe_share=1.0),
                 "mixed": toy_questions(plan.questions, describe_share=plan.describe_share)}
    distinct = list({(q.scene, q.qtype): q for questions in workloads.values() for q in questions}.values())
    answers = greedy_references(target_dir, distinct, plan.max_new_tokens)
    settings = GenerationSettings(max_new_tokens=plan.max_new_tokens, seed=plan.seed)
    draft = ArtifactDraft(artifact)
    tables = {(q.scene, q.qtype): build_chunk_table(draft, q, answer, chunk=plan.chunk, settings=settings)
              for q, answer in zip(distinct, answers)}
    return {name: [tables[(q.scene, q.qtype)] for q in questions] for name, questions in workloads.items()}


def table_figures(tables: Sequence[ChunkTable]) -> dict:
    """What the chunk tables promise: answer lengths, rounds and accepted tokens per
    round of an exact greedy edge; the real draft's time per prefill and per chunk
    (what a paced replay device waits), and the seconds the builds took."""
    rounds = [t.expected_rounds() for t in tables]
    return {"questions": len(tables), "answer_tokens": [len(t.answer) for t in tables],
            "expected_rounds": [r for r, _ in rounds],
            "expected_mean_accepted": round(float(np.mean([a for _, a in rounds])), 3),
            "draft_prefill_ms_mean": round(1000 * float(np.mean([t.prefill_s for t in tables])), 2),
            "draft_chunk_ms_mean": round(1000 * float(np.mean([c.draft_s for t in tables for c in t.chunks]
                                                              or [0.0])), 2),
            "draft_build_s": round(sum(t.build_s for t in tables), 3)}


def phase_figures(answers: Sequence[ReplayAnswer], began: float, seconds: float, wall_s: float, devices: int) -> dict:
    """The figures of one phase whose ``devices`` devices started at ``began``
    (monotonic) and were stopped after ``seconds``; ``wall_s`` ran to the last answer."""
    end = began + seconds
    per_device = np.zeros(devices)
    for answer in answers:
        per_device[answer.device] += sum(n for at, n in answer.commits if at <= end)
    rounds = np.array([s for a in answers for s in a.round_s]) * 1000
    accepted = [n for a in answers for n in a.accepted]
    tokens = sum(a.tokens for a in answers)
    errors = sorted({a.error for a in answers if a.error})
    return {"answers": len(answers), "correct": sum(a.correct for a in answers),
            "all_correct": bool(answers) and all(a.correct for a in answers),
            "failed": sum(bool(a.error) for a in answers), "errors": errors[:3],
            "short_answers": sum(a.qtype != "describe" for a in answers),
            "tokens": tokens, "tokens_in_window": int(per_device.sum()),
            "tokens_per_s": round(float(per_device.sum()) / seconds, 1),
            "device_tokens_per_s_p50": round(float(np.median(per_device)) / seconds, 1),
            "tokens_per_s_wall": round(tokens / wall_s, 1) if wall_s > 0 else 0.0,
            "rounds": int(rounds.size),
            "round_ms_p50": round(float(np.percentile(rounds, 50)), 2) if rounds.size else None,
            "round_ms_p99": round(float(np.percentile(rounds, 99)), 2) if rounds.size else None,
            "mean_accepted": round(float(np.mean(accepted)), 3) if accepted else None,
            "device_cpu_ms_per_round": round(1000 * sum(a.cpu_s for a in answers) / rounds.size, 3)
            if rounds.size else None,
            "wall_s": round(wall_s, 2)}


def edge_counters(address: str) -> Pong:
    reply = ask(address, Ping(session="", seq=0), timeout_s=30.0)
    if not isinstance(reply, Pong):
        raise RuntimeError(f"the edge at {address} did not answer a ping ({reply!r})")
    return reply


def counter_figures(before: Pong, after: Pong) -> dict:
    """Target forwards per committed token over a phase, and the edge's peak memory."""
    forwards, committed = after.forwards - before.forwards, after.committed - before.committed
    return {"forwards": forwards, "committed": committed,
            "forwards_per_token": round(forwards / committed, 3) if committed else None,
            "edge_peak_mib": round(after.peak_bytes / MIB, 1)}


def measure_phase(configuration: Configuration, devices: int, workload: str, tables: Sequence[ChunkTable],
                  address: str, edge_pid: int, plan: CapacityPlan) -> dict:
    """``devices`` replay devices of ``configuration`` on ``workload`` for ``plan.seconds``."""
    settings = GenerationSettings(max_new_tokens=plan.max_new_tokens, seed=plan.seed)
    before = edge_counters(address)
    rss = RssSampler(edge_pid)
    rss.start()
    answers, began, wall = run_replay(devices, plan.seconds, address, tables, mode=configuration.mode,
                                      pace=plan.pace, settings=settings)
    memory = rss.finish()
    return {"configuration": configuration.name, "devices": devices, "workload": workload,
            **phase_figures(answers, began, plan.seconds, wall, devices),
            **counter_figures(before, edge_counters(address)), "edge_rss_peak_mib": memory["rss_peak_mib"]}


def agreement_phase(devices: int, tables: Sequence[ChunkTable], artifact: DraftArtifact, address: str,
                    plan: CapacityPlan, replayed: dict) -> dict:
    """``devices`` real devices (onnxruntime drafting, the replay's chunk length) on the
    same edge and questions as the replay phase ``replayed``; both runs' figures."""
    settings = GenerationSettings(max_new_tokens=plan.max_new_tokens, seed=plan.seed)
    before = edge_counters(address)
    answers, wall = run_devices(devices, plan.seconds, artifact, address, [t.question for t in tables],
                                [list(t.answer) for t in tables], settings=settings,
                                options=replay_options(plan.chunk))
    counters = counter_figures(before, edge_counters(address))
    real = round(sum(a.tokens for a in answers) / wall, 1) if wall > 0 else 0.0
    replay = replayed["tokens_per_s_wall"]
    return {"devices": devices, "workload": replayed["workload"], "replay_tokens_per_s": replay,
            "real_tokens_per_s": real, "real_over_replay": round(real / replay, 3) if replay else None,
            "replay_answers": replayed["answers"], "real_answers": len(answers),
            "replay_all_correct": replayed["all_correct"],
            "real_all_correct": bool(answers) and all(a.correct for a in answers),
            "real_errors": sorted({a.error for a in answers if a.error})[:3],
            "replay_forwards_per_token": replayed["forwards_per_token"],
            "real_forwards_per_token": counters["forwards_per_token"]}


def measure_capacity(plan: CapacityPlan, artifacts: Path, target_dir: Path, log_path: Path,
                     phase: Callable[[str], None] = lambda name: None, tick: Callable[[], None] = lambda: None) -> dict:
    """Every phase of ``plan``; ``phase(name)`` is called as each begins, ``tick()`` as each ends."""
    phase("chunk tables: the target's answers, the real draft along them")
    artifact = DraftArtifact.load(artifacts, threads=1)
    tables = prepare_tables(plan, artifact, target_dir)
    summary: dict = {"plan": asdict(plan), "configurations": [asdict(c) for c in CONFIGURATIONS],
                     "tables": {name: table_figures(t) for name, t in tables.items()}, "phases": [], "agreement": []}
    for devices in plan.levels:                 # configurations interleaved per level: drifts hit them alike
        for configuration in CONFIGURATIONS:
            edge = start_edge(target_dir, "tcp://127.0.0.1:*", log_path, max_batch=configuration.max_batch,
                              max_sessions=max(64, 2 * devices))
            try:
                for workload in WORKLOADS:
                    phase(f"{configuration.name}: {devices} devices, {workload}")
                    summary["phases"].append(measure_phase(configuration, devices, workload, tables[workload],
                                                           edge.address, edge.pid, plan))
                    tick()
                if configuration is BATCHED and devices in plan.agreement_levels:
                    phase(f"{configuration.name}: {devices} real devices, descriptions")
                    replayed = next(p for p in summary["phases"] if p["configuration"] == BATCHED.name
                                    and p["devices"] == devices and p["workload"] == "descriptions")
                    summary["agreement"].append(agreement_phase(devices, tables["descriptions"], artifact,
                                                                edge.address, plan, replayed))
                    tick()
            finally:
                edge.stop()
    summary["ratios"] = capacity_ratios(summary["phases"])
    summary["all_correct"] = (all(p["all_correct"] for p in summary["phases"])
                              and all(a["real_all_correct"] for a in summary["agreement"]))
    return summary


def phase_count(plan: CapacityPlan) -> int:
    """How many phases (``tick`` calls) ``measure_capacity`` runs for ``plan``."""
    return len(plan.levels) * len(CONFIGURATIONS) * len(WORKLOADS) + len(plan.agreement_levels)


def capacity_ratios(phases: Sequence[dict]) -> dict:
    """Per level and workload: CoVSpec batched over target-only batched, and CoVSpec
    batched over unbatched (aggregate tokens/s); and the two goals' figures."""
    rate = {(p["configuration"], p["devices"], p["workload"]): p["tokens_per_s"] for p in phases}

    def ratio(top: Configuration, bottom: Configuration, devices: int, workload: str) -> float | None:
        a, b = rate.get((top.name, devices, workload)), rate.get((bottom.name, devices, workload))
        return round(float(a) / float(b), 2) if a is not None and b else None

    levels = sorted({p["devices"] for p in phases})
    rows = [{"devices": n, "workload": w, "covspec_over_target_only": ratio(BATCHED, TARGET_ONLY, n, w),
             "batched_over_unbatched": ratio(BATCHED, UNBATCHED, n, w)} for n in levels for w in WORKLOADS]
    batching = ratio(BATCHED, UNBATCHED, 16, "descriptions")
    speedup = ratio(BATCHED, TARGET_ONLY, 4, "descriptions")
    goals = [{"goal": "covspec batched / unbatched at 16 devices (descriptions)", "target": GOAL_BATCHING,
              "value": batching, "met": None if batching is None else bool(batching >= GOAL_BATCHING)},
             {"goal": "covspec / target-only, both batched, at 4 devices (descriptions)", "target": GOAL_SPEEDUP,
              "value": speedup, "met": None if speedup is None else bool(speedup >= GOAL_SPEEDUP)}]
    return {"by_level": rows, "goals": goals}
