"""Real devices through a faulty link (``covspec bench reliability --faulty-link``).

``faulty_link_phase(address, world, plan)`` puts a ``LinkEmulator`` with ``Faults`` in
both directions (drops, duplicates, reordering, jitter; seeded) in front of the edge at
``address``, partitions it ``plan.partitions`` times for ``plan.partition_s`` seconds,
and runs ``plan.devices`` real devices through it for ``plan.seconds``: half device-led,
half edge-led (greedy, so every answer has one right value: the target's greedy
answer). The promises it checks, each counted over every answer:

- an answer either finishes as the target's own (resends and reopens allowed) or ends
  with a clear error (``EdgeError`` or ``EdgeUnreachable``, never another exception)
  no later than its patience (``session.patience_s``) after its last token;
- nothing is committed twice or wrong: the tokens a device committed are always a
  prefix of the target's answer (``Answer.diverged``), though the link duplicated
  messages both ways.

``faulty_link_problems(result)`` lists what broke, empty when every promise held;
``measure_faulty_link`` runs the phase against an edge child of its own
(``covspec bench reliability --faulty-link``).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from covspec.bench.harness.devices import DeviceLoop, own_copy, run_for
from covspec.bench.harness.edge import start_edge
from covspec.bench.harness.link import Faults, LinkEmulator, profile_named
from covspec.bench.reliability.phases import reliability_world
from covspec.runtime_device.client import Backoff
from covspec.runtime_device.options import DraftingOptions
from covspec.runtime_device.session import patience_s

SLACK_S = 2.0                 # the draft's prefill and a busy CPU, on top of the patience
CLEAR_ERRORS = ("EdgeError", "EdgeUnreachable", "EdgeMisbehaved")


@dataclass(frozen=True)
class FaultyLinkPlan:
    """One faulty-link run: devices, duration, the faults (both directions) and the partitions."""

    devices: int = 4                 # half device-led, half edge-led
    seconds: float = 60.0
    link: str = "wifi"
    drop: float = 0.02
    duplicate: float = 0.05
    reorder: float = 0.05
    reorder_ms: float = 30.0
    jitter_ms: float = 5.0
    partitions: int = 3
    partition_s: float = 2.0
    partition_way: str = "both"      # up, down or both
    timeout_s: float = 1.0           # the devices' per-attempt timeout
    retries: int = 4
    reopen_attempts: int = 10
    seed: int = 0

    def __post_init__(self):
        self.faults                              # noqa: B018 - refuses faults that are not probabilities
        if self.devices < 1 or self.seconds <= 0 or self.partitions < 0 or self.partition_s < 0:
            raise ValueError("a faulty-link run needs devices >= 1, seconds > 0 and partitions, partition_s >= 0")
        if self.partition_way not in ("up", "down", "both"):
            raise ValueError(f"partition_way is up, down or both, not {self.partition_way!r}")

    @property
    def faults(self) -> Faults:
        return Faults(drop=self.drop, duplicate=self.duplicate, reorder=self.reorder, reorder_ms=self.reorder_ms,
                      jitter_ms=self.jitter_ms)

    @property
    def backoff(self) -> Backoff:
        return Backoff(timeout_s=self.timeout_s, retries=self.retries, backoff_s=0.05)

    @property
    def patience_s(self) -> float:
        return patience_s(self.backoff, self.reopen_attempts)


def faulty_link_phase(address: str, world: dict, plan: FaultyLinkPlan) -> dict:
    """``plan.devices`` devices answering through a faulty link to the edge at ``address``.
    ``world``: ``artifact``, ``questions``, ``references``, ``settings`` (greedy)."""
    faults = plan.faults
    link = LinkEmulator("tcp://127.0.0.1:0", address, profile_named(plan.link), up=faults, down=faults,
                        seed=plan.seed).start()
    stop = threading.Event()
    # One artifact per device (``own_copy``): abandoning a prefill must not end another device's runs.
    devices = [DeviceLoop(i, own_copy(world["artifact"]), link.address, world["questions"], world["references"], stop,
                          settings=world["settings"], backoff=plan.backoff,
                          options=DraftingOptions(lead="device" if i % 2 == 0 else "edge",
                                                  reopen_attempts=plan.reopen_attempts))
               for i in range(plan.devices)]

    def partitioner(stop: threading.Event) -> None:
        for _ in range(plan.partitions):
            if stop.wait(plan.seconds / (plan.partitions + 1)):
                return
            link.partition(plan.partition_s, plan.partition_way)

    try:
        answers, _, wall = run_for(devices, stop, plan.seconds, partitioner)
    finally:
        link.stop()
    by_lead = {}
    for lead, parity in (("device", 0), ("edge", 1)):
        mine = [a for a in answers if a.device % 2 == parity]
        by_lead[lead] = {"answers": len(mine), "correct": sum(a.correct for a in mine),
                         "failed": sum(bool(a.error) for a in mine), "reopens": sum(a.reopens for a in mine)}
    failed = [a for a in answers if a.error]
    return {"plan": asdict(plan), "patience_s": round(plan.patience_s, 2), "slack_s": SLACK_S,
            "wall_s": round(wall, 1), "link": link.counts, "partitions": link.partitions,
            "answers": len(answers), "correct": sum(a.correct for a in answers), "failed": len(failed),
            "wrong": sum(not a.error and not a.correct for a in answers),
            "diverged": sum(a.diverged for a in answers),
            "unclear_errors": sum(not a.error.startswith(CLEAR_ERRORS) for a in failed),
            "beyond_patience": sum(a.stalled_s > plan.patience_s + SLACK_S for a in failed),
            "longest_stall_s": round(max((a.stalled_s for a in failed), default=0.0), 2),
            "reopens": sum(a.reopens for a in answers), "by_lead": by_lead,
            "errors": sorted({a.error[:200] for a in failed})[:5]}


def measure_faulty_link(plan: FaultyLinkPlan, artifacts: Path, target_dir: Path, log_path: Path,
                        questions: int = 8, max_new_tokens: int = 48) -> dict:
    """``faulty_link_phase`` against a ``covspec edge serve`` child of its own."""
    _, world = reliability_world(artifacts, target_dir, questions, max_new_tokens)
    edge = start_edge(target_dir, "tcp://127.0.0.1:*", log_path, idle_timeout_s=30.0)
    try:
        return {**faulty_link_phase(edge.address, world, plan), "questions": questions,
                "max_new_tokens": max_new_tokens}
    finally:
        edge.stop()


def faulty_link_problems(result: dict) -> list[str]:
    """Every broken promise of a ``faulty_link_phase`` result, one sentence each."""
    problems = []
    if not result["answers"] or not result["correct"]:
        problems.append("no answer came through the faulty link")
    if result["wrong"]:
        problems.append(f"{result['wrong']} answers finished but were not the target's")
    if result["diverged"]:
        problems.append(f"{result['diverged']} answers committed a token twice or wrong")
    if result["unclear_errors"]:
        problems.append(f"{result['unclear_errors']} answers ended with an unclear error: {result['errors']}")
    if result["beyond_patience"]:
        problems.append(f"{result['beyond_patience']} answers ended later than their patience "
                        f"({result['patience_s']:g} s + {result['slack_s']:g} s) after their last token")
    return problems


def faulty_link_table(result: dict) -> str:
    """The run as Markdown: the link's faults, then the answers by lead."""
    plan, up, down = result["plan"], result["link"]["up"], result["link"]["down"]

    def faults(counts: dict) -> str:
        return (f"{counts['sent']:,} sent: {counts['dropped']} dropped, {counts['duplicated']} duplicated, "
                f"{counts['reordered']} reordered, {counts['partitioned']} lost to partitions")

    lines = [f"Link `{plan['link']}` with, each way, drop {plan['drop']:g}, duplicate {plan['duplicate']:g}, "
             f"reorder {plan['reorder']:g} (held {plan['reorder_ms']:g} ms), jitter up to {plan['jitter_ms']:g} ms, "
             f"and {result['partitions']} partitions of {plan['partition_s']:g} s ({plan.get('partition_way', 'both')} "
             f"ways); {plan['devices']} devices for "
             f"{plan['seconds']:g} s (timeout {plan['timeout_s']:g} s, {plan['retries']} resends, "
             f"{plan['reopen_attempts']} reopens: patience {result['patience_s']:g} s). Seed {plan['seed']}.",
             "", f"Up: {faults(up)}. Down: {faults(down)}.", "",
             "| lead | answers | the target's own | failed (clear error) | reopens |", "|---|---|---|---|---|"]
    for lead, r in result["by_lead"].items():
        lines.append(f"| {lead}-led | {r['answers']} | {r['correct']} | {r['failed']} | {r['reopens']} |")
    lines += ["", f"Committed twice or wrong: {result['diverged']}; finished but wrong: {result['wrong']}; "
              f"unclear errors: {result['unclear_errors']}; failures later than their patience after the last "
              f"token: {result['beyond_patience']} (longest {result['longest_stall_s']:g} s)."]
    return "\n".join(lines)
