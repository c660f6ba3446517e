"""`covspec demo`: the toy world end to end, on bundled sample images.

Builds the toy draft artifacts if missing (``covspec export``, int8), starts an edge
server with the toy target in a child process, asks questions about the bundled
ShapesVQA images with co-inference, asks the same with the edge alone (target-only),
and prints both as they stream (alike, so that printing costs each the same), with
their statistics.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import click


@click.command()
@click.option("--artifacts", "artifacts_dir", default=Path("artifacts/toy-draft-int8"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Draft artifact folder (built if missing).")
@click.option("--questions", "per_image", default=2, show_default=True, type=click.IntRange(min=1),
              help="Questions per sample image (the description question is always asked).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--regime", default=None, metavar="DEVICE@TARGET|FILE",
              help="Emulate a deployment: the edge's forwards and the draft's runs padded to a phone and a "
                   "GPU-served target (`covspec plan --list`). Real time only by default.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Times each question is asked both ways (alternating which goes first); the speedup is "
                   "the ratio of the medians. A short answer takes a few milliseconds, so one timing is noise.")
def demo(artifacts_dir: Path, per_image: int, max_new_tokens: int, regime: str | None, repeats: int) -> None:
    """Ask the toy VLM pair about bundled sample images, co-inference vs target alone.

    Everything runs on this machine: an edge server with the toy target in a child
    process, and the device side (onnxruntime draft) in this process. With --regime the
    timings are emulated (and labelled so); the answers are the same. Each question is
    asked --repeats times both ways; the first answers stream, every answer is checked.
    """
    from covspec.cli.device_setup import device_pacing
    from covspec.runtime_device.artifact import DraftArtifact
    from covspec.runtime_device.client import EdgeClient
    from covspec.runtime_device.engine import CoInference
    from covspec.runtime_device.options import GenerationSettings
    from covspec.runtime_device.stats import GenerationStats
    from covspec.runtime_device.target_only import generate_target_only
    from covspec.runtime_edge import EdgeProcess, ServerConfig
    from covspec.toy.artifacts import ensure_toy_artifacts
    from covspec.toy.demo_samples import load_samples
    from covspec.toy.models import bundled_model_dir

    pacing = device_pacing(regime)
    artifact = DraftArtifact.load(ensure_toy_artifacts(artifacts_dir, lambda line: click.echo(line, err=True)),
                                  threads=1, pacing=pacing)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    edge_log = artifacts_dir.parent / "demo-edge.log"
    click.echo(f"starting the edge (toy target; its log: {edge_log}) ...", err=True)
    with EdgeProcess(bundled_model_dir("target"), ServerConfig(bind="tcp://127.0.0.1:*", threads=1, regime=regime),
                     log_path=edge_log) as edge:
        client = EdgeClient(edge.address)
        engine = CoInference(artifact, client)
        speedups, identical, total = [], 0, 0
        try:
            _warm_up(engine, client, load_samples()[0], settings)
            for sample in load_samples():
                image = Path(sample["image"]).read_bytes()
                click.secho(f"\n{Path(sample['image']).name}", bold=True)
                for qa in _pick(sample["questions"], per_image):
                    click.echo(f"Q: {qa['question']}")
                    def covspec(label: str | None, stats: GenerationStats) -> list[int]:
                        return _streamed(label, engine.generate(image, qa["question"], settings, stats=stats),
                                         artifact.decode_text)

                    def target_only(label: str | None, stats: GenerationStats) -> list[int]:
                        return _streamed(label, generate_target_only(client, image, qa["question"], settings, stats),
                                         artifact.decode_text)

                    co_stats, target_stats = [GenerationStats()], [GenerationStats()]
                    co_answers = [covspec("  covspec:     ", co_stats[0])]
                    target_answers = [target_only("  target only: ", target_stats[0])]
                    for repeat in range(1, repeats):                     # silent, alternating which goes first
                        runs = [(covspec, co_stats, co_answers), (target_only, target_stats, target_answers)]
                        for run, stats, answers in runs[::-1] if repeat % 2 else runs:
                            stats.append(GenerationStats())
                            answers.append(run(None, stats[-1]))
                    same = all(answer == target_answers[0] for answer in co_answers + target_answers)
                    identical += same
                    total += 1
                    co_rate = statistics.median(stats.tokens_per_s for stats in co_stats)
                    target_rate = statistics.median(stats.tokens_per_s for stats in target_stats)
                    speedups.append(co_rate / max(target_rate, 1e-9))
                    click.echo(f"  reference:   {qa['answer']}")
                    click.echo(f"  {'identical' if same else 'DIFFERENT'} | covspec {co_rate:.0f} tok/s "
                               f"(mean accepted {co_stats[0].mean_accepted:.2f}, {co_stats[0].rounds} rounds, "
                               f"{co_stats[0].bytes_up + co_stats[0].bytes_down} B) vs target only "
                               f"{target_rate:.0f} tok/s -> {speedups[-1]:.2f}x")
        finally:
            client.close()
    speedups.sort()
    where = (f"EMULATED regime {regime}, loopback; {pacing.pacer.overruns} draft runs overran their emulated time"
             if regime else "this machine, loopback") + f"; medians of {repeats} timings per answer each way" \
        + "; after one untimed warm-up question"
    click.secho(f"\n{identical}/{total} answers identical to the target's own; median speedup "
                f"{speedups[len(speedups) // 2]:.2f}x over target-only ({where}).", bold=True)


def _streamed(label: str | None, chunks, decode_text) -> list[int]:
    """Print ``label`` and the answer's text as ``chunks`` of tokens come (nothing when
    ``label`` is None); the tokens. Both ways stream alike, so printing costs each the
    same inside its timing."""
    from covspec.runtime_device.stream import TextStream

    stream = TextStream(decode_text)
    if label is None:
        for tokens in chunks:
            stream.push(tokens)
        return stream.tokens
    click.echo(label, nl=False)
    for tokens in chunks:
        click.echo(stream.push(tokens), nl=False)
    click.echo("")
    return stream.tokens


def _warm_up(engine, client, sample: dict, settings) -> None:
    """One untimed question both ways first, as a running app would have had: the edge's
    first forwards and the draft's first runs pay one-off costs (allocations, lazy
    initialisation) that would otherwise land on whichever way is timed first."""
    from covspec.runtime_device.target_only import generate_target_only

    image, question = Path(sample["image"]).read_bytes(), sample["questions"][0]["question"]
    for _ in engine.generate(image, question, settings):
        pass
    for _ in generate_target_only(client, image, question, settings):
        pass


def _pick(questions: list[dict], count: int) -> list[dict]:
    """The description question plus the first ``count - 1`` others."""
    describe = [q for q in questions if q["type"] == "describe"][:1]
    others = [q for q in questions if q["type"] != "describe"][: max(count - len(describe), 0)]
    return others + describe
