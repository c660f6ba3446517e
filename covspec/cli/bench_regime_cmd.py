"""``covspec bench regime``: the deployment regimes, emulated, side by side with target-only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from covspec.cli.bench_common import LINKS, RESULTS, write_section



@click.command("regime")
@click.option("--regimes", default=None, metavar="DEVICE@TARGET,...",
              help="Comma-separated regimes (default: every built-in one; `covspec plan --list` names them).")
@click.option("--links", default=",".join(LINKS), show_default=True, help="Comma-separated link profiles.")
@click.option("--questions", "count", default=8, show_default=True, type=click.IntRange(min=2),
              help="Held-out toy questions, half of them descriptions.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--artifacts", "artifacts_dir", default=Path("artifacts/toy-draft-int8"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", default=RESULTS, show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--markdown/--no-markdown", default=True, show_default=True,
              help="Write the tables to BENCHMARKS.md, section 'Deployment regime (emulated)'.")
def regime(regimes: str | None, links: str, count: int, max_new_tokens: int, artifacts_dir: Path, out: Path,
           markdown: bool) -> None:
    """Time-to-answer under emulated deployments: the toy pair's every call padded to what a
    phone-class draft and a GPU-served target would take (covspec.regime), over every link,
    for target-only, the default, device-led and the device-led loop `covspec plan` models.
    Tables say "emulated", name the profile and count overruns; raw records go to
    OUT/regime.json for `covspec plan --validate`."""
    from tqdm import tqdm

    from covspec.bench.harness.link import profile_named
    from covspec.bench.end_to_end.regime import PLAN_DRAFT_LEN, measure_regimes, regime_scenarios, regime_section
    from covspec.bench.harness.workload import toy_questions
    from covspec.regime import RegimeError, builtin_regimes, load_regime
    from covspec.runtime_device.options import GenerationSettings
    from covspec.toy.artifacts import ensure_toy_artifacts
    from covspec.toy.models import bundled_model_dir

    names = [n.strip() for n in regimes.split(",") if n.strip()] if regimes else builtin_regimes()
    try:
        described = {name: load_regime(name).describe() for name in names}
        profiles = [profile_named(name.strip()) for name in links.split(",") if name.strip()]
    except (RegimeError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from None
    artifacts = ensure_toy_artifacts(artifacts_dir, lambda line: click.echo(line, err=True))
    questions = toy_questions(count)
    out.mkdir(parents=True, exist_ok=True)
    total = len(names) * len(profiles) * len(questions) * len(regime_scenarios())
    with tqdm(total=total, desc="regimes", unit="run", file=sys.stderr) as bar:
        results = measure_regimes(names, artifacts, bundled_model_dir("target"), profiles, questions,
                                  GenerationSettings(max_new_tokens=max_new_tokens), out / "edge.log",
                                  tick=bar.update)
    (out / "regime.json").write_text(json.dumps(
        {"links": [p.__dict__ for p in profiles], "profiles": described, "plan_draft_len": PLAN_DRAFT_LEN,
         "records": results}, indent=1))
    sections = [regime_section(name, records, profiles) for name, records in results.items()]
    body = "\n\n".join(sections)
    click.echo(body)
    if markdown:
        intro = (f"{len(questions)} held-out ShapesVQA questions (half descriptions), greedy, max {max_new_tokens} "
                 "new tokens. EMULATED: the toy pair runs for real, but every draft run is padded to the named "
                 "phone-class device and every target forward to the named model on its GPU (profiles and their "
                 "sources: `covspec/regime/profiles.json`); calls whose real compute was slower than emulated are "
                 "counted as overruns. `covspec` is today's default (greedy: edge-led, handing the lead to device-led rounds once the draft is ready and they pay); `plan-device-led` is "
                 f"device-led with a fixed draft length of {PLAN_DRAFT_LEN}, no pipelining, no branches. Speedups are medians over "
                 "questions of target-only's time over the scenario's, same run, same link.")
        write_section("regime", "Deployment regime (emulated)", f"{intro}\n\n{body}")
    click.echo(f"raw results: {out / 'regime.json'}", err=True)
