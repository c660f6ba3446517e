"""Markdown tables of a ``covspec bench reliability`` summary (``phases.measure_reliability``).

``markdown(summary)`` renders the fuzz (totals, replies by code, per class), the load
levels and the faults; ``verdict(summary)`` lists what broke a promise (a message
without a reply, an edge crash, a wrong or failed answer, a victim session ended by
messages its owner did not send, a session that never expired), empty when the run
kept every one. Pure formatting: nothing is measured here.
"""

from __future__ import annotations


def _mib(memory: dict) -> str:
    return f"{memory['rss_before_mib']:.0f} / {memory['rss_peak_mib']:.0f} / {memory['rss_after_mib']:.0f}"


def _labels(counter: dict) -> str:
    return ", ".join(f"{label} {count}" for label, count in sorted(counter.items(), key=lambda kv: -kv[1]))


def fuzz_tables(fuzz: dict) -> str:
    replied = sum(fuzz["replies"].values())
    by_design = fuzz["no_reply_by_design"]
    device = fuzz["device"]
    lines = ["| messages sent | sockets | replied | unanswered | no reply by design: close / socket drop "
             "| unexpected replies | misaddressed | edge crashes | edge RSS MiB before / peak / after "
             "| well-behaved answers: correct / all |", "|" + "---|" * 10,
             f"| {fuzz['sent']:,} | {fuzz['sockets']} | {replied:,} | {sum(fuzz['unanswered'].values())} | "
             f"{by_design.get('close', 0):,} / {by_design.get('socket_drop', 0)} | "
             f"{sum(fuzz['unexpected'].values())} | {fuzz['misaddressed']} | {fuzz['edge_crashes']} | "
             f"{_mib(fuzz['memory'])} | {device['correct']} / {device['answers']} |", ""]
    if fuzz.get("victim_checks"):
        lines += ["| victim rounds after a batch | committed the target's tokens | victims ended by others "
                  "| wrong | unanswered |", "|---|---|---|---|---|",
                  f"| {fuzz['victim_checks']:,} | {fuzz['victim_rounds_right']:,} | "
                  f"{fuzz['victims_ended_by_others']} | {fuzz['victim_wrong']} | {fuzz['victim_unanswered']} |", ""]
    lines += ["| reply | count |", "|---|---|"]
    lines += [f"| {label} | {count:,} |" for label, count in sorted(fuzz["replies"].items(), key=lambda kv: -kv[1])]
    lines += ["", "| class | sent | replies |", "|---|---|---|"]
    for name, sent in sorted(fuzz["sent_by_class"].items(), key=lambda kv: -kv[1]):
        replies = dict(fuzz["replies_by_class"].get(name, {}))
        silent = fuzz["no_reply_by_design"].get(name, 0) + fuzz["unanswered"].get(name, 0)
        if silent:
            replies["(no reply)"] = silent
        lines.append(f"| {name} | {sent:,} | {_labels(replies)} |")
    return "\n".join(lines)


def load_table(levels: list[dict]) -> str:
    lines = ["| devices | seconds | answers | correct | failed | committed tok/s | latency p50 s | latency p95 s "
             "| reopens |", "|" + "---|" * 9]
    for r in levels:
        lines.append(f"| {r['devices']} | {r['seconds']:g} | {r['answers']} | {r['correct']} | {r['failed']} | "
                     f"{r['tokens_per_s']:.0f} | {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | "
                     f"{r['reopens']} |")
    return "\n".join(lines)


def faults_table(restarts: dict, vanished: dict) -> str:
    restart_s = [e["restart_s"] for e in restarts["events"]]
    live = [e["sessions_live_at_kill"] for e in restarts["events"]]
    kill = (f"{restarts['kills']} kills, sessions live at each kill {live}, restart took "
            f"{min(restart_s, default=0):.1f}-{max(restart_s, default=0):.1f} s")
    gone = (f"{vanished['vanished']} sessions opened and abandoned, {vanished['expired']} expired "
            f"{vanished['expiry_s_min']:.1f}-{vanished['expiry_s_max']:.1f} s after (idle timeout "
            f"{vanished['idle_timeout_s']:g} s)")
    lines = ["| fault | what happened | devices | answers | correct | failed | reopens |", "|" + "---|" * 7,
             f"| SIGKILL + restart on the same address | {kill} | {restarts['devices']} | {restarts['answers']} | "
             f"{restarts['correct']} | {restarts['failed']} | {restarts['reopens']} |",
             f"| vanished clients | {gone} | {vanished['devices']} | {vanished['answers']} | {vanished['correct']} "
             f"| {vanished['failed']} | {vanished['reopens']} |"]
    return "\n".join(lines)


