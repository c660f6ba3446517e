"""`covspec bench pruning`: visual token reduction, keep ratio by method, on one link.

A click command of the ``bench`` group (``covspec/cli/bench_cmd.py``)."""

from __future__ import annotations

from pathlib import Path

import click

from covspec.cli.bench_common import RESULTS, measure, write_section


@click.command("pruning")
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

    from covspec.bench.end_to_end import report
    from covspec.bench.harness.link import profile_named
    from covspec.bench.end_to_end.scenarios import Scenario
    from covspec.bench.harness.workload import toy_questions
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
