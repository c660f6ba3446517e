"""The report of ``covspec bench load``: Markdown tables and a plot, from the dict
``covspec.bench.capacity.measure_capacity`` returned (nothing is measured here).

``markdown(summary)``: one row per configuration x N x workload, the ratios the goals
name (computed from the same run) per N, the goals, and the agreement of replay with
real devices. ``plot_capacity(summary, path)``: aggregate tokens/s against N, one
line per configuration, descriptions solid and the mixed stream dashed.
"""

from __future__ import annotations

from pathlib import Path

from covspec.bench.capacity import BATCHED, TARGET_ONLY


def _fmt(value, spec: str = "g") -> str:
    return "-" if value is None else format(value, spec)


def phase_table(phases: list[dict]) -> str:
    lines = ["| configuration | devices | workload | aggregate tok/s | per-device tok/s (p50) | round ms p50 / p99 "
             "| accepted / round | target forwards / token | edge peak MiB | answers correct |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(phases, key=lambda p: (p["workload"], p["configuration"], p["devices"]))
    for p in order:
        lines.append(
            f"| {p['configuration']} | {p['devices']} | {p['workload']} | {_fmt(p['tokens_per_s'], '.0f')} "
            f"| {_fmt(p['device_tokens_per_s_p50'], '.1f')} "
            f"| {_fmt(p['round_ms_p50'], '.1f')} / {_fmt(p['round_ms_p99'], '.1f')} "
            f"| {_fmt(p['mean_accepted'], '.2f')} | {_fmt(p['forwards_per_token'], '.3f')} "
            f"| {_fmt(p['edge_peak_mib'], '.0f')} | {p['correct']}/{p['answers']} |")
    return "\n".join(lines)


def ratio_table(ratios: dict) -> str:
    lines = ["| devices | covspec / target-only (descriptions) | covspec / target-only (mixed) "
             "| batched / unbatched covspec (descriptions) | batched / unbatched covspec (mixed) |",
             "|---|---|---|---|---|"]
    by = {(r["devices"], r["workload"]): r for r in ratios["by_level"]}
    for n in sorted({r["devices"] for r in ratios["by_level"]}):
        d, m = by.get((n, "descriptions"), {}), by.get((n, "mixed"), {})
        lines.append(f"| {n} | {_fmt(d.get('covspec_over_target_only'), '.2f')}x "
                     f"| {_fmt(m.get('covspec_over_target_only'), '.2f')}x "
                     f"| {_fmt(d.get('batched_over_unbatched'), '.2f')}x "
                     f"| {_fmt(m.get('batched_over_unbatched'), '.2f')}x |")
    return "\n".join(lines)


def goal_lines(ratios: dict) -> str:
    marks = {True: "met", False: "NOT met", None: "not measured (level not in this run)"}
    return "\n".join(f"- {g['goal']}: {_fmt(g['value'], '.2f')}x (goal >= {g['target']}x): {marks[g['met']]}"
                     for g in ratios["goals"])


def trend(phases: list[dict], ratios: dict) -> str:
    """How CoVSpec's ratio to target-only moves with N on descriptions, with the
    target forwards per committed token that explain it."""
    by = {(r["devices"], r["workload"]): r["covspec_over_target_only"] for r in ratios["by_level"]}
    levels = sorted(n for n, w in by if w == "descriptions" and by[(n, w)] is not None)
    if len(levels) < 2:
        return ""
    low, high = levels[0], levels[-1]
    first, last = by[(low, "descriptions")], by[(high, "descriptions")]
    fwd = {(p["configuration"], p["devices"]): p["forwards_per_token"]
           for p in phases if p["workload"] == "descriptions"}

    def moved(name: str) -> str:
        return f"{_fmt(fwd.get((name, low)), '.3f')} -> {_fmt(fwd.get((name, high)), '.3f')}"

    why = ("batching shares each forward among the sessions in it, which helps target-only (one token per session "
           "per forward) more than CoVSpec, whose forwards already commit several tokens each; once the edge is "
           "compute-bound, CoVSpec also pays for the draft tokens the target rejects" if last < first else
           "batching helps CoVSpec at least as much as target-only here: its rounds carry several tokens per "
           "session, so a batched forward commits more tokens")
    return (f"CoVSpec / target-only (descriptions) goes from {first:.2f}x at {low} devices to {last:.2f}x at {high}. "
            f"Target forwards per committed token, {low} -> {high} devices: target-only {moved(TARGET_ONLY.name)}, "
            f"CoVSpec batched {moved(BATCHED.name)}. Why: {why}.")


def agreement_table(agreement: list[dict]) -> str:
    if not agreement:
        return "No agreement check in this run."
    lines = ["| devices | workload | replay tok/s | real tok/s | real / replay | forwards / token replay / real "
             "| answers correct replay / real |", "|---|---|---|---|---|---|---|"]
    for a in agreement:
        lines.append(f"| {a['devices']} | {a['workload']} | {_fmt(a['replay_tokens_per_s'], '.0f')} "
                     f"| {_fmt(a['real_tokens_per_s'], '.0f')} | {_fmt(a['real_over_replay'], '.2f')} "
                     f"| {_fmt(a['replay_forwards_per_token'], '.3f')} / {_fmt(a['real_forwards_per_token'], '.3f')} "
                     f"| {'all' if a['replay_all_correct'] else 'NOT all'} / "
                     f"{'all' if a['real_all_correct'] else 'NOT all'} |")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    plan = summary["plan"]
    tables = summary["tables"]
    head = (f"{plan['questions']} held-out ShapesVQA questions per workload (descriptions; mixed: "
            f"{plan['describe_share']:.0%} descriptions, the rest short answers), greedy, max "
            f"{plan['max_new_tokens']} new tokens, {plan['seconds']:g} s per phase, fixed chunks of "
            f"{plan['chunk']} tokens from the real int8 draft, replayed at {plan.get('pace', 1.0):g}x its time here "
            f"({tables['descriptions'].get('draft_chunk_ms_mean', 0):.1f} ms per chunk; expected accepted/round "
            f"{tables['descriptions']['expected_mean_accepted']:.2f} on descriptions). Aggregate tok/s: tokens "
            f"committed within the phase's window over all devices. Edge peak: since the edge started "
            f"(one edge per configuration and N; descriptions first).")
    verdict = "every answer equals the target's own" if summary.get("all_correct") else \
        "NOT every answer equals the target's own (see the JSON)"
    parts = [head, phase_table(summary["phases"]), "Ratios (same run):", ratio_table(summary["ratios"]),
             goal_lines(summary["ratios"]), trend(summary["phases"], summary["ratios"]),
             "Replay devices vs real devices (all answers' tokens over the wall time, same edge, same questions):",
             agreement_table(summary["agreement"]), f"Correctness: {verdict}."]
    return "\n\n".join(part for part in parts if part)


def plot_capacity(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = summary["phases"]
    figure, axis = plt.subplots(figsize=(7, 4))
    configurations = list(dict.fromkeys(p["configuration"] for p in phases))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(configurations):
        for workload, style in (("descriptions", "-"), ("mixed", "--")):
            points = sorted((p["devices"], p["tokens_per_s"]) for p in phases
                            if p["configuration"] == name and p["workload"] == workload)
            if points:
                axis.plot(*zip(*points), style, marker="o", color=colors[i % len(colors)],
                          label=f"{name} ({workload})")
    levels = sorted({p["devices"] for p in phases})
    axis.set_xscale("log", base=2)
    axis.set_xticks(levels, [str(n) for n in levels])
    axis.set_ylim(bottom=0)
    axis.set_xlabel("devices against one edge")
    axis.set_ylabel("aggregate committed tokens/s")
    axis.set_title("Edge capacity (descriptions solid, mixed dashed)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
