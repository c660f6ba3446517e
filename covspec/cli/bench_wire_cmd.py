"""`covspec bench wire`: the bytes each wire format sends at real vocabulary sizes.

A click command of the ``bench`` group (``covspec/cli/bench_cmd.py``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from covspec.cli.bench_common import RESULTS, write_section


@click.command("wire")
@click.option("--vocab", "vocab_sizes", default="32000,151936,262144", show_default=True,
              help="Comma-separated vocabulary sizes of the tiny random model pairs.")
@click.option("--sessions", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--out", default=RESULTS, show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--markdown/--no-markdown", default=True, show_default=True)
def wire(vocab_sizes: str, sessions: int, out: Path, markdown: bool) -> None:
    """Bytes per drafted position and per verdict, compact vs dense wire, at real
    vocabulary sizes (tiny random models, real sessions, bytes counted on the socket)."""
    from tqdm import tqdm

    from covspec.bench.end_to_end.wire import measure_wire, wire_table
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