def verdict(summary: dict) -> list[str]:
    """Every broken promise, one sentence each."""
    problems = []
    fuzz = summary["fuzz"]
    if fuzz["unanswered"]:
        problems.append(f"messages without a reply: {fuzz['unanswered']}")
    if fuzz["edge_crashes"]:
        problems.append("the edge crashed under the fuzz")
    if fuzz["unexpected"]:
        problems.append(f"replies outside what each case allows: {fuzz['unexpected']}")
    if any(fuzz["edge_log_failures"].values()):
        problems.append(f"the edge logged failed requests: {fuzz['edge_log_failures']}")
    ended, wrong = fuzz.get("victims_ended_by_others", 0), fuzz.get("victim_wrong", 0) + fuzz.get("victim_unanswered", 0)
    if ended or wrong:
        problems.append(f"victim sessions: {ended} ended by messages their owner did not send, {wrong} rounds wrong or "
                        f"unanswered ({fuzz.get('victim_examples')})")
    if fuzz["misaddressed"]:
        problems.append(f"{fuzz['misaddressed']} replies named another session or seq")
    phases = [("fuzz device", fuzz["device"])] + [(f"{r['devices']} devices", r) for r in summary.get("load", [])]
    phases += [(name, summary[name]) for name in ("vanished", "restarts") if name in summary]
    for name, r in phases:
        if r["correct"] != r["answers"] or not r["answers"]:
            problems.append(f"{name}: {r['correct']} of {r['answers']} answers correct ({r['errors']})")
    vanished = summary.get("vanished")
    if vanished and vanished["expired"] != vanished["vanished"]:
        problems.append(f"only {vanished['expired']} of {vanished['vanished']} vanished sessions expired")
    return problems


def markdown(summary: dict) -> str:
    plan, fuzz = summary["plan"], summary["fuzz"]
    failures = {kind: n for kind, n in fuzz["edge_log_failures"].items() if n}
    parts = [f"Toy target on the edge (a `covspec edge serve` child, one torch thread), toy int8 draft on the "
             f"devices, greedy, max {plan['max_new_tokens']} new tokens, {plan['questions']} held-out ShapesVQA "
             f"questions; every answer is compared token for token with the target's own greedy answer "
             f"(transformers `generate`). Seed {plan['seed']}.",
             f"**Hostile messages.** {fuzz['sent']:,} generated messages in {len(fuzz['sent_by_class'])} classes "
             f"from {fuzz['sockets']} sockets in lock-step (each waits {fuzz['reply_timeout_s']:g} s for its reply), a well-behaved "
             f"device answering alongside. A close is answered only when refused; a frame over the socket's "
             f"MAXMSGSIZE makes ZeroMQ drop the peer before the edge sees it (sent from throw-away sockets). "
             f"Each socket keeps a victim session that hostile string fields (lone surrogates, empty, huge, wrong "
             f"types, in every string field of every message) name, and runs its next round after every batch of "
             f"messages: it must commit the target's own tokens. "
             f"Edge log lines recording a failed request: {failures or 'none'}.",
             fuzz_tables(fuzz)]
    if "load" in summary:
        parts += [f"**Load.** Devices answering back to back for {plan['seconds']:g} s per level (threads of "
                  f"this process, one onnxruntime thread each, sharing the machine with the edge).",
                  load_table(summary["load"])]
    if "restarts" in summary and "vanished" in summary:
        parts += ["**Faults.** The edge child is killed with SIGKILL mid-generation and restarted on the same "
                  "address; devices reopen with their committed tokens. Vanished clients open a session and close "
                  "their socket without `close`; each session is probed with a wrong owner (which never refreshes "
                  "it) until the edge no longer knows it.",
                  faults_table(summary["restarts"], summary["vanished"])]
    problems = verdict(summary)
    parts.append("Verdict: " + ("every promise kept." if not problems else "; ".join(problems) + "."))
    return "\n\n".join(parts)
