"""`covspec device run` and `covspec device chat`: co-infer with an edge from a draft artifact. Never imports torch."""

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


OPTIONS = [
    click.option("--artifacts", "artifacts_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
                 help="Artifact folder written by `covspec export`."),
    click.option("--edge", default="tcp://127.0.0.1:5555", show_default=True, help="ZeroMQ address of the edge."),
    click.option("--image", "image_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
                 help="Image file (PNG, JPEG)."),
    click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1)),
    click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
                 help="0 = greedy (exactly the target's greedy output)."),
    click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 = off."),
    click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True)),
    click.option("--seed", default=0, show_default=True, type=int, help="Seed for sampling."),
    click.option("--lead", default="auto", show_default=True, type=click.Choice(list(LEADS)),
                 help="edge: the target generates by itself and the draft's chunks jump it ahead (never slower than "
                      "the edge alone; protocol v2); device: the target waits for each chunk (a seed reproduces a "
                      "sampled answer); auto: when greedy, edge until the draft is ready, then device if its rounds "
                      "commit faster than the edge alone (measured as it runs); device when sampling."),
    click.option("--draft-policy", default="adaptive", show_default=True, type=click.Choice(list(POLICIES)),
                 help="adaptive: chunk length from draft confidence and measured costs; fixed: --draft-len."),
    click.option("--draft-len", default=4, show_default=True, type=click.IntRange(min=1),
                 help="Tokens per chunk for --draft-policy fixed."),
    click.option("--max-draft-len", default=12, show_default=True, type=click.IntRange(min=1),
                 help="Hard maximum chunk length of the adaptive policy."),
    click.option("--pipeline/--no-pipeline", default=True, show_default=True,
                 help="Send the next chunk before the verdict on the current one arrives."),
    click.option("--max-in-flight", default=4, show_default=True, type=click.IntRange(min=2),
                 help="With --pipeline, chunks awaiting a verdict at most (the fixed policy always "
                      "keeps this many; the adaptive one as many as the wait for a verdict hides)."),
    click.option("--branches", default=2, show_default=True, type=click.IntRange(min=0),
                 help="Continuations drafted while waiting for a verdict (0 = off)."),
    click.option("--wire", default="compact", show_default=True, type=click.Choice(list(CODECS)),
                 help="compact: ids (+ sparse q); dense: full distributions both ways (baseline)."),
    click.option("--keep-ratio", type=click.FloatRange(0, 1, min_open=True),
                 help="Share of visual tokens the draft keeps (default: the artifact's)."),
    click.option("--keep-tokens", type=click.IntRange(min=1), help="Number of visual tokens the draft keeps."),
    click.option("--selection", default="covspec", show_default=True,
                 type=click.Choice(list(METHODS)),
                 help="How the kept visual tokens are chosen."),
    click.option("--reselect/--no-reselect", default=False, show_default=True,
                 help="In a conversation, choose the draft's kept visual tokens again for each follow-up question "
                      "(re-prefills the draft from the image on; by default the first question's stay, and a "
                      "follow-up prefills only its new tokens)."),
    click.option("--prune-target", is_flag=True,
                 help="NOT EXACT (opt-in): the edge target also sees only the kept visual tokens, "
                      "trading accuracy for edge prefill time."),
    click.option("--trace", "trace_file", type=click.Path(dir_okay=False, path_type=Path),
                 help="Append one JSON line per drafting decision to this file."),
    click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1),
                 help="onnxruntime intra-op threads."),
    click.option("--memory", default="lean", show_default=True, type=click.Choice(["lean", "resident"]),
                 help="lean: open each graph when first needed and close the vision graph once the image is "
                      "encoded, so the vision tower and the decoder are never in memory together (the edge also "
                      "starts sooner); resident: open every graph before connecting (a broken graph fails first)."),
    click.option("--regime", default=None, metavar="DEVICE@TARGET|FILE",
                 help="Emulate a phone: pad every draft run to what the regime's device would take (with "
                      "`covspec edge serve --regime` on the edge). Real time only by default."),
    click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path),
                 help="This device's CurveZMQ secret key (NAME.key_secret from `covspec keys new`); with --edge-key."),
    click.option("--edge-key", "edge_key_file", type=click.Path(dir_okay=False, path_type=Path),
                 help="The edge's CurveZMQ public key file (EDGE.key), to encrypt and authenticate the link."),
    click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.01),
                 help="Seconds to wait for each edge reply before resending."),
    click.option("--retries", default=3, show_default=True, type=click.IntRange(min=0)),
]


