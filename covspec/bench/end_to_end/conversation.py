"""Conversations on the toy pair: what a follow-up question costs next to the first one.

``measure_conversations`` serves the toy target (an edge child, ``harness/edge.py``) and,
for each configuration of ``CONFIGURATIONS`` and each of ``images`` toy scenes, holds a
conversation of ``turns`` questions (``QUESTIONS`` in turn) through ``Conversation``:
the default drafting options, device-led (its time to the first token is the draft's
prefill: the device side), and device-led with a draft keeping half its visual tokens,
kept from the first question or chosen again for each (``DraftingOptions.reselect``). Every answer is checked against the toy
target's own greedy answer to the whole conversation (the chat template applied to the
history); a wrong one is counted, never hidden. Per turn it records the device's time
to the first token, the draft's prefill, the bytes up and down, the tokens, the wall
time and the accepted draft tokens per round.

``memory_over_turns`` holds one conversation of ``turns`` questions (default 10) and
records after each: the context the edge holds for it (``opened.context_len`` plus the
answer), the live KV bytes the edge reports (``pong``'s ``kv_bytes``), the draft's KV
cache bytes and the device's peak RSS. The edge bounds a conversation by ``--max-context``
(a longer one is refused ``too_long``) and ``--kv-budget`` (a finished conversation's
cache is evicted first, and reopened with the history when it comes back).

Under a deployment ``regime`` both sides are paced as in ``covspec bench regime``: the
toy's fixed per-forward costs, which dominate its follow-ups, give way to a GPU target's
prefill of image and prompt against a follow-up's short extension.
"""

from __future__ import annotations

import io
import statistics
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

QUESTIONS = ["what is in the picture ?", "what color is the square ?", "describe the picture .",
             "is there a red circle ?", "how many shapes are there ?"]
CONFIGURATIONS = {
    "default (lead auto)": {},
    "device-led": {"lead": "device"},
    "device-led, keep 0.5, kept from the first question": {"lead": "device", "keep_ratio": 0.5},
    "device-led, keep 0.5, re-selected per question": {"lead": "device", "keep_ratio": 0.5, "reselect": True},
}


class References:
    """The toy target's own greedy answers to conversations (loaded once)."""

    def __init__(self, max_new_tokens: int):
        from covspec.families import family_for_folder
        from covspec.toy.models import bundled_model_dir

        family = family_for_folder(bundled_model_dir("target"))
        self.model, processor = family.load(bundled_model_dir("target"))
        self.target = family.target(self.model, processor)
        self.max_new_tokens = max_new_tokens

    def answer(self, image_png: bytes, history, question: str) -> list[int]:
        import torch
        from PIL import Image

        from covspec.families.common import fill_prompt

        image = Image.open(io.BytesIO(image_png)).convert("RGB")
        prompt = fill_prompt(self.target.turns.template(history), question)
        inputs = dict(self.target.processor(images=image, text=prompt, return_tensors="pt"))
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return output[0, inputs["input_ids"].shape[1]:].tolist()


def measure_conversations(artifacts: Path, images: int = 8, turns: int = 3, max_new_tokens: int = 48,
                          tick: Callable[[], None] = lambda: None, regime: str | None = None) -> dict:
    """Per configuration, the turns of every conversation (see the module docstring)."""
    from covspec.bench.harness.workload import toy_questions
    from covspec.runtime_device.options import DraftingOptions

    references = References(max_new_tokens)
    pictures = [question.image_png for question in toy_questions(images)]
    report = {"images": images, "turns": turns, "max_new_tokens": max_new_tokens, "regime": regime,
              "configurations": {}}
    with _toy_edge(regime) as edge, _device(artifacts, edge.address, regime) as device:
        warm_up(device, pictures[0])
        for name, fields in CONFIGURATIONS.items():
            rows = []
            for picture in pictures:
                rows.append(_conversation(device, picture, turns, DraftingOptions(**fields), max_new_tokens,
                                          references))
                tick()
            report["configurations"][name] = {"conversations": rows, "summary": summarize(rows)}
    return report


