"""`covspec bench load`: the edge's capacity with N devices (registered in the ``bench``
group). Measures with ``covspec.bench.capacity.load``, reports with
``covspec.bench.capacity.report``; writes JSON (and a PNG) to ``--out``, prints the
Markdown, and exits 1 when an answer was not the target's own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from covspec.cli.bench_common import regime_slug, write_section

DEFAULT_CHUNK = 8          # covspec.bench.capacity.replay_table.DEFAULT_CHUNK (not imported: subcommands load lazily)


def parse_levels(text: str, option: str) -> tuple[int, ...]:
    """``1,4,16`` -> (1, 4, 16); ``click.BadParameter`` naming ``option`` otherwise."""
    try:
        levels = tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=option) from None
    if any(n < 1 for n in levels):
        raise click.BadParameter("every number of devices must be >= 1", param_hint=option)
    return tuple(dict.fromkeys(levels))


@click.command("load")
@click.option("--levels", default="1,4,16,32", show_default=True,
              help="Comma-separated numbers of devices against one edge.")
@click.option("--seconds", default=20.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="How long the devices ask questions in each phase (configuration x N x workload).")
@click.option("--questions", "count", default=8, show_default=True, type=click.IntRange(min=1),
              help="Questions per workload (descriptions; mixed).")
@click.option("--describe-share", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Share of descriptions in the mixed stream.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--chunk", default=DEFAULT_CHUNK, show_default=True, type=click.IntRange(min=1),
              help="Tokens per drafted chunk (fixed, as the replay devices send them).")
@click.option("--pace", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Replay devices take PACE times the real draft's time (measured here) per prefill and chunk, "
                   "without using this CPU; 0: they draft instantly.")
@click.option("--agreement", default="1,4", show_default=True,
              help="Levels at which real drafting devices are run beside the replay ones (must be among --levels).")
@click.option("--regime", default=None, metavar="DEVICE@TARGET|FILE",
              help="Emulate a deployment: each edge's batched forward padded by the regime's roofline (batching "
                   "nearly free until the knee, as on a GPU) and the replay devices paced by its phone.")
@click.option("--repeat-images", default=1, show_default=True, type=click.IntRange(min=1),
              help="Questions asked about each scene in a row (descriptions: the same one again, as many "
                   "devices asking about one picture; mixed: follow-ups); above 1 also measures CoVSpec batched "
                   "with the edge's prefix cache on. 1: a new scene per question.")
@click.option("--quick", is_flag=True, help="A smoke test: 2 devices, 1 s per phase, 2 short questions.")
@click.option("--artifacts", "artifacts_dir", default=Path("artifacts/toy-draft-int8"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", default=Path("benchmarks"), show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for load.json (load-quick.json with --quick) and the edge log.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG of aggregate tokens/s against N (default: OUT/load_capacity.png; none with --quick).")
@click.option("--markdown/--no-markdown", default=True, show_default=True,
              help="Put the tables in BENCHMARKS.md (never with --quick).")
def load(levels: str, seconds: float, count: int, describe_share: float, max_new_tokens: int, chunk: int,
         pace: float, agreement: str, regime: str | None, repeat_images: int, quick: bool, artifacts_dir: Path, out: Path,
         plot_path: Path | None, markdown: bool) -> None:
    """N devices against one edge: target-only batched, CoVSpec batched, CoVSpec
    unbatched, edge-led CoVSpec batched (edge steps auto and always), on descriptions
    and on a mixed stream. Replay devices send the real int8 draft's chunks at
    negligible CPU cost (checked against real devices). Reports aggregate and
    per-device tokens/s, round latency, target forwards per token, the share of tokens
    from the edge's own steps (edge-led), edge peak memory; every answer must equal the
    target's own. With --repeat-images, the prefix cache on against off."""
    from tqdm import tqdm

    from covspec.bench.capacity.load import CapacityPlan, measure_capacity, phase_count
    from covspec.bench.capacity.report import markdown as render, plot_capacity
    from covspec.toy.artifacts import ensure_toy_artifacts
    from covspec.toy.models import bundled_model_dir

    import dataclasses

    from covspec.regime import RegimeError, load_regime

    if regime is not None:
        try:
            load_regime(regime)
        except RegimeError as exc:
            raise click.BadParameter(str(exc), param_hint="--regime") from None
    if quick:
        plan = dataclasses.replace(CapacityPlan.quick(), regime=regime, repeat_images=repeat_images)
    else:
        try:
            plan = CapacityPlan(levels=parse_levels(levels, "--levels"), seconds=seconds, questions=count,
                                describe_share=describe_share, max_new_tokens=max_new_tokens, chunk=chunk,
                                pace=pace, agreement_levels=parse_levels(agreement, "--agreement"), regime=regime,
                                repeat_images=repeat_images)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    artifacts = ensure_toy_artifacts(artifacts_dir, lambda line: click.echo(line, err=True))
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=phase_count(plan), desc="load", unit="phase", file=sys.stderr) as bar:
        summary = measure_capacity(plan, artifacts, bundled_model_dir("target"), out / "edge.log",
                                   phase=lambda name: bar.write(f"load: {name}", file=sys.stderr), tick=bar.update)
    name = ("load-quick" if quick else "load") + (f"-{regime_slug(regime)}" if regime else "") + \
        (f"-repeat{repeat_images}" if repeat_images > 1 else "")
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    body = render(summary)
    if regime:
        body = (f"EMULATED deployment regime `{regime}` (`covspec/regime/profiles.json`): {summary['overruns']} target "
                f"forwards overran their emulated time.\n\n{body}")
    if plot_path is None and not quick:
        plot_path = out / f"{name.replace('load', 'load_capacity', 1)}.png"
    if plot_path is not None:
        plot_capacity(summary, plot_path)
        body += f"\n\n![capacity]({plot_path.as_posix()})"
    click.echo(body)
    if markdown and not quick:
        title = "Edge capacity: N devices against one edge" + (f", emulated {regime}" if regime else "") + \
            (f", {repeat_images} questions per image" if repeat_images > 1 else "")
        write_section("load", title, body)
    click.echo(f"raw results: {out / (name + '.json')}", err=True)
    if not summary["all_correct"]:
        raise click.ClickException("not every answer equals the target's own; see the JSON")
