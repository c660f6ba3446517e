"""`covspec bench run`: target-only, vanilla speculative decoding and CoVSpec (and CoVSpec minus
each feature) side by side over emulated links, with transformers' assisted generation.

A click command of the ``bench`` group (``covspec/cli/bench_cmd.py``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from covspec.cli.bench_common import LINKS, REGIME_HELP, RESULTS, described, regime_label, write_section


@click.command("run")
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

    from covspec.bench.end_to_end import lead_report, report
    from covspec.bench.harness.link import profile_named
    from covspec.bench.end_to_end.runner import Bench, records_to_json, run_assisted
    from covspec.bench.end_to_end.scenarios import standard_scenarios
    from covspec.bench.harness.workload import toy_questions
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
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, "records": raw, "regime": described(regime)},
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
