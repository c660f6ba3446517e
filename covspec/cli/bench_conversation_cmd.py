"""`covspec bench conversation`: what a follow-up question costs next to the first one.

A click command of the ``bench`` group (``covspec/cli/bench_cmd.py``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from covspec.cli.bench_common import REGIME_HELP, RESULTS, write_section


@click.command("conversation")
@click.option("--artifacts", default="artifacts/toy-draft-int8", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="The toy draft's artifact (exported if missing).")
@click.option("--images", default=8, show_default=True, type=click.IntRange(min=1),
              help="Conversations per configuration, one toy scene each.")
@click.option("--turns", default=3, show_default=True, type=click.IntRange(min=2), help="Questions per conversation.")
@click.option("--memory-turns", default=10, show_default=True, type=click.IntRange(min=1),
              help="Questions of the one long conversation whose memory is followed turn by turn.")
@click.option("--max-new-tokens", default=48, show_default=True, type=click.IntRange(min=1))
@click.option("--regime", default=None, metavar="DEVICE@TARGET|FILE", help=REGIME_HELP)
@click.option("--out", default=RESULTS, show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--markdown/--no-markdown", default=True, show_default=True)
def conversation(artifacts: Path, images: int, turns: int, memory_turns: int, max_new_tokens: int,
                 regime: str | None, out: Path, markdown: bool) -> None:
    """Conversations about toy scenes against a real toy edge: time to the first token, the
    draft's prefill and the bytes of each turn, first question vs follow-ups; kept vs
    re-selected visual tokens; and one long conversation's memory on both sides. Every
    answer is checked against the target's own answer to the whole conversation."""
    from tqdm import tqdm

    from covspec.bench.end_to_end.conversation import CONFIGURATIONS, measure_conversations, memory_over_turns
    from covspec.bench.end_to_end.conversation_report import markdown_report
    from covspec.toy.artifacts import ensure_toy_artifacts

    ensure_toy_artifacts(artifacts, lambda line: click.echo(line, err=True))
    with tqdm(total=images * len(CONFIGURATIONS), desc="conversations", unit="conv", file=sys.stderr) as bar:
        report = measure_conversations(artifacts, images, turns, max_new_tokens, tick=bar.update, regime=regime)
    click.echo(f"a conversation of {memory_turns} questions ...", err=True)
    report["memory"] = memory_over_turns(artifacts, memory_turns, max_new_tokens, regime)
    out.mkdir(parents=True, exist_ok=True)
    name = "conversation" + (f"-{regime.replace('@', '-at-')}" if regime else "")
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    body = markdown_report(report)
    click.echo(body)
    if markdown:
        write_section("conversation", f"Conversations: follow-up questions{f' under {regime}' if regime else ''}", body)
