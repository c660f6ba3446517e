"""`covspec bench reliability`: hostile messages, load and faults against a live edge, or
(``--hostile-edge``) a fake, hostile edge against the real device, or (``--faulty-link``)
real devices through a link that drops, duplicates, reorders and partitions.

A click command of the ``bench`` group (``covspec/cli/bench_cmd.py``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from covspec.cli.bench_common import RESULTS, write_section


@click.command("reliability")
@click.option("--messages", default=100_000, show_default=True, type=click.IntRange(min=1),
              help="Hostile messages to send to a live edge.")
@click.option("--sockets", default=8, show_default=True, type=click.IntRange(min=1), help="Fuzzing sockets.")
@click.option("--devices", "levels", default="1,4,16,32", show_default=True,
              help="Comma-separated numbers of concurrent devices, one load level each.")
@click.option("--seconds", default=60.0, show_default=True, type=click.FloatRange(min=1),
              help="Duration of each load level and of the restart phase.")
@click.option("--kills", default=3, show_default=True, type=click.IntRange(min=0),
              help="SIGKILLs of the edge (each followed by a restart) during the restart phase.")
@click.option("--vanished", default=16, show_default=True, type=click.IntRange(min=1),
              help="Clients that open a session and disappear.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--fuzz-only", is_flag=True, help="The hostile messages alone (no load levels, vanished clients, restarts).")
@click.option("--quick", is_flag=True, help="A smoke test: 2,000 messages, 1 and 4 devices for 10 s, one kill.")
@click.option("--hostile-edge", is_flag=True,
              help="Instead: a fake edge answers the real device with malformed and hostile replies (< 1 min).")
@click.option("--faulty-link", is_flag=True,
              help="Instead: real devices (half device-led, half edge-led) through a faulty link for --seconds.")
@click.option("--link-devices", default=4, show_default=True, type=click.IntRange(min=1),
              help="With --faulty-link: devices.")
@click.option("--faults", default="", metavar="FIELD=VALUE,...",
              help="With --faulty-link: the link's faults and the devices' patience, e.g. "
                   "drop=0.05,duplicate=0.1,reorder=0.05,jitter_ms=5,partitions=3,partition_s=2,link=wifi "
                   "(fields of covspec.bench.reliability.faulty_link.FaultyLinkPlan).")
@click.option("--soak-seconds", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Instead: a soak this long (0: none): mixed device-led and edge-led devices with bursts of "
                   "hostile messages; edge RSS growth after the warm-up (a tenth, at most 120 s), wrong answers, "
                   "latency percentiles per minute.")
@click.option("--soak-devices", default=16, show_default=True, type=click.IntRange(min=1), help="Devices of the soak.")
@click.option("--artifacts", "artifacts_dir", default=Path("artifacts/toy-draft-int8"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", default=RESULTS, show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--markdown/--no-markdown", default=True, show_default=True)
def reliability(messages: int, sockets: int, levels: str, seconds: float, kills: int, vanished: int, seed: int,
                fuzz_only: bool, quick: bool, hostile_edge: bool, faulty_link: bool, link_devices: int, faults: str,
                soak_seconds: float, soak_devices: int, artifacts_dir: Path, out: Path, markdown: bool) -> None:
    """Hostile messages against a live edge with a well-behaved device alongside (replies
    by code, messages without a reply, crashes, edge memory), then 1..N concurrent
    devices, SIGKILL + restart mid-generation and vanished clients; every answer is
    checked against the target's greedy answer. With --hostile-edge, the other way round:
    a fake edge against the real device, which must end every generation with a clear
    error within its patience. With --faulty-link, devices through a link that drops,
    duplicates, reorders and partitions: every answer the target's own or a clear error
    within its patience, nothing committed twice. With --soak-seconds, a long soak: edge
    memory flat after the warm-up, no wrong answer. Exits 1 if a promise was broken."""
    if hostile_edge:
        return _hostile_edge(artifacts_dir, out, markdown)
    if faulty_link:
        return _faulty_link(artifacts_dir, out, markdown, link_devices, seconds, seed, faults)
    if soak_seconds:
        return _soak(artifacts_dir, out, markdown, soak_seconds, soak_devices, seed)
    from tqdm import tqdm

    from covspec.bench.reliability.phases import ReliabilityPlan, measure_reliability
    from covspec.bench.reliability.report import markdown as render, verdict
    from covspec.toy.artifacts import ensure_toy_artifacts
    from covspec.toy.models import bundled_model_dir

    try:
        counts = tuple(int(n) for n in levels.split(",") if n.strip())
    except ValueError:
        raise click.BadParameter(f"{levels!r} is not a comma-separated list of numbers", param_hint="--devices") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter("give at least one number of devices, each >= 1", param_hint="--devices")
    plan = ReliabilityPlan(messages=messages, sockets=sockets, levels=counts, seconds=seconds, kills=kills,
                           vanished=vanished, seed=seed, fuzz_only=fuzz_only)
    if quick:
        plan = ReliabilityPlan(messages=2_000, sockets=4, levels=(1, 4), seconds=10.0, kills=1, vanished=4,
                               idle_timeout_s=3.0, questions=4, seed=seed, fuzz_only=fuzz_only)
    artifacts = ensure_toy_artifacts(artifacts_dir, lambda line: click.echo(line, err=True))
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=plan.messages, desc="hostile messages", unit="msg", file=sys.stderr) as bar:
        summary = measure_reliability(plan, artifacts, bundled_model_dir("target"), out / "edge.log",
                                      phase=lambda name: bar.write(f"reliability: {name}", file=sys.stderr),
                                      tick=bar.update)
    name = "reliability-quick" if quick else "reliability-fuzz" if fuzz_only else "reliability"
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    body = render(summary)
    click.echo(body)
    if markdown and not quick:
        write_section("reliability", "Reliability: hostile messages" + ("" if fuzz_only else ", load, faults"), body)
    click.echo(f"raw results: {out / (name + '.json')}", err=True)
    problems = verdict(summary)
    if problems:
        raise click.ClickException("broken promises: " + "; ".join(problems))


def _hostile_edge(artifacts_dir: Path, out: Path, markdown: bool) -> None:
    from covspec.bench.harness.workload import toy_questions
    from covspec.bench.reliability import hostile_edge
    from covspec.runtime_device.artifact import DraftArtifact
    from covspec.runtime_device.client import Backoff
    from covspec.toy.artifacts import ensure_toy_artifacts

    artifact = DraftArtifact.load(ensure_toy_artifacts(artifacts_dir, lambda line: click.echo(line, err=True)))
    question = toy_questions(1)[0]
    backoff, attempts = Backoff(timeout_s=0.5, retries=1, backoff_s=0.05), 2
    outcomes = hostile_edge.run_hostile_edge(artifact, question.image_png, question.question, backoff=backoff,
                                             reopen_attempts=attempts, tick=lambda line: click.echo(line, err=True))
    summary = hostile_edge.summary(outcomes, backoff, attempts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability-hostile-edge.json").write_text(json.dumps(summary, indent=1))
    body = hostile_edge.report(summary)
    click.echo(body)
    if markdown:
        write_section("reliability", "A hostile edge against the real device", body)
    if summary["broken"]:
        raise click.ClickException("broken promises: " + "; ".join(summary["broken"]))


def plan_fields(text: str, plan, option: str):
    """``plan`` (a frozen dataclass) with ``FIELD=VALUE,...`` applied, each value of its field's type."""
    from dataclasses import fields, replace

    types = {f.name: type(getattr(plan, f.name)) for f in fields(plan)}
    changes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in types or not value:
            raise click.BadParameter(f"{item!r}: give FIELD=VALUE with FIELD one of {', '.join(types)}",
                                     param_hint=option)
        try:
            changes[name] = types[name](value)
        except ValueError:
            raise click.BadParameter(f"{item!r}: {value!r} is not a {types[name].__name__}", param_hint=option) \
                from None
    try:
        return replace(plan, **changes)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _faulty_link(artifacts_dir: Path, out: Path, markdown: bool, devices: int, seconds: float, seed: int,
                 faults: str) -> None:
    from covspec.bench.reliability.faulty_link import (FaultyLinkPlan, faulty_link_problems, faulty_link_table,
                                                       measure_faulty_link)
    from covspec.toy.artifacts import ensure_toy_artifacts
    from covspec.toy.models import bundled_model_dir

    plan = plan_fields(faults, FaultyLinkPlan(devices=devices, seconds=seconds, seed=seed), "--faults")
    artifacts = ensure_toy_artifacts(artifacts_dir, lambda line: click.echo(line, err=True))
    out.mkdir(parents=True, exist_ok=True)
    result = measure_faulty_link(plan, artifacts, bundled_model_dir("target"), out / "edge.log")
    _publish(result, out / "reliability-faulty-link.json", "Reliability: real devices through a faulty link",
             faulty_link_table(result), faulty_link_problems(result), markdown)


