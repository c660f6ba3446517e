"""`covspec bench`: every claim of the project as a number from one command.

The ``bench`` click group; each ``covspec bench X`` is the command ``X`` of its own module
``covspec/cli/bench_X_cmd.py`` (helpers they share: ``bench_common``), and what it
measures lives in ``covspec/bench`` (ARCHITECTURE.md, "Where a change lands").
"""

from __future__ import annotations

import click

from covspec.cli.bench_conversation_cmd import conversation
from covspec.cli.bench_device_cmd import device
from covspec.cli.bench_drafting_cmd import drafting
from covspec.cli.bench_families_cmd import families
from covspec.cli.bench_gpu_cmd import gpu
from covspec.cli.bench_load_cmd import load
from covspec.cli.bench_pruning_cmd import pruning
from covspec.cli.bench_regime_cmd import regime
from covspec.cli.bench_reliability_cmd import reliability
from covspec.cli.bench_run_cmd import run
from covspec.cli.bench_wire_cmd import wire


@click.group()
def bench() -> None:
    """Measure covspec against its baselines on the toy pair; results go to
    benchmarks/ (JSON, PNG) and BENCHMARKS.md (Markdown tables)."""


for command in (run, pruning, drafting, wire, families, reliability, load, regime, device, gpu, conversation):
    bench.add_command(command)
