"""`covspec bench`: every claim of the project as a number from one command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

RESULTS = Path("benchmarks")
LINKS = ["loopback", "lan", "wifi", "5g", "4g"]


def write_section(command: str, title: str, body: str) -> None:
    """Put ``body`` under ``## title (`covspec bench command`)`` in BENCHMARKS.md (replacing
    an earlier run's numbers), with the command line that produced it."""
    from covspec.bench import report

    line = " ".join(["covspec bench", command, *sys.argv[3:]])
    report.append_markdown(Path("BENCHMARKS.md"), f"{title} (`covspec bench {command}`)", line, body)


REGIME_HELP = ("Emulate a deployment (DEVICE@TARGET or a profile file; `covspec plan --list`): the edge's forwards "
               "and the draft's runs padded to a phone and a GPU-served target. Real time only by default.")


def regime_label(regime: str | None, records: list[dict]) -> str:
    """The line that says a table's timings are emulated, and how faithfully; "" without a regime."""
    if not regime:
        return ""
    from covspec.bench.regime import overrun_line

    return overrun_line(regime, records) + "\n\n"


def measure(name: str, artifacts_dir: Path, out: Path, profiles: list, scenarios: list, questions: list,
            max_new_tokens: int, regime: str | None = None) -> tuple[list[dict], list[dict]]:
    """Run ``scenarios`` on ``questions`` over ``profiles`` against a fresh edge (under
    ``regime`` when given); write ``out/NAME.json`` and return (raw records, summary rows)."""
    from tqdm import tqdm

    from covspec.bench import report
    from covspec.bench.runner import Bench, records_to_json
    from covspec.runtime_device.options import GenerationSettings
    from covspec.toy.artifacts import ensure_toy_artifacts
    from covspec.toy.models import bundled_model_dir

    artifacts = ensure_toy_artifacts(artifacts_dir, lambda line: click.echo(line, err=True))
    out.mkdir(parents=True, exist_ok=True)
    bench_run = Bench(artifacts, bundled_model_dir("target"), GenerationSettings(max_new_tokens=max_new_tokens),
                      out / "edge.log", regime=regime)
    try:
        total = len(profiles) * len(scenarios) * len(questions)
        with tqdm(total=total, desc=name, unit="run", file=sys.stderr) as bar:
            records = bench_run.run(profiles, scenarios, questions, tick=bar.update)
    finally:
        bench_run.close()
    raw = records_to_json(records)
    rows = report.summarize(raw)
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, "records": raw, "regime": _described(regime)},
                                                 indent=1))
    return raw, rows


def _described(regime: str | None) -> dict | None:
    from covspec.regime import load_regime

    return load_regime(regime).describe() if regime else None


@click.group()
def bench() -> None:
    """Measure covspec against its baselines on the toy pair; results go to
    benchmarks/ (JSON, PNG) and BENCHMARKS.md (Markdown tables)."""


@bench.command("run")
@click.option("--quick", is_flag=True, help="A smoke test: 2 questions, loopback only, short answers (< 3 min).")
@click.option("--links", default=",".join(LINKS), show_default=True, help="Comma-separated link profiles.")
@click.option("--questions", "count", default=12, show_default=True, type=click.IntRange(min=1))
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--keep-ratio", default=None, type=click.FloatRange(0, 1, min_open=True),
              help="Keep ratio for the CoVSpec scenarios (default: the artifact's).")
