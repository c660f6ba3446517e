"""Benchmark questions: held-out ShapesVQA test scenes, as a device would send them."""

from __future__ import annotations

import io
from dataclasses import dataclass


@dataclass(frozen=True)
class Question:
    scene: int
    qtype: str
    question: str
    answer: str
    image_png: bytes


def toy_questions(count: int, describe_share: float = 0.5, first_scene: int = 0) -> list[Question]:
    """``count`` test-split questions, about ``describe_share`` of them descriptions (the
    long answers where decoding time matters), the rest short answers of every type."""
    from covspec.toy import shapes

    import itertools

    describe_target = round(count * describe_share)
    short_types = [t for t in shapes.QUESTION_TYPES if t != "describe"]
    picked: list[Question] = []
    describe = short = 0
    for index in itertools.count(first_scene):
        take_describe = describe < describe_target and (index % 2 == 0 or short >= count - describe_target)
        wanted = "describe" if take_describe else short_types[short % len(short_types)]
        qa = next((qa for qa in shapes.sample("test", index).qas if qa.type == wanted), None)
        if qa is None:
            continue
        png = io.BytesIO()
        shapes.sample("test", index).image().save(png, format="PNG")
        picked.append(Question(index, qa.type, qa.question, qa.answer, png.getvalue()))
        describe += take_describe
        short += not take_describe
        if len(picked) == count:
            return picked


def follow_ups(questions: list[Question], per_scene: int, describe_only: bool) -> list[Question]:
    """Each of ``questions`` followed by ``per_scene - 1`` more about its scene, with the same
    image bytes: its scene's other questions in turn (follow-ups), or with ``describe_only``
    the same description again (many devices asking about one picture)."""
    from covspec.toy import shapes

    asked: list[Question] = []
    for question in questions:
        scene = [question] + [Question(question.scene, qa.type, qa.question, qa.answer, question.image_png)
                              for qa in shapes.sample("test", question.scene).qas
                              if qa.type != question.qtype and not describe_only]
        asked += [scene[i % len(scene)] for i in range(per_scene)]
    return asked
