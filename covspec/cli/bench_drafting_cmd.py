"""`covspec bench drafting`: drafting policies, pipelining and branching over emulated links.

A click command of the ``bench`` group (``covspec/cli/bench_cmd.py``)."""

from __future__ import annotations

from pathlib import Path

import click

from covspec.cli.bench_common import LINKS, REGIME_HELP, RESULTS, measure, regime_label, regime_slug, write_section


@click.command("drafting")
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

    from covspec.bench.end_to_end import report
    from covspec.bench.harness.link import profile_named
    from covspec.bench.end_to_end.scenarios import Scenario
    from covspec.bench.harness.workload import toy_questions
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
    name = f"drafting-{regime_slug(regime)}" if regime else "drafting"
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
