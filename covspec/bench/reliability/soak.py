"""A long soak of one edge (``covspec bench reliability --soak-seconds N --soak-devices M``).

``soak_phase(edge_pid, address, facts, world, plan)`` runs ``plan.devices`` real devices
against the edge at ``address`` for ``plan.seconds``, half device-led and half edge-led
(greedy: every answer has one right value, the target's own), while every
``plan.hostile_every_s`` a burst of ``plan.hostile_burst`` hostile messages
(``fuzz_run.run_fuzz``, its victim session checked too) hits the same edge. It reports:

- the edge's resident memory (``RssSampler`` on ``edge_pid``) when the warm-up
  (``plan.warmup_s``) ends and at the end, and the growth between them in percent
  (the issue's goal: below 5%);
- wrong answers (finished but not the target's; goal 0) and failed ones;
- per ``plan.bucket_s`` (a minute by default): answers, wrong, failed, and latency
  percentiles (p50, p95, p99) of the answers finished in it;
- the hostile bursts: messages, unexpected or missing replies, victims ended by others.

``soak_problems(result)`` lists what broke; ``soak_table(result)`` renders it as Markdown.
``measure_soak`` runs it against an edge child of its own.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from covspec.bench.harness.devices import DeviceLoop, own_copy, run_for
from covspec.bench.harness.edge import start_edge
from covspec.bench.harness.rss import RssSampler
from covspec.bench.reliability.fuzz_run import run_fuzz
from covspec.bench.reliability.hostile import TargetFacts
from covspec.bench.reliability.phases import reliability_world
from covspec.runtime_device.options import DraftingOptions

MIB = 1024 * 1024


@dataclass(frozen=True)
class SoakPlan:
    seconds: float = 1200.0
    devices: int = 16                # half device-led, half edge-led
    warmup_s: float = 120.0          # RSS growth is measured from the end of the warm-up
    hostile_every_s: float = 10.0
    hostile_burst: int = 200         # hostile messages per burst
    bucket_s: float = 60.0           # latency percentiles per bucket
    max_rss_growth_pct: float = 5.0
    seed: int = 0

    def __post_init__(self):
        if self.devices < 1 or self.seconds <= 0 or self.bucket_s <= 0 or self.hostile_every_s <= 0:
            raise ValueError("a soak needs devices >= 1, seconds > 0, bucket_s > 0 and hostile_every_s > 0")
        if not 0 <= self.warmup_s < self.seconds:
            raise ValueError("the warm-up must end before the soak does")


def soak_phase(edge_pid: int, address: str, facts: TargetFacts, world: dict, plan: SoakPlan) -> dict:
    """The soak against the edge at ``address`` (process ``edge_pid``); see the module docstring."""
    rss = RssSampler(edge_pid, every_s=1.0)
    rss.start()
    stop = threading.Event()
    devices = [DeviceLoop(i, own_copy(world["artifact"]), address, world["questions"],
                          world["references"], stop, settings=world["settings"],
                          options=DraftingOptions(lead="device" if i % 2 == 0 else "edge"))
               for i in range(plan.devices)]
    hostile = {"bursts": 0, "sent": 0, "unexpected": 0, "unanswered": 0, "misaddressed": 0,
               "victim_checks": 0, "victims_ended_by_others": 0, "victim_wrong": 0}
    marks: dict = {}

    def attack(stop: threading.Event) -> None:
        began = time.monotonic()
        burst, next_burst = 0, began + plan.hostile_every_s
        while not stop.is_set() and time.monotonic() - began < plan.seconds:
            if "warm_rss" not in marks and time.monotonic() - began >= plan.warmup_s:
                marks["warm_rss"] = rss.after                  # the latest sample (one a second)
            if time.monotonic() >= next_burst:
                tally = run_fuzz(address, facts, plan.hostile_burst, sockets=1,
                                 seed=plan.seed * 100_000 + burst).as_dict()
                burst, next_burst = burst + 1, next_burst + plan.hostile_every_s
                hostile["bursts"] += 1
                for key in ("sent", "misaddressed", "victim_checks", "victims_ended_by_others", "victim_wrong"):
                    hostile[key] += tally[key]
                hostile["unexpected"] += sum(tally["unexpected"].values())
                hostile["unanswered"] += sum(tally["unanswered"].values())
            wake = min(next_burst, began + plan.seconds, began + plan.warmup_s if "warm_rss" not in marks else
                       next_burst)
            stop.wait(max(0.0, wake - time.monotonic()))

    answers, began, wall = run_for(devices, stop, plan.seconds, attack)
    memory = rss.finish()
    warm = marks.get("warm_rss", rss.before)
    end = rss.after
    return {"plan": asdict(plan), "wall_s": round(wall, 1), "answers": len(answers),
            "correct": sum(a.correct for a in answers), "wrong": sum(not a.error and not a.correct for a in answers),
            "failed": sum(bool(a.error) for a in answers), "diverged": sum(a.diverged for a in answers),
            "errors": sorted({a.error[:200] for a in answers if a.error})[:5],
            "rss_start_mib": round(rss.before / MIB, 1), "rss_warm_mib": round(warm / MIB, 1),
            "rss_end_mib": round(end / MIB, 1), "rss_peak_mib": memory["rss_peak_mib"],
            "rss_growth_pct": round(100.0 * (end - warm) / warm, 2), "edge_died": memory["died"],
            "hostile": hostile, "buckets": buckets(answers, began, plan.bucket_s)}


def buckets(answers: list, began: float, bucket_s: float) -> list[dict]:
    """Per ``bucket_s`` of finishing time: answers, wrong, failed, latency p50/p95/p99 (s)."""
    rows = []
    count = int(max((a.finished_at - began for a in answers), default=0.0) // bucket_s) + 1
    for k in range(count):
        mine = [a for a in answers if k * bucket_s <= a.finished_at - began < (k + 1) * bucket_s]
        latencies = np.array([a.latency_s for a in mine]) if mine else np.zeros(1)
        rows.append({"from_s": round(k * bucket_s), "answers": len(mine),
                     "wrong": sum(not a.error and not a.correct for a in mine), "failed": sum(bool(a.error) for a in mine),
                     **{f"p{q}_s": round(float(np.percentile(latencies, q)), 3) for q in (50, 95, 99)}})
    return rows


def measure_soak(plan: SoakPlan, artifacts: Path, target_dir: Path, log_path: Path, questions: int = 16,
                 max_new_tokens: int = 64) -> dict:
    """``soak_phase`` against a ``covspec edge serve`` child of its own."""
    facts, world = reliability_world(artifacts, target_dir, questions, max_new_tokens)
    edge = start_edge(target_dir, "tcp://127.0.0.1:*", log_path, idle_timeout_s=20.0)
    try:
        return {**soak_phase(edge.pid, edge.address, facts, world, plan), "questions": questions,
                "max_new_tokens": max_new_tokens}
    finally:
        edge.stop()


def soak_problems(result: dict) -> list[str]:
    problems = []
    hostile = result["hostile"]
    if not result["correct"]:
        problems.append("no answer was right")
    if result["wrong"] or result["diverged"]:
        problems.append(f"{result['wrong']} answers wrong, {result['diverged']} committed a wrong token")
    if result["failed"]:
        problems.append(f"{result['failed']} answers failed: {result['errors']}")
    if result["edge_died"]:
        problems.append("the edge died")
    if result["rss_growth_pct"] >= result["plan"]["max_rss_growth_pct"]:
        problems.append(f"edge RSS grew {result['rss_growth_pct']:g}% after the warm-up "
                        f"(goal < {result['plan']['max_rss_growth_pct']:g}%)")
    if hostile["unexpected"] or hostile["unanswered"] or hostile["misaddressed"]:
        problems.append(f"hostile messages answered wrongly: {hostile}")
    if hostile["victims_ended_by_others"] or hostile["victim_wrong"]:
        problems.append(f"victim sessions ended by others or answered wrong: {hostile}")
    return problems


def soak_table(result: dict) -> str:
    plan, hostile = result["plan"], result["hostile"]
    lines = [f"{plan['devices']} devices (half device-led, half edge-led, greedy, max {result.get('max_new_tokens', '?')} "
             f"new tokens, answers checked token for token against the target's) for {plan['seconds']:g} s against one "
             f"edge child (one torch thread); every {plan['hostile_every_s']:g} s a burst of {plan['hostile_burst']} "
             f"hostile messages with a victim session checked. Seed {plan['seed']}.", "",
             "| answers | the target's own | wrong | failed | edge RSS MiB: start / after warm-up "
             f"({plan['warmup_s']:g} s) / end / peak | growth after warm-up | hostile messages | unexpected or "
             "missing replies | victims ended by others |", "|" + "---|" * 9,
             f"| {result['answers']:,} | {result['correct']:,} | {result['wrong']} | {result['failed']} | "
             f"{result['rss_start_mib']:.0f} / {result['rss_warm_mib']:.0f} / {result['rss_end_mib']:.0f} / "
             f"{result['rss_peak_mib']:.0f} | {result['rss_growth_pct']:+.1f}% | {hostile['sent']:,} | "
             f"{hostile['unexpected'] + hostile['unanswered'] + hostile['misaddressed']} | "
             f"{hostile['victims_ended_by_others']} |", "",
             "| from (s) | answers | wrong | failed | latency p50 s | p95 s | p99 s |", "|" + "---|" * 7]
    for row in result["buckets"]:
        lines.append(f"| {row['from_s']} | {row['answers']} | {row['wrong']} | {row['failed']} | {row['p50_s']:.2f} | "
                     f"{row['p95_s']:.2f} | {row['p99_s']:.2f} |")
    return "\n".join(lines)
