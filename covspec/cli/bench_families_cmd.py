"""`covspec bench families`: per-family figures on tiny configs.

A click command of the ``bench`` group (``covspec/cli/bench_cmd.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from covspec.cli.bench_common import RESULTS, measure, write_section


@click.command("families")
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