def _publish(result: dict, json_path: Path, title: str, table: str, problems: list[str], markdown: bool) -> None:
    """Write ``result`` to ``json_path``, print ``table`` and its verdict (and put them under
    ``title`` in BENCHMARKS.md); exit 1 when a promise was broken."""
    json_path.write_text(json.dumps(result, indent=1))
    body = table + "\n\nVerdict: " + ("every promise kept." if not problems else "; ".join(problems) + ".")
    click.echo(body)
    if markdown:
        write_section("reliability", title, body)
    if problems:
        raise click.ClickException("broken promises: " + "; ".join(problems))


def _soak(artifacts_dir: Path, out: Path, markdown: bool, seconds: float, devices: int, seed: int) -> None:
    from covspec.bench.reliability.soak import SoakPlan, measure_soak, soak_problems, soak_table
    from covspec.toy.artifacts import ensure_toy_artifacts
    from covspec.toy.models import bundled_model_dir

    plan = SoakPlan(seconds=seconds, devices=devices, warmup_s=min(120.0, seconds / 10),
                    hostile_every_s=min(10.0, seconds / 4), seed=seed)
    artifacts = ensure_toy_artifacts(artifacts_dir, lambda line: click.echo(line, err=True))
    out.mkdir(parents=True, exist_ok=True)
    click.echo(f"soak: {devices} devices for {seconds:g} s", err=True)
    result = measure_soak(plan, artifacts, bundled_model_dir("target"), out / "edge.log")
    _publish(result, out / "reliability-soak.json", "Reliability: soak", soak_table(result), soak_problems(result),
             markdown)
