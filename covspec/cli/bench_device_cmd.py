"""``covspec bench device --config NAME``: the draft on the device at real size.

A click command for the ``bench`` group (``covspec.bench.device.size`` does the work):
builds a random-weight model of the config's dimensions, exports it fp32/int8/int4,
measures each artifact with one onnxruntime thread and with all (size, load time, peak
RSS, vision, LM prefill per keep ratio, per-token decode per context), the same text
decoder under onnxruntime-genai when it is installed, the bandwidth floor, and `covspec
device run` itself against the model served as its own target (peak RSS, lean and
resident). Writes
``<out>/<config>/device-size.json`` and ``.md`` and prints the Markdown. Heavy: a
0.5B config exports about 4 GB of fp32 graphs and takes tens of minutes on two cores.
"""

from __future__ import annotations

from pathlib import Path

import click

from covspec.cli.values import positive_ints

from covspec.bench.device.size import CONFIGS, run_bench     # torch is imported when a bench runs


@click.command("device")
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), required=True,
              help="The real draft's dimensions to build (random weights) and measure.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("artifacts/device-size"), show_default=True,
              help="Folder for the model, the artifacts and the report (reused when present).")
@click.option("--quant", "quants", type=click.Choice(["fp32", "int8", "int4"]), multiple=True,
              help="Precisions to export and measure [default: fp32, int8, int4].")
@click.option("--contexts", default="256,1024,2048", show_default=True,
              help="Context lengths of the per-token decode measurement.")
@click.option("--threads", "threads_text", default=None,
              help="onnxruntime thread counts to measure with [default: 1 and all cores].")
@click.option("--decode-tokens", type=click.IntRange(1, 1000), default=16, show_default=True,
              help="Decode steps timed per context (their median is reported).")
@click.option("--no-genai", is_flag=True, help="Skip the onnxruntime-genai anchor.")
@click.option("--no-device-run", is_flag=True,
              help="Skip `covspec device run` against the model served as its own target (peak RSS lean/resident).")
def device(config_name: str, out: Path, quants: tuple[str, ...], contexts: str, threads_text: str | None,
           decode_tokens: int, no_genai: bool, no_device_run: bool) -> None:
    """Measure a real-size draft on this machine's CPU (the device side)."""
    report = run_bench(config_name, out, quants=quants or ("fp32", "int8", "int4"),
                       contexts=positive_ints(contexts, "--contexts"),
                       threads=positive_ints(threads_text, "--threads") if threads_text else None, genai=not no_genai,
                       device_runs=not no_device_run,
                       decode_tokens=decode_tokens, log=lambda line: click.echo(line, err=True))
    click.echo((out / config_name / "device-size.md").read_text())
    if any("error" in probe for entry in report["artifacts"].values()
           for key, probe in entry.items() if key.startswith("threads_")):
        raise click.ClickException("a measurement failed; see the report.")
