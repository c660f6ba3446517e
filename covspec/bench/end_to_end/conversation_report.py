"""``covspec bench conversation``'s tables, from its report (``conversation.py``)."""

from __future__ import annotations


def markdown_report(report: dict) -> str:
    regime = f"under the regime {report['regime']} (both sides paced), " if report.get("regime") else ""
    lines = [f"{report['images']} conversations of {report['turns']} questions per configuration (toy scenes, "
             f"at most {report['max_new_tokens']} new tokens, greedy, the default lead), one toy edge child, "
             f"{regime}medians per turn. TTFT and prefill are the device's; bytes are what its socket sent and "
             "received.", ""]
    for name, entry in report["configurations"].items():
        summary = entry["summary"]
        lines += [f"**{name}**: {summary['answers'] - summary['wrong']} of {summary['answers']} answers the "
                  f"target's own; follow-up TTFT / first TTFT (median): {summary['follow_up_ttft_ratio']:.2f}", "",
                  "| turn | TTFT ms | draft prefill ms | bytes up | bytes down | tokens | wall ms | accepted per round |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in summary["turns"]:
            lines.append(f"| {row['turn']} | {row['ttft_s'] * 1000:.1f} | {row['device_prefill_s'] * 1000:.1f} | "
                         f"{row['bytes_up']:.0f} | {row['bytes_down']:.0f} | {row['tokens']:.0f} | "
                         f"{row['wall_s'] * 1000:.1f} | {row['mean_accepted']:.2f} |")
        lines.append("")
    memory = report.get("memory")
    if memory:
        lines += [f"One conversation of {len(memory)} questions, after each answer:", "",
                  "| turn | answer tokens | edge KV (live sessions) KiB | draft KV cache KiB | draft rows | "
                  "device peak RSS MB | TTFT ms | bytes up |", "|---|---|---|---|---|---|---|---|"]
        for row in memory:
            edge = "n/a" if row["edge_kv_bytes"] is None else f"{row['edge_kv_bytes'] / 1024:.0f}"
            lines.append(f"| {row['turn']} | {row['answer_tokens']} | {edge} | {row['draft_kv_bytes'] / 1024:.0f} | "
                         f"{row['draft_context_rows']} | {row['device_peak_rss_mb']:.0f} | {row['ttft_s'] * 1000:.1f} | "
                         f"{row['bytes_up']} |")
    return "\n".join(lines)