def device_options(command):
    """The options `device run` and `device chat` share: the artifact, the edge, the image,
    the generation settings and the drafting options."""
    for option in reversed(OPTIONS):
        command = option(command)
    return command


@device.command()
@device_options
@click.option("--prompt", "prompts", required=True, multiple=True,
              help="The question about the image. Give it several times for a scripted conversation: each "
                   "question is answered with the earlier ones and their answers as context, on one session.")
@click.option("--json", "as_json", is_flag=True, help="Print the answer(s) and statistics as JSON.")
def run(prompts: tuple[str, ...], as_json: bool, **values) -> None:
    """Answer PROMPT about IMAGE: draft on this device, verify on the edge.

    The text is streamed as the edge commits it and equals the target model's own
    output (greedy: token for token). Several --prompt make a scripted conversation:
    each answer is the target's own answer to the conversation so far, and follow-ups
    send no image and reuse both sides' caches.
    """
    from covspec.cli.device_setup import DeviceSetup
    from covspec.runtime_device.memory import peak_rss_mb
    from covspec.runtime_device.stats import GenerationStats

    setup = DeviceSetup.from_values(values)
    turns = []
    answer = ""
    try:
        with setup.conversation() as chat:
            for prompt in prompts:
                if len(prompts) > 1 and not as_json:
                    click.secho(f"> {prompt.strip()}", bold=True)
                stats, answer = GenerationStats(), ""
                for text in chat.ask(prompt, stats=stats, trace=setup.trace):
                    answer += text
                    if not as_json:
                        click.echo(text, nl=False)
                        sys.stdout.flush()
                turns.append({"question": prompt.strip(), "answer": chat.history[-1][1],
                              "token_ids": chat.last_tokens, **stats.as_dict()})
                if not as_json:
                    click.echo("")
                    click.echo(stats_line(stats), err=True)
    except setup.errors as exc:
        click.echo("", err=True)
        click.echo(f"error: {exc}", err=True)
        click.echo(f"committed so far: {answer}", err=True)
        sys.exit(1)
    finally:
        setup.close()
    if as_json:
        peak = {"peak_rss_mb": round(peak_rss_mb(), 1)}
        click.echo(json.dumps({**turns[0], **peak} if len(turns) == 1 else {"turns": turns, **peak}))


@device.command()
@device_options
def chat(**values) -> None:
    """Talk with the edge about IMAGE: type a question, read the answer as it streams.

    Each answer is the target's own answer to the conversation so far (follow-ups send
    no image and reuse both sides' caches). Commands: /image PATH starts a new
    conversation about another image, /save FILE writes the transcript as JSON, /quit
    (or end of input) leaves.
    """
    from covspec.cli.device_chat import chat_loop
    from covspec.cli.device_setup import DeviceSetup

    setup = DeviceSetup.from_values(values)
    try:
        chat_loop(setup, str(values["image_file"]))
    finally:
        setup.close()


def stats_line(stats) -> str:
    """One line of an answer's statistics, for a person."""
    return (f"[{stats.tokens} tokens, {stats.tokens_per_s:.1f} tok/s, {stats.rounds} rounds, "
            f"mean accepted {stats.mean_accepted:.2f}, up {stats.bytes_up} B, down {stats.bytes_down} B, "
            f"first token {stats.ttft_s * 1000:.0f} ms]")
