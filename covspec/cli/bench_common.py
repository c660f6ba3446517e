"""What the ``covspec bench`` commands share: where results go (``RESULTS``), the link
profiles a run covers (``LINKS``), writing a section of BENCHMARKS.md (``write_section``),
one run of scenarios against a fresh edge (``measure``, for ``pruning`` and
``drafting``), and the ``--regime`` option's help, the line that labels an emulated
table (``regime_label``), the regime as the JSON records it (``described``) and as a
file name (``regime_slug``). Heavy imports stay inside the functions: ``covspec bench
--help`` loads this module."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

RESULTS = Path("benchmarks")
LINKS = ["loopback", "lan", "wifi", "5g", "4g"]


def write_section(command: str, title: str, body: str, program: str = "covspec bench") -> None:
    """Put ``body`` under ``## title (`PROGRAM command`)`` in BENCHMARKS.md (replacing an
    earlier run's numbers), with the command line that produced it (``program`` is the
    command group: ``covspec bench``, or ``covspec`` for a top-level command)."""
    from covspec.bench.harness.sections import append_markdown

    words = len(program.split()) + 1              # the arguments after `PROGRAM command`
    line = " ".join([program, command, *sys.argv[words:]])
    append_markdown(Path("BENCHMARKS.md"), f"{title} (`{program} {command}`)", line, body)


REGIME_HELP = ("Emulate a deployment (DEVICE@TARGET or a profile file; `covspec plan --list`): the edge's forwards "
               "and the draft's runs padded to a phone and a GPU-served target. Real time only by default.")


def regime_label(regime: str | None, records: list[dict]) -> str:
    """The line that says a table's timings are emulated, and how faithfully; "" without a regime."""
    if not regime:
        return ""
    from covspec.bench.end_to_end.regime import overrun_line

    return overrun_line(regime, records) + "\n\n"


def regime_slug(regime: str) -> str:
    """A file-name form of a regime spec (``phone-135m@7b-a100-hf`` -> ``phone-135m-7b-a100-hf``)."""
    return Path(regime).stem.replace("@", "-")


def described(regime: str | None) -> dict | None:
    """The regime's profile as the JSON results record it; None without a regime."""
    from covspec.regime import load_regime

    return load_regime(regime).describe() if regime else None


def measure(name: str, artifacts_dir: Path, out: Path, profiles: list, scenarios: list, questions: list,
            max_new_tokens: int, regime: str | None = None) -> tuple[list[dict], list[dict]]:
    """Run ``scenarios`` on ``questions`` over ``profiles`` against a fresh edge (under
    ``regime`` when given); write ``out/NAME.json`` and return (raw records, summary rows)."""
    from tqdm import tqdm

    from covspec.bench.end_to_end import report
    from covspec.bench.end_to_end.runner import Bench, records_to_json
    from covspec.runtime_device.options import GenerationSettings
    from covspec.toy.artifacts import ensure_toy_artifacts
    from covspec.toy.models import bundled_model_dir

    artifacts = ensure_toy_artifacts(artifacts_dir, lambda line: click.echo(line, err=True))
    out.mkdir(parents=True, exist_ok=True)
    bench_run = Bench(artifacts, bundled_model_dir("target"), GenerationSettings(max_new_tokens=max_new_tokens),
                      out / "edge.log", regime=regime)
    try:
        total = len(profiles) * len(scenarios) * len(questions)
        with tqdm(total=total, desc=name, unit="run", file=sys.stderr) as bar:
            records = bench_run.run(profiles, scenarios, questions, tick=bar.update)
    finally:
        bench_run.close()
    raw = records_to_json(records)
    rows = report.summarize(raw)
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, "records": raw, "regime": described(regime)},
                                                 indent=1))
    return raw, rows
