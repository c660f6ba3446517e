"""``covspec plan``: which mode and draft length to run, from the costs and the acceptance curve."""

from __future__ import annotations

import json
from pathlib import Path

import click

from covspec.cli.bench_common import write_section
from covspec.cli.values import chances


@click.command()
@click.option("--regime", "regime_spec", default="phone-135m@7b-a100-hf", show_default=True,
              metavar="DEVICE@TARGET|FILE", help="The deployment: a phone-class draft and a served target.")
@click.option("--link", "link_name", default="wifi", show_default=True,
              help="A link profile (loopback, lan, wifi, 5g, 4g) or custom with --rtt-ms and --bandwidth-mbps.")
@click.option("--rtt-ms", type=float, default=None, help="Round trip of a custom link, ms.")
@click.option("--bandwidth-mbps", type=float, default=None, help="Bandwidth of a custom link, Mbit/s (0: unlimited).")
@click.option("--answer-tokens", default=40, show_default=True, type=click.IntRange(min=1))
@click.option("--alpha", default="0.8", show_default=True, metavar="A[,A2,...]",
              help="Acceptance chance by draft position (one value: the same at every position).")
@click.option("--edge-context", default=600, show_default=True, type=click.IntRange(min=1),
              help="Tokens of the target's context (image and prompt).")
@click.option("--draft-rows", default=160, show_default=True, type=click.IntRange(min=1),
              help="Rows of the draft's prefill (kept visual tokens and prompt).")
@click.option("--image-bytes", default=100_000, show_default=True, type=click.IntRange(min=0))
@click.option("--list", "list_regimes", is_flag=True, help="List the built-in regimes with their derived costs.")
@click.option("--validate", "records_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Compare the plan with the emulated runs of `covspec bench regime` (its regime.json).")
@click.option("--markdown/--no-markdown", default=False, show_default=True,
              help="With --validate: write the error table to BENCHMARKS.md.")
def plan(regime_spec: str, link_name: str, rtt_ms: float | None, bandwidth_mbps: float | None, answer_tokens: int,
         alpha: str, edge_context: int, draft_rows: int, image_bytes: int, list_regimes: bool,
         records_file: Path | None, markdown: bool) -> None:
    """Expected time-to-answer of target-only, device-led (by draft length) and edge-led for
    one request, and the mode to run. The costs come from the regime's profiles (a roofline
    of the target on its GPU, the phone's measured draft times) and the request's shapes."""
    from covspec.bench.harness.link import profile_named
    from covspec.regime import RegimeError, builtin_regimes, load_regime
    from covspec.regime import plan as model
    from covspec.regime import roofline

    if list_regimes:
        for name in builtin_regimes():
            regime = load_regime(name)
            click.echo(f"{name}: target step {roofline.step_s(regime.target) * 1000:.1f} ms, prefill of "
                       f"{edge_context} tokens {roofline.prefill_s(regime.target, edge_context) * 1000:.0f} ms, knee "
                       f"{roofline.knee_tokens(regime.target):.0f} tokens; draft step "
                       f"{roofline.decoder_s(regime.device, 1, False) * 1000:.1f} ms, prefill of {draft_rows} rows "
                       f"{roofline.decoder_s(regime.device, draft_rows, True) * 1000:.0f} ms + vision "
                       f"{roofline.vision_s(regime.device, 1) * 1000:.0f} ms")
        return
    if records_file is not None:
        from covspec.bench.end_to_end.plan_check import curve, draft_len, error_table, validate

        data = json.loads(records_file.read_text())
        table = error_table(validate(data), curve(data), draft_len(data))
        click.echo(table)
        if markdown:
            write_section("plan", "Plan vs emulated runs", f"Records: `{records_file}` (`covspec bench regime`).\n\n"
                          f"{table}", program="covspec")
        return
    try:
        regime = load_regime(regime_spec)
        link = profile_named(link_name, rtt_ms, bandwidth_mbps)
    except (RegimeError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from None
    curve = chances(alpha, "--alpha")
    costs = model.costs_for(regime, link.rtt_ms, link.bandwidth_mbps, edge_context=edge_context,
                            draft_rows=draft_rows, image_bytes=image_bytes)
    result = model.recommend(costs, answer_tokens, curve)
    click.echo(f"{regime.name} over {link.name} ({link.rtt_ms:g} ms), {answer_tokens} tokens, alpha "
               f"{', '.join(f'{a:g}' for a in curve)}:")
    click.echo(f"  target step {costs.target_step_s * 1000:.1f} ms, prefill {costs.target_prefill_s * 1000:.0f} ms; "
               f"draft step {costs.draft_step_s * 1000:.1f} ms, prefill {costs.draft_prefill_s * 1000:.0f} ms")
    for mode, seconds in sorted(result.times.items(), key=lambda item: item[1]):
        click.echo(f"  {mode:<16} {seconds * 1000:8.0f} ms  {result.target_only_s / seconds:5.2f}x")
    length = f" (draft length {result.draft_len})" if result.mode != "target-only" else ""
    click.echo(f"recommended: {result.mode}{length}, {result.speedup:.2f}x target-only")
