"""Load and faults against a live edge child process, every answer checked.

Each phase runs well-behaved devices (``covspec.bench.harness.devices``) against an edge in a
child process (``EdgeProcess``) and returns one JSON-ready dict:

- ``load_level``: ``count`` devices answering back to back for ``seconds``; answers,
  how many equal the target's greedy answer, committed tokens/s over all devices,
  latency percentiles;
- ``restart_phase``: devices answering while the edge is killed with SIGKILL
  ``kills`` times mid-generation and restarted on the same address; the devices
  reopen their sessions with the committed tokens (counted) and every answer must
  still be the target's;
- ``vanished_phase``: clients that open a session and disappear without ``close``
  while devices answer; each vanished session is probed with a wrong owner (which
  never refreshes it) until the edge says it is unknown: the time it took, against
  the edge's idle timeout.

``fuzz_phase`` runs ``covspec.bench.reliability.fuzz_run.run_fuzz`` the same way, with one
device alongside and the edge's memory watched. ``measure_reliability`` runs every
phase of a ``ReliabilityPlan`` (``covspec bench reliability``): the fuzz on an edge of
its own, then the load levels, the vanished clients and the restarts on another.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from covspec.bench.harness.devices import Answer, greedy_references, run_devices
from covspec.bench.harness.edge import ask, live_sessions, start_edge
from covspec.bench.harness.rss import RssSampler
from covspec.bench.harness.workload import toy_questions
from covspec.bench.reliability.fuzz_run import REPLY_TIMEOUT_S, run_fuzz
from covspec.bench.reliability.hostile import QUESTION, TargetFacts
from covspec.protocol.messages import Error, Open, Verify
from covspec.protocol.ownership import new_owner, session_id_for
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.client import Backoff
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_edge import EdgeProcess

# What the edge logs when a request failed: the I/O thread (no reply went out), the model thread (``internal``).
EDGE_FAILURES = {"io_thread": re.compile(r"failed to handle an incoming message"),
                 "model_thread": re.compile(r"request \w+ failed|target-only step failed")}


def summarize(answers: list[Answer], wall_s: float) -> dict:
    """Answers, correct ones, committed tokens/s over ``wall_s``, latency p50/p95, reopens."""
    latencies = np.array([a.latency_s for a in answers]) if answers else np.zeros(1)
    errors = sorted({a.error for a in answers if a.error})
    return {"answers": len(answers), "correct": sum(a.correct for a in answers),
            "failed": sum(bool(a.error) for a in answers), "tokens": sum(a.tokens for a in answers),
            "tokens_per_s": round(sum(a.tokens for a in answers) / wall_s, 1) if wall_s > 0 else 0.0,
            "latency_p50_s": round(float(np.percentile(latencies, 50)), 3),
            "latency_p95_s": round(float(np.percentile(latencies, 95)), 3),
            "reopens": sum(a.reopens for a in answers), "wall_s": round(wall_s, 1), "errors": errors[:5]}


def fuzz_phase(edge: EdgeProcess, facts: TargetFacts, world: dict, messages: int, sockets: int, seed: int,
               log_path: Path, tick: Callable[[], None]) -> dict:
    """``messages`` hostile messages from ``sockets`` sockets, one device alongside."""
    log_start = log_path.stat().st_size if log_path.exists() else 0
    rss = RssSampler(edge.pid)
    rss.start()
    tally = {}

    def attack(stop: threading.Event) -> None:
        tally["fuzz"] = run_fuzz(edge.address, facts, messages, sockets, seed, tick=tick)
        stop.set()

    answers, wall = run_devices(1, 0.0, during=attack, address=edge.address, **world)
    memory = rss.finish()
    alive = live_sessions(edge.address) is not None and not memory["died"]
    return {"messages": messages, "sockets": sockets, "seed": seed, "wall_s": round(wall, 1),
            "reply_timeout_s": REPLY_TIMEOUT_S,
            **tally["fuzz"].as_dict(), "memory": memory, "edge_crashes": 0 if alive else 1,
            "edge_log_failures": count_failures(log_path, log_start), "device": summarize(answers, wall)}


def count_failures(log_path: Path, offset: int) -> dict:
    """Lines of the edge log (from ``offset``) that record a failed request, by kind."""
    text = log_path.read_bytes()[offset:].decode("utf-8", "replace") if log_path.exists() else ""
    return {kind: len(pattern.findall(text)) for kind, pattern in EDGE_FAILURES.items()}


def load_level(count: int, seconds: float, address: str, world: dict) -> dict:
    answers, wall = run_devices(count, seconds, address=address, **world)
    return {"devices": count, "seconds": seconds, **summarize(answers, wall)}


def restart_phase(target_dir: Path, address: str, log_path: Path, world: dict, *, devices: int, seconds: float,
                  kills: int, edge_config: dict) -> dict:
    """Devices answering while the edge at ``address`` is SIGKILLed ``kills`` times and restarted."""
    edge = [start_edge(target_dir, address, log_path, **edge_config)]
    events: list[dict] = []

    def killer(stop: threading.Event) -> None:
        began = time.monotonic()
        for k in range(kills):
            if stop.wait(max(0.0, began + (k + 1) * seconds / (kills + 1) - time.monotonic())):
                return
            sessions = live_sessions(address)
            os.kill(edge[0].pid, signal.SIGKILL)
            status = edge[0].stop()
            killed = time.monotonic()
            edge[0] = start_edge(target_dir, address, log_path, **edge_config)
            events.append({"sessions_live_at_kill": sessions, "exit_status": status,
                           "restart_s": round(time.monotonic() - killed, 2)})

    tolerant = {**world, "backoff": Backoff(timeout_s=2.0, retries=4, backoff_s=0.1),
                "options": DraftingOptions(reopen_attempts=10)}
    try:
        answers, wall = run_devices(devices, seconds, address=address, during=killer, **tolerant)
    finally:
        edge[0].stop()
    return {"devices": devices, "seconds": seconds, "kills": len(events), "events": events,
            **summarize(answers, wall)}


def vanished_phase(address: str, facts: TargetFacts, world: dict, *, clients: int, devices: int,
                   idle_timeout_s: float) -> dict:
    """``clients`` sessions opened and abandoned while ``devices`` devices answer; when each expired."""
    result: dict = {}

    def vanish(stop: threading.Event) -> None:
        before = live_sessions(address)
        owners = {}
        for i in range(clients):
            owner = new_owner()
            session = session_id_for(owner)
            owners[session] = owner
            reply = ask(address, Open(session=session, seq=0, prompt=QUESTION, image=np.frombuffer(
                facts.image_png, np.uint8), vocab_hash=facts.vocab_hash, owner=owners[session],
                committed=np.zeros(0, np.int32)), timeout_s=30)
            if reply is None or isinstance(reply, Error):
                owners.pop(session)                   # not opened: nothing to vanish
        left = time.monotonic()
        opened_live = live_sessions(address)
        expired: dict[str, float] = {}
        while len(expired) < len(owners) and time.monotonic() - left < idle_timeout_s + 30:
            for session in set(owners) - set(expired):
                probe = Verify(session=session, seq=1, owner="not-the-owner-secret", tokens=np.asarray([3], np.int32))
                reply = ask(address, probe)
                if isinstance(reply, Error) and reply.code == "unknown_session":
                    expired[session] = time.monotonic() - left
            stop.wait(0.25)
        result.update({"vanished": len(owners), "expired": len(expired), "idle_timeout_s": idle_timeout_s,
                       "expiry_s_min": round(min(expired.values(), default=0.0), 2),
                       "expiry_s_max": round(max(expired.values(), default=0.0), 2),
                       "live_sessions_before": before, "live_sessions_after_vanishing": opened_live,
                       "live_sessions_after_expiry": live_sessions(address)})
        stop.set()

    answers, wall = run_devices(devices, 0.0, address=address, during=vanish, **world)
    return {**result, "devices": devices, **summarize(answers, wall)}


@dataclass(frozen=True)
class ReliabilityPlan:
    """The sizes of one ``covspec bench reliability`` run."""

    messages: int = 100_000          # hostile messages
    sockets: int = 8                 # fuzzing sockets
    levels: tuple[int, ...] = (1, 4, 16, 32)
    seconds: float = 60.0            # per load level, and for the restart phase
    kills: int = 3
    restart_devices: int = 4
    vanished: int = 16
    idle_timeout_s: float = 8.0      # of the load edge (vanished sessions expire after it)
    questions: int = 16
    max_new_tokens: int = 64
    seed: int = 0
    fuzz_only: bool = False          # the hostile messages alone (no load, vanished clients, restarts)


def reliability_world(artifacts: Path, target_dir: Path, questions: int, max_new_tokens: int) -> tuple[TargetFacts, dict]:
    """What the fuzzer knows of the target (its victims ask the first question), and what
    the devices need (``run_devices``'s keywords): the draft, ``questions`` held-out
    questions, the target's greedy answers to them, greedy settings."""
    from covspec.runtime_edge.target import TargetModel

    asked = toy_questions(questions)
    target = TargetModel.load(target_dir)
    references = greedy_references(target_dir, asked, max_new_tokens)
    facts = TargetFacts(target.vocab_size, target.vocab_hash, asked[0].image_png, victim_prompt=asked[0].question,
                        victim_answer=tuple(references[0]))
    return facts, {"artifact": DraftArtifact.load(artifacts, threads=1), "questions": asked,
                   "references": references, "settings": GenerationSettings(max_new_tokens=max_new_tokens)}


def measure_reliability(plan: ReliabilityPlan, artifacts: Path, target_dir: Path, log_path: Path,
                        phase: Callable[[str], None] = lambda name: None,
                        tick: Callable[[], None] = lambda: None) -> dict:
    """Every phase of ``plan``; ``phase(name)`` is called as each begins, ``tick`` per hostile message."""
    phase("references")
    facts, world = reliability_world(artifacts, target_dir, plan.questions, plan.max_new_tokens)
    summary: dict = {"plan": asdict(plan)}
    phase("fuzz")
    edge = start_edge(target_dir, "tcp://127.0.0.1:*", log_path, idle_timeout_s=20.0)
    try:
        summary["fuzz"] = fuzz_phase(edge, facts, world, plan.messages, plan.sockets, plan.seed, log_path, tick)
    finally:
        edge.stop()
    if plan.fuzz_only:
        return summary
    edge = start_edge(target_dir, "tcp://127.0.0.1:*", log_path, idle_timeout_s=plan.idle_timeout_s)
    address = edge.address
    try:
        summary["load"] = []
        for count in plan.levels:
            phase(f"load: {count} devices")
            summary["load"].append(load_level(count, plan.seconds, address, world))
        phase("vanished clients")
        summary["vanished"] = vanished_phase(address, facts, world, clients=plan.vanished,
                                             devices=min(4, max(plan.levels)), idle_timeout_s=plan.idle_timeout_s)
    finally:
        edge.stop()
    phase("SIGKILL and restart")
    summary["restarts"] = restart_phase(target_dir, address, log_path, world, devices=plan.restart_devices,
                                        seconds=plan.seconds, kills=plan.kills,
                                        edge_config={"idle_timeout_s": plan.idle_timeout_s})
    return summary
