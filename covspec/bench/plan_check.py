"""``covspec plan --validate``: the plan's predicted speedups against emulated runs.

Takes the records of ``covspec bench regime`` (``benchmarks/regime.json``). The
acceptance curve is measured from the runs themselves, from the rounds of the
fixed-length device-led scenario (``plan-device-led``), per workload (descriptions,
short answers), pooled over regimes and links (acceptance depends on neither). For
each regime x link x workload and each modelled scenario (the default, edge-led, and
``plan-device-led``) every question's time is predicted from its own answer length and
upload bytes; the predicted speedup (median over questions of target-only's predicted
time over the scenario's) is compared with the measured one (same median, measured),
and the relative error reported.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from covspec.bench.lead_report import WORKLOADS
from covspec.bench.regime import PLAN_DRAFT_LEN
from covspec.regime import load_regime
from covspec.regime import plan as model

TOY_EDGE_CONTEXT = 154      # the toy target's context: 144 visual tokens and the prompt
TOY_DRAFT_ROWS = 82         # the toy draft's context at the artifact's keep ratio 0.5: 72 visual tokens and the prompt
MODELLED = {"covspec": "edge-led", "plan-device-led": "device-led"}


def curves(records_by_regime: dict[str, list[dict]]) -> dict[str, list[float]]:
    """Workload -> the acceptance curve of the fixed-length device-led rounds."""
    counts: dict[str, list[int]] = defaultdict(list)
    for records in records_by_regime.values():
        for r in records:
            if r["scenario"] == "plan-device-led":
                for name, wanted in WORKLOADS.items():
                    if name != "all" and wanted(r["qtype"]):
                        counts[name] += r["accepted_counts"]
    return {name: model.acceptance_curve(c, PLAN_DRAFT_LEN) for name, c in counts.items() if c}


def predicted_s(regime, link: dict, record: dict, mode: str, alpha: list[float]) -> float:
    costs = model.costs_for(regime, link["rtt_ms"], link["bandwidth_mbps"], edge_context=TOY_EDGE_CONTEXT,
                            draft_rows=TOY_DRAFT_ROWS, image_bytes=record["bytes_up"])
    n = record["tokens"]
    if mode == "target-only":
        return model.target_only_s(costs, n)
    if mode == "edge-led":
        return model.edge_led_s(costs, n, alpha)
    return model.device_led_s(costs, n, alpha, PLAN_DRAFT_LEN)


def validate(data: dict) -> list[dict]:
    """One row per regime x link x workload x modelled scenario: measured and predicted speedups."""
    links = {link["name"]: link for link in data["links"]}
    alpha = curves(data["records"])
    rows = []
    for name, records in data["records"].items():
        regime = load_regime(name)
        baseline = {(r["link"], r["scene"]): r for r in records if r["scenario"] == "target-only"}
        for link_name, link in links.items():
            for scenario, mode in MODELLED.items():
                for workload, wanted in WORKLOADS.items():
                    if workload == "all":
                        continue
                    pairs = [(r, baseline[(link_name, r["scene"])]) for r in records
                             if r["link"] == link_name and r["scenario"] == scenario and wanted(r["qtype"])
                             and (link_name, r["scene"]) in baseline]
                    if not pairs or workload not in alpha:
                        continue
                    measured = np.median([b["wall_s"] / r["wall_s"] for r, b in pairs])
                    predicted = np.median([predicted_s(regime, link, b, "target-only", alpha[workload]) /
                                           predicted_s(regime, link, r, mode, alpha[workload]) for r, b in pairs])
                    rows.append({"regime": name, "link": link_name, "scenario": scenario, "workload": workload,
                                 "measured": float(measured), "predicted": float(predicted),
                                 "error": float(predicted / measured - 1)})
    return rows


def error_table(rows: list[dict], alpha: dict[str, list[float]]) -> str:
    within = sum(abs(r["error"]) <= 0.15 for r in rows)
    lines = [f"Acceptance curves (from the `plan-device-led` rounds): " + "; ".join(
                 f"{name} " + ", ".join(f"{a:.2f}" for a in curve) for name, curve in alpha.items()),
             "", f"{within} of {len(rows)} predictions within ±15% of the emulated runs; largest error "
             f"{max((abs(r['error']) for r in rows), default=0):.0%}.", "",
             "| regime | link | scenario | workload | measured speedup | predicted | error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = "" if abs(r["error"]) <= 0.15 else " **(out)**"
        lines.append(f"| {r['regime']} | {r['link']} | {r['scenario']} | {r['workload']} | {r['measured']:.2f}x "
                     f"| {r['predicted']:.2f}x | {r['error']:+.0%}{flag} |")
    return "\n".join(lines)
