"""`covspec device run`: co-infer with an edge from a draft artifact. Never imports torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from covspec.protocol.wire import CODECS
from covspec.runtime_device.options import LEADS
from covspec.runtime_device.policy import POLICIES
from covspec.runtime_device.pruning import METHODS


@click.group()
def device() -> None:
    """Device side: the draft VLM in onnxruntime, verified by an edge server."""


def device_pacing(regime: str | None):
    """The draft's pacing under ``regime`` (none without one); BadParameter for a bad regime."""
    from covspec.regime import DevicePacing, RegimeError, load_regime
    from covspec.regime.pacing import NO_PACING

    try:
        return DevicePacing(load_regime(regime).device) if regime else NO_PACING
    except RegimeError as exc:
        raise click.BadParameter(str(exc), param_hint="--regime") from None


@device.command()
@click.option("--artifacts", "artifacts_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Artifact folder written by `covspec export`.")
@click.option("--edge", default="tcp://127.0.0.1:5555", show_default=True, help="ZeroMQ address of the edge.")
@click.option("--image", "image_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Image file (PNG, JPEG).")
@click.option("--prompt", required=True, help="The question about the image.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="0 = greedy (exactly the target's greedy output).")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for sampling.")
@click.option("--lead", default="auto", show_default=True, type=click.Choice(list(LEADS)),
              help="edge: the target generates by itself and the draft's chunks jump it ahead (never slower than "
                   "the edge alone; protocol v2); device: the target waits for each chunk (a seed reproduces a "
                   "sampled answer); auto: when greedy, edge until the draft is ready, then device if its rounds "
                   "commit faster than the edge alone (measured as it runs); device when sampling.")
@click.option("--draft-policy", default="adaptive", show_default=True, type=click.Choice(list(POLICIES)),
              help="adaptive: chunk length from draft confidence and measured costs; fixed: --draft-len.")
@click.option("--draft-len", default=4, show_default=True, type=click.IntRange(min=1),
              help="Tokens per chunk for --draft-policy fixed.")
@click.option("--max-draft-len", default=12, show_default=True, type=click.IntRange(min=1),
              help="Hard maximum chunk length of the adaptive policy.")
@click.option("--pipeline/--no-pipeline", default=True, show_default=True,
              help="Send the next chunk before the verdict on the current one arrives.")
@click.option("--max-in-flight", default=4, show_default=True, type=click.IntRange(min=2),
              help="With --pipeline, chunks awaiting a verdict at most (the fixed policy always "
                   "keeps this many; the adaptive one as many as the wait for a verdict hides).")
@click.option("--branches", default=2, show_default=True, type=click.IntRange(min=0),
              help="Continuations drafted while waiting for a verdict (0 = off).")
@click.option("--wire", default="compact", show_default=True, type=click.Choice(list(CODECS)),
              help="compact: ids (+ sparse q); dense: full distributions both ways (baseline).")
@click.option("--keep-ratio", type=click.FloatRange(0, 1, min_open=True),
              help="Share of visual tokens the draft keeps (default: the artifact's).")
@click.option("--keep-tokens", type=click.IntRange(min=1), help="Number of visual tokens the draft keeps.")
@click.option("--selection", default="covspec", show_default=True,
              type=click.Choice(list(METHODS)),
              help="How the kept visual tokens are chosen.")
@click.option("--prune-target", is_flag=True,
              help="NOT EXACT (opt-in): the edge target also sees only the kept visual tokens, "
                   "trading accuracy for edge prefill time.")
@click.option("--trace", "trace_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Append one JSON line per drafting decision to this file.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1),
              help="onnxruntime intra-op threads.")
@click.option("--memory", default="lean", show_default=True, type=click.Choice(["lean", "resident"]),
              help="lean: open each graph when first needed and close the vision graph once the image is "
                   "encoded, so the vision tower and the decoder are never in memory together (the edge also "
                   "starts sooner); resident: open every graph before connecting (a broken graph fails first).")
@click.option("--regime", default=None, metavar="DEVICE@TARGET|FILE",
              help="Emulate a phone: pad every draft run to what the regime's device would take (with "
                   "`covspec edge serve --regime` on the edge). Real time only by default.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path),
              help="This device's CurveZMQ secret key (NAME.key_secret from `covspec keys new`); with --edge-key.")
@click.option("--edge-key", "edge_key_file", type=click.Path(dir_okay=False, path_type=Path),
              help="The edge's CurveZMQ public key file (EDGE.key), to encrypt and authenticate the link.")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds to wait for each edge reply before resending.")
@click.option("--retries", default=3, show_default=True, type=click.IntRange(min=0))
@click.option("--json", "as_json", is_flag=True, help="Print the answer and statistics as JSON.")
def run(artifacts_dir: Path, edge: str, image_file: Path, prompt: str, max_new_tokens: int,
        temperature: float, top_k: int, top_p: float, seed: int, lead: str, draft_policy: str, draft_len: int,
        max_draft_len: int, pipeline: bool, max_in_flight: int, branches: int, wire: str, keep_ratio: float | None,
        keep_tokens: int | None, selection: str, prune_target: bool, trace_file: Path | None, threads: int, memory: str,
        regime: str | None, key_file: Path | None, edge_key_file: Path | None, timeout: float, retries: int, as_json: bool) -> None:
    """Answer PROMPT about IMAGE: draft on this device, verify on the edge.

    The text is streamed as the edge commits it and equals the target model's own
    output (greedy: token for token).
    """
    from covspec.protocol.manifest import ArtifactError
    from covspec.runtime_device.artifact import DraftArtifact
    from covspec.runtime_device.client import CurveKeys, EdgeClient, EdgeError, EdgeUnreachable, Backoff
    from covspec.runtime_device.engine import CoInference
    from covspec.runtime_device.memory import peak_rss_mb
    from covspec.runtime_device.options import DraftingOptions, GenerationSettings
    from covspec.runtime_device.stats import GenerationStats, trace_to_file
    from covspec.runtime_device.preprocess import ImageError, load_image
    from covspec.runtime_device.stream import TextStream

    try:      # settings first: nothing is loaded for a request that cannot run
        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                      top_p=top_p, seed=seed, prune_target=prune_target)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if (key_file is None) != (edge_key_file is None):
        raise click.UsageError("--key and --edge-key come together: both are needed to encrypt the link.")
    try:
        curve = CurveKeys.load(key_file, edge_key_file) if key_file else None
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read the keys ({exc}).", param_hint="--key/--edge-key") from None
    if not image_file.is_file():
        raise click.BadParameter(f"{image_file} does not exist.", param_hint="--image")
    image_bytes = image_file.read_bytes()
    try:
        load_image(image_bytes)
        artifact = DraftArtifact.load(artifacts_dir, threads=threads, lean=memory == "lean",
                                      pacing=device_pacing(regime))
    except (ImageError, ArtifactError) as exc:
        raise click.ClickException(str(exc)) from None
    options = DraftingOptions(lead=lead, policy=draft_policy, draft_len=draft_len, max_draft_len=max_draft_len,
                              pipeline=pipeline, max_in_flight=max_in_flight, branches=branches, wire=wire,
                              keep_ratio=keep_ratio, keep_tokens=keep_tokens, selection=selection)
    if prune_target:
        click.secho("warning: --prune-target is not exact; the answer may differ from the target's own.",
                    fg="yellow", err=True)
    trace, close_trace = trace_to_file(trace_file) if trace_file else (None, lambda: None)
    client = EdgeClient(edge, Backoff(timeout_s=timeout, retries=retries), curve)
    stats = GenerationStats()
    stream = TextStream(artifact.decode_text)
    try:
        for tokens in CoInference(artifact, client).generate(image_bytes, prompt, settings, options, stats, trace):
            increment = stream.push(tokens)
            if not as_json:
                click.echo(increment, nl=False)
                sys.stdout.flush()
    except (EdgeUnreachable, EdgeError, ArtifactError) as exc:   # ArtifactError: preprocessing vs graph
        click.echo("", err=True)
        click.echo(f"error: {exc}", err=True)
        click.echo(f"committed so far ({len(stream.tokens)} tokens): {stream.text}", err=True)
        sys.exit(1)
    finally:
        client.close()
        close_trace()
    if as_json:
        report = {"answer": stream.text.strip(), "token_ids": stream.tokens, **stats.as_dict(),
                  "peak_rss_mb": round(peak_rss_mb(), 1)}
        click.echo(json.dumps(report))
    else:
        click.echo("")
        click.echo(f"[{stats.tokens} tokens, {stats.tokens_per_s:.1f} tok/s, {stats.rounds} rounds, "
                   f"mean accepted {stats.mean_accepted:.2f}, up {stats.bytes_up} B, down {stats.bytes_down} B, "
                   f"first token {stats.ttft_s * 1000:.0f} ms]", err=True)
