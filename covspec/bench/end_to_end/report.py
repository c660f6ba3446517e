"""Benchmark reports: per (link, scenario) figures, a Markdown table, PNG plots.

Figures are medians over questions (with the 25th-75th percentile spread for
tokens/s); the speedup is the median over questions of the per-question ratio to
target-only measured in the same run on the same link.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np


def summarize(records: list[dict]) -> list[dict]:
    """One row per (link, scenario), in first-seen order."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["link"], record["scenario"])].append(record)
    baseline = {(r["link"], r["scene"], r["qtype"]): r for r in records if r["scenario"] == "target-only"}
    rows = []
    for (link, scenario), group in groups.items():
        rates = np.array([r["tokens_per_s"] for r in group])
        tokens = max(sum(r["tokens"] for r in group), 1)
        speedups, identical = [], []
        for r in group:
            base = baseline.get((link, r["scene"], r["qtype"])) or baseline.get(("loopback", r["scene"], r["qtype"]))
            if base is not None:
                speedups.append(r["tokens_per_s"] / max(base["tokens_per_s"], 1e-9))
                identical.append(r["token_ids"] == base["token_ids"])
        described = [r["description_f1"] for r in group if r["description_f1"] is not None]
        rows.append({
            "link": link, "scenario": scenario, "questions": len(group),
            "tokens_per_s": float(np.median(rates)),
            "tokens_per_s_p25": float(np.percentile(rates, 25)), "tokens_per_s_p75": float(np.percentile(rates, 75)),
            "speedup": float(np.median(speedups)) if speedups else None,
            "identical": float(np.mean(identical)) if identical else None,
            "mean_accepted": float(np.mean([r["mean_accepted"] for r in group])),
            "drafted": sum(r.get("drafted", 0) for r in group),
            "accepted": sum(sum(r.get("accepted_counts", [])) for r in group),
            "bytes_up_per_token": sum(r["bytes_up"] for r in group) / tokens,
            "bytes_down_per_token": sum(r["bytes_down"] for r in group) / tokens,
            "ttft_ms": float(np.median([r["ttft_s"] for r in group])) * 1000,
            "device_prefill_ms": float(np.median([r["device_prefill_s"] for r in group])) * 1000,
            "edge_ms_per_token": sum(r["edge_ms"] for r in group) / tokens,
            "accuracy": float(np.mean([r["correct"] for r in group])),
            "description_f1": float(np.mean(described)) if described else None,
        })
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    header = ("| link | scenario | tok/s (p25-p75) | speedup | same as target | accepted | B up/tok | B down/tok "
              "| TTFT ms | edge ms/tok | accuracy | descr. F1 |")
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['link']} | {r['scenario']} | {r['tokens_per_s']:.0f} ({r['tokens_per_s_p25']:.0f}-"
            f"{r['tokens_per_s_p75']:.0f}) | {_fmt(r['speedup'], '.2f')}x | {_fmt(r['identical'], '.0%')} | "
            f"{r['mean_accepted']:.2f} | {r['bytes_up_per_token']:.0f} | {r['bytes_down_per_token']:.0f} | "
            f"{r['ttft_ms']:.1f} | {r['edge_ms_per_token']:.2f} | {r['accuracy']:.0%} | "
            f"{_fmt(r['description_f1'], '.3f')} |")
    return "\n".join(lines)


def plot_speedup(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = list(dict.fromkeys(r["link"] for r in rows))
    scenarios = [s for s in dict.fromkeys(r["scenario"] for r in rows) if s != "assisted"]
    figure, axis = plt.subplots(figsize=(7, 4))
    for scenario in scenarios:
        values = [next((r["speedup"] for r in rows if r["link"] == link and r["scenario"] == scenario), None)
                  for link in links]
        axis.plot(links, [np.nan if v is None else v for v in values], marker="o", label=scenario)
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_ylabel("tokens/s vs target-only")
    axis.set_xlabel("link")
    axis.set_title("Speedup over target-only, per link")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_bytes(rows: list[dict], path: Path, link: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if r["link"] == link and r["scenario"] != "assisted"]
    figure, axis = plt.subplots(figsize=(7, 4))
    names = [r["scenario"] for r in chosen]
    up = [r["bytes_up_per_token"] for r in chosen]
    down = [r["bytes_down_per_token"] for r in chosen]
    axis.bar(names, up, label="up")
    axis.bar(names, down, bottom=up, label="down")
    axis.set_yscale("log")
    axis.set_ylabel("bytes per generated token")
    axis.set_title(f"Traffic per generated token ({link})")
    axis.tick_params(axis="x", rotation=35, labelsize=7)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def pruning_table(rows: list[dict]) -> str:
    """Rows named ``method@ratio``: draft prefill, acceptance and speed per selection."""
    lines = [("| keep ratio | selection | draft prefill ms | mean accepted | tok/s | accuracy (exact) "
             "| accuracy with --prune-target (not exact) |"), "|---|---|---|---|---|---|---|"]
    pruned_target = {r["scenario"].removesuffix("+target"): r["accuracy"] for r in rows
                     if r["scenario"].endswith("+target")}
    for r in rows:
        if r["scenario"].endswith("+target"):
            continue
        method, _, ratio = r["scenario"].partition("@")
        lines.append(f"| {ratio} | {method} | {r['device_prefill_ms']:.2f} | {r['mean_accepted']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['accuracy']:.0%} | "
                     f"{_fmt(pruned_target.get(r['scenario']), '.0%')} |")
    return "\n".join(lines)


def plot_pruning(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    methods = list(dict.fromkeys(r["scenario"].partition("@")[0] for r in rows))
    for method in methods:
        mine = sorted(((float(r["scenario"].partition("@")[2]), r) for r in rows
                       if r["scenario"].partition("@")[0] == method), key=lambda pair: pair[0])
        ratios = [ratio for ratio, _ in mine]
        left.plot(ratios, [r["mean_accepted"] for _, r in mine], marker="o", label=method)
        right.plot(ratios, [r["device_prefill_ms"] for _, r in mine], marker="o", label=method)
    for axis, label in ((left, "mean accepted length"), (right, "draft prefill (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("keep ratio")
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
    figure.suptitle("Visual token reduction on the draft")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