@click.option("--artifacts", "artifacts_dir", default=Path("artifacts/toy-draft-int8"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", default=RESULTS, show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--regime", default=None, metavar="DEVICE@TARGET|FILE", help=REGIME_HELP)
@click.option("--markdown/--no-markdown", default=True, show_default=True,
              help="Append the table to BENCHMARKS.md.")
def run(quick: bool, links: str, count: int, max_new_tokens: int, keep_ratio: float | None,
        artifacts_dir: Path, out: Path, regime: str | None, markdown: bool) -> None:
    """Target-only vs vanilla speculative decoding vs CoVSpec (and CoVSpec minus each
    feature) over emulated links, plus transformers' assisted generation."""
    from tqdm import tqdm

    from covspec.bench import lead_report, report
    from covspec.bench.link import profile_named
    from covspec.bench.runner import Bench, records_to_json, run_assisted
    from covspec.bench.scenarios import standard_scenarios
    from covspec.bench.workload import toy_questions
    from covspec.protocol.manifest import load_manifest
    from covspec.runtime_device.options import GenerationSettings
    from covspec.toy.artifacts import ensure_toy_artifacts
    from covspec.toy.models import bundled_model_dir

    if quick:
        links, count, max_new_tokens = "loopback", 2, min(max_new_tokens, 32)
    try:
        profiles = [profile_named(name.strip()) for name in links.split(",") if name.strip()]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--links") from None
    artifacts = ensure_toy_artifacts(artifacts_dir, lambda line: click.echo(line, err=True))
    ratio = keep_ratio if keep_ratio is not None else load_manifest(artifacts).pruning.get("keep_ratio", 1.0)
    scenarios = standard_scenarios(ratio)
    questions = toy_questions(count)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    total = len(profiles) * len(questions) * (len(scenarios) - 1) + len(questions)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=total, desc="bench", unit="run", file=sys.stderr) as bar:
        records = run_assisted(bundled_model_dir("draft"), bundled_model_dir("target"), questions, settings,
                               tick=bar.update)
        bench_run = Bench(artifacts, bundled_model_dir("target"), settings, out / "edge.log", regime=regime)
        try:
            records += bench_run.run(profiles, scenarios, questions, tick=bar.update)
        finally:
            bench_run.close()
    raw = records_to_json(records)
    rows = report.summarize(raw)
    name = ("bench-quick" if quick else "bench") + ("-regime" if regime else "")
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, "records": raw, "regime": _described(regime)},
                                                 indent=1))
    table = regime_label(regime, raw) + report.markdown_table(rows)
    lead = lead_report.lead_table(lead_report.lead_rows(raw, {p.name: p.rtt_ms for p in profiles}))
    click.echo(table + "\n\n" + lead)
    if not quick and not regime:
        report.plot_speedup(rows, out / "speedup_vs_link.png")
        report.plot_bytes(rows, out / "bytes_per_token.png", profiles[0].name)
    if markdown and not quick:
        plots = "" if regime else \
            "\n\n![speedup](benchmarks/speedup_vs_link.png) ![bytes](benchmarks/bytes_per_token.png)"
        body = (f"{len(questions)} held-out ShapesVQA questions (half descriptions), greedy, max {max_new_tokens} "
                f"new tokens, CoVSpec keep ratio {ratio}.\n\n{table}\n\n"
                f"Never slower than the edge alone? Speedup over target-only per workload (median per question), "
                f"TTFT, and the target's forwards per committed token (target-only's in brackets):\n\n{lead}{plots}")
        write_section("run", "Side by side" + (f", EMULATED {regime}" if regime else ""), body)
    click.echo(f"raw results: {out / (name + '.json')}", err=True)


