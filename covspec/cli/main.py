"""The ``covspec`` click group.

Subcommands are registered by dotted path (``SUBCOMMANDS``) and imported only when
invoked, so ``covspec --help`` imports none of them and ``covspec device --help`` never
imports torch or transformers.
"""

from __future__ import annotations

import importlib

import click

from covspec import __version__

# name -> ("module:attribute", one-line help shown by `covspec --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "export": ("covspec.cli.export_cmd:export", "Export a draft VLM to quantized ONNX device artifacts."),
    "device": ("covspec.cli.device_cmd:device", "Device side: run the draft and co-infer with an edge."),
    "edge": ("covspec.cli.edge_cmd:edge", "Edge side: serve a target VLM for verification."),
    "demo": ("covspec.cli.demo_cmd:demo", "Run the toy end-to-end demo on bundled sample images."),
    "bench": ("covspec.cli.bench_cmd:bench", "Measure scenarios side by side and write BENCHMARKS.md."),
    "toy": ("covspec.cli.toy_cmd:toy", "The ShapesVQA toy world: build and evaluate toy models."),
    "plan": ("covspec.cli.plan_cmd:plan", "Which mode and draft length to run: a model of time-to-answer."),
    "keys": ("covspec.cli.keys_cmd:keys", "Make CurveZMQ key pairs for an edge and its devices."),
    "link": ("covspec.cli.link_cmd:link", "Emulate a network link (delay, bandwidth) between device and edge."),
}


class LazyGroup(click.Group):
    """A click group that imports each subcommand's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module_name, attribute = SUBCOMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing uses the static help so that `covspec --help` imports no subcommand.
        rows = [(name, SUBCOMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="covspec")
def cli() -> None:
    """covspec: run a vision-language model on a phone with an edge GPU's help.

    A small draft VLM (quantized ONNX, onnxruntime) drafts tokens on the device; a
    large target VLM (PyTorch) on the edge verifies them. The output is exactly the
    target's own output, with far less compute on the edge and tiny messages.

    Start with `covspec demo`, or see `covspec COMMAND --help`.
    """


if __name__ == "__main__":
    cli()
