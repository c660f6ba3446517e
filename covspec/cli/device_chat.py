"""The loop of `covspec device chat`: read a question, stream its answer, repeat.

A line is a question about the conversation's image, or a command: ``/image PATH``
starts a new conversation about another image (the old one's edge session is closed),
``/save FILE`` writes the transcript so far as JSON (every conversation: its image and
its turns, each with the question, the answer and its statistics), ``/quit`` or the end
of input leaves. An answer that fails (the edge unreachable, a refusal) prints the error
and the loop goes on; the failed turn does not join the conversation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from covspec.cli.device_setup import DeviceSetup, read_image
from covspec.runtime_device.stats import GenerationStats

HELP = "type a question, or /image PATH (a new conversation), /save FILE (the transcript as JSON), /quit"


def chat_loop(setup: DeviceSetup, image: str | None = None) -> None:
    conversation = setup.conversation()
    transcript = [{"image": image or "--image", "turns": []}]
    click.echo(f"[{HELP}]", err=True)
    try:
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                break
            if not line:
                continue
            command, _, argument = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/image":
                try:
                    image_bytes = read_image(Path(argument.strip()), "/image")
                except click.ClickException as exc:
                    click.echo(f"error: {exc.format_message()}", err=True)
                    continue
                conversation.close()
                conversation = setup.conversation(image_bytes)
                transcript.append({"image": argument.strip(), "turns": []})
                click.echo(f"[a new conversation about {argument.strip()}]", err=True)
            elif command == "/save":
                _save(Path(argument.strip()), transcript)
            elif command.startswith("/"):
                click.echo(f"[unknown command {command}; {HELP}]", err=True)
            else:
                _answer(setup, conversation, line, transcript[-1]["turns"])
    finally:
        conversation.close()


def _answer(setup: DeviceSetup, conversation, question: str, turns: list) -> None:
    """Stream the answer to ``question``; record the turn in ``turns`` if it completes."""
    stats = GenerationStats()
    try:
        for text in conversation.ask(question, stats=stats, trace=setup.trace):
            click.echo(text, nl=False)
            sys.stdout.flush()
    except setup.errors as exc:
        click.echo("", err=True)
        click.echo(f"error: {exc}", err=True)
        return
    click.echo("")
    turns.append({"question": conversation.history[-1][0], "answer": conversation.history[-1][1],
                  "token_ids": conversation.last_tokens, **stats.as_dict()})


def _save(path: Path, transcript: list) -> None:
    try:
        path.write_text(json.dumps({"conversations": transcript}, indent=2))
    except OSError as exc:
        click.echo(f"error: cannot write {path} ({exc})", err=True)
        return
    click.echo(f"[saved {sum(len(c['turns']) for c in transcript)} turns to {path}]", err=True)