def memory_over_turns(artifacts: Path, turns: int = 10, max_new_tokens: int = 48,
                      regime: str | None = None) -> list[dict]:
    """Per turn of one long conversation: context, edge KV bytes, draft KV bytes, device peak RSS."""
    from covspec.bench.harness.edge import ask
    from covspec.bench.harness.workload import toy_questions
    from covspec.protocol.messages import Ping
    from covspec.runtime_device.conversation import Conversation
    from covspec.runtime_device.memory import peak_rss_mb
    from covspec.runtime_device.options import GenerationSettings
    from covspec.runtime_device.stats import GenerationStats

    picture = toy_questions(1)[0].image_png
    rows = []
    with _toy_edge(regime) as edge, _device(artifacts, edge.address, regime) as device:
        with Conversation(device, picture, GenerationSettings(max_new_tokens=max_new_tokens)) as chat:
            for number in range(turns):
                events: list[dict] = []
                stats = GenerationStats()
                list(chat.ask(QUESTIONS[number % len(QUESTIONS)], stats=stats, trace=events.append))
                pong = ask(edge.address, Ping(session="", seq=0))
                rows.append({"turn": number + 1, "answer_tokens": len(chat.last_tokens),
                             "edge_kv_bytes": None if pong is None else pong.kv_bytes,
                             "draft_kv_bytes": device.draft.drafter.cache.nbytes,
                             "draft_context_rows": device.draft.drafter.context_len + device.draft.drafter.generated,
                             "device_peak_rss_mb": round(peak_rss_mb(), 1), "ttft_s": stats.ttft_s,
                             "bytes_up": stats.bytes_up})
    return rows


def warm_up(device, picture: bytes) -> None:
    """One untimed question: the cold edge's first forwards and the draft's first runs."""
    from covspec.runtime_device.options import GenerationSettings

    list(device.generate(picture, QUESTIONS[0], GenerationSettings(max_new_tokens=4)))


def _conversation(device, picture: bytes, turns: int, options, max_new_tokens: int, references: References) -> list:
    """One conversation's rows. Each answer is checked after the conversation, against the
    history it was asked after: the target's own generation in this process, between timed
    turns, would leave torch's worker threads spinning on the cores the next turn needs."""
    from covspec.runtime_device.conversation import Conversation
    from covspec.runtime_device.options import GenerationSettings
    from covspec.runtime_device.stats import GenerationStats

    rows, answers = [], []
    with Conversation(device, picture, GenerationSettings(max_new_tokens=max_new_tokens), options) as chat:
        for number in range(turns):
            stats = GenerationStats()
            list(chat.ask(QUESTIONS[number % len(QUESTIONS)], stats=stats))
            answers.append(chat.last_tokens)
            rows.append({"turn": number + 1, "tokens": stats.tokens,
                         "ttft_s": stats.ttft_s, "wall_s": stats.wall_s, "device_prefill_s": stats.device_prefill_s,
                         "bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down,
                         "mean_accepted": stats.mean_accepted, "rounds": stats.rounds})
        history = list(chat.history)
    for number, (row, answer) in enumerate(zip(rows, answers)):
        row["correct"] = answer == references.answer(picture, history[:number], QUESTIONS[number % len(QUESTIONS)])
    return rows


def summarize(conversations: list[list[dict]]) -> dict:
    """Medians per turn position, and the follow-ups' TTFT over the first turn's (per conversation)."""
    turns = len(conversations[0])
    by_turn = [[conversation[n] for conversation in conversations] for n in range(turns)]

    def median(rows, key):
        return statistics.median(row[key] for row in rows)

    ratios = [row["ttft_s"] / conversation[0]["ttft_s"] for conversation in conversations for row in conversation[1:]]
    return {"wrong": sum(not row["correct"] for conversation in conversations for row in conversation),
            "answers": sum(len(conversation) for conversation in conversations),
            "turns": [{"turn": n + 1, **{key: median(rows, key) for key in
                                         ("ttft_s", "device_prefill_s", "bytes_up", "bytes_down", "tokens", "wall_s",
                                          "mean_accepted")}} for n, rows in enumerate(by_turn)],
            "follow_up_ttft_ratio": statistics.median(ratios) if ratios else None}


@contextmanager
def _toy_edge(regime: str | None):
    """The toy target served by an edge child (paced to ``regime``'s target) for a ``with``."""
    from covspec.bench.harness.edge import start_edge
    from covspec.toy.models import bundled_model_dir

    with tempfile.TemporaryDirectory() as folder:
        edge = start_edge(bundled_model_dir("target"), "tcp://127.0.0.1:*", Path(folder) / "edge.log", regime=regime)
        try:
            yield edge
        finally:
            edge.stop()


@contextmanager
def _device(artifacts: Path, address: str, regime: str | None):
    """A ``CoInference`` on ``artifacts`` (paced to ``regime``'s phone) against ``address`` for a ``with``."""
    from covspec.regime import device_pacing
    from covspec.runtime_device.artifact import DraftArtifact
    from covspec.runtime_device.client import Backoff, EdgeClient
    from covspec.runtime_device.engine import CoInference

    client = EdgeClient(address, Backoff(timeout_s=10))
    try:
        yield CoInference(DraftArtifact.load(artifacts, threads=1, pacing=device_pacing(regime)), client)
    finally:
        client.close()