@bench.command("pruning")
@click.option("--questions", "count", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--ratios", default="1,0.5,0.25,0.125", show_default=True, help="Comma-separated keep ratios.")
@click.option("--methods", default="covspec,random,relevance,activity,diversity", show_default=True)
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--artifacts", "artifacts_dir", default=Path("artifacts/toy-draft-int8"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", default=RESULTS, show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--markdown/--no-markdown", default=True, show_default=True)
def pruning(count: int, ratios: str, methods: str, max_new_tokens: int, artifacts_dir: Path, out: Path,
            markdown: bool) -> None:
    """Visual token reduction: keep ratios x selection methods, measured on loopback
    device-led with a fixed draft length of 4 (no pipelining, no branches), so acceptance
    is comparable (edge-led, a fast edge may finish before anything is drafted)."""
    import dataclasses

    from covspec.bench import report
    from covspec.bench.link import profile_named
    from covspec.bench.scenarios import Scenario
    from covspec.bench.workload import toy_questions
    from covspec.runtime_device.options import DraftingOptions

    keep = [float(r) for r in ratios.split(",")]
    chosen = [m.strip() for m in methods.split(",")]
    fixed = DraftingOptions(lead="device", policy="fixed", draft_len=4, pipeline=False, branches=0)
    scenarios = [Scenario(f"{m}@{r:g}", "speculative", dataclasses.replace(fixed, keep_ratio=r, selection=m))
                 for r in keep for m in (chosen if r < 1 else chosen[:1])]
    scenarios += [Scenario(f"{m}@{r:g}+target", "speculative", dataclasses.replace(fixed, keep_ratio=r, selection=m),
                           prune_target=True)
                  for r in keep if r < 1 for m in chosen]
    scenarios += [Scenario(f"covspec-contiguous@{r:g}", "speculative",
                           dataclasses.replace(fixed, keep_ratio=r, positions="contiguous")) for r in keep if r < 1]
    _, rows = measure("pruning", artifacts_dir, out, [profile_named("loopback")], scenarios, toy_questions(count),
                      max_new_tokens)
    report.plot_pruning([r for r in rows if "contiguous" not in r["scenario"] and "+target" not in r["scenario"]],
                        out / "pruning.png")
    table = report.pruning_table(rows)
    click.echo(table)
    if markdown:
        body = (f"{count} held-out ShapesVQA questions, greedy, device-led, fixed draft length 4, loopback. "
                f"`covspec-contiguous` re-numbers kept tokens contiguously instead of keeping their "
                f"original positions. The last column is the opt-in, NOT exact mode where the target keeps "
                f"only the same tokens (`--prune-target`): its task accuracy.\n\n{table}\n\n"
                f"![pruning](benchmarks/pruning.png)")
        write_section("pruning", "Visual token reduction", body)


@bench.command("wire")
@click.option("--vocab", "vocab_sizes", default="32000,151936,262144", show_default=True,
              help="Comma-separated vocabulary sizes of the tiny random model pairs.")
@click.option("--sessions", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--out", default=RESULTS, show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--markdown/--no-markdown", default=True, show_default=True)
def wire(vocab_sizes: str, sessions: int, out: Path, markdown: bool) -> None:
    """Bytes per drafted position and per verdict, compact vs dense wire, at real
    vocabulary sizes (tiny random models, real sessions, bytes counted on the socket)."""
    from tqdm import tqdm

    from covspec.bench.wire import measure_wire, wire_table
    from covspec.protocol.wire import CODECS

    sizes = [int(v) for v in vocab_sizes.split(",")]
    with tqdm(total=len(sizes) * 2 * len(CODECS), desc="wire", unit="config", file=sys.stderr) as bar:
        rows = measure_wire(sizes, sessions=sessions, tick=bar.update)
    out.mkdir(parents=True, exist_ok=True)
    (out / "wire.json").write_text(json.dumps(rows, indent=1))
    table = wire_table(rows)
    click.echo(table)
    if markdown:
        body = (f"Tiny random LLaVA pairs, {sessions} sessions x 16 new tokens per configuration, fixed draft "
                f"length 4. Bytes are verify/result frame payloads counted by the device's socket.\n\n{table}")
        write_section("wire", "Wire traffic at real vocabulary sizes", body)


@bench.command("drafting")
@click.option("--links", default=",".join(LINKS), show_default=True, help="Comma-separated link profiles.")
@click.option("--questions", "count", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--artifacts", "artifacts_dir", default=Path("artifacts/toy-draft-int8"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", default=RESULTS, show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--regime", default=None, metavar="DEVICE@TARGET|FILE", help=REGIME_HELP)
@click.option("--markdown/--no-markdown", default=True, show_default=True)
def drafting(links: str, count: int, max_new_tokens: int, artifacts_dir: Path, out: Path, regime: str | None,
             markdown: bool) -> None:
    """Fixed draft lengths 2/4/6/8 vs adaptive, and pipelining / branching on and off
    (pipelining also capped at two chunks in flight), all device-led, and edge-led
    beside them, on every link profile (no pruning, compact wire)."""
    import dataclasses

    from covspec.bench import report
    from covspec.bench.link import profile_named
    from covspec.bench.scenarios import Scenario
    from covspec.bench.workload import toy_questions
    from covspec.runtime_device.options import DraftingOptions

    plain = DraftingOptions(lead="device", keep_ratio=1.0, pipeline=False, branches=0)   # device-led features
    scenarios = [Scenario("target-only", "target_only")]
    scenarios += [Scenario(f"fixed-{n}", "speculative", dataclasses.replace(plain, policy="fixed", draft_len=n))
                  for n in (2, 4, 6, 8)]
    scenarios += [Scenario("adaptive", "speculative", plain),
                  Scenario("adaptive+pipeline", "speculative", dataclasses.replace(plain, pipeline=True)),
                  Scenario("adaptive+branches", "speculative", dataclasses.replace(plain, branches=2)),
                  Scenario("adaptive+pipeline+branches", "speculative",
                           dataclasses.replace(plain, pipeline=True, branches=2)),
                  Scenario("adaptive+pipeline(2)+branches", "speculative",
                           dataclasses.replace(plain, pipeline=True, max_in_flight=2, branches=2)),
                  Scenario("edge-led", "speculative", dataclasses.replace(plain, lead="edge"))]
    profiles = [profile_named(name.strip()) for name in links.split(",") if name.strip()]
    name = f"drafting-{Path(regime).stem.replace('@', '-')}" if regime else "drafting"
    raw, rows = measure(name, artifacts_dir, out, profiles, scenarios, toy_questions(count, describe_share=1.0),
                        max_new_tokens, regime)
    report.plot_speedup(rows, out / f"{name}_speedup_vs_link.png")
    table = regime_label(regime, raw) + report.markdown_table(rows)
    click.echo(table)
    if markdown and regime:
        write_section("drafting", f"Drafting policy, pipelining, branching, emulated {regime}",
                      f"{count} held-out ShapesVQA descriptions, greedy, EMULATED regime `{regime}`.\n\n{table}")
    elif markdown:
        body = (f"{count} held-out ShapesVQA descriptions, greedy, max {max_new_tokens} new tokens, no "
                f"pruning, compact wire.\n\n{table}\n\n![drafting](benchmarks/drafting_speedup_vs_link.png)")
        write_section("drafting", "Drafting policy, pipelining, branching", body)


@bench.command("families")
@click.option("--family", "names", default="llava-siglip,onevision,idefics3", show_default=True,
              help="Comma-separated family pairs (tiny configs) to measure.")
@click.option("--out", default=RESULTS, show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--markdown/--no-markdown", default=True, show_default=True)
def families(names: str, out: Path, markdown: bool) -> None:
    """Per model family on tiny configs: artifact sizes (fp32/int8/int4), parity,
    self-draft acceptance, device prefill and per-token times."""
    import tempfile

    from covspec.bench.families import PAIRS, family_table, measure_family

    chosen = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in PAIRS]
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; known: {', '.join(PAIRS)}.", param_hint="--family")
    out.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        with tempfile.TemporaryDirectory() as root:
            record = measure_family(PAIRS[name], Path(root), lambda line: click.echo(line, err=True))
        (out / f"family-{name}.json").write_text(json.dumps(record, indent=1))
        table = family_table(record)
        click.echo(table)
        if markdown:
            write_section("families", f"Model family {name} (tiny configs)", table)


@bench.command("reliability")
@click.option("--messages", default=100_000, show_default=True, type=click.IntRange(min=1),
              help="Hostile messages to send to a live edge.")
@click.option("--sockets", default=8, show_default=True, type=click.IntRange(min=1), help="Fuzzing sockets.")
@click.option("--devices", "levels", default="1,4,16,32", show_default=True,
              help="Comma-separated numbers of concurrent devices, one load level each.")
@click.option("--seconds", default=60.0, show_default=True, type=click.FloatRange(min=1),
              help="Duration of each load level and of the restart phase.")
@click.option("--kills", default=3, show_default=True, type=click.IntRange(min=0),
              help="SIGKILLs of the edge (each followed by a restart) during the restart phase.")
@click.option("--vanished", default=16, show_default=True, type=click.IntRange(min=1),
              help="Clients that open a session and disappear.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--quick", is_flag=True, help="A smoke test: 2,000 messages, 1 and 4 devices for 10 s, one kill.")
@click.option("--hostile-edge", is_flag=True,
              help="Instead: a fake edge answers the real device with malformed and hostile replies (< 1 min).")
@click.option("--artifacts", "artifacts_dir", default=Path("artifacts/toy-draft-int8"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", default=RESULTS, show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--markdown/--no-markdown", default=True, show_default=True)
def reliability(messages: int, sockets: int, levels: str, seconds: float, kills: int, vanished: int, seed: int,
                quick: bool, hostile_edge: bool, artifacts_dir: Path, out: Path, markdown: bool) -> None:
    """Hostile messages against a live edge with a well-behaved device alongside (replies
    by code, messages without a reply, crashes, edge memory), then 1..N concurrent
    devices, SIGKILL + restart mid-generation and vanished clients; every answer is
    checked against the target's greedy answer. With --hostile-edge, the other way round:
    a fake edge against the real device, which must end every generation with a clear
    error within its patience. Exits 1 if a promise was broken."""
    if hostile_edge:
        return _hostile_edge(artifacts_dir, out, markdown)
    from tqdm import tqdm

    from covspec.bench.load import ReliabilityPlan, measure_reliability
    from covspec.bench.reliability_report import markdown as render, verdict
    from covspec.toy.artifacts import ensure_toy_artifacts
    from covspec.toy.models import bundled_model_dir

    try:
        counts = tuple(int(n) for n in levels.split(",") if n.strip())
    except ValueError:
        raise click.BadParameter(f"{levels!r} is not a comma-separated list of numbers", param_hint="--devices") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter("give at least one number of devices, each >= 1", param_hint="--devices")
    plan = ReliabilityPlan(messages=messages, sockets=sockets, levels=counts, seconds=seconds, kills=kills,
                           vanished=vanished, seed=seed)
    if quick:
        plan = ReliabilityPlan(messages=2_000, sockets=4, levels=(1, 4), seconds=10.0, kills=1, vanished=4,
                               idle_timeout_s=3.0, questions=4, seed=seed)
    artifacts = ensure_toy_artifacts(artifacts_dir, lambda line: click.echo(line, err=True))
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=plan.messages, desc="hostile messages", unit="msg", file=sys.stderr) as bar:
        summary = measure_reliability(plan, artifacts, bundled_model_dir("target"), out / "edge.log",
                                      phase=lambda name: bar.write(f"reliability: {name}", file=sys.stderr),
                                      tick=bar.update)
    name = "reliability-quick" if quick else "reliability"
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    body = render(summary)
    click.echo(body)
    if markdown and not quick:
        write_section("reliability", "Reliability: hostile messages, load, faults", body)
    click.echo(f"raw results: {out / (name + '.json')}", err=True)
    problems = verdict(summary)
    if problems:
        raise click.ClickException("broken promises: " + "; ".join(problems))


def _hostile_edge(artifacts_dir: Path, out: Path, markdown: bool) -> None:
    from covspec.bench import hostile_edge
    from covspec.bench.workload import toy_questions
    from covspec.runtime_device.artifact import DraftArtifact
    from covspec.runtime_device.client import RetryPolicy
    from covspec.toy.artifacts import ensure_toy_artifacts

    artifact = DraftArtifact.load(ensure_toy_artifacts(artifacts_dir, lambda line: click.echo(line, err=True)))
    question = toy_questions(1)[0]
    policy, attempts = RetryPolicy(timeout_s=0.5, retries=1, backoff_s=0.05), 2
    outcomes = hostile_edge.run_hostile_edge(artifact, question.image_png, question.question, policy=policy,
                                             reopen_attempts=attempts, tick=lambda line: click.echo(line, err=True))
    summary = hostile_edge.summary(outcomes, policy, attempts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability-hostile-edge.json").write_text(json.dumps(summary, indent=1))
    body = hostile_edge.report(summary)
    click.echo(body)
    if markdown:
        write_section("reliability", "A hostile edge against the real device", body)
    if summary["broken"]:
        raise click.ClickException("broken promises: " + "; ".join(summary["broken"]))


from covspec.cli.bench_device_cmd import device  # noqa: E402 - commands in modules of their own join the group here
from covspec.cli.bench_gpu_cmd import gpu  # noqa: E402
from covspec.cli.bench_load_cmd import load  # noqa: E402
from covspec.cli.bench_regime_cmd import regime  # noqa: E402

bench.add_command(load)
bench.add_command(regime)
bench.add_command(gpu)
bench.add_command(device)
