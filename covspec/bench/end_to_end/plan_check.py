"""``covspec plan --validate``: the plan's predicted speedups against emulated runs.

Takes the records of ``covspec bench regime`` (``benchmarks/regime.json``). The
acceptance curve is measured from the runs themselves: the rounds of the fixed-length
device-led scenario (``plan-device-led``) on descriptions (short answers end before a
round can draft its full length), pooled over regimes and links (acceptance depends on
neither); positions past the rounds' length take the geometric mean of the measured ones. The
costs are the regime's (``costs_for``) with what the same run measured put in (``measured``):
the target's step as target-only streamed it (the roofline's plus the real system's own cost
per token: the edge's bookkeeping, the socket), target-only's time to first token, and the
draft's prefill as the device timed it. For
each regime x link x workload and each modelled scenario (the default, edge-led with its hand-over, and
``plan-device-led``) every question's time is predicted from its own answer length and
upload bytes; the predicted speedup (median over questions of target-only's predicted
time over the scenario's) is compared with the measured one (same median, measured),
and the relative error reported.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from covspec.bench.end_to_end.lead_report import WORKLOADS
from covspec.regime import load_regime
from covspec.regime import plan as model

TOY_EDGE_CONTEXT = 154      # the toy target's context: 144 visual tokens and the prompt
TOY_DRAFT_ROWS = 82         # the toy draft's context at the artifact's keep ratio 0.5: 72 visual tokens and the prompt
MODELLED = {"covspec": "hand-over", "plan-device-led": "device-led"}


def draft_len(data: dict) -> int:
    """The fixed draft length of the run's ``plan-device-led`` rounds (4 before it was recorded)."""
    return int(data.get("plan_draft_len", 4))


def curve(data: dict) -> list[float]:
    """The acceptance curve of the fixed-length device-led rounds on descriptions,
    extended to the longest edge-led chunk by the measured positions' geometric mean."""
    counts = [a for records in data["records"].values() for r in records
              if r["scenario"] == "plan-device-led" and r["qtype"] == "describe" for a in r["accepted_counts"]]
    measured = model.acceptance_curve(counts, draft_len(data))
    mean = float(np.prod(measured) ** (1 / len(measured)))
    return measured + [mean] * (model.LEAD_MAX - len(measured))


def measured(costs: model.Costs, records: list[dict]) -> model.Costs:
    """``costs`` with the target's step, the first token and the draft's prefill as the
    records of one regime and link measured them."""
    baseline = [r for r in records if r["scenario"] == "target-only"]
    streamed = sum(r["tokens"] - 1 for r in baseline)
    step = sum(r["wall_s"] - r["ttft_s"] for r in baseline) / streamed if streamed else costs.target_step_s
    extra = step - costs.target_step_s                  # the real system's own cost per forward
    first = float(np.median([r["ttft_s"] for r in baseline]))
    drafts = [r["device_prefill_s"] for r in records if r["scenario"] != "target-only" and r["device_prefill_s"] > 0]
    return dataclasses.replace(
        costs, target_step_s=step, verify_s=tuple(v + extra for v in costs.verify_s),
        target_prefill_s=max(first - costs.rtt_s - costs.upload_s, 0.0),
        draft_prefill_s=float(np.median(drafts)) if drafts else costs.draft_prefill_s)


def predicted_s(regime, link: dict, record: dict, mode: str, alpha: list[float], run: list[dict], k: int) -> float:
    """The plan's time for ``record``'s answer under ``mode``, with the costs ``run`` (the
    records of its regime and link) measured."""
    costs = measured(model.costs_for(regime, link["rtt_ms"], link["bandwidth_mbps"], edge_context=TOY_EDGE_CONTEXT,
                                     draft_rows=TOY_DRAFT_ROWS, image_bytes=record["bytes_up"]), run)
    n = record["tokens"]
    if mode == "target-only":
        return model.target_only_s(costs, n)
    if mode == "edge-led":
        return model.edge_led_s(costs, n, alpha)
    if mode == "hand-over":
        return model.hand_over_s(costs, n, alpha, k)
    return model.device_led_s(costs, n, alpha, k)


def validate(data: dict) -> list[dict]:
    """One row per regime x link x workload x modelled scenario: measured and predicted speedups."""
    links = {link["name"]: link for link in data["links"]}
    alpha, k = curve(data), draft_len(data)
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
                    if not pairs:
                        continue
                    measured = np.median([b["wall_s"] / r["wall_s"] for r, b in pairs])
                    run = [r for r in records if r["link"] == link_name]
                    predicted = np.median([predicted_s(regime, link, b, "target-only", alpha, run, k) /
                                           predicted_s(regime, link, r, mode, alpha, run, k) for r, b in pairs])
                    rows.append({"regime": name, "link": link_name, "scenario": scenario, "workload": workload,
                                 "measured": float(measured), "predicted": float(predicted),
                                 "error": float(predicted / measured - 1)})
    return rows


def error_table(rows: list[dict], alpha: list[float], k: int) -> str:
    within = sum(abs(r["error"]) <= 0.15 for r in rows)
    lines = ["Acceptance by position (the `plan-device-led` rounds on descriptions; later positions their "
             f"geometric mean): {', '.join(f'{a:.2f}' for a in alpha[:k + 1])}, ...",
             "", f"{within} of {len(rows)} predictions within ±15% of the emulated runs; largest error "
             f"{max((abs(r['error']) for r in rows), default=0):.0%}.", "",
             "| regime | link | scenario | workload | measured speedup | predicted | error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = "" if abs(r["error"]) <= 0.15 else " **(out)**"
        lines.append(f"| {r['regime']} | {r['link']} | {r['scenario']} | {r['workload']} | {r['measured']:.2f}x "
                     f"| {r['predicted']:.2f}x | {r['error']:+.0%}{flag} |")
    return "\n".join(lines)
