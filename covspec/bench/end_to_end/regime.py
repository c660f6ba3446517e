"""``covspec bench regime``: covspec where it is meant to run, emulated.

For each deployment regime (``covspec.regime``: a phone-class draft and a target model
on a GPU) one ``Bench`` runs the same questions over every link with the edge padded
to the regime's target and the device to its phone, in four scenarios: target-only,
today's default (``covspec``), the device-led default (``covspec-device-led``), and
device-led with a fixed draft length and no pipelining or branches (``plan-device-led``,
the device-led loop ``covspec plan`` models). ``regime_section`` renders, per regime,
the per-link table of ``lead_report`` (descriptions, short answers, all, worst
question, TTFT, drafted tokens per committed token, overruns), labelled "emulated"
with the profile's name and the overrun counts of every side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from covspec.bench.end_to_end.lead_report import lead_rows, lead_table
from covspec.bench.harness.link import LinkProfile
from covspec.bench.end_to_end.runner import Bench, records_to_json
from covspec.bench.end_to_end.scenarios import COVSPEC, Scenario
from covspec.bench.harness.workload import Question
from covspec.runtime_device.options import DraftingOptions, GenerationSettings

PLAN_DRAFT_LEN = 8


def regime_scenarios() -> list[Scenario]:
    return [Scenario("target-only", "target_only"),
            Scenario("covspec", "speculative", COVSPEC),
            Scenario("covspec-device-led", "speculative", dataclasses.replace(COVSPEC, lead="device")),
            Scenario("plan-device-led", "speculative",
                     DraftingOptions(lead="device", policy="fixed", draft_len=PLAN_DRAFT_LEN, pipeline=False,
                                     branches=0))]


def measure_regimes(regimes: list[str], artifacts: Path, target_dir: Path, links: list[LinkProfile],
                    questions: list[Question], settings: GenerationSettings, edge_log: Path,
                    tick: Callable[[], None] = lambda: None) -> dict[str, list[dict]]:
    """Regime name -> the raw records of every (link, scenario, question) run under it."""
    results: dict[str, list[dict]] = {}
    for regime in regimes:
        bench = Bench(artifacts, target_dir, settings, edge_log, regime=regime)
        try:
            results[regime] = records_to_json(bench.run(links, regime_scenarios(), questions, tick=tick))
        finally:
            bench.close()
    return results


def overrun_line(regime: str, records: list[dict]) -> str:
    device = sum(r.get("device_overruns", 0) for r in records)
    edge = sum(r.get("edge_overruns", 0) for r in records)
    return (f"Emulated regime `{regime}`: overruns (real compute slower than emulated) {device} draft runs on the "
            f"device, {edge} target forwards on the edge, over {len(records)} answers.")


def regime_section(regime: str, records: list[dict], links: list[LinkProfile]) -> str:
    """One regime's labelled table (Markdown)."""
    rows = lead_rows(records, {link.name: link.rtt_ms for link in links})
    return f"**{regime} (emulated)**. {overrun_line(regime, records)}\n\n{lead_table(rows)}"
